"""A smoke run of benchmarks/objectives.py on a small archive in CIFAR-10's format: every run
trains for its seconds and is scored, and the file records what the table prints."""
from __future__ import annotations

import json
import subprocess
import sys

from fakes import ROOT


def test_two_objectives_train_for_the_same_seconds_and_are_scored(tmp_path, cifar_archive,
                                                                   inception_weights):
    archive, _ = cifar_archive
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/objectives.py"), "--cifar", str(archive),
         "--weights", str(inception_weights), "--seconds", "2", "--images", "10",
         "--data-limit", "64", "--runs", "eps;v, min-SNR-5", "--cache", str(tmp_path / "cache"),
         "--out", str(tmp_path / "objectives.json")],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "objectives.json").read_text())
    assert {"date", "device", "cpu", "torch", "commit"} <= result["machine"].keys()
    assert (result["seconds"], result["images"], result["real_images"]) == (2, 10, 64)
    eps, v = result["runs"]
    assert (eps["run"], v["run"]) == ("eps", "v, min-SNR-5")
    assert eps["objective"] == "eps-prediction MSE"
    assert v["objective"] == "v-prediction MSE, min-SNR-5 weights"
    assert eps["parameters"] == v["parameters"] == 563_555  # the quick preset's network
    for run in (eps, v):
        assert run["train_seconds"] >= 2 and run["steps"] >= 1 and run["fid"] > 0
        assert f"| {run['run']} | 563,555 | {run['steps']:,} |" in done.stdout
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the real statistics, computed once
