"""Training: the eps-prediction objective with Adam, EMA, gradient accumulation and clipping,
mixed precision and data parallelism, resumable from its last checkpoint.

Randomness is a pure function of (seed, epoch, rank): each epoch reseeds its data order, flips,
timesteps, noise and dropout, so a run resumed at an epoch boundary replays exactly what an
uninterrupted run would have done; on the CPU its final weights are bitwise equal.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ddpm import checkpoint, diffusion, networks, previews
from ddpm.data import load_cifar10
from ddpm.ema import EMA
from ddpm.errors import Interrupted, PipelineError
from ddpm.files import write_json, write_tsv
from ddpm.images import save_png, to_float
from ddpm.params import Params, plain
from ddpm.runs import CHECKPOINT, RunFolders, run_id
from ddpm.runtime import (MemoryMonitor, World, autocast, derive_seed, resolve_compile,
                           resolve_precision)

LOSS_HEADER = ["step", "loss", "images_per_second"]
# train.* keys that do not change the optimisation: a checkpoint resumes across changes to them.
RESUME_IGNORES = ("epochs", "gpus", "compile", "checkpoint_every", "sample_every",
                  "preview_images", "preview_steps", "log_every")


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on (a non-finite loss, out of memory); says what to change."""


@dataclass(frozen=True)
class TrainPaths:
    cifar: Path        # extracted CIFAR-10 batches (input)
    checkpoints: Path  # persistent DVC output: the finished run's last.pt and preview grids
    runs: Path         # outside DVC: unfinished runs' last.pt and grids, one folder per config
    ema: Path          # the EMA weights that sample reads
    metrics: Path      # metrics/train.json
    loss: Path         # plots/train/loss.tsv
    samples: Path      # plots/samples/: preview grids for dvc plots


@dataclass
class Progress:
    epoch: int = 0         # completed epochs
    step: int = 0          # optimizer steps
    seconds: float = 0.0   # time spent in training steps, over all sessions
    loss: float = float("nan")
    rows: list[list[float]] = field(default_factory=list)  # loss.tsv: step, loss, images/s


def learning_rate(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of optimizer step `step` (0 = the first): linear warmup from 0 over
    warmup_steps steps, as in Ho et al.'s code (lr * min(step / warmup, 1)); then constant."""
    return lr * min(step / warmup_steps, 1.0) if warmup_steps else lr


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, 3, H, W) on the device -> float [-1, 1], each image flipped left-right w.p. 1/2."""
    x = to_float(images)
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class Trainer:
    """One training run; `run()` resumes from the last checkpoint if it fits, else starts fresh."""

    def __init__(self, params: Params, paths: TrainPaths, world: World, device: torch.device,
                 images: torch.Tensor | None = None):
        """images: (N, 3, 32, 32) uint8 to train on instead of paths.cifar (benchmarks)."""
        self.p, self.tp, self.paths, self.world, self.device = params, params.train, paths, world, device
        self.precision = resolve_precision(self.tp.precision, device)
        if images is None:
            images = torch.from_numpy(load_cifar10(paths.cifar, "train", params.data.limit))
        self.data_digest = hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest()[:16]
        self.images = images.to(device)  # (N, 3, 32, 32) uint8, resident on the device
        self.global_batch = self.tp.batch_size * self.tp.grad_accum * world.size
        self.steps_per_epoch = len(self.images) // self.global_batch
        if self.steps_per_epoch == 0:
            raise TrainingError(f"{len(self.images)} training images cannot fill one optimizer step "
                                f"of {self.global_batch} images (train.batch_size x grad_accum x "
                                "gpus): raise data.limit or lower those")
        self.sched = diffusion.Schedule(**dataclasses.asdict(params.diffusion)).to(device)
        torch.manual_seed(derive_seed(params.seed, "init"))
        self.model = networks.build(params.model).to(device)
        # NHWC for cuDNN's tensor-core convolutions. Unmeasured for training: at batch 32 an H100
        # waits on kernel launches either way, and NHWC slowed eager sampling there (README).
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, self.tp.ema_decay, self.tp.ema_warmup)
        # Fused Adam: one kernel over all parameters, on GPUs and (torch >= 2.4) CPUs alike.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.tp.lr, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.net = self.model
        if world.size > 1:
            ids = [device] if device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.compiled = resolve_compile(self.tp.compile, device)
        if self.compiled:
            self.net = torch.compile(self.net)
        self.memory = MemoryMonitor(device)
        self.config = self._resume_config()
        self.folders = RunFolders(paths.checkpoints, paths.runs / run_id(self.config))
        self.progress = Progress()
        self.resumable: tuple[Path, int] | None = None  # the checkpoint a rerun starts from, epoch

    # -- checkpoints ------------------------------------------------------------------------

    def _resume_config(self) -> dict:
        """Everything a checkpoint must share with this run for resuming to be exact."""
        train = {k: v for k, v in dataclasses.asdict(self.tp).items() if k not in RESUME_IGNORES}
        return plain({"seed": self.p.seed, "data_limit": self.p.data.limit, "data": self.data_digest,
                "model": dataclasses.asdict(self.p.model),
                "diffusion": dataclasses.asdict(self.p.diffusion),
                "train": dict(train, precision=self.precision), "world_size": self.world.size})

    def resume(self) -> str:
        """Load the most advanced checkpoint that belongs to this run (this config's unfinished
        one, or the published one of a finished run); return what happened, in words."""
        found, notes = None, []
        for path in self.folders.checkpoints():
            if not path.exists():
                continue
            try:
                state = checkpoint.load(path)
            except checkpoint.CheckpointError as e:
                notes.append(f"{e}: not resumed")
                continue
            differs = checkpoint.differences(state.get("resume_config", {}), self.config)
            if differs:
                notes.append(f"{path} is from another run ({', '.join(differs)} differ)")
            elif state["progress"]["epoch"] > self.tp.epochs:
                notes.append(f"{path} is at epoch {state['progress']['epoch']}, beyond "
                             "train.epochs")
            elif found is None or state["progress"]["step"] > found[1]["progress"]["step"]:
                found = path, state
        if found is None:
            return "; ".join(notes + ["starting at epoch 0" if not notes else "starting fresh"])
        path, state = found
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        self.resumable = path, self.progress.epoch
        if self.world.main:
            self.folders.adopt_previews(path)
        return f"resuming from {path} at epoch {self.progress.epoch}"

    def save_checkpoint(self) -> None:
        checkpoint.save({
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "progress": dataclasses.asdict(self.progress), "resume_config": self.config,
            "config": self.p.to_dict(),
        }, self.folders.work / CHECKPOINT)
        self.resumable = self.folders.work / CHECKPOINT, self.progress.epoch

    # -- the loop ---------------------------------------------------------------------------

    def optimizer_step(self, micro_batches: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """grad_accum micro-batches (index rows) -> one Adam step and one EMA update; the loss."""
        total = torch.zeros((), device=self.device)
        for i, idx in enumerate(micro_batches):
            x0 = augment(self.images[idx], gen)
            if self.device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            last = i == len(micro_batches) - 1
            no_sync = self.net.no_sync() if self.world.size > 1 and not last else contextlib.nullcontext()
            with no_sync, autocast(self.precision, self.device):
                loss = diffusion.loss(self.net, self.sched, x0, gen) / len(micro_batches)
            self.scaler.scale(loss).backward()
            total += loss.detach()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.tp.lr, self.tp.warmup_steps, self.progress.step)
        if self.tp.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tp.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model, self.progress.step)
        return total

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world.size > 1:
            torch.distributed.all_reduce(value)
            value = value / self.world.size
        return value.item()

    def run_epoch(self, epoch: int, bar: tqdm) -> None:
        """One pass over the data: order, flips, t, noise and dropout seeded by (seed, epoch, rank)."""
        seed, rank, world = self.p.seed, self.world.rank, self.world.size
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(
            derive_seed(seed, epoch, "order"))).to(self.device)
        gen = torch.Generator(self.device).manual_seed(derive_seed(seed, epoch, rank, "noise"))
        torch.manual_seed(derive_seed(seed, epoch, rank, "dropout"))
        self.model.train()
        epoch_loss = window_loss = torch.zeros((), device=self.device)
        window_start, window_steps, start = time.perf_counter(), 0, time.perf_counter()
        for s in range(self.steps_per_epoch):
            batch = order[s * self.global_batch:(s + 1) * self.global_batch]
            micro = batch.view(self.tp.grad_accum, world, self.tp.batch_size)[:, rank]
            loss = self.optimizer_step(micro, gen)
            epoch_loss, window_loss = epoch_loss + loss, window_loss + loss
            self.progress.step += 1
            window_steps += 1
            bar.update(1)
            if self.progress.step % self.tp.log_every == 0 or s == self.steps_per_epoch - 1:
                mean = self._mean_over_ranks(window_loss) / window_steps  # syncs: only here
                rate = window_steps * self.global_batch / (time.perf_counter() - window_start)
                self.progress.rows.append([self.progress.step, mean, rate])
                self._check_finite(mean)
                bar.set_postfix(epoch=epoch + 1, loss=f"{mean:.4f}", img_s=f"{rate:.1f}", refresh=False)
                self.memory.sample()
                window_loss, window_start, window_steps = torch.zeros((), device=self.device), time.perf_counter(), 0
        self.progress.loss = self._mean_over_ranks(epoch_loss) / self.steps_per_epoch
        self.progress.seconds += time.perf_counter() - start
        self.progress.epoch = epoch + 1
        self._check_finite(self.progress.loss)

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} at optimizer step {self.progress.step}: training stopped "
                f"and the last good checkpoint is kept in {self.folders.work}. Lower "
                f"train.lr (now {self.tp.lr}) or use train.precision=fp32 or bf16")

    def run(self) -> Progress:
        message = self.resume()
        if self.world.main:
            for folder, size in self.folders.others():
                print(f"train: {folder} holds an unfinished run of another config ({size / 2**20:.0f}"
                      f" MiB; resumed if that config runs again, else rm -r it)", file=sys.stderr)
            print(f"train: {message}; {len(self.images)} images, {self.steps_per_epoch} steps per "
                  f"epoch of {self.global_batch} images ({self.world.size} process(es)), "
                  f"{self.precision} on {self.device}", file=sys.stderr, flush=True)
        if self.progress.epoch == 0 and self.world.main:
            previews.clear(self.folders.previews)
        total = self.tp.epochs * self.steps_per_epoch
        with tqdm(total=total, initial=self.progress.step, desc="train", unit="step",
                  disable=not self.world.main, dynamic_ncols=True) as bar:
            for epoch in range(self.progress.epoch, self.tp.epochs):
                try:
                    self.run_epoch(epoch, bar)
                    if self.world.main:
                        self.end_of_epoch()
                except torch.cuda.OutOfMemoryError:
                    raise TrainingError(self._oom_advice()) from None
                except KeyboardInterrupt:
                    raise self._interrupted(epoch) from None
                self.world.barrier()
        if self.world.main:
            self.write_outputs(final=True)
            self.folders.finish()
        return self.progress

    def _interrupted(self, epoch: int) -> BaseException:
        """Ctrl-C: one line saying where it stopped and how to go on (other ranks stay quiet)."""
        if not self.world.main:
            return SystemExit(130)
        kept = (f"its last checkpoint, {self.resumable[0]} (epoch {self.resumable[1]}), is kept"
                if self.resumable else "no checkpoint was written yet")
        return Interrupted(f"train: interrupted in epoch {epoch + 1} of {self.tp.epochs}; {kept}."
                           " Run the same command again (dvc repro, or dvc exp run with the same"
                           " -S values) to resume")

    def end_of_epoch(self) -> None:
        """Preview, then checkpoint: a kill in between only redoes this epoch's identical preview."""
        epoch = self.progress.epoch
        last = epoch == self.tp.epochs
        if self.tp.sample_every and (epoch % self.tp.sample_every == 0 or last):
            self.ema.model.eval()
            grid = previews.preview_grid(self.ema.model, self.sched, self.tp.preview_images,
                                         self.tp.preview_steps, self.p.seed, self.precision)
            save_png(grid, self.folders.previews / f"epoch_{epoch:04d}.png")
        if epoch % self.tp.checkpoint_every == 0 or last:
            self.save_checkpoint()
        self.write_outputs(final=False)

    def write_outputs(self, final: bool) -> None:
        """metrics/train.json and loss.tsv every epoch (dvc exp show follows a running run)."""
        pr = self.progress
        self.memory.sample()
        write_tsv(self.paths.loss, LOSS_HEADER, pr.rows)
        write_json(self.paths.metrics, {
            "loss": pr.loss, "epochs": pr.epoch, "steps": pr.step, "seconds": round(pr.seconds, 3),
            "images_per_second": round(pr.step * self.global_batch / max(pr.seconds, 1e-9), 3),
            "peak_memory_mb": round(self.memory.peak_mb, 1),
            "parameters": networks.parameter_count(self.model), "arch": self.p.model.arch,
            "effective_batch": self.global_batch, "processes": self.world.size,
            "precision": self.precision, "device": str(self.device.type), "compile": self.compiled,
        })
        previews.publish(self.folders.previews, self.paths.samples, pr.epoch)
        if final:
            checkpoint.save({"ema": self.ema.state_dict(), "config": self.p.to_dict(),
                             "epochs": pr.epoch, "steps": pr.step}, self.paths.ema)
            print(f"train: {pr.epoch} epochs, {pr.step} steps, loss {pr.loss:.4f}, "
                  f"{pr.step * self.global_batch / max(pr.seconds, 1e-9):.1f} images/s, peak "
                  f"memory {self.memory.peak_mb:.0f} MiB -> {self.paths.ema}", file=sys.stderr)

    def _oom_advice(self) -> str:
        bs, accum = self.tp.batch_size, self.tp.grad_accum
        return (f"CUDA out of memory at train.batch_size={bs} per GPU. Lower it and raise "
                f"train.grad_accum to keep the effective batch of {self.global_batch}, e.g. "
                f"dvc exp run -S train.batch_size={max(bs // 2, 1)} -S train.grad_accum={accum * 2}")
