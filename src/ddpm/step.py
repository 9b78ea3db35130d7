"""One optimizer step as a plain function of the training state and the batch's draws, which the
trainer, the tests and the benchmarks call alike (EDM's training loop, nanoGPT's step).

The batch follows EDM (NVlabs/edm train.py): train.batch_size is the optimizer's batch over all
processes; each process takes its share of it in micro-batches that fit its memory
(train.batch_gpu), and the gradients add up to the whole batch's mean.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddpm import checkpoint, networks
from ddpm.batches import Draws, augment
from ddpm.ema import EMA
from ddpm.losses import Loss
from ddpm.params import Params
from ddpm.runtime import World, autocast, compile_mode, derive_seed


@dataclass
class Progress:
    epoch: int = 0         # completed epochs
    step: int = 0          # optimizer steps
    seconds: float = 0.0   # time spent in training steps, over all sessions
    loss: float = float("nan")
    rows: list[list[float]] = field(default_factory=list)  # loss.tsv: step, loss, images/s
    fid_rows: list[list[float]] = field(default_factory=list)  # fid.tsv's rows: FID_ROW


@dataclass
class TrainState:
    """What training updates and a checkpoint holds. `net` is `model` as the forward pass runs it
    (wrapped by DDP and torch.compile where they apply); clipping, EMA and checkpoints use
    `model` itself."""
    model: nn.Module
    net: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    graphs: bool = False   # net replays CUDA graphs (train.compile: reduce-overhead)
    progress: Progress = field(default_factory=Progress)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "progress": dataclasses.asdict(self.progress)}

    def refusal(self, state: dict[str, Any], steps_per_epoch: int | None = None) -> str | None:
        """What makes `state` (a checkpoint's content) no state of this training run, in words;
        None if it is one: the five parts, the model's and EMA's tensor names and shapes those
        of this network, the optimizer's state of its parameters, progress values of their
        types and in range (step = epoch x steps_per_epoch where that is given: checkpoints are
        written at the ends of epochs), and finite weights, moments and scale."""
        parts = ("model", "ema", "optimizer", "scaler", "progress")
        if missing := [part for part in parts if not isinstance(state.get(part), dict)]:
            return f"no {', '.join(missing)} state in it"
        for part, module in (("model", self.model), ("ema", self.ema.model)):
            if why := _weights_refusal(state[part], module.state_dict()):
                return f"its {part} weights {why}"
        if why := _optimizer_refusal(state["optimizer"], self.optimizer):
            return f"its optimizer state {why}"
        fresh = self.scaler.state_dict()  # {} when the scaler is off (not fp16)
        scaler = state["scaler"]
        if fresh and not (fresh.keys() <= scaler.keys() and all(
                _real(scaler[key]) and math.isfinite(scaler[key]) for key in fresh)):
            return "its gradient scaler state is not a finite scale and its settings"
        return _progress_refusal(state["progress"], steps_per_epoch)

    def load_state_dict(self, state: dict[str, Any], steps_per_epoch: int | None = None) -> None:
        """Load a checkpoint's state; one that refusal() refuses is a ValueError saying why,
        before anything is loaded."""
        if why := self.refusal(state, steps_per_epoch):
            raise ValueError(f"not a training state of this run: {why}")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _some(names: Any, limit: int = 3) -> str:
    names = sorted(map(str, names))
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                       else "")


def _weights_refusal(weights: dict, fresh: dict[str, torch.Tensor]) -> str | None:
    """What keeps `weights` from being a state_dict of the network whose state_dict is `fresh`."""
    if missing := fresh.keys() - weights.keys():
        return f"lack {_some(missing)}"
    if extra := weights.keys() - fresh.keys():
        return f"hold tensors this network has not ({_some(extra)})"
    for name, tensor in fresh.items():
        saved = weights[name]
        if not isinstance(saved, torch.Tensor) or saved.shape != tensor.shape or (
                saved.is_floating_point() != tensor.is_floating_point()):
            what = (f"{tuple(saved.shape)} {saved.dtype}" if isinstance(saved, torch.Tensor)
                    else type(saved).__name__)
            return (f"do not fit this network: {name} is {what}, the network's "
                    f"{tuple(tensor.shape)} {tensor.dtype}")
    if bad := checkpoint.non_finite(weights):
        return f"hold NaN or infinite values ({_some(bad)})"
    return None


def _optimizer_refusal(saved: dict, optimizer: torch.optim.Optimizer) -> str | None:
    """What keeps `saved` from being the state_dict of `optimizer` (Adam over this network)."""
    fresh = optimizer.state_dict()
    groups = saved.get("param_groups")
    if not isinstance(saved.get("state"), dict) or not isinstance(groups, list):
        return "is not an optimizer's (no state and param_groups)"
    if len(groups) != len(fresh["param_groups"]) or any(
            not isinstance(group, dict) or group.get("params") != ref["params"]
            for group, ref in zip(groups, fresh["param_groups"])):
        return "is not of this network's parameters"
    shapes = [p.shape for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved["state"].items():
        if not (type(index) is int and 0 <= index < len(shapes) and isinstance(values, dict)):
            return f"names a parameter {str(index)[:20]} this network has not"
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                return f"holds a {type(value).__name__} as parameter {index}'s {name}"
            if value.dim() and value.shape != shapes[index]:
                return (f"does not fit this network: parameter {index}'s {name} is "
                        f"{tuple(value.shape)}, the parameter {tuple(shapes[index])}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"holds NaN or infinite values (parameter {index}'s {name})"
    return None


def _progress_refusal(progress: dict, steps_per_epoch: int | None) -> str | None:
    """What keeps `progress` from being a Progress of a run at the end of an epoch."""
    names = {f.name for f in dataclasses.fields(Progress)}
    if missing := names - progress.keys():
        return f"its progress lacks {_some(missing)}"
    if extra := progress.keys() - names:
        return f"its progress holds unknown keys ({_some(extra)})"
    epoch, step, seconds, loss = (progress[k] for k in ("epoch", "step", "seconds", "loss"))
    if type(epoch) is not int or epoch < 0:
        return f"its progress.epoch is {str(epoch)[:20]}, not a count of epochs (0 or more)"
    if type(step) is not int or step < 0:
        return f"its progress.step is {str(step)[:20]}, not a count of steps (0 or more)"
    if steps_per_epoch is not None and step != epoch * steps_per_epoch:
        return (f"its progress.step {step} is not its epoch {epoch} x {steps_per_epoch} steps "
                "per epoch")
    if not (_real(seconds) and math.isfinite(seconds) and seconds >= 0):
        return f"its progress.seconds is {str(seconds)[:20]}, not a duration"
    if not (_real(loss) and (math.isfinite(loss) or epoch == 0)):
        return f"its progress.loss is {str(loss)[:20]}, not a finite loss"
    for key, widths in (("rows", (len(LOSS_ROW),)), ("fid_rows", (FID_ROW_BEFORE_KID,
                                                                   len(FID_ROW)))):
        rows = progress[key]
        if not isinstance(rows, list) or not all(
                isinstance(row, list) and len(row) in widths and all(map(_real, row))
                for row in rows):
            return (f"its progress.{key} is not a list of rows of "
                    f"{' or '.join(map(str, widths))} numbers")
    return None


LOSS_ROW = ("step", "loss", "images_per_second")  # a row of Progress.rows
FID_ROW = ("epoch", "step", "fid", "seconds", "kid", "kid_std")  # a row of Progress.fid_rows
FID_ROW_BEFORE_KID = 4  # the first four: checkpoints of before KID resume (no KID: nan)


def new_state(params: Params, shape: Sequence[int], precision: str, device: torch.device,
              world: World, dtype: torch.dtype = torch.float32, classes: int = 0) -> TrainState:
    """A fresh network for images of `shape` (C, H, W) (and `classes` labels, if
    model.conditional), initialised from params.seed, its EMA copy, fused Adam and the fp16
    gradient scaler (a no-op in other precisions); the forward wrapped for DDP and compile.
    dtype: of the weights, float64 only to check exactness (tests)."""
    torch.manual_seed(derive_seed(params.seed, "init"))
    model = networks.build(params.model, shape, classes).to(device, dtype)
    if device.type == "cuda":  # NHWC for cuDNN's tensor-core convolutions
        model = model.to(memory_format=torch.channels_last)
    net = model
    if world.size > 1:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if (mode := compile_mode(params.train.compile, device)) is not None:
        net = torch.compile(net, mode=mode)  # reduce-overhead: forward and backward as CUDA graphs
    return TrainState(model, net, EMA(model, params.train.ema_decay, params.train.ema_warmup),
                      torch.optim.Adam(model.parameters(), lr=params.train.lr, fused=True),
                      torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                      graphs=mode == "reduce-overhead")


def learning_rate(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of optimizer step `step` (0 = the first): linear warmup from 0 over
    warmup_steps steps, as in Ho et al.'s code (lr * min(step / warmup, 1)); then constant."""
    return lr * min(step / warmup_steps, 1.0) if warmup_steps else lr


def train_step(state: TrainState, loss_fn: Loss, images: torch.Tensor, draws: Draws, micro: int,
               precision: str, lr: float, grad_clip: float) -> torch.Tensor:
    """One Adam step and one EMA update from this process's share of the batch, in micro-batches
    of `micro` images. loss_fn: the objective (ddpm.losses); images: the (N, C, H, W) uint8 data
    set on the device. Returns the share's mean loss, a 0-dim tensor left on the device (reading
    it would synchronise)."""
    model, dtype = state.model, next(state.model.parameters()).dtype
    rounds = len(draws.idx) // micro
    total = torch.zeros((), device=images.device)

    # Accumulate gradients: each micro-batch's mean loss / rounds, so that they add up to the
    # share's mean (and DDP's average over the processes, synchronised in the last round only,
    # makes it the whole batch's).
    for j in range(rounds):
        part = slice(j * micro, (j + 1) * micro)
        x0 = augment(images[draws.idx[part]], draws.flip[part]).to(dtype)
        labels = None if draws.labels is None else draws.labels[part]
        if x0.is_cuda:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        no_sync = getattr(state.net, "no_sync", None)  # DDP's, through torch.compile too
        if state.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are used
        with (no_sync() if no_sync and j < rounds - 1 else contextlib.nullcontext(),
              autocast(precision, x0.device)):
            loss = loss_fn(state.net, x0, draws.t[part], draws.noise[part].to(dtype),
                           labels) / rounds
        state.scaler.scale(loss).backward()
        total += loss.detach()

    # Update weights: the clipped (unscaled) gradients, then Adam, which the fp16 scaler skips
    # when they overflowed.
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    if grad_clip:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)

    # Update EMA.
    state.ema.update(model, state.progress.step)
    return total
