"""The real CIFAR-10 subset through the pipeline: the download and export_real stages, loading,
and a short training run whose loss falls. The truth is the archive itself, read with tarfile
and pickle alone."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import dataset
from ddpm.params import parse_params
from ddpm.runtime import World
from ddpm.train import Trainer
from fakes import run_data_stages, run_stage, train_paths
from real_data import PER_BATCH, REAL_ARCHIVE, REAL_MD5, archive_member, require


@pytest.fixture(scope="module")
def real_cifar(tmp_path_factory):
    """The data stage's dataset of the real archive (data.url, data.md5 as a user sets them)."""
    require(REAL_ARCHIVE)
    cwd = tmp_path_factory.mktemp("real")
    done = run_data_stages(cwd, data__url=str(REAL_ARCHIVE), data__md5=REAL_MD5)
    assert done.returncode == 0, done.stderr
    return cwd / "dataset"


def rows_as_images(batch: dict) -> np.ndarray:
    """(N, 3072) rows of 1024 R, 1024 G, 1024 B -> (N, 32, 32, 3) uint8, by hand."""
    data = np.asarray(batch["data"], dtype=np.uint8)
    return np.stack([data[:, :1024], data[:, 1024:2048], data[:, 2048:]], axis=-1).reshape(
        -1, 32, 32, 3)


def test_the_real_subset_downloads_and_loads_in_archive_order(real_cifar):
    train, test = dataset.load(real_cifar, "train"), dataset.load(real_cifar, "test")
    assert train.shape == (5 * PER_BATCH, 3, 32, 32) and test.shape == (PER_BATCH, 3, 32, 32)
    expected = np.concatenate([rows_as_images(archive_member(f"data_batch_{i}"))
                               for i in range(1, 6)])
    assert np.array_equal(train.transpose(0, 2, 3, 1), expected)
    assert np.array_equal(test.transpose(0, 2, 3, 1), rows_as_images(archive_member("test_batch")))
    assert dataset.load(real_cifar, "train", limit=1500).shape[0] == 1500  # spans two batches
    report = json.loads((real_cifar.parent / "data.json").read_text())
    labels = [archive_member(f"data_batch_{i}")["labels"] for i in range(1, 6)]
    names = archive_member("batches.meta")["label_names"]
    assert report["classes"] == names and report["splits"]["train"]["classes"] == {
        name: sum(batch.count(k) for batch in labels) for k, name in enumerate(names)}


def test_export_writes_the_archive_pixels_exactly_the_first_is_a_frog(real_cifar):
    """export_real over the whole real training split: 0.png is data_batch_1's first row (label
    6, 'frog'), pixel for pixel, and image 1017 is data_batch_2's first row."""
    cwd = real_cifar.parent
    done = run_stage("export_real.py", cwd, "--data", "dataset", "--out", "real_png",
                     data__limit=0, data__real_split="train")
    assert done.returncode == 0, done.stderr
    pngs = list((cwd / "real_png").iterdir())
    assert len(pngs) == 5 * PER_BATCH
    first, meta = archive_member("data_batch_1"), archive_member("batches.meta")
    assert first["labels"][:5] == [6, 9, 9, 4, 1] and meta["label_names"][6] == "frog"
    with Image.open(cwd / "real_png" / "0.png") as frog:
        assert frog.mode == "RGB" and np.array_equal(np.asarray(frog), rows_as_images(first)[0])
    with Image.open(cwd / "real_png" / f"{PER_BATCH}.png") as image:
        assert np.array_equal(np.asarray(image), rows_as_images(archive_member("data_batch_2"))[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_the_loss_falls_when_training_on_real_images(real_cifar, tiny, tmp_path, seed):
    """A small seed network on 256 real images, 64 Adam steps: the mean loss of the last 16
    steps is below LOSS_RATIO x that of the first 4 (see LOSS_RATIO for the measured spread)."""
    raw = copy.deepcopy(tiny)
    raw["seed"] = seed
    raw["data"]["limit"] = 256
    raw["train"].update(epochs=4, batch_size=16, lr=1e-3, log_every=1,
                        sample_every=0, checkpoint_every=4)
    trainer = Trainer(parse_params(raw), train_paths(tmp_path, real_cifar), World(),
                      torch.device("cpu"))
    trainer.run()
    losses = [row[1] for row in trainer.state.progress.rows]
    assert len(losses) == 64
    assert np.mean(losses[-16:]) < LOSS_RATIO * np.mean(losses[:4]), losses


# Measured 2026-11-29 over seeds 0-9 with this test's settings: the first 4 steps averaged
# 1.02-1.06, the last 16 0.43-0.47, ratios 0.419-0.455 (mean 0.433, sd 0.012). 0.6 is 12 sd above
# the mean: a network that learns passes on any seed, one that does not (ratio ~1) cannot.
LOSS_RATIO = 0.6
