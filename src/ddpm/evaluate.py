"""FID and KID during training: the sample stage's drawing and the fid stage's scoring of the EMA
weights' train.fid_images images, drawn with SAMPLER in train.fid_steps steps."""
from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ddpm.diffusion import Schedule
from ddpm.fid import folder_features, frechet_distance, inception, load_statistics, statistics
from ddpm.generate import generate
from ddpm.params import Params
from ddpm.scores import kid, load_features

SAMPLER = "ddim"  # deterministic (eta 0)


class TrainingFid:
    """The real statistics and features and the Inception network, loaded once: a missing or
    wrong file fails before the first epoch, not after train.fid_every of them."""

    def __init__(self, params: Params, real_stats: Path, device: torch.device):
        self.params = params
        self.reference = load_statistics(real_stats, params.fid.dims)[:2]  # mu, sigma
        self.real: np.ndarray | None = load_features(real_stats, params.fid.dims)
        if self.real is None:
            print(f"train: no KID during training: {real_stats} holds no real features (rerun "
                  "real_stats: dvc repro real_stats)", file=sys.stderr)
        self.inception = inception(params.fid.dims, params.fid.weights, device)

    def __call__(self, model: torch.nn.Module, sched: Schedule, shape: Sequence[int],
                 precision: str, folder: Path, desc: str, classes: Sequence[str] = ()
                 ) -> tuple[float, float | None, float | None]:
        """FID, KID and KID's std over its subsets (ddpm.scores; None without real features) of
        `model` (eval mode) against the real images. Image i comes from the sample
        stage's seed of i, through generate() with sample.batch_size and clip_denoised but
        SAMPLER and train.fid_steps (so train's params need list no other sample.* key); a
        conditional model (its `classes` given) draws the balanced classes without guidance.
        The PNGs pass through `folder` (created, then removed), so the score is the fid stage's
        computation on the same files."""
        params, train = self.params, self.params.train
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        sample = dataclasses.replace(params.sample, num_images=train.fid_images, sampler=SAMPLER,
                                     steps=train.fid_steps, eta=0.0, variance="beta",
                                     labels="balanced", guidance=0.0)
        generate(model, sched, shape, dataclasses.replace(params, sample=sample), precision,
                 range(train.fid_images), folder, progress=False, classes=classes)
        features = folder_features(folder, params.fid.dims, params.fid.batch_size,
                                   params.fid.weights, sched.device, desc, model=self.inception)
        shutil.rmtree(folder)
        fid = frechet_distance(*statistics(features), *self.reference)
        return (fid, *kid(features, self.real)) if self.real is not None else (fid, None, None)
