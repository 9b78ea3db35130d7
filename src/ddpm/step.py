"""One optimizer step as a plain function of the training state and the batch's draws, which the
trainer, the tests and the benchmarks call alike (EDM's training loop, nanoGPT's step).

The batch follows EDM (NVlabs/edm train.py): train.batch_size is the optimizer's batch over all
processes; each process takes its share of it in micro-batches that fit its memory
(train.batch_gpu), and the gradients add up to the whole batch's mean.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddpm import diffusion, networks
from ddpm.batches import Draws, augment
from ddpm.ema import EMA
from ddpm.params import Params
from ddpm.runtime import World, autocast, compile_mode, derive_seed


@dataclass
class Progress:
    epoch: int = 0         # completed epochs
    step: int = 0          # optimizer steps
    seconds: float = 0.0   # time spent in training steps, over all sessions
    loss: float = float("nan")
    rows: list[list[float]] = field(default_factory=list)  # loss.tsv: step, loss, images/s
    fid_rows: list[list[float]] = field(default_factory=list)  # fid.tsv: epoch, step, FID, s


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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])


def new_state(params: Params, shape: Sequence[int], precision: str, device: torch.device,
              world: World, dtype: torch.dtype = torch.float32) -> TrainState:
    """A fresh network for images of `shape` (C, H, W), initialised from params.seed, its EMA
    copy, fused Adam and the fp16 gradient scaler (a no-op in other precisions); the forward
    wrapped for DDP and compile. dtype: of the weights, float64 only to check exactness (tests)."""
    torch.manual_seed(derive_seed(params.seed, "init"))
    model = networks.build(params.model, shape).to(device, dtype)
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


def train_step(state: TrainState, sched: diffusion.Schedule, images: torch.Tensor, draws: Draws,
               micro: int, precision: str, lr: float, grad_clip: float) -> torch.Tensor:
    """One Adam step and one EMA update from this process's share of the batch, in micro-batches
    of `micro` images. images: the (N, C, H, W) uint8 data set on the device. Returns the
    share's mean loss, a 0-dim tensor left on the device (reading it would synchronise)."""
    model, dtype = state.model, next(state.model.parameters()).dtype
    rounds = len(draws.idx) // micro
    total = torch.zeros((), device=images.device)

    # Accumulate gradients: each micro-batch's mean loss / rounds, so that they add up to the
    # share's mean (and DDP's average over the processes, synchronised in the last round only,
    # makes it the whole batch's).
    for j in range(rounds):
        part = slice(j * micro, (j + 1) * micro)
        x0 = augment(images[draws.idx[part]], draws.flip[part]).to(dtype)
        if x0.is_cuda:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        no_sync = getattr(state.net, "no_sync", None)  # DDP's, through torch.compile too
        if state.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are used
        with (no_sync() if no_sync and j < rounds - 1 else contextlib.nullcontext(),
              autocast(precision, x0.device)):
            loss = diffusion.loss(state.net, sched, x0, t=draws.t[part],
                                  noise=draws.noise[part].to(dtype)) / rounds
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
