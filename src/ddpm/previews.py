"""Preview grids during training: the EMA model's images from the same fixed noise every time.

Deterministic DDIM from per-image fixed noise makes the grids of successive epochs comparable
image by image. The predicted x0 is clipped to [-1, 1] inside every step (Ho et al.'s sampling):
early in training the eps error at large t, amplified by 1 / sqrt(alpha_bar_t) (156x at t = 999),
otherwise turns a few DDIM steps into saturated noise that hides what the model has learnt. Grids
are kept beside the checkpoint (a persistent output), so a resumed run still shows the grids of the
epochs it did not redo.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ddpm import images as img
from ddpm.diffusion import Schedule, sample
from ddpm.files import atomic_file
from ddpm.runtime import autocast, derive_seed

GRID_NAME = re.compile(r"epoch_(\d+)\.png")
PROGRESSION = "progression.png"


def preview_grid(model: torch.nn.Module, sched: Schedule, shape: Sequence[int], num_images: int,
                 steps: int, seed: int, precision: str, classes: Sequence[str] = ()
                 ) -> np.ndarray:
    """A grid of num_images samples of `shape` (C, H, W) from fixed noise: image i's noise
    depends on (seed, i) only. A conditional model (its `classes` given) draws one labelled row
    per class, without guidance: ceil(num_images / K) images each, image i of class i // that."""
    device = sched.device
    per_class = -(-num_images // len(classes)) if classes else 0
    count = per_class * len(classes) or num_images
    gens = [torch.Generator(device).manual_seed(derive_seed(seed, i, "preview"))
            for i in range(count)]
    labels = torch.arange(count) // per_class if classes else None
    with autocast(precision, device):
        x = sample(model, sched, (count, *shape), "ddim", steps, generator=gens,
                   clip_denoised=True, labels=labels)
    images = img.to_uint8(x)
    if not classes:
        return img.grid(images)
    return img.labelled_grid([(name, np.asarray(images[c * per_class:(c + 1) * per_class]))
                              for c, name in enumerate(classes)])


def grid_files(folder: Path, up_to_epoch: int | None = None) -> list[tuple[int, Path]]:
    """(epoch, path) of the preview grids in folder, by epoch;
    optionally only those <= up_to_epoch."""
    found = []
    for path in folder.glob("epoch_*.png") if folder.is_dir() else []:
        match = GRID_NAME.fullmatch(path.name)
        if match and (up_to_epoch is None or int(match[1]) <= up_to_epoch):
            found.append((int(match[1]), path))
    return sorted(found)


def clear(store: Path) -> None:
    """Forget the grids of an earlier run (a fresh start must not show them)."""
    shutil.rmtree(store, ignore_errors=True)


def publish(store: Path, plots: Path, up_to_epoch: int, tile: int, max_rows: int = 10) -> None:
    """Copy the grids of epochs <= up_to_epoch from the store to plots, with a progression
    figure of their top rows of `tile`-pixel images; each file is replaced whole (dvc plots may
    read them while training runs)."""
    plots.mkdir(parents=True, exist_ok=True)
    grids = grid_files(store, up_to_epoch)
    for _, path in grids:
        with atomic_file(plots / path.name) as tmp:
            shutil.copyfile(path, tmp)
    if grids:
        rows = sorted({round(i) for i in np.linspace(0, len(grids) - 1, min(max_rows, len(grids)))})
        progression_figure([grids[i][0] for i in rows], [grids[i][1] for i in rows],
                           plots / PROGRESSION, tile)


def progression_figure(epochs: list[int], paths: list[Path], out: Path, tile: int,
                       pad: int = 2) -> None:
    """One row per preview epoch: the top row of that epoch's grid (the same noise each time)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strips = []
    for path in paths:
        with Image.open(path) as grid:
            strips.append(np.asarray(grid.convert("RGB"))[: tile + 2 * pad])
    fig, axes = plt.subplots(len(strips), 1, figsize=(8, 0.9 * len(strips) + 0.4), squeeze=False)
    for ax, epoch, strip in zip(axes[:, 0], epochs, strips):
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"epoch {epoch}", rotation=0, ha="right", va="center")
    fig.suptitle("EMA samples from fixed noise, by epoch")
    fig.tight_layout()
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
