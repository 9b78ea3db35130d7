"""The whole pipeline through the real dvc CLI: repro, exp run, exp show, metrics diff, plots show.

The tests read one of two copies of a reproduced repository: as `dvc repro` left it (repro), or
after an experiment (experiment), each made once for the module; so any of them runs alone, or in
any order.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dvc_repo import assert_up_to_date, dvc, sh
from fakes import cifar_images

pytestmark = pytest.mark.e2e


EXPERIMENT = ["exp", "run", "-S", "train.lr=1e-4", "-S", "train.fid_every=1"]


@pytest.fixture(scope="module")
def repro(reproduced):
    """A repository after `dvc repro` (results committed): (path, the command's output)."""
    return reproduced


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, reproduced_template):
    """Another copy of the reproduced repository after `dvc exp run -S train.lr=1e-4 -S
    train.fid_every=1`, applied to its workspace: (path, the command's output)."""
    repo = tmp_path_factory.mktemp("experiment") / "repo"
    shutil.copytree(reproduced_template[0], repo, symlinks=True)
    return repo, dvc(repo, *EXPERIMENT).stdout


def read_json(path):
    return json.loads(path.read_text())


def test_repro_runs_every_stage_in_order(repro):
    _, out = repro
    ran = re.findall(r"Running stage '(\w+)'", out)
    assert ran == ["check_params", "source", "download", "export_real", "real_stats", "train",
                   "sample", "fid"]


def test_download_and_export_reproduce_the_archive_pixel_for_pixel(repro, tiny):
    repo, _ = repro
    assert sorted(p.name for p in (repo / "data/dataset").iterdir()) == [
        "dataset.json", "test.npy", "test_labels.npy", "train.npy", "train_labels.npy"]
    limit = tiny["data"]["limit"]
    pngs = sorted((repo / "data/real_png").iterdir(), key=lambda p: int(p.stem))
    assert [p.name for p in pngs] == [f"{i}.png" for i in range(limit)]
    expected = cifar_images("train", per_batch=16)[:limit].transpose(0, 2, 3, 1)
    for i, path in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(path)), expected[i]), path


def test_real_stats_are_the_inception_statistics_of_the_exported_images(repro, tiny):
    """data/real_stats.npz holds what ddpm.fid.folder_statistics computes from data/real_png with
    fid.* (to float32 rounding: the stage ran with its own thread count), in pytorch-fid's
    format."""
    from ddpm.fid import folder_statistics
    repo, _ = repro
    fid = tiny["fid"]
    mu, sigma, n = folder_statistics(repo / "data/real_png", fid["dims"], fid["batch_size"],
                                     fid["weights"], torch.device("cpu"))
    assert n == tiny["data"]["limit"]
    with np.load(repo / "data/real_stats.npz") as f:
        assert f["mu"].shape == (fid["dims"],) and int(f["num_images"]) == n
        np.testing.assert_allclose(f["mu"], mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f["sigma"], sigma, rtol=1e-5, atol=1e-6)
        assert np.allclose(f["sigma"], f["sigma"].T)


def test_train_writes_weights_metrics_loss_and_previews(repro, tiny):
    repo, _ = repro
    metrics = read_json(repo / "metrics/train.json")
    report = read_json(repo / "reports/train.json")  # the facts of the run, beside the metrics
    epochs, steps_per_epoch = tiny["train"]["epochs"], tiny["data"]["limit"] // 16
    assert metrics["epochs"] == epochs and report["steps"] == epochs * steps_per_epoch
    assert 0.5 < metrics["loss"] < 1.5  # eps-prediction MSE of a barely trained net: about 1
    for key in ("seconds", "images_per_second", "peak_memory_mb"):
        assert metrics[key] > 0, key
    rows = (repo / "plots/train/loss.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "loss", "images_per_second"]
    assert len(rows) == 1 + report["steps"]
    ema = torch.load(repo / "models/ema.pt", weights_only=True)
    assert ema["config"]["train"]["lr"] == tiny["train"]["lr"]
    assert sum(v.numel() for v in ema["ema"].values()) == report["parameters"] > 0
    grids = sorted(p.name for p in (repo / "plots/samples").iterdir())
    assert grids == [f"epoch_{e:04d}.png" for e in range(1, epochs + 1)] + ["progression.png"]
    assert (repo / "models/checkpoints/last.pt").is_file()
    assert tiny["train"]["fid_every"] == 0  # no FID curve, and DVC is content with the folder
    assert sorted(p.name for p in (repo / "plots/curves").iterdir()) == ["loss.png"]
    assert Image.open(repo / "plots/curves/loss.png").size == (640, 400)


def test_sample_and_fid_write_images_and_metrics(repro, tiny):
    repo, _ = repro
    n = tiny["sample"]["num_images"]
    pngs = list((repo / "data/samples").iterdir())
    assert sorted(p.name for p in pngs) == sorted(f"{i}.png" for i in range(n))
    assert all(Image.open(p).size == (32, 32) and Image.open(p).mode == "RGB" for p in pngs)
    assert read_json(repo / "metrics/sample.json")["images_per_second"] > 0
    sample = read_json(repo / "reports/sample.json")
    assert sample["num_images"] == n and sample["sampler"] == "ddpm"
    assert sample["steps"] == tiny["sample"]["steps"] and sample["kept_images"] == 0
    metrics = read_json(repo / "metrics/fid.json")
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
    # KID, precision and recall against the features real_stats kept; no Inception Score at
    # 64 dims (tests/test_scores.py checks the values)
    assert set(metrics) == {"fid", "kid", "kid_std", "precision", "recall"}
    report = read_json(repo / "reports/fid.json")
    assert {key: report[key] for key in ("num_generated", "num_real", "dims", "kid_subset_size")
            } == {"num_generated": n, "num_real": tiny["data"]["limit"],
                  "dims": tiny["fid"]["dims"], "kid_subset_size": min(n, tiny["data"]["limit"])}
    assert "fid.dims is 64" in report["inception_score_note"]
    assert (repo / "plots/sample_grid.png").is_file()


def test_status_is_clean_and_outputs_are_not_in_git(repro):
    repo, _ = repro
    assert_up_to_date(repo)
    tracked = sh(repo, "git", "ls-files").stdout.split()
    assert not [f for f in tracked if f.startswith(("data/", "models/"))]  # DVC's, not git's
    assert "metrics/train.json" in tracked and "dvc.lock" in tracked
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


def test_exp_run_reruns_train_sample_fid_only(experiment):
    repo, out = experiment
    for stage in ("download", "export_real", "real_stats"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
        assert f"Running stage '{stage}'" not in out
    for stage in ("train", "sample", "fid"):
        assert f"Running stage '{stage}'" in out, out
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 1e-4
    assert sorted(p.name for p in (repo / "plots/curves").iterdir()) == ["fid.png", "loss.png"]


def test_exp_show_lists_the_experiment_with_its_params_and_fid(experiment):
    repo, _ = experiment
    rows = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    experiments = [e for row in rows for e in (row.get("experiments") or [])]
    assert experiments, rows
    data = experiments[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == 1e-4
    assert "fid" in data["metrics"]["metrics/fid.json"]["data"]


def test_metrics_diff_compares_the_experiment_with_the_baseline(experiment):
    repo, _ = experiment
    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)
    assert "metrics/train.json" in diff and "loss" in diff["metrics/train.json"]
    assert diff["metrics/train.json"]["loss"]["old"] != diff["metrics/train.json"]["loss"]["new"]


def loss_series(repo, rev: str = "") -> list[tuple[str, str]]:
    """(step, loss) of plots/train/loss.tsv, in the workspace or at a git revision, as text."""
    text = (sh(repo, "git", "show", f"{rev}:plots/train/loss.tsv").stdout if rev else
            (repo / "plots/train/loss.tsv").read_text())
    return [tuple(line.split("\t")[:2]) for line in text.splitlines()[1:]]


def vega_data(html: str, plot: str) -> list[dict]:
    """The data rows of the vega-lite spec that DVC's page draws as `plot`."""
    start = html.index("var spec = ", html.index(f'<div id = "{plot}">')) + len("var spec = ")
    spec, _ = json.JSONDecoder().raw_decode(html, start)
    return spec["data"]["values"]


def images(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_plots_show_renders_the_loss_series_the_curves_and_the_grids(experiment):
    repo, _ = experiment
    dvc(repo, "plots", "show")
    html = (repo / "dvc_plots/index.html").read_text()
    drawn = [(row["step"], row["loss"]) for row in vega_data(html, "loss")]
    assert drawn == loss_series(repo)  # the loss series is embedded in the page (vega)
    shown = images(html)
    for png in ("curves/loss.png", "curves/fid.png", "samples/epoch_0001.png", "sample_grid.png"):
        found = [src for src in shown if src.replace("_", "/").endswith(png.replace("_", "/"))]
        assert found, (png, shown)
        assert (repo / "dvc_plots" / found[0]).is_file()  # the page holds its own copy: offline


def test_plots_diff_overlays_the_vega_curves_and_shows_both_runs_pngs(experiment):
    repo, _ = experiment
    dvc(repo, "plots", "diff", "HEAD", "-o", "diff_plots")
    html = (repo / "diff_plots/index.html").read_text()
    assert "workspace" in html and "HEAD" in html
    for plot in ("loss", "loss_smoothed"):  # one chart, both runs' series
        rows = vega_data(html, plot)
        for rev, series in (("HEAD", loss_series(repo, "HEAD")), ("workspace", loss_series(repo))):
            assert [(r["step"], r["loss"]) for r in rows if r["rev"] == rev] == series, plot
    assert loss_series(repo, "HEAD") != loss_series(repo)
    shown = images(html)
    loss_pngs = [src for src in shown if src.replace("_", "/").endswith("curves/loss.png")]
    assert len(loss_pngs) == 2, shown  # the baseline's and the experiment's
    assert len([src for src in shown if src.replace("_", "/").endswith("curves/fid.png")]) == 1
