"""train: the DDPM UNet on the data stage's images, resuming from its last checkpoint when it
fits this run.

With train.gpus > 1 this script relaunches itself under torchrun (one process per GPU); under a
launcher you started yourself (several nodes) it joins the existing process group instead.
"""
import argparse
import sys
from pathlib import Path

import torch

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm import cli
from ddpm.errors import PipelineError
from ddpm.params import TrainParams, load_params_or_exit
from ddpm.runtime import keep_freed_host_memory, start_processes
from ddpm.train import Trainer, TrainPaths

PATHS = [("data", "the data stage's dataset folder"),
         ("checkpoints", "persistent folder for the finished run's last.pt and grids"),
         ("runs", "folder (outside DVC) for unfinished runs, one per config"),
         ("ema", "EMA weights file to write"), ("metrics", "metrics JSON to write"),
         ("report", "JSON of the run's facts to write"), ("loss", "loss TSV to write"),
         ("samples", "folder for preview grids"),
         ("real_stats", "real_stats' .npz file (read when train.fid_every > 0)"),
         ("fid", "TSV of the FIDs during training to write"),
         ("curves", "folder for the loss and FID curves as PNGs")]


def out_of_memory(micro: int, train: TrainParams) -> str:
    smaller = micro // 2 if micro % 2 == 0 else 1
    return (f"CUDA out of memory with {micro} images per forward pass (train.batch_gpu = "
            f"{train.batch_gpu}). Lower it: the run stays the same, since train.batch_size = "
            f"{train.batch_size} alone defines it, e.g. dvc exp run -S train.batch_gpu={smaller}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name, what in PATHS:
        parser.add_argument(f"--{name.replace('_', '-')}", required=True, type=Path, help=what)
    args = parser.parse_args()
    params = load_params_or_exit()
    world, device = start_processes(params.device, params.train.gpus)
    keep_freed_host_memory(device)  # on CPUs: no page faults on every step's activations
    trainer = Trainer(params, TrainPaths(**vars(args)), world, device)
    if params.train.batch_gpu == "auto" and world.main:
        print(f"train: batch_gpu auto -> {trainer.micro} images per forward pass, {trainer.rounds}"
              f" round(s) per step of {params.train.batch_size}", file=sys.stderr, flush=True)
    cli.on_interrupt(lambda: trainer.where() if world.main else None)
    try:
        trainer.run()
    except torch.cuda.OutOfMemoryError:
        raise PipelineError(out_of_memory(trainer.micro, params.train)) from None
    world.close()


if __name__ == "__main__":
    cli.run(main)
