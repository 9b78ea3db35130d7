"""The training loop: epochs of optimizer steps (ddpm.step), then previews, FIDs, checkpoints and
the outputs DVC tracks; resumed from the last checkpoint of the same run.

Each epoch reseeds its streams (ddpm.batches.epoch_draws), so a run resumed at an epoch boundary
replays exactly what an uninterrupted run would have done: on the CPU, for a fixed split, its
final weights are bitwise equal. Image k of a step draws the same whatever the split over
processes and micro-batches, so a run checkpointed on 1 GPU resumes on 4.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddpm import batches, checkpoint, curves, dataset, diffusion, losses, networks, previews
from ddpm.errors import PipelineError
from ddpm.evaluate import SAMPLER, TrainingFid
from ddpm.files import refuse_non_folder, sweep_temporaries, write_json, write_tsv
from ddpm.images import save_png
from ddpm.params import Params, run_config
from ddpm.runs import CHECKPOINT, PREVIOUS, RunFolders, run_id
from ddpm.runtime import (MemoryMonitor, World, compile_mode, derive_seed, device_name,
                          resolve_precision)
from ddpm.step import FID_ROW, Progress, learning_rate, new_state, train_step

LOSS_HEADER = ["step", "loss", "images_per_second"]
FID_HEADER = list(FID_ROW)  # kid, kid_std: nan where unknown


@dataclass(frozen=True)
class TrainPaths:
    data: Path         # the data stage's dataset folder (input: ddpm.dataset)
    checkpoints: Path  # persistent DVC output: the finished run's last.pt and preview grids
    runs: Path         # outside DVC: unfinished runs' last.pt and grids, one folder per config
    ema: Path          # the EMA weights that sample reads
    metrics: Path      # metrics/train.json: what experiments compare
    report: Path       # reports/train.json: what the run was (network, device, batch split)
    loss: Path         # plots/train/loss.tsv
    samples: Path      # plots/samples/: preview grids for dvc plots
    real_stats: Path   # data/real_stats.npz: the FID reference (read when train.fid_every > 0)
    fid: Path          # plots/train/fid.tsv: epoch, step, FID, seconds, KID, KID's std
    curves: Path       # plots/curves/: the loss and FID curves as PNGs


class Trainer:
    """One training run on this process's device; run() resumes the last checkpoint that fits."""

    def __init__(self, params: Params, paths: TrainPaths, world: World, device: torch.device,
                 images: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 labels: tuple[torch.Tensor, list[str]] | None = None):
        """images: (N, C, H, W) uint8 to train on instead of paths.data's (benchmarks), with
        labels: their (N,) classes and the class names, for a conditional model; dtype: of the
        weights, float64 only to check exactness (tests)."""
        self.params, self.paths, self.world, self.device = params, paths, world, device
        self.precision = resolve_precision(params.train.precision, device)
        conditional, origin = params.model.conditional, ""
        if images is None:
            meta = dataset.read_meta(paths.data)
            loaded = dataset.load(paths.data, "train", params.data.limit, labels=conditional)
            images, found = loaded if conditional else (loaded, None)  # labels: only if used
            images, origin = torch.from_numpy(images), f" in {paths.data} (of {meta['source']})"
            labels = (torch.from_numpy(found), meta["classes"]) if found is not None else None
        if conditional and labels is None:
            raise PipelineError(f"model.conditional = true, but the training images{origin} have "
                                "no class labels (a folder's classes are its subfolders, two or "
                                "more): sort them into class folders or set "
                                "model.conditional=false")
        # A conditional model's labels, resident on the device, and class names (the null label
        # is their count); an unconditional model's: none
        self.labels = labels[0].to(device) if conditional else None
        self.classes: list[str] = list(labels[1]) if conditional else []
        self.images = images.to(device)  # resident on the device
        self.shape = tuple(images.shape[1:])  # (C, H, W): the network's, the noise's, samples'
        self.steps_per_epoch = len(images) // params.train.batch_size
        if self.steps_per_epoch == 0:
            raise PipelineError(f"{len(images)} training images{origin} cannot fill one optimizer "
                                f"step of {params.train.batch_size} images (train.batch_size): "
                                "add images, raise data.limit or lower train.batch_size")
        self.sched = diffusion.Schedule(**dataclasses.asdict(params.diffusion)).to(device)
        self.loss = losses.build(self.sched, params.train.snr_gamma)
        self.state = new_state(params, self.shape, self.precision, device, world, dtype,
                               len(self.classes))
        self.micro, self.rounds = batches.split(params.train, world, device, batches.probe(
            self.state.model, self.sched.timesteps, self.shape, self.precision, device))
        # What the checkpoints and models/ema.pt record: all that the weights depend on.
        self.config = run_config(params)
        self.config["train"]["precision"] = self.precision
        self.config["data"]["images"] = hashlib.sha256(
            images.cpu().numpy().tobytes()).hexdigest()[:16]
        if conditional:  # and their classes
            self.config["data"]["labels"] = hashlib.sha256(
                self.labels.cpu().numpy().tobytes() + "\n".join(self.classes).encode()
            ).hexdigest()[:16]
        self.folders = RunFolders(paths.checkpoints, paths.runs / run_id(self.config))
        self.memory = MemoryMonitor(device)
        self.fid = None  # loaded now: a missing file fails before training
        if params.train.fid_every and world.main:
            self.fid = TrainingFid(params, paths.real_stats, device)
        self.kept: tuple[Path, int] | None = None  # the checkpoint a rerun starts from, its epoch

    def step(self, draws: batches.Draws) -> torch.Tensor:
        """One optimizer step of this process's share of a batch (ddpm.step.train_step)."""
        train = self.params.train
        lr = learning_rate(train.lr, train.warmup_steps, self.state.progress.step)
        return train_step(self.state, self.loss, self.images, draws, self.micro, self.precision,
                          lr, train.grad_clip)

    def run(self) -> Progress:
        """Train to train.epochs from the last checkpoint that fits; the main process holds the
        run folder's lock meanwhile, and first sweeps what killed writers left. A folder it
        writes in, empties or moves that is a link (or no folder) stops it first, in one line."""
        if self.world.main:
            refuse_non_folder(*self.folders.folders(), self.paths.samples, self.paths.curves)
        with self.folders.lock() if self.world.main else contextlib.nullcontext():
            if self.world.main:
                p = self.paths
                sweep_temporaries(self.folders.work, self.folders.previews, self.folders.published,
                                  p.ema.parent, p.metrics.parent, p.report.parent, p.loss.parent,
                                  p.fid.parent, p.samples, p.curves)
            resumed = self.resume()
            if self.world.main:
                self.announce(resumed)
            self.world.barrier()  # the main process's start-up work is done
            train, progress = self.params.train, self.state.progress
            total = train.epochs * self.steps_per_epoch * train.batch_size
            # The bar counts images over the whole stage, resumed epochs included: its rate is
            # images/s and its ETA the stage's, previews and checkpoints included.
            with tqdm(total=total, initial=progress.step * train.batch_size, desc="train",
                      unit="img", unit_scale=total >= 100_000, disable=not self.world.main,
                      dynamic_ncols=True) as bar:
                bar.set_postfix(epoch=f"{progress.epoch}/{train.epochs}", refresh=False)
                for epoch in range(progress.epoch, train.epochs):
                    self.epoch(epoch, bar)
                    if self.world.main:
                        self.end_of_epoch()
                    self.world.barrier()
            if self.world.main:
                self.write_outputs(final=True)
                self.folders.finish()
        return self.state.progress

    def resume(self) -> str:
        """Load the most advanced checkpoint of this run (its own, the one before it if that
        does not load or is unfit, or the published one of a finished run); what happened, in
        words: each checkpoint passed over names its file and why."""
        found, notes = self.folders.resumable(
            self.config, self.params.train.epochs,
            lambda state: self.state.refusal(state, self.steps_per_epoch))
        if found is None:
            if self.world.main:
                previews.clear(self.folders.previews)
            return "; ".join(notes + ["starting fresh" if notes else "starting at epoch 0"])
        path, state = found
        self.state.load_state_dict(state, self.steps_per_epoch)
        self.kept = path, self.state.progress.epoch
        if self.world.main:
            self.folders.adopt_previews(path)
        return "; ".join(notes + [f"resuming from {path} at epoch {self.state.progress.epoch}"])

    def announce(self, resumed: str) -> None:
        for folder, size in self.folders.others():
            print(f"train: {folder} holds an unfinished run of another config ({size / 2**20:.0f}"
                  " MiB; resumed if that config runs again, else rm -r it)", file=sys.stderr)
        print(f"train: {resumed}; {len(self.images)} images, {self.steps_per_epoch} steps per "
              f"epoch of {self.params.train.batch_size} images ({self.world.size} process(es) x "
              f"{self.rounds} round(s) x {self.micro}), {self.precision} on {self.device}",
              file=sys.stderr, flush=True)

    def epoch(self, epoch: int, bar: tqdm) -> None:
        """One pass over the data; dropout is seeded by (seed, epoch, rank)."""
        train, progress = self.params.train, self.state.progress
        torch.manual_seed(derive_seed(self.params.seed, epoch, self.world.rank, "dropout"))
        self.state.model.train()
        epoch_loss = window = torch.zeros((), device=self.device)
        start = window_start = time.perf_counter()
        for draws in batches.epoch_draws(self.params.seed, epoch, len(self.images),
                                         train.batch_size, self.sched.timesteps, self.shape,
                                         self.world, self.device, self.labels,
                                         train.label_dropout, len(self.classes)):
            loss = self.step(draws)
            epoch_loss, window = epoch_loss + loss, window + loss
            progress.step += 1
            bar.update(train.batch_size)
            steps = progress.step - (progress.rows[-1][0] if progress.rows else 0)
            if progress.step % train.log_every == 0 or progress.step % self.steps_per_epoch == 0:
                mean = self.mean_over_ranks(window) / steps  # synchronises: only here
                rate = steps * train.batch_size / (time.perf_counter() - window_start)
                progress.rows.append([progress.step, mean, rate])
                self.stop_unless_finite(mean, f"the loss became {mean}")
                bar.set_postfix(epoch=f"{epoch + 1}/{train.epochs}", loss=f"{mean:.4f}",
                                refresh=False)
                self.memory.sample()
                window, window_start = torch.zeros((), device=self.device), time.perf_counter()
        progress.loss = self.mean_over_ranks(epoch_loss) / self.steps_per_epoch
        progress.seconds += time.perf_counter() - start
        progress.epoch = epoch + 1
        self.stop_unless_finite(progress.loss, f"the loss became {progress.loss}")
        for name, weights in (("model", self.state.model), ("EMA", self.state.ema.model)):
            # the last step's loss is finite even when its update was not
            if bad := checkpoint.non_finite(weights.state_dict()):
                self.stop_unless_finite(math.nan, f"the {name} weights became non-finite "
                                                  f"({', '.join(bad[:3])})")

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world.size > 1:
            torch.distributed.all_reduce(value)
            value = value / self.world.size
        return value.item()

    def stop_unless_finite(self, value: float, what: str) -> None:
        """A non-finite value stops training before it reaches a checkpoint or models/ema.pt."""
        if not math.isfinite(value):
            kept = (f"the last good checkpoint, {self.kept[0]} (epoch {self.kept[1]}), is kept"
                    if self.kept else "no checkpoint was written")
            raise PipelineError(f"{what} at optimizer step "
                                f"{self.state.progress.step}: training stopped and {kept}. Lower "
                                f"train.lr (now {self.params.train.lr}) or use "
                                "train.precision=fp32 or bf16")

    def end_of_epoch(self) -> None:
        """Preview, FID, then checkpoint: a kill in between only redoes this epoch's previews."""
        train, progress = self.params.train, self.state.progress
        epoch, ema = progress.epoch, self.state.ema.model.eval()
        last = epoch == train.epochs
        if train.sample_every and (epoch % train.sample_every == 0 or last):
            grid = previews.preview_grid(ema, self.sched, self.shape, train.preview_images,
                                         train.preview_steps, self.params.seed, self.precision,
                                         self.classes)
            save_png(grid, self.folders.previews / f"epoch_{epoch:04d}.png")
        if self.fid is not None and (epoch % train.fid_every == 0 or last):
            start = time.perf_counter()  # FID time is logged apart from the training throughput
            value, kid, kid_std = self.fid(ema, self.sched, self.shape, self.precision,
                                           self.folders.work / "fid_images",
                                           f"train: FID at epoch {epoch}, Inception", self.classes)
            seconds = time.perf_counter() - start
            kid, kid_std = (math.nan, math.nan) if kid is None else (kid, kid_std)
            progress.fid_rows.append([epoch, progress.step, value, round(seconds, 3), kid, kid_std])
            print(f"train: epoch {epoch}: FID {value:.2f}, KID {kid:.4f} ({train.fid_images} "
                  f"images, {SAMPLER}-{train.fid_steps}, vs {self.paths.real_stats}) in "
                  f"{seconds:.0f} s", file=sys.stderr, flush=True)
        if epoch % train.checkpoint_every == 0 or last:
            self.save_checkpoint()
        self.write_outputs(final=False)

    def save_checkpoint(self) -> None:
        """last.pt; the last.pt before it, if this run wrote or resumed it (and so knows it good),
        becomes previous.pt, which resuming falls back to if last.pt does not load."""
        last = self.folders.work / CHECKPOINT
        previous = self.folders.work / PREVIOUS if self.kept and self.kept[0] == last else None
        checkpoint.save({**self.state.state_dict(), "config": self.config,  # the shape: for
                         "image_shape": list(self.shape), **self.class_names()},  # python -m
                        last, keep=previous)                                        # ddpm
        self.kept = last, self.state.progress.epoch

    def write_outputs(self, final: bool) -> None:
        """Metrics, report, loss and FID logs and curves every epoch (dvc exp show follows a
        running run); models/ema.pt at the end."""
        progress, batch = self.state.progress, self.params.train.batch_size
        rate = progress.step * batch / max(progress.seconds, 1e-9)
        self.memory.sample()
        write_tsv(self.paths.loss, LOSS_HEADER, progress.rows)
        fid_rows = [row + [math.nan] * (len(FID_HEADER) - len(row))  # rows of runs from before
                    for row in progress.fid_rows]                        # KID have no KID
        write_tsv(self.paths.fid, FID_HEADER, fid_rows)  # the header while fid_every is 0
        curves.write(self.paths.curves, progress.rows, fid_rows, self.loss.label)
        fid = {}
        if fid_rows:
            best = min(fid_rows, key=lambda row: row[2])
            fid = {"fid_last": fid_rows[-1][2], "fid_best": best[2], "fid_best_epoch": best[0]}
            if math.isfinite(fid_rows[-1][4]):
                fid["kid_last"] = fid_rows[-1][4]
        write_json(self.paths.metrics, {
            "loss": progress.loss, "epochs": progress.epoch, "seconds": round(progress.seconds, 3),
            "images_per_second": round(rate, 3), "peak_memory_mb": round(self.memory.peak_mb, 1),
            **fid})
        write_json(self.paths.report, {
            "arch": self.params.model.arch, "objective": self.loss.label,
            "parameters": networks.parameter_count(self.state.model), "steps": progress.step,
            "batch_size": batch, "batch_gpu": self.micro, "rounds": self.rounds,
            "processes": self.world.size, "precision": self.precision,
            "device": self.device.type, "device_name": device_name(self.device),
            "compile": compile_mode(self.params.train.compile, self.device) or "eager",
            "fid_seconds": round(sum(row[3] for row in progress.fid_rows), 3)})
        previews.publish(self.folders.previews, self.paths.samples, progress.epoch,
                         tile=self.shape[1])
        if final:
            checkpoint.save({"ema": self.state.ema.state_dict(), "config": self.config,
                             "image_shape": list(self.shape), **self.class_names(),
                             "epochs": progress.epoch, "steps": progress.step}, self.paths.ema)
            print(f"train: {progress.epoch} epochs, {progress.step} steps, loss "
                  f"{progress.loss:.4f}, {rate:.1f} images/s, peak memory "
                  f"{self.memory.peak_mb:.0f} MiB -> {self.paths.ema}", file=sys.stderr)

    def class_names(self) -> dict[str, list[str]]:
        """What a conditional model's files record besides its weights: the class names, in
        label order (the null label is their count); nothing for an unconditional one."""
        return {"classes": self.classes} if self.classes else {}

    def where(self) -> str:
        """Where an interrupted run stopped and what a rerun resumes (ddpm.cli.on_interrupt)."""
        kept = (f"its last checkpoint, {self.kept[0]} (epoch {self.kept[1]}), is kept"
                if self.kept else "no checkpoint was written yet")
        return (f" in epoch {self.state.progress.epoch + 1} of {self.params.train.epochs}; "
                f"{kept}. Run the same command again (dvc repro, or dvc exp run with the same -S "
                "values) to resume")
