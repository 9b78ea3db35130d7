"""Smoke runs of benchmarks/seed_metrics.py (on a few real images) and benchmarks/scores_cost.py:
each writes the figures it prints, with the machine, and they hold together."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fakes import ROOT
from real_data import SEED_SAMPLES, SHARED_DATA, require

MACHINE = {"date", "device", "cpu", "cpu_cores", "torch_threads", "torch", "commit"}


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# ~1 min; what it computes is checked in CI by tests/test_scores.py against torch-fidelity
@pytest.mark.slow
def test_seed_metrics_on_twelve_images_of_each_set(tmp_path, inception_weights):
    """--limit 12: every section, with the test's Inception weights (torch-fidelity's extractor
    loads them too); precision and recall of a set against itself are 1; the features kept."""
    pytest.importorskip("torch_fidelity")
    require(SEED_SAMPLES)
    out = run(ROOT / "benchmarks/seed_metrics.py", "--data", SHARED_DATA, "--weights",
              inception_weights, "--limit", "12", "--sizes", "6,12", "--repeats", "2",
              "--features", tmp_path / "features", "--out", tmp_path / "metrics.json")
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert MACHINE <= result.keys() and result["limit"] == 12
    main = result["seed_vs_train"]["stored_float16"]
    assert main["num_generated"] == main["num_real"] == 12
    assert {"fid", "kid", "kid_std", "precision", "recall"} <= main.keys()
    assert result["sanity"]["train_vs_itself"] == {"precision": 1.0, "recall": 1.0}
    assert result["sanity"]["test_vs_itself"] == {"precision": 1.0, "recall": 1.0}
    assert [(row["what"], row["n"], row["draws"]) for row in result["sizes"]] == [
        ("real test vs real train", 6, 2), ("real test vs real train", 12, 1),
        ("seed samples vs real train", 6, 2), ("seed samples vs real train", 12, 1)]
    fidelity = result["torch_fidelity"]
    assert fidelity["ours"]["num_generated"] == fidelity["torch_fidelity_extractor"][
        "num_generated"] == 12
    assert 0 < fidelity["feature_relative_difference"]["test"] < 1
    assert f"{fidelity['torch_fidelity_extractor']['fid']:.2f}" in out
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == [
        "seed_12.npy", "seed_12_torch_fidelity.npy", "test_12.npy", "test_12_torch_fidelity.npy",
        "train_12.npy"]


def test_scores_cost_records_the_rows_it_prints(tmp_path):
    out = run(ROOT / "benchmarks/scores_cost.py", "--sizes", "20x30,40x30", "--json",
              tmp_path / "cost.json")
    result = json.loads((tmp_path / "cost.json").read_text())
    assert MACHINE <= result.keys()
    assert [(row["generated"], row["real"]) for row in result["rows"]] == [(20, 30), (40, 30)]
    for row in result["rows"]:
        assert set(row["seconds"]) == {"kid", "precision_recall", "inception_score"}
        assert all(seconds > 0 for seconds in row["seconds"].values())  # 4 decimals: 0.1 ms
        kid = row["seconds"]["kid"]
        assert f"{row['generated']:>6} x {row['real']:>6}: KID {kid:7.2f} s" in out
