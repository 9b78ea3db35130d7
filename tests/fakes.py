"""Inputs the tests build for themselves (CIFAR-10 and Inception weights cannot be downloaded here).

The archive is in exactly the cifar-10-python.tar.gz format: a gzipped tar holding
cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta, readme.html}, each batch a
protocol-2 (Python 2 compatible) pickle of a dict that loads with encoding='latin1'.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent  # the repository
PER_BATCH = 16  # images per fake batch file: 80 train, 16 test

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_images(split: str, per_batch: int, seed: int = 0) -> np.ndarray:
    """The (N, 3, 32, 32) uint8 images the fake archive holds for a split, in order.

    Smooth random colour fields plus noise: varied enough to train on and to have non-degenerate
    Inception statistics.
    """
    batches = 5 if split == "train" else 1
    rng = np.random.default_rng(seed + (0 if split == "train" else 1000))
    n = batches * per_batch
    coarse = rng.integers(0, 256, size=(n, 3, 4, 4)).astype(np.float64)
    smooth = coarse.repeat(8, axis=2).repeat(8, axis=3)
    noisy = smooth + rng.normal(0, 24, size=smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _batch(images: np.ndarray, label: str, offset: int) -> dict:
    n = len(images)
    return {
        "batch_label": label,
        "labels": [int(i % 10) for i in range(offset, offset + n)],
        "data": images.reshape(n, 3072),
        "filenames": [f"image_{offset + i:05d}.png" for i in range(n)],
    }


def make_cifar_archive(path: Path, per_batch: int = 16, seed: int = 0) -> str:
    """Write the fake archive; returns its md5 (what data.md5 must say)."""
    train, test = cifar_images("train", per_batch, seed), cifar_images("test", per_batch, seed)
    members = {f"data_batch_{i + 1}": _batch(train[i * per_batch:(i + 1) * per_batch],
                                              f"training batch {i + 1} of 5", i * per_batch)
               for i in range(5)}
    members["test_batch"] = _batch(test, "testing batch 1 of 1", 0)
    members["batches.meta"] = {"num_cases_per_batch": per_batch, "label_names": LABELS,
                               "num_vis": 3072}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in [*members.items(), ("readme.html", None)]:
            data = b"<html></html>" if obj is None else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_inception_weights(path: Path, seed: int = 0) -> Path:
    """A random-weight state_dict with the exact structure of pytorch-fid's FID Inception."""
    from unittest import mock

    import torchvision
    from pytorch_fid import inception

    torch.manual_seed(seed)
    # Build pytorch-fid's own network, skipping only its download and weight loading.
    with mock.patch.object(inception, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(torchvision.models.Inception3, "load_state_dict"):
        state = inception.fid_inception_v3().state_dict()
    for name, tensor in state.items():
        if name.endswith(".weight") and tensor.dim() == 4:  # conv: keep activations O(1) in depth
            torch.nn.init.kaiming_normal_(tensor)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def committed_params() -> dict:
    """params.yaml as committed (git HEAD), not as `dvc exp run -S ...` or `dvc exp apply` left
    the working copy: the tests' defaults do not move with the user's experiments. Outside a git
    checkout (or before params.yaml is committed), the file itself."""
    try:
        text = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        text = (ROOT / "params.yaml").read_text()
    return yaml.safe_load(text)


def tiny_params(base: dict, archive: Path, md5: str, weights: Path) -> dict:
    """params.yaml's dict shrunk to a run of seconds on the CPU, pointing at the fake inputs."""
    import copy
    p = copy.deepcopy(base)
    p["device"] = "cpu"
    p["data"].update(url=str(archive), md5=md5, limit=48)
    p["model"].update(channels=[16, 32, 32], res_blocks=1, attention_resolutions=[16], heads=2)
    p["diffusion"].update(timesteps=40)
    p["train"].update(epochs=2, batch_size=16, batch_gpu=8, ema_decay=0.5, checkpoint_every=1,
                      sample_every=1, preview_images=4, preview_steps=3, log_every=1,
                      fid_images=6, fid_steps=4)
    p["sample"].update(num_images=12, batch_size=5, steps=8)
    p["fid"].update(dims=64, batch_size=8, weights=str(weights))
    return p


def prepare_dataset(archive: Path, md5: str, out: Path) -> Path:
    """The data stage's dataset folder `out` of a CIFAR-10 archive, by the data stage's code."""
    from ddpm.files import atomic_dir
    from ddpm.params import parse_params
    from ddpm.sources import listing, prepare
    raw = committed_params()
    raw["data"].update(source="cifar10", url=str(archive), md5=md5)
    data = parse_params(raw).data
    with atomic_dir(out) as staging:
        prepare(data, staging, listing(data))
    return out


def train_paths(root: Path, data: Path):
    """The train stage's outputs under root, reading the data stage's dataset folder `data`."""
    from ddpm.train import TrainPaths
    return TrainPaths(data=data, checkpoints=root / "checkpoints", runs=root / "runs",
                      ema=root / "ema.pt", metrics=root / "train.json",
                      report=root / "train_report.json", loss=root / "loss.tsv",
                      samples=root / "samples", real_stats=root / "real_stats.npz",
                      fid=root / "fid.tsv", curves=root / "curves")


def python_m_ddpm(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    """`python -m ddpm ARGS` of this checkout in cwd (no params.yaml needed there)."""
    import os
    return subprocess.run([sys.executable, "-m", "ddpm", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))


def run_stage(script: str, cwd: Path, *args: str, **overrides) -> subprocess.CompletedProcess:
    """Run stages/<script> in cwd with a copy of the committed params.yaml; `data__url=...` sets
    data.url, `device=...` a top-level key."""
    config = committed_params()
    for key, value in overrides.items():
        section, _, name = key.rpartition("__")
        (config[section] if section else config)[name] = value
    (cwd / "params.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def run_data_stages(cwd: Path, out: str = "dataset", **overrides) -> subprocess.CompletedProcess:
    """The source stage, then the data stage (download) writing `out` in cwd, as dvc.yaml runs
    them (params as run_stage takes them): the first that fails, else the data stage's result."""
    listed = run_stage("source.py", cwd, "--out", "source.json", **overrides)
    if listed.returncode != 0:
        return listed
    return run_stage("download.py", cwd, "--listing", "source.json", "--out", out, "--report",
                     "data.json", **overrides)


def record_draws(trainer) -> dict:
    """Wrap trainer.step so that every call's data indices, flips, t, noise, labels (conditional
    models) and the loss it returned are kept, in order, in the returned dict's lists (one
    tensor per step)."""
    names = ("idx", "flip", "t", "noise", "labels", "loss")
    seen = {key: [] for key in names if key != "labels"}  # labels: a conditional model's only
    real = trainer.step

    def recording(draws):
        loss = real(draws)
        for key, value in zip(names, (*draws, loss[None])):
            if value is not None:
                seen.setdefault(key, []).append(value.detach().cpu())
        return loss

    trainer.step = recording
    return seen
