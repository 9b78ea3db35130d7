"""The train stage under dvc: SIGKILL at any moment then `dvc repro` finishes the same run;
data-parallel training through dvc, and SIGTERM to it; a bad params value stops it at once."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dvc_repo import dvc, dvc_killed_when, env, make_repo, unfinished_epoch

pytestmark = pytest.mark.e2e

TRAIN = dict(epochs=5, checkpoint_every=1, sample_every=2, fid_every=1)


def test_sigkill_at_any_moment_then_repro_gives_the_uninterrupted_weights(new_repo):
    reference = new_repo("reference", train=TRAIN)
    dvc(reference, "repro", "train")

    repo = new_repo("killed", train=TRAIN)
    dvc(repo, "repro", "download")
    start = time.monotonic()
    repro = ("repro", "train")
    # while starting up
    dvc_killed_when(repo, repro, lambda: time.monotonic() - start > 1.0)
    assert unfinished_epoch(repo) == 0
    # right after a checkpoint
    dvc_killed_when(repo, repro, lambda: unfinished_epoch(repo) >= 1)
    # in the middle of an epoch
    dvc_killed_when(repo, repro, lambda: unfinished_epoch(repo) >= 3, 0.3)
    killed_at = unfinished_epoch(repo)
    assert 3 <= killed_at < TRAIN["epochs"]
    out = dvc(repo, "repro", "train").stdout
    assert re.search(rf"resuming from models/runs/\w+/last.pt at epoch {killed_at}", out), out
    assert not list((repo / "models/runs").iterdir())  # finished: moved to models/checkpoints

    expected = torch.load(reference / "models/ema.pt", weights_only=True)
    got = torch.load(repo / "models/ema.pt", weights_only=True)
    assert got["steps"] == expected["steps"]
    for name, tensor in expected["ema"].items():
        assert torch.equal(got["ema"][name], tensor), name  # bitwise, on the CPU
    loss = [r.split("\t")[:2]
            for r in (reference / "plots/train/loss.tsv").read_text().splitlines()]
    assert [r.split("\t")[:2]
            for r in (repo / "plots/train/loss.tsv").read_text().splitlines()] == loss
    grids = sorted(p.name for p in (repo / "plots/samples").iterdir())
    assert grids == ["epoch_0002.png", "epoch_0004.png", "epoch_0005.png", "progression.png"]
    assert (repo / "plots/samples/epoch_0002.png").read_bytes() == (
        reference / "plots/samples/epoch_0002.png").read_bytes()
    # one FID row per epoch, continued across the kills: the same rows as the uninterrupted run's
    fid = [r.split("\t")[:3] for r in (reference / "plots/train/fid.tsv").read_text().splitlines()]
    assert [row[0] for row in fid] == ["epoch", "1", "2", "3", "4", "5"]
    assert [r.split("\t")[:3]
            for r in (repo / "plots/train/fid.tsv").read_text().splitlines()] == fid
    kid = [r.split("\t")[4] for r in (reference / "plots/train/fid.tsv").read_text().splitlines()]
    assert [r.split("\t")[4]
            for r in (repo / "plots/train/fid.tsv").read_text().splitlines()] == kid
    metrics = json.loads((repo / "metrics/train.json").read_text())
    assert metrics["fid_last"] == pytest.approx(float(fid[-1][2]), rel=1e-5)
    assert metrics["kid_last"] == pytest.approx(float(kid[-1]), rel=1e-5)
    dvc(repo, "plots", "show")  # the fid_ and kid_during_training plots carry the rows
    html = (repo / "dvc_plots/index.html").read_text()
    assert "FID of the EMA weights during training" in html and fid[1][2] in html
    assert "KID of the EMA weights during training" in html and kid[1] in html
    assert "up to date" in dvc(repo, "status", "train").stdout


TWO = dict(gpus=2, batch_size=16, batch_gpu=4, sample_every=0, epochs=6)  # 2 x 2 x 4


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny):
    """(repo, output) of `dvc repro sample` with train.gpus=2 on the CPU, uninterrupted."""
    params = yaml.safe_load(yaml.safe_dump(tiny))
    params["train"].update(TWO)
    repo = make_repo(tmp_path_factory.mktemp("two") / "repo", params)
    return repo, dvc(repo, "repro", "sample").stdout


def test_two_processes_train_and_sample_through_dvc(two_processes):
    """gpus=2 on the CPU: torchrun with gloo; samples equal those of one process."""
    repo, out = two_processes
    assert out.count("launching 2 processes") == 2  # train and sample
    report = json.loads((repo / "reports/train.json").read_text())
    assert report["processes"] == 2 and report["batch_size"] == 4 * 2 * 2
    assert report["steps"] == TWO["epochs"] * (48 // 16)
    assert json.loads((repo / "reports/sample.json").read_text())["processes"] == 2

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["gpus"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run([sys.executable, "stages/sample.py", "--ema", "models/ema.pt", "--out", "one",
                    "--metrics", "one.json", "--report", "one_report.json", "--grid", "one.png"],
                   cwd=repo, env=env(), check=True)
    for path in (repo / "data/samples").iterdir():
        two, one = (np.asarray(Image.open(p), dtype=int) for p in (path, repo / "one" / path.name))
        assert np.abs(two - one).max() <= 1, path.name  # the same image, up to rounding


def test_sigterm_to_dvc_stops_every_process_of_a_two_process_stage_and_repro_resumes(
        new_repo, two_processes):
    """gpus=2: SIGTERM to dvc's process alone (DVC has no handler: its stage would run on,
    orphaned), with the stage run by bash (which execs it) and by /bin/sh (dash waits for it:
    DVC's shell where SHELL is unset, as in many CI containers), then to its whole process group
    (as `timeout` and systemd send it). Each time the workers stop with the one-line message and
    no process of the stage survives dvc; then `dvc repro` resumes and ends bitwise where the
    uninterrupted run ended."""
    repo = new_repo("sigterm", train=TWO)
    dvc(repo, "repro", "download")
    for group, shell in ((False, "/bin/bash"), (False, "/bin/sh"), (True, None)):
        before = unfinished_epoch(repo)
        out = dvc_killed_when(repo, ("repro", "train"),
                              lambda before=before: unfinished_epoch(repo) > before,
                              sig=signal.SIGTERM, group=group, shell=shell)
        stopped = [line for line in out.splitlines() if "train: interrupted" in line]
        assert len(stopped) == 1 and "Traceback" not in out, (shell, out)
        assert re.search(r"its last checkpoint, models/runs/\w+/last.pt \(epoch \d\), is kept",
                         stopped[0]), out
    killed_at = unfinished_epoch(repo)
    assert 3 <= killed_at < TWO["epochs"]
    out = dvc(repo, "repro", "train").stdout
    assert re.search(rf"resuming from models/runs/\w+/last.pt at epoch {killed_at}", out), out
    expected = torch.load(two_processes[0] / "models/ema.pt", weights_only=True)
    got = torch.load(repo / "models/ema.pt", weights_only=True)
    assert got["steps"] == expected["steps"]
    for name, tensor in expected["ema"].items():
        assert torch.equal(got["ema"][name], tensor), name  # bitwise, for the same split


def test_a_bad_param_fails_in_one_line_before_any_work(new_repo):
    """check_params rejects it before download (whose outputs DVC would delete) runs."""
    repo = new_repo(train=dict(lr=-1.0))
    result = dvc(repo, "repro", "train", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert errors == ["error: params.yaml: train.lr = -1.0: expected a finite number in (0, 1]"]
    assert "exited with 2" in result.stdout
    assert not (repo / "data").exists() or not any((repo / "data").iterdir())
