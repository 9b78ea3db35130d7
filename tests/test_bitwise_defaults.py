"""The defaults stay the seed's, bitwise: the committed params (CIFAR-10, 32 px) through this
code's stages give the same real PNGs, EMA weights, samples and FID as the code of BASELINE,
the last commit before data.source and data.resolution existed, run here on the same machine;
and the same checkpoint files, byte for byte, and FID as PREVIOUS, the last commit before the
objectives issue (#33; the conditional issue's bb6fda0 and the evaluation issue's 0d451cd were
checked the same way).

Both run every stage script at the tiny scale of the other tests, each from its own checkout
(`git archive` of BASELINE), in folders of their own."""
from __future__ import annotations

import copy
import io
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
       ("real_stats.py", "--images", "real", "--data", "dataset", "--out", "real.npz"),
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


# The keys added since BASELINE and PREVIOUS, at the committed values that keep the old behaviour
NEW_KEYS = {"data.source": "cifar10", "data.resolution": 32, "model.conditional": False,
            "train.label_dropout": 0.1, "sample.guidance": 0.0, "sample.labels": "balanced",
            "diffusion.prediction": "eps", "train.snr_gamma": 0.0}
SINCE_PREVIOUS = ("diffusion.prediction", "train.snr_gamma")  # the objectives issue's
PREVIOUS = "03447b7"  # main before the objectives issue (#33)


def checkout(commit: str, folder: Path) -> Path:
    """The stages and src of `commit`, extracted into `folder` (skipped in a shallow clone)."""
    if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT,
                      capture_output=True).returncode != 0:
        pytest.skip(f"commit {commit} is not in this clone (a shallow clone?)")
    folder.mkdir()
    archive = subprocess.run(["git", "archive", commit, "stages", "src"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def without(params: dict, keys) -> dict:
    """params without the dotted `keys`, each first checked to hold its NEW_KEYS value."""
    old = copy.deepcopy(params)
    for key in keys:
        section, name = key.split(".")
        assert old[section].pop(name) == NEW_KEYS[key], key
    return old


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny) -> tuple[Path, Path]:
    """(the baseline's work folder, this code's), each after the whole pipeline."""
    root = tmp_path_factory.mktemp("bitwise")
    baseline = checkout(BASELINE, root / "baseline")
    params = copy.deepcopy(tiny)
    return (run_pipeline(baseline, root / "before", without(params, NEW_KEYS), BEFORE),
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


def untimed(state: dict) -> dict:
    """A checkpoint's content without what measures time (seconds, images/s), which no two runs
    share: the tensors, optimizer, scaler, config and progress otherwise, as saved."""
    progress = dict(state["progress"], seconds=None,
                    rows=[[step, loss] for step, loss, _ in state["progress"]["rows"]])
    return dict(state, progress=progress)


def test_the_checkpoints_are_the_previous_codes(tmp_path, tiny, both):
    """The committed params train what the code before this issue trained: models/ema.pt equal
    to PREVIOUS's byte for byte (the run config it records included), and every checkpoint
    equal but for its timings (torch.save of equal states writes equal bytes:
    ddpm.checkpoint.save); its fid stage gives the same FID of the same samples."""
    previous = checkout(PREVIOUS, tmp_path / "previous")
    steps = [("train.py", "--data", str(both[1] / "dataset"), *TRAIN),
             ("fid.py", "--images", str(both[1] / "samples"), "--real-stats",
              str(both[1] / "real.npz"), "--metrics", "fid.json", "--report", "fid_report.json")]
    before = run_pipeline(previous, tmp_path / "before", without(tiny, SINCE_PREVIOUS), steps)
    now = both[1]
    assert (before / "ema.pt").read_bytes() == (now / "ema.pt").read_bytes()
    names = sorted(p.relative_to(before).as_posix() for p in (before / "ckpt").rglob("*.pt"))
    assert names and names == sorted(p.relative_to(now).as_posix()
                                     for p in (now / "ckpt").rglob("*.pt"))
    for name in names:
        old, new = (untimed(torch.load(folder / name, weights_only=True))
                    for folder in (before, now))
        buffers = [io.BytesIO(), io.BytesIO()]
        for state, buffer in zip((old, new), buffers):
            torch.save(state, buffer)
        assert buffers[0].getvalue() == buffers[1].getvalue(), name
    fid = [json.loads((folder / "fid.json").read_text()) for folder in (before, now)]
    assert {"fid", "kid", "precision", "recall"} <= fid[0].keys() and fid[0] == fid[1]
