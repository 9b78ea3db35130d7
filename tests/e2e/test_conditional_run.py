"""A conditional run through the real dvc CLI: `dvc exp run -S +presets=conditional` trains on
the classes, draws each class in turn with guidance, grids them by class and scores each class;
a new guidance value re-runs sampling and scoring only."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dvc_repo import dvc

pytestmark = pytest.mark.e2e

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def test_the_conditional_preset_trains_samples_and_scores_by_class(reproduced, tiny):
    repo, _ = reproduced
    out = dvc(repo, "exp", "run", "-n", "cond", "-S", "+presets=conditional").stdout
    for stage in ("train", "sample", "fid"):
        assert f"Running stage '{stage}'" in out, out
    assert "Running stage 'real_stats'" not in out  # its features and labels serve every run

    num = tiny["sample"]["num_images"]
    report = json.loads((repo / "reports/sample.json").read_text())
    assert report["guidance"] == 0.3
    assert report["labels"] == {name: len(range(k, num, 10)) for k, name in enumerate(CIFAR10)}
    fid = json.loads((repo / "reports/fid.json").read_text())
    drawn = [name for k, name in enumerate(CIFAR10) if k < num]
    assert list(fid["per_class"]) == drawn
    assert all(fid["per_class"][name]["generated"] == report["labels"][name] for name in drawn)
    assert json.loads((repo / "metrics/fid.json").read_text())["fid"] > 0

    # one labelled row of 32 px images (+ 2 px padding) per class drawn
    grid = np.asarray(Image.open(repo / "plots/sample_grid.png"))
    assert grid.shape[0] == 2 + len(drawn) * 34
    model = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    assert "True" in json.dumps(model) or "true" in json.dumps(model)

    again = dvc(repo, "exp", "run", "-n", "cond-w1", "-S", "+presets=conditional", "-S",
                "sample.guidance=1").stdout
    assert "Stage 'train' didn't change, skipping" in again, again
    assert "Running stage 'sample'" in again and "Running stage 'fid'" in again
    assert json.loads((repo / "reports/sample.json").read_text())["guidance"] == 1.0
