"""The train stage under dvc: SIGKILL at any moment then `dvc repro` finishes the same run;
data-parallel training through dvc; a bad params value stops it at once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dvc_repo import dvc, env

pytestmark = pytest.mark.e2e

TRAIN = dict(epochs=5, checkpoint_every=1, sample_every=2)


def checkpoint_epoch(repo) -> int:
    path = repo / "models/checkpoints/last.pt"
    if not path.exists():
        return 0
    return torch.load(path, weights_only=True)["progress"]["epoch"]  # replaced atomically


def repro_killed_when(repo, ready, extra_delay: float = 0.0, timeout: float = 120) -> None:
    """Start `dvc repro train`, wait until ready() is true, then SIGKILL dvc and its children."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=repo, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "training ended before the kill point"
            assert time.monotonic() < deadline, "kill point not reached"
            time.sleep(0.02)
        time.sleep(extra_delay)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        forget_dvc_lock_torn_by_the_kill(repo)


def forget_dvc_lock_torn_by_the_kill(repo) -> None:
    """DVC rewrites .dvc/tmp/rwlock in place: killed at that moment, it leaves the file empty and
    every later dvc command fails with "Unable to read RWLock-file" (treeverse/dvc#7615). No
    dvc runs any more, so delete it, as the README's troubleshooting says."""
    rwlock = repo / ".dvc/tmp/rwlock"
    if not rwlock.exists():
        return
    try:
        json.loads(rwlock.read_text())
    except json.JSONDecodeError:
        rwlock.unlink()


def test_sigkill_at_any_moment_then_repro_gives_the_uninterrupted_weights(new_repo):
    reference = new_repo("reference", train=TRAIN)
    dvc(reference, "repro", "train")

    repo = new_repo("killed", train=TRAIN)
    dvc(repo, "repro", "download")
    start = time.monotonic()
    repro_killed_when(repo, lambda: time.monotonic() - start > 1.0)     # while starting up
    assert checkpoint_epoch(repo) == 0
    repro_killed_when(repo, lambda: checkpoint_epoch(repo) >= 1)        # right after a checkpoint
    repro_killed_when(repo, lambda: checkpoint_epoch(repo) >= 3, 0.3)   # in the middle of an epoch
    killed_at = checkpoint_epoch(repo)
    assert 3 <= killed_at < TRAIN["epochs"]
    out = dvc(repo, "repro", "train").stdout
    assert f"resuming from models/checkpoints/last.pt at epoch {killed_at}" in out

    expected = torch.load(reference / "models/ema.pt", weights_only=True)
    got = torch.load(repo / "models/ema.pt", weights_only=True)
    assert got["steps"] == expected["steps"]
    for name, tensor in expected["ema"].items():
        assert torch.equal(got["ema"][name], tensor), name  # bitwise, on the CPU
    loss = [r.split("\t")[:2] for r in (reference / "plots/train/loss.tsv").read_text().splitlines()]
    assert [r.split("\t")[:2] for r in (repo / "plots/train/loss.tsv").read_text().splitlines()] == loss
    grids = sorted(p.name for p in (repo / "plots/samples").iterdir())
    assert grids == ["epoch_0002.png", "epoch_0004.png", "epoch_0005.png", "progression.png"]
    assert (repo / "plots/samples/epoch_0002.png").read_bytes() == (
        reference / "plots/samples/epoch_0002.png").read_bytes()
    assert "up to date" in dvc(repo, "status", "train").stdout


def test_two_processes_train_and_sample_through_dvc(new_repo):
    """gpus=2 on the CPU: torchrun with gloo; samples equal those of one process."""
    repo = new_repo(train=dict(gpus=2, batch_size=4, sample_every=0))
    out = dvc(repo, "repro", "sample").stdout
    assert out.count("launching 2 processes") == 2  # train and sample
    metrics = json.loads((repo / "metrics/train.json").read_text())
    assert metrics["processes"] == 2 and metrics["effective_batch"] == 4 * 2 * 2
    assert metrics["steps"] == 2 * (48 // 16)
    assert json.loads((repo / "metrics/sample.json").read_text())["processes"] == 2

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["gpus"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run([sys.executable, "stages/sample.py", "--ema", "models/ema.pt", "--out", "one",
                    "--metrics", "one.json", "--grid", "one.png"], cwd=repo, env=env(), check=True)
    for path in (repo / "data/samples").iterdir():
        two, one = (np.asarray(Image.open(p), dtype=int) for p in (path, repo / "one" / path.name))
        assert np.abs(two - one).max() <= 1, path.name  # the same image, up to rounding


def test_a_bad_param_fails_in_one_line_before_any_work(new_repo):
    repo = new_repo(train=dict(lr=-1.0))
    result = dvc(repo, "repro", "train", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert errors == ["error: params.yaml: train.lr = -1.0: expected a positive number"]
    assert "exited with 2" in result.stdout
    assert not (repo / "data").exists() or not any((repo / "data").iterdir())
