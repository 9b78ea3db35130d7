"""FID of a model's samples during training: the sample stage's drawing and the fid stage's
scoring, on train.fid_images images drawn with deterministic DDIM in train.fid_steps steps."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch

from ddpm.diffusion import Schedule
from ddpm.fid import folder_statistics, frechet_distance
from ddpm.generate import generate
from ddpm.params import Params


def ema_fid(model: torch.nn.Module, sched: Schedule, params: Params, precision: str,
            real_stats: tuple[np.ndarray, np.ndarray], folder: Path, desc: str) -> float:
    """FID of train.fid_images images of `model` (eval mode) against real_stats (mu, sigma).

    Image i comes from the sample stage's seed of i, through generate() with sample.* but DDIM,
    eta 0 and train.fid_steps; the PNGs pass through `folder` (created, then removed) so that
    the score is the fid stage's computation on the same files.
    """
    tp = params.train
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # DDIM has no variance choice: "beta" only passes sample()'s check, so sample.variance is
    # not read (the train stage does not depend on it)
    sample = dataclasses.replace(params.sample, num_images=tp.fid_images, sampler="ddim",
                                 steps=tp.fid_steps, eta=0.0, variance="beta")
    generate(model, sched, dataclasses.replace(params, sample=sample), precision,
             range(tp.fid_images), folder, progress=False)
    fid = params.fid
    mu, sigma, _ = folder_statistics(folder, fid.dims, fid.batch_size, fid.weights,
                                     sched.device, desc)
    shutil.rmtree(folder)
    return frechet_distance(mu, sigma, *real_stats)
