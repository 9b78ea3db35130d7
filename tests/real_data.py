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
