"""The classes of a conditional model's images: the class names a model file records, the class
that sample.labels gives image i, and the grid that shows one row per class.

Image i's class depends on (sample.labels, the model's classes, i) only, as its noise depends
on (seed, i) only: a batch size or a resumed run cannot change it, and the fid stage knows it
without reading the sample stage's outputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from ddpm.errors import ParamsError, PipelineError

Spec = Union[str, Sequence[str]]  # sample.labels: "balanced" or class names
MAX_CLASSES = 100_000


def recorded_classes(state: dict[str, Any], path: str | Path, conditional: bool) -> list[str]:
    """The class names a training checkpoint or models/ema.pt records (the null label is their
    count); [] for an unconditional model. A conditional model's file must name them."""
    names = state.get("classes")
    if not conditional:
        return []
    if not (isinstance(names, list) and 1 <= len(names) <= MAX_CLASSES
            and all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names)):
        raise PipelineError(f"{path}: a conditional model's file without the list of its class "
                            "names; retrain (dvc repro train) or restore it (dvc checkout)")
    return names


def class_indices(spec: Spec, classes: Sequence[str], key: str = "sample.labels") -> list[int]:
    """The class indices that image i cycles through: all K in order for balanced, else the
    named classes in the order given. An unknown name is a ParamsError naming `key`."""
    if not classes:
        raise ParamsError(f"{key}: the model is unconditional (model.conditional: false)")
    if spec == "balanced":
        return list(range(len(classes)))
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in spec if name not in index]
    if unknown:
        shown = ", ".join(classes[:12]) + (" ..." if len(classes) > 12 else "")
        raise ParamsError(f"{key}: {unknown[0]!r} is not a class of the model (its classes: "
                          f"{shown})")
    return [index[name] for name in spec]


def image_labels(spec: Spec, classes: Sequence[str], ids: Sequence[int]) -> torch.Tensor:
    """(len(ids),) long: the class of each image i of `ids`, the cycle's entry i mod its length
    (balanced: i mod K)."""
    cycle = class_indices(spec, classes)
    return torch.tensor([cycle[i % len(cycle)] for i in ids], dtype=torch.long)


def counts(spec: Spec, classes: Sequence[str], num_images: int) -> dict[str, int]:
    """How many of images 0..N-1 each class drawn gets, by name, in the cycle's order."""
    drawn = np.bincount(image_labels(spec, classes, range(num_images)).numpy(),
                        minlength=len(classes))
    return {classes[c]: int(drawn[c]) for c in dict.fromkeys(class_indices(spec, classes))}


def rows(labels: Sequence[int], per_row: int) -> list[tuple[int, list[int]]]:
    """(class, the first per_row image indices of that class) for each class in `labels`, in
    the order of their first image: the rows of a grid of one row per class."""
    found: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        row = found.setdefault(int(label), [])
        if len(row) < per_row:
            row.append(i)
    return list(found.items())


def class_grid(folder: Path, size: int, spec: Spec, classes: Sequence[str], num_images: int,
               per_row: int = 8) -> np.ndarray:
    """The grid of a folder of a conditional model's images 0..N-1: one labelled row per class
    drawn, its first per_row images (plots/sample_grid.png)."""
    from ddpm.images import labelled_grid, read_png
    labels = image_labels(spec, classes, range(num_images)).tolist()
    return labelled_grid([(classes[c], [read_png(folder / f"{i}.png", size) for i in ids])
                          for c, ids in rows(labels, per_row)])
