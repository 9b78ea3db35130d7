"""Training: the eps-prediction objective with Adam, EMA, gradient accumulation and clipping,
mixed precision and data parallelism, resumable from its last checkpoint.

The batch follows EDM (NVlabs/edm train.py): train.batch_size is the optimizer's batch over all
processes and defines the run; train.batch_gpu only caps how many images one process puts
through forward+backward at once, and the accumulation rounds follow from the two. Image k of
optimizer step s gets its data index, flip, t and noise from (seed, epoch) alone, drawn for the
whole batch on every process, so the split over processes and rounds changes only the dropout
masks and the summation order: a run checkpointed on 1 GPU resumes on 4.

Each epoch reseeds its streams, so a run resumed at an epoch boundary replays exactly what an
uninterrupted run would have done; on the CPU, for a fixed split, its final weights are bitwise
equal.
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

from ddpm import checkpoint, curves, diffusion, networks, previews
from ddpm.data import load_cifar10
from ddpm.ema import EMA
from ddpm.batches import augment, draw, resolve_batch_gpu
from ddpm.errors import Interrupted, TrainingError
from ddpm.evaluate import ema_fid
from ddpm.fid import load_statistics
from ddpm.files import write_json, write_tsv
from ddpm.images import save_png
from ddpm.params import Params, plain, split_batch
from ddpm.runs import CHECKPOINT, RunFolders, run_id
from ddpm.runtime import (MemoryMonitor, World, autocast, compile_mode, derive_seed,
                           resolve_precision)

LOSS_HEADER = ["step", "loss", "images_per_second"]
FID_HEADER = ["epoch", "step", "fid", "seconds"]
# train.* keys that do not change the optimisation: a checkpoint resumes across changes to them.
RESUME_IGNORES = ("epochs", "batch_gpu", "gpus", "compile", "checkpoint_every", "sample_every",
                  "preview_images", "preview_steps", "log_every", "fid_every", "fid_images",
                  "fid_steps")


def weights_config(params: Params) -> dict:
    """The params that models/ema.pt records: those its weights depend on. Not fid.*, sample.* or
    RESUME_IGNORES, so a finished run re-run after a change of them rewrites the same bytes."""
    p = params.to_dict()
    return {"seed": p["seed"], "device": p["device"], "data": {"limit": p["data"]["limit"]},
            "model": p["model"], "diffusion": p["diffusion"],
            "train": {k: v for k, v in p["train"].items() if k not in RESUME_IGNORES}}


@dataclass(frozen=True)
class TrainPaths:
    cifar: Path        # extracted CIFAR-10 batches (input)
    checkpoints: Path  # persistent DVC output: the finished run's last.pt and preview grids
    runs: Path         # outside DVC: unfinished runs' last.pt and grids, one folder per config
    ema: Path          # the EMA weights that sample reads
    metrics: Path      # metrics/train.json
    loss: Path         # plots/train/loss.tsv
    samples: Path      # plots/samples/: preview grids for dvc plots
    real_stats: Path   # data/real_stats.npz: the FID reference (read when train.fid_every > 0)
    fid: Path          # plots/train/fid.tsv: epoch, step, FID, seconds
    curves: Path | None = None  # plots/curves/: the loss and FID curves as PNGs (ddpm.curves)


@dataclass
class Progress:
    epoch: int = 0         # completed epochs
    step: int = 0          # optimizer steps
    seconds: float = 0.0   # time spent in training steps, over all sessions
    loss: float = float("nan")
    rows: list[list[float]] = field(default_factory=list)  # loss.tsv: step, loss, images/s
    fid_rows: list[list[float]] = field(default_factory=list)  # fid.tsv: epoch, step, FID, s


def learning_rate(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of optimizer step `step` (0 = the first): linear warmup from 0 over
    warmup_steps steps, as in Ho et al.'s code (lr * min(step / warmup, 1)); then constant."""
    return lr * min(step / warmup_steps, 1.0) if warmup_steps else lr


class Trainer:
    """One training run; `run()` resumes from the last checkpoint if it fits, else starts fresh."""

    def __init__(self, params: Params, paths: TrainPaths, world: World, device: torch.device,
                 images: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        """images: (N, 3, 32, 32) uint8 to train on instead of paths.cifar (benchmarks); dtype:
        of the weights, float64 only to check exactness (tests)."""
        self.p, self.tp, self.paths, self.world, self.device = params, params.train, paths, world, device
        self.precision = resolve_precision(self.tp.precision, device)
        if images is None:
            images = torch.from_numpy(load_cifar10(paths.cifar, "train", params.data.limit))
        self.data_digest = hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest()[:16]
        self.images = images.to(device)  # (N, 3, 32, 32) uint8, resident on the device
        self.batch = self.tp.batch_size  # the optimizer's batch, over all processes
        self.share = split_batch(self.batch, world.size, self.batch)[0]  # images per process
        self.steps_per_epoch = len(self.images) // self.batch
        if self.steps_per_epoch == 0:
            raise TrainingError(f"{len(self.images)} training images cannot fill one optimizer step "
                                f"of {self.batch} images (train.batch_size): raise data.limit or "
                                "lower train.batch_size")
        self.sched = diffusion.Schedule(**dataclasses.asdict(params.diffusion)).to(device)
        torch.manual_seed(derive_seed(params.seed, "init"))
        self.model = networks.build(params.model).to(device, dtype)
        # NHWC for cuDNN's tensor-core convolutions. Unmeasured for training: at batch 32 an H100
        # waits on kernel launches either way, and NHWC slowed eager sampling there (README).
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, self.tp.ema_decay, self.tp.ema_warmup)
        # Fused Adam: one kernel over all parameters, on GPUs and (torch >= 2.4) CPUs alike.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.tp.lr, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.micro, self.rounds = self._split()
        self.net = self.model
        if world.size > 1:
            ids = [device] if device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        # Eager, or torch.compile in a mode: "reduce-overhead" replays forward and backward as
        # CUDA graphs (shapes are static: every micro-batch has self.micro images).
        self.compile_mode = compile_mode(self.tp.compile, device)
        self.compiled = self.compile_mode is not None
        if self.compiled:
            self.net = torch.compile(self.net, mode=self.compile_mode)
        self.memory = MemoryMonitor(device)
        self.real_stats = None  # (mu, sigma) of the real images, for FIDs during training
        if self.tp.fid_every and world.main:  # read now: a missing file fails before training
            self.real_stats = load_statistics(paths.real_stats, params.fid.dims)[:2]
        self.config = self._resume_config()
        self.folders = RunFolders(paths.checkpoints, paths.runs / run_id(self.config))
        self.progress = Progress()
        self.resumable: tuple[Path, int] | None = None  # the checkpoint a rerun starts from, epoch

    # -- the batch ---------------------------------------------------------------------------

    def _split(self) -> tuple[int, int]:
        """(images per micro-batch, accumulation rounds), the same on every process."""
        micro = resolve_batch_gpu(self.tp.batch_gpu, self.share, self.device, self._fits)
        if self.world.size > 1:  # ranks must agree on the rounds (DDP syncs the last one)
            agreed = torch.tensor(micro, device=self.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            micro = int(agreed)
        _, micro, rounds = split_batch(self.batch, self.world.size, micro)
        if self.tp.batch_gpu == "auto" and self.world.main:
            print(f"train: batch_gpu auto -> {micro} images per forward pass, {rounds} round(s) "
                  f"per step of {self.batch}", file=sys.stderr, flush=True)
        return micro, rounds

    def _fits(self, images: int) -> bool:
        """One eager forward+backward of `images` random images: False if it ran out of memory.
        The probe leaves no gradients and does not advance any random stream."""
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), autocast(self.precision, self.device):
                x = torch.randn(images, 3, 32, 32, device=self.device,
                                dtype=next(self.model.parameters()).dtype)
                t = torch.randint(0, self.sched.timesteps, (images,), device=self.device)
                self.model(x, t).float().square().mean().backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            self.model.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- checkpoints ------------------------------------------------------------------------

    def _resume_config(self) -> dict:
        """Everything a checkpoint must share with this run for resuming to be exact."""
        train = {k: v for k, v in dataclasses.asdict(self.tp).items() if k not in RESUME_IGNORES}
        return plain({"seed": self.p.seed, "data_limit": self.p.data.limit, "data": self.data_digest,
                "model": dataclasses.asdict(self.p.model),
                "diffusion": dataclasses.asdict(self.p.diffusion),
                "train": dict(train, precision=self.precision)})

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

    def optimizer_step(self, idx: torch.Tensor, flip: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        """This process's share of one optimizer step (data indices and draws, self.share each)
        in self.rounds micro-batches -> one Adam step and one EMA update; the share's mean loss.

        Each micro-batch's mean loss is divided by the rounds, so the gradients add up to the
        share's mean, and DDP's average over processes makes it the whole batch's."""
        total = torch.zeros((), device=self.device)
        dtype = next(self.model.parameters()).dtype  # float32; float64 in exactness tests
        for j in range(self.rounds):
            part = slice(j * self.micro, (j + 1) * self.micro)
            x0 = augment(self.images[idx[part]], flip[part]).to(dtype)
            if self.device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            last = j == self.rounds - 1
            no_sync = self.net.no_sync() if self.world.size > 1 and not last else contextlib.nullcontext()
            if self.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are used
            with no_sync, autocast(self.precision, self.device):
                loss = diffusion.loss(self.net, self.sched, x0, t=t[part],
                                      noise=noise[part].to(dtype)) / self.rounds
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
        """One pass over the data: order, flips, t and noise seeded by (seed, epoch) and the same
        on every process; dropout by (seed, epoch, rank)."""
        seed, rank = self.p.seed, self.world.rank
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(
            derive_seed(seed, epoch, "order"))).to(self.device)
        gen = torch.Generator(self.device).manual_seed(derive_seed(seed, epoch, "noise"))
        torch.manual_seed(derive_seed(seed, epoch, rank, "dropout"))
        mine = slice(rank * self.share, (rank + 1) * self.share)
        self.model.train()
        epoch_loss = window_loss = torch.zeros((), device=self.device)
        window_start, window_steps, start = time.perf_counter(), 0, time.perf_counter()
        for s in range(self.steps_per_epoch):
            batch = order[s * self.batch:(s + 1) * self.batch]
            flip, t, noise = draw(gen, self.batch, self.sched.timesteps)
            loss = self.optimizer_step(batch[mine], flip[mine], t[mine], noise[mine])
            epoch_loss, window_loss = epoch_loss + loss, window_loss + loss
            self.progress.step += 1
            window_steps += 1
            bar.update(self.batch)
            if self.progress.step % self.tp.log_every == 0 or s == self.steps_per_epoch - 1:
                mean = self._mean_over_ranks(window_loss) / window_steps  # syncs: only here
                rate = window_steps * self.batch / (time.perf_counter() - window_start)
                self.progress.rows.append([self.progress.step, mean, rate])
                self._check_finite(mean)
                bar.set_postfix(epoch=f"{epoch + 1}/{self.tp.epochs}", loss=f"{mean:.4f}",
                                refresh=False)
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
                  f"epoch of {self.batch} images ({self.world.size} process(es) x {self.rounds} "
                  f"round(s) x {self.micro}), "
                  f"{self.precision} on {self.device}", file=sys.stderr, flush=True)
        if self.progress.epoch == 0 and self.world.main:
            previews.clear(self.folders.previews)
        # In images over the whole stage (all epochs, resumed ones included): tqdm's rate is then
        # images/s and its ETA the stage's, previews and checkpoints included.
        total = self.tp.epochs * self.steps_per_epoch * self.batch
        with tqdm(total=total, initial=self.progress.step * self.batch, desc="train", unit="img",
                  unit_scale=total >= 100_000, disable=not self.world.main,
                  dynamic_ncols=True) as bar:
            bar.set_postfix(epoch=f"{self.progress.epoch}/{self.tp.epochs}", refresh=False)
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
        if self.tp.fid_every and (epoch % self.tp.fid_every == 0 or last):
            self.evaluate_fid()
        if epoch % self.tp.checkpoint_every == 0 or last:
            self.save_checkpoint()
        self.write_outputs(final=False)

    def evaluate_fid(self) -> float:
        """FID of train.fid_images images of the EMA weights (deterministic DDIM, fid_steps;
        image i from the sample stage's seed of i) against the real statistics: the fid stage's
        computation on the same PNGs, which pass through a folder in this run's work folder. The
        seconds it takes are logged and kept out of the training throughput."""
        tp, epoch, start = self.tp, self.progress.epoch, time.perf_counter()
        self.ema.model.eval()
        value = ema_fid(self.ema.model, self.sched, self.p, self.precision, self.real_stats,
                        self.folders.work / "fid_images", f"train: FID at epoch {epoch}, Inception")
        seconds = time.perf_counter() - start
        self.progress.fid_rows.append([epoch, self.progress.step, value, round(seconds, 3)])
        print(f"train: epoch {epoch}: FID {value:.2f} ({tp.fid_images} images, DDIM-"
              f"{tp.fid_steps}, vs {self.paths.real_stats}) in {seconds:.0f} s", file=sys.stderr,
              flush=True)
        return value

    def write_outputs(self, final: bool) -> None:
        """metrics/train.json and loss.tsv every epoch (dvc exp show follows a running run)."""
        pr = self.progress
        self.memory.sample()
        write_tsv(self.paths.loss, LOSS_HEADER, pr.rows)
        write_tsv(self.paths.fid, FID_HEADER, pr.fid_rows)  # only the header while fid_every = 0
        if self.paths.curves is not None:
            curves.write(self.paths.curves, pr.rows, pr.fid_rows)
        fid = {}
        if pr.fid_rows:
            best = min(pr.fid_rows, key=lambda row: row[2])
            fid = {"fid_last": pr.fid_rows[-1][2], "fid_best": best[2], "fid_best_epoch": best[0],
                   "fid_seconds": round(sum(row[3] for row in pr.fid_rows), 3)}
        write_json(self.paths.metrics, {
            "loss": pr.loss, "epochs": pr.epoch, "steps": pr.step, "seconds": round(pr.seconds, 3),
            "images_per_second": round(pr.step * self.batch / max(pr.seconds, 1e-9), 3),
            "peak_memory_mb": round(self.memory.peak_mb, 1),
            "parameters": networks.parameter_count(self.model), "arch": self.p.model.arch,
            "effective_batch": self.batch, "batch_gpu": self.micro, "rounds": self.rounds,
            "processes": self.world.size,
            "precision": self.precision, "device": str(self.device.type), "compile": self.compiled,
            **fid,
        })
        previews.publish(self.folders.previews, self.paths.samples, pr.epoch)
        if final:
            checkpoint.save({"ema": self.ema.state_dict(), "config": weights_config(self.p),
                             "epochs": pr.epoch, "steps": pr.step}, self.paths.ema)
            print(f"train: {pr.epoch} epochs, {pr.step} steps, loss {pr.loss:.4f}, "
                  f"{pr.step * self.batch / max(pr.seconds, 1e-9):.1f} images/s, peak "
                  f"memory {self.memory.peak_mb:.0f} MiB -> {self.paths.ema}", file=sys.stderr)

    def _oom_advice(self) -> str:
        smaller = self.micro // 2 if self.micro % 2 == 0 else 1
        return (f"CUDA out of memory with {self.micro} images per forward pass (train.batch_gpu = "
                f"{self.tp.batch_gpu}). Lower it: the run stays the same, since train.batch_size "
                f"= {self.batch} alone defines it, e.g. dvc exp run -S train.batch_gpu={smaller}")
