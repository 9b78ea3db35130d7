"""The real inputs of ../shared/data (its README): CIFAR-10 rows and the seed's samples.

Tests that need them skip, saying why, where a checkout has no ../shared beside it.
"""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import pytest

from fakes import ROOT

SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_ARCHIVE = SHARED_DATA / "cifar10-real-subset" / "cifar-10-python.tar.gz"
REAL_MD5 = "7ce1f99f2b1658965d4df61be0d12ed7"
SEED_SAMPLES = SHARED_DATA / "seed-samples"
PER_BATCH = 1017  # rows of each official batch file in the subset


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path}: the real data is not here (../shared/data beside the checkout)")
    return path


def archive_member(name: str) -> dict:
    """One batch file of the real archive, read with tarfile and pickle alone (not ddpm.data)."""
    with tarfile.open(require(REAL_ARCHIVE), "r:gz") as tar:
        with tar.extractfile(f"cifar-10-batches-py/{name}") as f:
            return pickle.load(f, encoding="latin1")


def real_folder(dest: Path, per_class: int) -> dict[str, int]:
    """The real subset's first training images as a folder tree a user might have:
    dest/<class name>/<index>.png or .jpg, per_class images of each of the ten classes, in
    archive order; even indices lossless PNG, odd ones JPEG (quality 95); every fifth image
    first resized to another size (48 x 48, or 40 x 32: not square). Returns the counts by
    class. Read with tarfile and pickle alone (not ddpm.data)."""
    from PIL import Image
    import numpy as np
    names = archive_member("batches.meta")["label_names"]
    batch = archive_member("data_batch_1")
    data = np.asarray(batch["data"], dtype=np.uint8)
    pixels = np.stack([data[:, :1024], data[:, 1024:2048], data[:, 2048:]], -1).reshape(
        -1, 32, 32, 3)
    counts = dict.fromkeys(names, 0)
    for index, (image, label) in enumerate(zip(pixels, batch["labels"])):
        name = names[label]
        if counts[name] == per_class:
            continue
        img = Image.fromarray(image)
        if index % 5 == 0:
            img = img.resize((48, 48) if index % 10 == 0 else (40, 32), Image.BICUBIC)
        (dest / name).mkdir(parents=True, exist_ok=True)
        if index % 2 == 0:
            img.save(dest / name / f"{index:05d}.png")
        else:
            img.save(dest / name / f"{index:05d}.jpg", quality=95)
        counts[name] += 1
        if all(n == per_class for n in counts.values()):
            break
    return counts
