"""The training step (ddpm.step.train_step) observed where it acts: the gradient that reaches the
optimizer (clipped, unscaled) and the EMA that the trainer keeps over a run."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from fakes import cifar_images, train_paths

from ddpm import batches, diffusion, losses
from ddpm.batches import Draws
from ddpm.params import parse_params
from ddpm.runtime import World
from ddpm.step import new_state, train_step
from ddpm.train import Trainer

CPU = torch.device("cpu")
BATCH, MICRO = 8, 4  # two accumulation rounds: the clip acts on the sum of both


def step_params(tiny: dict):
    raw = copy.deepcopy(tiny)
    raw["model"]["dropout"] = 0.0  # the reference gradient below must see the same network
    raw["train"].update(batch_size=BATCH, batch_gpu=MICRO, precision="fp32")
    return parse_params(raw)


@pytest.fixture
def batch(tiny):
    """(images, draws) of one optimizer step of 8 fake CIFAR images."""
    images = torch.from_numpy(cifar_images("train", per_batch=4))[:BATCH]
    generator = torch.Generator().manual_seed(0)
    flip, t, noise = batches.draw(generator, BATCH, tiny["diffusion"]["timesteps"],
                                 (3, 32, 32))
    return images, Draws(torch.arange(BATCH), flip, t, noise)


def at_the_optimizer_step(tiny, batch, precision: str, dtype: torch.dtype, grad_clip: float,
                          init_scale: float | None = None) -> tuple[torch.Tensor, float]:
    """One train_step from the initial weights; the gradient the optimizer applies, flat (the
    fused Adam that the fp16 scaler drives unscales what is still scaled: divided out here), and
    the scale the fp16 scaler used (1 without it)."""
    params = step_params(tiny)
    sched = diffusion.Schedule(**tiny["diffusion"])
    state = new_state(params, (3, 32, 32), precision, CPU, World(), dtype)
    if init_scale is not None:  # a scale whose first step does not overflow in fp16
        state.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    scale = state.scaler.get_scale() if state.scaler.is_enabled() else 1.0
    seen, optimizer_step = [], state.optimizer.step

    def recording(*args, **kwargs):
        grad = torch.cat([p.grad.flatten() for p in state.model.parameters()]).double()
        divisor = getattr(state.optimizer, "grad_scale", None)  # set by GradScaler.step
        assert not float(getattr(state.optimizer, "found_inf", 0.0)), "fp16 overflow: no step"
        seen.append(grad / (float(divisor) if divisor is not None else 1.0))
        return optimizer_step(*args, **kwargs)

    state.optimizer.step = recording
    images, draws = batch
    train_step(state, losses.Loss(sched), images, draws, MICRO, precision, params.train.lr,
               grad_clip)
    assert len(seen) == 1, "the optimizer did not step exactly once"
    return seen[0], scale


def reference_gradient(tiny, batch) -> torch.Tensor:
    """The gradient of the batch's mean loss, by one float64 forward+backward of the whole batch
    on the same initial network: no micro-batches, no clip, no scaler."""
    params = step_params(tiny)
    model = new_state(params, (3, 32, 32), "fp32", CPU, World(), torch.float64).model
    images, draws = batch
    x0 = batches.augment(images[draws.idx], draws.flip).double()
    sched = diffusion.Schedule(**tiny["diffusion"])
    diffusion.loss(model, sched, x0, t=draws.t, noise=draws.noise.double()).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_the_gradient_is_clipped_to_train_grad_clip_above_it_and_untouched_below(tiny, batch):
    """float64: at the optimizer step the gradient is the batch's (the reference), scaled to norm
    grad_clip when its norm is above it (the same direction), and bitwise the unclipped one
    when below it or when grad_clip is 0."""
    raw = reference_gradient(tiny, batch)
    norm = raw.norm().item()
    assert norm > 0
    unclipped, _ = at_the_optimizer_step(tiny, batch, "fp32", torch.float64, 0.0)
    torch.testing.assert_close(unclipped, raw, rtol=1e-10, atol=1e-14)

    clip = 0.25 * norm
    clipped, _ = at_the_optimizer_step(tiny, batch, "fp32", torch.float64, clip)
    assert clipped.norm().item() == pytest.approx(clip, rel=1e-5)  # torch's clip: norm + 1e-6
    torch.testing.assert_close(clipped, raw * (clip / norm), rtol=1e-5, atol=1e-14)

    below, _ = at_the_optimizer_step(tiny, batch, "fp32", torch.float64, 4.0 * norm)
    assert torch.equal(below, unclipped)


def test_with_the_fp16_scaler_the_clip_acts_on_unscaled_gradients(tiny, batch):
    """fp16 autocast with the gradient scaler (scale 1024): the gradient that Adam applies has
    norm grad_clip, not grad_clip / scale (a clip of the scaled gradients), and below the clip
    it is the unscaled gradient of the same step without clipping."""
    unclipped, scale = at_the_optimizer_step(tiny, batch, "fp16", torch.float32, 0.0, 1024.0)
    assert scale == 1024.0
    norm = unclipped.norm().item()
    # fp16 autocast against the float64 reference: the same gradient to fp16's precision
    assert norm == pytest.approx(reference_gradient(tiny, batch).norm().item(), rel=1e-2)

    clip = 0.25 * norm
    clipped, _ = at_the_optimizer_step(tiny, batch, "fp16", torch.float32, clip, 1024.0)
    assert clipped.norm().item() == pytest.approx(clip, rel=1e-4)
    torch.testing.assert_close(clipped, unclipped * (clip / norm), rtol=1e-4, atol=1e-9)

    below, _ = at_the_optimizer_step(tiny, batch, "fp16", torch.float32, 4.0 * norm, 1024.0)
    torch.testing.assert_close(below, unclipped, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("warmup", [True, False])
def test_the_trainers_ema_is_the_closed_form_average_of_the_weight_history(
        tiny, dataset_dir, tmp_path, warmup):
    """Over 2 epochs of 3 steps, resumed after the first: with w_0 the initial weights, w_k those
    after step k and d_k the decay of update k (min(0.9, (1 + k) / (10 + k)) with train.ema_warmup,
    0.9 without), the EMA is prod_k d_k w_0 + sum_k (1 - d_k) prod_{j>k} d_j w_{k+1}: the step
    count goes on across the resume."""
    raw = copy.deepcopy(tiny)
    raw["train"].update(ema_decay=0.9, ema_warmup=warmup, sample_every=0)
    history = []

    def trainer(epochs: int) -> Trainer:
        t = Trainer(parse_params(dict(raw, train=dict(raw["train"], epochs=epochs))),
                    train_paths(tmp_path, dataset_dir), World(), CPU, dtype=torch.float64)
        real_step = t.step

        def recording(draws):
            loss = real_step(draws)
            history.append([p.detach().clone() for p in t.state.model.parameters()])
            return loss
        t.step = recording
        return t

    first = trainer(1)
    start = [p.detach().clone() for p in first.state.model.parameters()]
    first.run()
    second = trainer(2)
    assert second.resume().startswith("resuming") and second.state.progress.step == 3
    second.run()
    assert len(history) == 6

    decays = [min(0.9, (1 + k) / (10 + k)) if warmup else 0.9 for k in range(6)]
    if warmup:
        assert decays[0] == 0.1 and decays[5] == 6 / 15
    for i, ema in enumerate(second.state.ema.model.parameters()):
        expected = math.prod(decays) * start[i] + sum(
            (1 - decays[k]) * math.prod(decays[k + 1:]) * history[k][i] for k in range(6))
        torch.testing.assert_close(ema, expected, rtol=1e-12, atol=1e-12)
    assert any(not torch.equal(history[-1][i], p) for i, p in enumerate(start))
