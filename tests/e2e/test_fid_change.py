"""A change of fid.* (or train.fid_*) after a finished run costs little: train re-runs (DVC
cannot see that train.fid_every = 0 leaves fid.* unread) but resumes the published checkpoint at
its last epoch and ends at once, rewriting models/ema.pt byte for byte, so sample is skipped."""
from __future__ import annotations

import hashlib
import json
import re

import pytest

from dvc_repo import dvc

pytestmark = pytest.mark.e2e


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digest(folder) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(folder.iterdir())}


def test_plots_show_without_training_fids_has_no_fid_curve_and_does_not_fail(reproduced):
    repo, _ = reproduced
    out = dvc(repo, "plots", "show").stdout
    html = (repo / "dvc_plots/index.html").read_text()
    shown = re.findall(r'<img src="([^"]+)"', html)
    assert any(src.replace("_", "/").endswith("curves/loss.png") for src in shown), shown
    assert not any("fid.png" in src for src in shown) and "ERROR" not in out, out


def test_a_change_of_fid_settings_ends_train_at_once_and_skips_sample(reproduced, tiny):
    repo, _ = reproduced
    ema, samples = digest(repo / "models/ema.pt"), folder_digest(repo / "data/samples")
    before = json.loads((repo / "metrics/train.json").read_text())
    batch = tiny["fid"]["batch_size"] // 2
    out = dvc(repo, "exp", "run", "-S", f"fid.batch_size={batch}",
              "-S", f"train.fid_images={tiny['train']['fid_images'] + 2}").stdout
    epochs = tiny["train"]["epochs"]
    # real_stats and fid list fid.*; train lists train.fid_images, not fid.batch_size (speed only)
    for stage in ("real_stats", "train", "fid"):
        assert f"Running stage '{stage}'" in out, out
    assert f"resuming from models/checkpoints/last.pt at epoch {epochs}" in out, out
    assert "Stage 'sample' didn't change, skipping" in out and "Running stage 'sample'" not in out
    assert digest(repo / "models/ema.pt") == ema
    assert folder_digest(repo / "data/samples") == samples
    after = json.loads((repo / "metrics/train.json").read_text())
    assert (after["epochs"], after["seconds"]) == (
        before["epochs"], before["seconds"])  # not one step trained
