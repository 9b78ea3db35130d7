"""The defaults stay the seed's, bitwise: the committed params (CIFAR-10, 32 px) through this
code's stages give the same real PNGs, EMA weights, samples and FID as the code of BASELINE,
the last commit before data.source and data.resolution existed, run here on the same machine.

Both run every stage script at the tiny scale of the other tests, each from its own checkout
(`git archive` of BASELINE), in folders of their own."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fakes import ROOT

BASELINE = "96257df"  # main before the own-images issue (#28)
TRAIN = ["--checkpoints", "ckpt", "--runs", "runs", "--ema", "ema.pt", "--metrics", "train.json",
         "--report", "train_report.json", "--loss", "loss.tsv", "--samples", "previews",
         "--real-stats", "real.npz", "--fid", "fid.tsv", "--curves", "curves"]
LATER = [("sample.py", "--ema", "ema.pt", "--out", "samples", "--metrics", "sample.json",
          "--report", "sample_report.json", "--grid", "grid.png"),
         ("fid.py", "--images", "samples", "--real-stats", "real.npz", "--metrics", "fid.json",
          "--report", "fid_report.json")]
NOW = [("source.py", "--out", "source.json"),
       ("download.py", "--listing", "source.json", "--out", "dataset", "--report", "data.json"),
       ("export_real.py", "--data", "dataset", "--out", "real"),
       ("real_stats.py", "--images", "real", "--out", "real.npz"),
       ("train.py", "--data", "dataset", *TRAIN), *LATER]
BEFORE = [("download.py", "--out", "cifar10"),
          ("export_real.py", "--cifar", "cifar10", "--out", "real"),
          ("real_stats.py", "--images", "real", "--out", "real.npz"),
          ("train.py", "--cifar", "cifar10", *TRAIN), *LATER]


def run_pipeline(code: Path, work: Path, params: dict, steps: list[tuple[str, ...]]) -> Path:
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for script, *args in steps:
        done = subprocess.run([sys.executable, str(code / "stages" / script), *args], cwd=work,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{code}: {script}\n{done.stderr[-3000:]}"
    return work


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny) -> tuple[Path, Path]:
    """(the baseline's work folder, this code's), each after the whole pipeline."""
    if subprocess.run(["git", "cat-file", "-e", f"{BASELINE}^{{commit}}"], cwd=ROOT,
                      capture_output=True).returncode != 0:
        pytest.skip(f"commit {BASELINE} is not in this clone (a shallow clone?)")
    root = tmp_path_factory.mktemp("bitwise")
    baseline = root / "baseline"
    baseline.mkdir()
    archive = subprocess.run(["git", "archive", BASELINE, "stages", "src"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
    params = copy.deepcopy(tiny)
    assert (params["data"]["source"], params["data"]["resolution"]) == ("cifar10", 32)
    old = copy.deepcopy(params)
    del old["data"]["source"], old["data"]["resolution"]
    return (run_pipeline(baseline, root / "before", old, BEFORE),
            run_pipeline(ROOT, root / "now", params, NOW))


def test_the_real_pngs_are_byte_for_byte_the_baselines(both):
    before, now = both
    names = sorted(p.name for p in (before / "real").iterdir())
    assert names == sorted(p.name for p in (now / "real").iterdir()) and names
    for name in names:
        assert (before / "real" / name).read_bytes() == (now / "real" / name).read_bytes(), name


def test_the_ema_weights_are_bitwise_the_baselines(both):
    before, now = (torch.load(folder / "ema.pt", weights_only=True) for folder in both)
    assert before["ema"].keys() == now["ema"].keys()
    for key in before["ema"]:
        assert torch.equal(before["ema"][key], now["ema"][key]), key
    assert before["config"] == now["config"]  # the run's identity: old checkpoints resume
    assert now["image_shape"] == [3, 32, 32]


def test_the_samples_and_the_fid_are_the_baselines(both):
    before, now = both
    names = sorted(p.name for p in (before / "samples").iterdir())
    assert names == sorted(p.name for p in (now / "samples").iterdir()) and names
    for name in names:
        assert (before / "samples" / name).read_bytes() == (now / "samples" / name).read_bytes()
    fid = [json.loads((folder / "fid.json").read_text())["fid"] for folder in both]
    assert fid[0] == fid[1]
