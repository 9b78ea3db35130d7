"""train: the DDPM UNet on CIFAR-10, resuming from its last checkpoint when it fits this run.

With train.gpus > 1 this script relaunches itself under torchrun (one process per GPU); under a
launcher you started yourself (several nodes) it joins the existing process group instead.
"""
import argparse
from pathlib import Path

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm.cli import run
from ddpm.params import load_params_or_exit
from ddpm.runtime import keep_freed_host_memory, start_processes
from ddpm.train import Trainer, TrainPaths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name, what in [("cifar", "folder of the extracted batches"),
                       ("checkpoints", "persistent folder for the finished run's last.pt and grids"),
                       ("runs", "folder (outside DVC) for unfinished runs, one per config"),
                       ("ema", "EMA weights file to write"), ("metrics", "metrics JSON to write"),
                       ("loss", "loss TSV to write"), ("samples", "folder for preview grids"),
                       ("real_stats", "real_stats' .npz file (read when train.fid_every > 0)"),
                       ("fid", "TSV of the FIDs during training to write"),
                       ("curves", "folder for the loss and FID curves as PNGs")]:
        parser.add_argument(f"--{name.replace('_', '-')}", required=True, type=Path, help=what)
    args = parser.parse_args()
    params = load_params_or_exit()
    world, device = start_processes(params.device, params.train.gpus)
    keep_freed_host_memory(device)  # on CPUs: no page faults on every step's activations
    Trainer(params, TrainPaths(**vars(args)), world, device).run()
    world.close()


if __name__ == "__main__":
    run(main)
