"""The ddpm and fast presets run end to end through `dvc exp run` (the quick preset runs in
test_workflows' queued sweep): shrunk to seconds by -S values, which win over the presets."""
from __future__ import annotations

import json

import pytest
import yaml

from dvc_repo import dvc

pytestmark = pytest.mark.e2e

# The DDPM paper's network at tiny widths, one epoch, a few samples in a few steps
SHRINK = ["model.channels=[32,32,32]", "model.res_blocks=1", "train.epochs=1",
          "train.batch_size=16", "train.preview_steps=3", "sample.num_images=12",
          "sample.steps=8"]


def test_the_ddpm_and_fast_presets_train_sample_and_score(reproduced):
    repo, _ = reproduced
    presets = {name: yaml.safe_load((repo / f"presets/{name}.yaml").read_text())
               for name in ("ddpm", "fast")}
    overrides = [arg for value in ["+presets=[ddpm,fast]", *SHRINK] for arg in ("-S", value)]
    out = dvc(repo, "exp", "run", *overrides).stdout
    for stage in ("train", "sample", "fid"):
        assert f"Running stage '{stage}'" in out, out
    train = json.loads((repo / "reports/train.json").read_text())
    assert train["arch"] == "ddpm" and train["steps"] == 48 // 16
    sample = json.loads((repo / "reports/sample.json").read_text())
    assert sample["sampler"] == presets["fast"]["sample"]["sampler"] and sample["steps"] == 8
    assert json.loads((repo / "metrics/fid.json").read_text())["fid"] > 0
    rows = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    shown = [e["revs"][0]["data"]["params"]["params.yaml"]["data"]
             for row in rows for e in (row.get("experiments") or [])]
    assert len(shown) == 1, rows
    params = shown[0]  # the resolved values, not the presets' names
    assert params["model"]["arch"] == "ddpm" and params["model"]["heads"] == 1
    assert params["train"]["warmup_steps"] == presets["ddpm"]["train"]["warmup_steps"] == 5000
    assert params["sample"]["clip_denoised"] is True and "presets" not in params
