"""The accelerator paths: bf16 and fp16 autocast, the fp16 gradient scaler, channels_last,
pynvml, torch.compile, resuming, and every stage of the pipeline on the device.

On the CUDA GPU where there is one, else on the CPU, where the CPU-meaningful cases run (the
scaler, bf16 and fp16 autocast, compiled against eager training; CI has no GPU): the GPU-only
ones (pynvml, CUDA graphs, compiled sampling's layout, the stages, which tests/e2e runs on the
CPU) skip there.
DDPM_TEST_DEVICE=cuda asks for the GPU (benchmarks/gpu_check.py), skipping all without one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._triton import has_triton

from ddpm import checkpoint, diffusion, networks
from ddpm.fid import folder_statistics
from ddpm.generate import for_sampling, generate
from ddpm.images import write_pngs
from ddpm.params import parse_params
from ddpm.runtime import MemoryMonitor, World, autocast, compile_mode, resolve_precision
from ddpm.batches import Draws, draw
from ddpm.train import Trainer
from fakes import cifar_images, run_stage, train_paths

DEVICE = torch.device(os.environ.get("DDPM_TEST_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                reason="no CUDA GPU here (DDPM_TEST_DEVICE=cuda)")
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="means something on a CUDA GPU only")


def gpu_params(tiny: dict, **train) -> dict:
    """tiny params on DEVICE, eager unless a test asks for train.compile."""
    raw = copy.deepcopy(tiny)
    raw["device"] = DEVICE.type
    raw["train"].update({"compile": False, **train})
    return raw


def trainer(tiny: dict, root, dataset_dir, **train) -> Trainer:
    return Trainer(parse_params(gpu_params(tiny, **train)), train_paths(root, dataset_dir), World(),
                   DEVICE)


def perturbed_unet(tiny: dict, **model) -> torch.nn.Module:
    """The network of tiny's model.* (with `model` overrides), its weights perturbed as after
    some training."""
    torch.manual_seed(0)
    model = networks.build(parse_params(dict(tiny, model=dict(tiny["model"], **model))).model,
                           (3, 32, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(DEVICE)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_loss_and_gradients_follow_fp32(tiny, precision):
    """The same batch, noise and timesteps under autocast: the loss within 1% of fp32's and the
    gradient pointing the same way (cosine > 0.99); in-place or dtype slips break either."""
    model = perturbed_unet(tiny, dropout=0.0).to(memory_format=torch.channels_last)
    sched = diffusion.Schedule(**tiny["diffusion"]).to(DEVICE)
    x0 = torch.rand(8, 3, 32, 32, device=DEVICE) * 2 - 1
    results = {}
    for prec in ("fp32", precision):
        model.zero_grad(set_to_none=True)
        gen = torch.Generator(DEVICE).manual_seed(0)
        with autocast(prec, DEVICE):
            loss = diffusion.loss(model, sched, x0, gen)
        loss.backward()
        assert loss.dtype == torch.float32
        results[prec] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    (loss32, grad32), (loss16, grad16) = results["fp32"], results[precision]
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(grad32, grad16, dim=0) > 0.99


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_runs_at_each_precision(tiny, dataset_dir, tmp_path, precision):
    if precision == "bf16" and ON_GPU and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    t = trainer(tiny, tmp_path, dataset_dir, precision=precision, sample_every=1)
    progress = t.run()
    metrics = json.loads((tmp_path / "train.json").read_text())
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["precision"] == precision and report["device"] == DEVICE.type
    assert np.isfinite(metrics["loss"]) and progress.step == 2 * t.steps_per_epoch
    assert metrics["peak_memory_mb"] > 0
    assert (tmp_path / "samples" / "epoch_0002.png").exists()
    if ON_GPU:  # NHWC weights for the tensor cores, kept through the optimizer and EMA
        for module in (t.state.model, t.state.ema.model):
            first_conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
            assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    scaler = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["scaler"]
    if precision == "fp16":  # the dynamic loss scale is live and saved for resuming
        assert scaler["scale"] > 1 and "_growth_tracker" in scaler
    else:
        assert scaler == {}


def test_resume_on_the_device_replays_the_uninterrupted_run(tiny, dataset_dir, tmp_path):
    """Stop after epoch 1, resume to 3: the same losses and weights as a run without a stop. Not
    bitwise on a GPU (cuDNN may pick reduction orders per call), but far closer than a replay
    with any other noise, data order or optimizer state would be."""
    straight = trainer(tiny, tmp_path / "a", dataset_dir, epochs=3, sample_every=0)
    straight.run()
    trainer(tiny, tmp_path / "b", dataset_dir, epochs=1, sample_every=0).run()
    resumed = trainer(tiny, tmp_path / "b", dataset_dir, epochs=3, sample_every=0)
    assert resumed.resume().startswith("resuming")
    resumed.run()

    def rows(folder):
        return np.array([[float(v) for v in row.split("\t")[:2]]
                         for row in (folder / "loss.tsv").read_text().splitlines()[1:]])
    np.testing.assert_allclose(rows(tmp_path / "b"), rows(tmp_path / "a"), rtol=1e-4)
    for a, b in zip(straight.state.model.state_dict().values(),
                    resumed.state.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# On a CPU, compiling takes inductor over a minute (C++ codegen, a cold cache): `-m slow` there
@pytest.mark.parametrize("mode", [pytest.param(True, marks=pytest.mark.slow if not ON_GPU else ()),
                                  pytest.param("reduce-overhead", marks=GPU_ONLY)])
def test_compiled_training_follows_eager(tiny, dataset_dir, tmp_path, mode):
    """train.compile, in the default mode and as CUDA graphs (reduce-overhead; on a CPU the same
    Python path without graphs): the compiled UNet's gradients are eager's, and three optimizer
    steps of 2 accumulation rounds give eager's losses. Without dropout: compiled code draws its
    masks from inductor's own generator. (Weights after Adam are no test: its first steps move
    every weight by about lr whatever the gradient's size, so a gradient near 0 flips sign on
    rounding alone; seen on an H100.)"""
    results = []
    no_dropout = dict(tiny, model=dict(tiny["model"], dropout=0.0))
    for compile in (False, mode):
        t = trainer(no_dropout, tmp_path / str(compile), dataset_dir, compile=compile,
                    batch_size=32, batch_gpu=16)
        expected = {False: None, True: "default"}.get(compile, compile)
        assert compile_mode(t.params.train.compile, DEVICE) == expected
        assert t.state.graphs == (expected == "reduce-overhead") and t.rounds == 2
        gen = torch.Generator(DEVICE).manual_seed(1)
        x0 = torch.rand(16, 3, 32, 32, device=DEVICE) * 2 - 1
        diffusion.loss(t.state.net, t.sched, x0, torch.Generator(DEVICE).manual_seed(0)).backward()
        grad = torch.cat([p.grad.flatten() for p in t.state.model.parameters()])
        t.state.optimizer.zero_grad(set_to_none=True)
        idx = torch.arange(32, device=DEVICE)
        results.append(([t.step(Draws(idx, *draw(gen, 32, t.sched.timesteps, t.shape))).item()
                         for _ in range(3)], grad))
    (eager_losses, eager_grad), (compiled_losses, compiled_grad) = results
    assert (compiled_grad - eager_grad).norm() <= 1e-3 * eager_grad.norm()
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)


@GPU_ONLY  # on a CPU, tests/test_sample.py checks both
def test_sampling_is_batch_independent_and_compiles_to_the_same_images(tiny, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 here
    params = parse_params(gpu_params(tiny))
    model = perturbed_unet(tiny)
    sched = diffusion.Schedule(**tiny["diffusion"]).to(DEVICE)
    outputs = {}
    for name, batch, mode in [("a", 6, None), ("b", 4, None), ("c", 6, "default")]:
        p = dataclasses.replace(params, sample=dataclasses.replace(params.sample, batch_size=batch))
        net = for_sampling(copy.deepcopy(model), mode)
        (tmp_path / name).mkdir()
        generate(net, sched, (3, 32, 32), p, "fp32", range(6), tmp_path / name, progress=False)
        outputs[name] = np.stack([np.asarray(Image.open(tmp_path / name / f"{i}.png"))
                                  for i in range(6)]).astype(int)
    assert outputs["a"].std() > 10
    for other in ("b", "c"):  # one quantisation level: other kernels may round differently
        assert np.abs(outputs["a"] - outputs[other]).max() <= 1
        assert (outputs["a"] == outputs[other]).mean() > 0.98


def test_inception_statistics_on_the_device_match_the_cpu(tmp_path, inception_weights,
                                                          monkeypatch):
    """real_stats on the GPU computes the CPU's mean and covariance. With TF32 off: by default
    cuDNN runs fp32 convolutions in TF32 on Ampere and newer, for pytorch-fid's CLI as for us."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    write_pngs(cifar_images("train", 8)[:40].transpose(0, 2, 3, 1), tmp_path)
    stats = {d: folder_statistics(tmp_path, 64, 8, str(inception_weights), torch.device(d))
             for d in ("cpu", DEVICE.type)}
    (mu_c, sigma_c, n_c), (mu_d, sigma_d, n_d) = stats["cpu"], stats[DEVICE.type]
    assert n_c == n_d == 40
    assert np.linalg.norm(mu_d - mu_c) <= 1e-4 * np.linalg.norm(mu_c)
    assert np.linalg.norm(sigma_d - sigma_c) <= 1e-4 * np.linalg.norm(sigma_c)


@pytest.mark.skipif(not ON_GPU, reason="pynvml reads GPUs only")
def test_pynvml_reads_this_gpus_memory():
    """The monitor finds this GPU through NVML (by UUID) and sees at least what PyTorch holds."""
    monitor = MemoryMonitor(DEVICE)
    assert monitor._handle is not None, "pynvml did not find the GPU"
    block = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    assert monitor.sample() >= torch.cuda.memory_reserved(DEVICE) / 2**20 >= 1024
    del block


@pytest.mark.skipif(not ON_GPU, reason="on a CPU the e2e tests run every stage")
def test_the_stages_run_on_the_device(tiny, tmp_path, inception_weights):
    """source -> download -> export_real -> real_stats -> train -> sample -> fid with device set,
    precision and compile auto: bf16 and torch.compile where the GPU has them, memory from
    pynvml."""
    over = {"device": DEVICE.type, "train__precision": "auto", "train__compile": "auto",
            "sample__compile": "auto"}
    for section in ("data", "model", "diffusion", "train", "sample", "fid"):
        for key, value in tiny[section].items():
            over.setdefault(f"{section}__{key}", value)
    steps = [("source.py", "--out", "source.json"),
             ("download.py", "--listing", "source.json", "--out", "dataset", "--report",
              "data.json"),
             ("export_real.py", "--data", "dataset", "--out", "real"),
             ("real_stats.py", "--images", "real", "--out", "real.npz"),
             ("train.py", "--data", "dataset", "--checkpoints", "ckpt", "--runs", "runs",
              "--ema", "ema.pt", "--metrics", "train.json", "--report", "train_report.json",
              "--loss", "loss.tsv", "--samples", "previews",
              "--real-stats", "real.npz", "--fid", "fid.tsv", "--curves", "curves"),
             ("sample.py", "--ema", "ema.pt", "--out", "samples", "--metrics", "sample.json",
              "--report", "sample_report.json", "--grid", "grid.png"),
             ("fid.py", "--images", "samples", "--real-stats", "real.npz", "--metrics", "fid.json",
              "--report", "fid_report.json")]
    for script, *args in steps:
        result = run_stage(script, tmp_path, *args, **over)
        assert result.returncode == 0, f"{script}:\n{result.stderr[-3000:]}"
        assert "pynvml unavailable" not in result.stderr
    expected = resolve_precision("auto", DEVICE)  # CPU: bf16 where native
    compiled = "default" if ON_GPU and has_triton() else "eager"  # train.compile, sample.compile
    if ON_GPU:
        assert expected == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    train = json.loads((tmp_path / "train_report.json").read_text())
    assert train["device"] == DEVICE.type and train["precision"] == expected
    assert train["compile"] == compiled
    assert json.loads((tmp_path / "train.json").read_text())["peak_memory_mb"] > 0
    sample = json.loads((tmp_path / "sample_report.json").read_text())
    assert sample["precision"] == expected and sample["compile"] == compiled
    assert np.isfinite(json.loads((tmp_path / "fid.json").read_text())["fid"])
