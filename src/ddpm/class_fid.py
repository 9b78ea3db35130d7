"""FID per class: each class's generated images against the real images of that class.

real_stats keeps, beside mu and sigma, the real images' Inception features (float16: half the
bytes, 205 MB for CIFAR-10's 50,000 at 2048 dims; per-class FIDs from them differ from float32
features' by less than docs/benchmarks.md's figure) and their class labels; the fid stage scores
a conditional model's images, image i of the class sample.labels gives it, class by class.

At the sizes this pipeline draws (50 to 500 images a class), FID is biased upwards, far more
than at 5,000: compare per-class values with each other and across runs of the same sizes, not
with the all-class FID or with papers (docs/fid.md).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ddpm.errors import PipelineError
from ddpm.fid import frechet_distance, statistics
from ddpm.safe_files import UnsafeFile, read_npz

NAME_BYTES = 256       # a class name, UTF-8, zero-padded (a folder name has at most 255 bytes)
MAX_CLASSES = 100_000
MAX_IMAGES = 10_000_000


def class_arrays(features: np.ndarray, labels: np.ndarray | None,
                 classes: Sequence[str]) -> dict[str, np.ndarray]:
    """What real_stats adds to its .npz: the (N, dims) features as float16 and, for labelled
    images, their (N,) labels, the class count K and the names, (K, NAME_BYTES) uint8."""
    arrays = {"features": features.astype(np.float16)}
    if labels is not None and classes:
        names = np.zeros((len(classes), NAME_BYTES), dtype=np.uint8)
        for k, name in enumerate(classes):
            raw = name.encode()[:NAME_BYTES]
            names[k, :len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        arrays.update(labels=np.asarray(labels, dtype=np.int64), class_names=names,
                      num_classes=np.int64(len(classes)))
    return arrays


def load_class_features(path: str | Path, dims: int
                        ) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """(features (N, dims) float32, labels (N,), class names) of a statistics file; None where
    it holds none (unlabelled images, or a file from before they were kept). Sizes are checked
    before anything is inflated (ddpm.safe_files.read_npz); a bad file is one line."""
    path = Path(path)
    try:
        n = int(read_npz(path, {"num_images": ("iu", ())})["num_images"])
        try:
            k = int(read_npz(path, {"num_classes": ("iu", ())})["num_classes"])
        except ValueError as e:  # unlabelled images, or a file from before
            if str(e).startswith("no num_classes"):
                return None
            raise
        if not (2 <= n <= MAX_IMAGES and 1 <= k <= MAX_CLASSES):
            raise ValueError(f"{n} images of {k} classes")
        arrays = read_npz(path, {"features": ("f", (n, dims)), "labels": ("i", (n,)),
                                 "class_names": ("u", (k, NAME_BYTES))})
    except (UnsafeFile, OSError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise PipelineError(f"{path}: its class features are not those of {dims}-dim features "
                            f"and labels ({e}); rerun the real_stats stage: dvc repro real_stats"
                            ) from None
    labels = arrays["labels"]
    if labels.min() < 0 or labels.max() >= k:
        raise PipelineError(f"{path}: class labels outside 0..{k - 1}; rerun the real_stats "
                            "stage: dvc repro real_stats")
    names = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in arrays["class_names"]]
    return arrays["features"].astype(np.float32), labels, names


def per_class_fid(generated: np.ndarray, generated_labels: np.ndarray, real: np.ndarray,
                  real_labels: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """For each class drawn: the FID of its generated features against its real ones, and both
    counts; null where either side has fewer than two images (no covariance)."""
    found = {}
    for k in dict.fromkeys(int(c) for c in generated_labels):
        gen, ref = generated[generated_labels == k], real[real_labels == k]
        value = (frechet_distance(*statistics(gen), *statistics(ref))
                 if len(gen) >= 2 and len(ref) >= 2 else None)
        found[classes[k]] = {"fid": value, "generated": len(gen), "real": len(ref)}
    return found
