"""benchmarks/conditional_quick.py on a tiny fake layout of recorded runs: the figures it copies
are the records', its classifier scores are the classifier's own predictions, and its floor and
recomputed per-class FIDs are those of ddpm.class_fid on the same images' features."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from fakes import LABELS, ROOT, cifar_images, make_cifar_archive, prepare_dataset

PER_BATCH = 20  # 100 training images, 20 test images: two of each class (labels i mod 10)
LIMIT = 60      # the real images real_stats saw (data.limit)
SAMPLES = 20    # images a run drew: two a class
DIMS = 64


def load_script(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as `python benchmarks/NAME.py` has it
    return __import__(name)


def run_record(conditional: bool, guidance: float, fid: float, train_s: float, wall: float,
               stages: dict) -> dict:
    return {"date": "2026-12-07 12:00 UTC", "commit": "abc1234", "command": ["dvc", "exp", "run"],
            "wall_seconds": wall, "stage_seconds": stages,
            "metrics": {"train": {"seconds": train_s, "epochs": 35}, "sample": {"seconds": 9.0},
                        "fid": {"fid": fid}},
            "fid_during_training": [{"epoch": 7.0, "step": 434.0, "fid": fid + 50, "seconds": 1.0},
                                    {"epoch": 14.0, "step": 868.0, "fid": fid + 9, "seconds": 1.0}],
            "params": {"data": {"real_split": "train", "limit": LIMIT},
                       "model": {"conditional": conditional},
                       "sample": {"guidance": guidance, "labels": "balanced",
                                  "num_images": SAMPLES}}}


@pytest.fixture(scope="module")
def layout(tmp_path_factory, inception_weights):
    from ddpm.class_fid import class_arrays, per_class_fid
    from ddpm.fid import folder_features, inception, save_statistics, statistics
    from ddpm.images import write_pngs

    tmp = tmp_path_factory.mktemp("conditional_quick")
    archive = tmp / "cifar-10-python.tar.gz"
    md5 = make_cifar_archive(archive, per_batch=PER_BATCH)
    data = tmp / "data"
    data.mkdir()
    prepare_dataset(archive, md5, data / "dataset")
    model = inception(DIMS, str(inception_weights), torch.device("cpu"))

    def features(images: np.ndarray, name: str) -> np.ndarray:  # (N, 3, 32, 32) uint8
        folder = tmp / name
        folder.mkdir()
        write_pngs(images.transpose(0, 2, 3, 1), folder)
        return folder_features(folder, DIMS, 50, str(inception_weights), torch.device("cpu"),
                               model=model)

    real = cifar_images("train", PER_BATCH)[:LIMIT]
    real_labels = np.arange(LIMIT) % 10  # fakes._batch's labels
    real_features = features(real, "real")
    arrays = class_arrays(real_features, real_labels, LABELS)
    save_statistics(data / "real_stats.npz", *statistics(real_features), LIMIT, **arrays)
    save_statistics(tmp / "old_stats.npz", *statistics(real_features), LIMIT)  # no classes

    runs = tmp / "results"
    runs.mkdir()
    rng = np.random.default_rng(1)
    stages = {"real_stats": 5.5, "train": 100.5, "sample": 10.25, "fid": 3.0}
    inputs = {"unconditional": run_record(False, 0.0, 201.5, 90.25, 120.75, stages),
              "conditional": run_record(True, 0.3, 188.25, 91.5, 122.0, stages),
              "conditional_w0.0": run_record(True, 0.0, 190.75, 91.5, 20.5,
                                             {"sample": 10.0, "fid": 3.0})}
    sample_features = {}
    for tag, recorded in inputs.items():
        (runs / f"quick_{tag}.json").write_text(json.dumps(recorded))
        drawn = (cifar_images("train", PER_BATCH)[LIMIT:LIMIT + SAMPLES].astype(int)
                 + rng.integers(-30, 30, (SAMPLES, 3, 32, 32))).clip(0, 255).astype(np.uint8)
        sample_features[tag] = features(drawn, f"samples_{tag}")
        (tmp / f"samples_{tag}").rename(runs / f"samples_{tag}")
    stored = arrays["features"].astype(np.float32)
    report = per_class_fid(sample_features["conditional"], np.arange(SAMPLES) % 10, stored,
                           real_labels, LABELS)
    (runs / "reports_conditional").mkdir()
    (runs / "reports_conditional" / "fid.json").write_text(json.dumps(
        {"num_generated": SAMPLES, "num_real": LIMIT, "dims": DIMS, "per_class": report}))
    (runs / "reports_conditional_w0.0").mkdir()  # a fid stage from before per-class FIDs
    (runs / "reports_conditional_w0.0" / "fid.json").write_text(json.dumps(
        {"num_generated": SAMPLES, "num_real": LIMIT, "dims": DIMS}))

    script = load_script("classifier")
    script.main(["train", "--archive", str(archive), "--weights", str(tmp / "classifier.pt"),
                 "--epochs", "1", "--width", "4", "--batch", "16", "--threads", "1"])
    test_images, test_labels = (cifar_images("test", PER_BATCH),
                                np.arange(PER_BATCH) % 10)
    return {"tmp": tmp, "data": data, "runs": runs, "inputs": inputs, "weights": inception_weights,
            "classifier": tmp / "classifier.pt", "stored": stored, "real_labels": real_labels,
            "real_features": real_features, "sample_features": sample_features,
            "report": report, "test_features": features(
                test_images[np.argsort(test_labels, kind="stable").reshape(10, 2).T.ravel()],
                "test"),
            "mu_sigma": statistics(real_features)}


def run(layout, *more: str, data=None) -> dict:
    script = load_script("conditional_quick")
    out = layout["tmp"] / f"out{len(list(layout['tmp'].glob('out*.json')))}.json"
    result = script.main(["--runs", str(layout["runs"]), "--data", str(data or layout["data"]),
                          "--classifier", str(layout["classifier"]),
                          "--weights", str(layout["weights"]), "--out", str(out),
                          "--dims", str(DIMS), "--device", "cpu", "--threads", "1", *more])
    recorded = json.loads(out.read_text())
    assert recorded == result
    return recorded


def test_copies_the_records_and_scores_the_samples(layout):
    from ddpm.class_fid import per_class_fid
    result = run(layout)
    assert {"date", "device", "cpu", "torch_threads", "commit"} <= result.keys()
    assert list(result["runs"]) == ["unconditional", "conditional", "conditional_w0.0"]
    assert any(note.startswith("conditional_w1.0: no ") for note in result["notes"])
    assert result["dims"] == DIMS and result["classes"] == LABELS
    assert result["class_features"].startswith("real_stats.npz")
    for tag, recorded in layout["inputs"].items():
        got = result["runs"][tag]
        assert got["fid"] == recorded["metrics"]["fid"]["fid"]
        assert got["train_seconds"] == recorded["metrics"]["train"]["seconds"]
        assert got["wall_seconds"] == recorded["wall_seconds"]
        assert got["stage_seconds"] == recorded["stage_seconds"]
        assert got["fid_during_training"] == recorded["fid_during_training"]
        assert got["conditional"] == recorded["params"]["model"]["conditional"]
        assert got["samples"]["images"] == SAMPLES
        assert sum(got["classifier"]["predicted_histogram"].values()) == SAMPLES
    assert result["runs"]["conditional"]["guidance"] == 0.3
    assert result["runs"]["unconditional"]["per_class_fid"] is None
    assert "accuracy" not in result["runs"]["unconditional"]["classifier"]
    assert any("train did not run" in n for n in result["runs"]["conditional_w0.0"]["notes"])

    # the classifier's accuracy: its own predictions against i mod 10
    script = load_script("classifier")
    model, _, _ = script.load_weights(layout["classifier"])
    from ddpm.images import list_pngs, read_png
    for tag in ("conditional", "conditional_w0.0"):
        files = list_pngs(layout["runs"] / f"samples_{tag}")
        images = np.stack([read_png(p, 32) for p in files]).transpose(0, 3, 1, 2)
        pred = script.predict(model, images).argmax(1).numpy()
        truth = np.array([int(p.stem) % 10 for p in files])
        assert result["runs"][tag]["classifier"]["correct"] == int((pred == truth).sum())

    # per-class FIDs: the report's as they are; where the report has none, recomputed
    cond = result["runs"]["conditional"]["per_class_fid"]
    assert cond["source"] == "reports/fid.json" and cond["classes"] == layout["report"]
    assert cond["mean"] == pytest.approx(np.mean([c["fid"] for c in layout["report"].values()]))
    w0 = result["runs"]["conditional_w0.0"]["per_class_fid"]
    assert w0["source"].startswith("recomputed")
    expected = per_class_fid(layout["sample_features"]["conditional_w0.0"],
                             np.arange(SAMPLES) % 10, layout["stored"], layout["real_labels"],
                             LABELS)
    for name in LABELS:
        assert w0["classes"][name]["fid"] == pytest.approx(expected[name]["fid"], rel=1e-6)

    # the floor: two real test images a class against the class's stored training features
    floor = result["floor"]
    assert floor["images_per_class"] == 2 and floor["test_images"] == 20
    test, labels = layout["test_features"], np.arange(20) % 10
    expected = per_class_fid(test, labels, layout["stored"], layout["real_labels"], LABELS)
    for name in LABELS:
        assert floor["per_class"][name]["generated"] == 2
        assert floor["per_class"][name]["real"] == LIMIT // 10
        assert floor["per_class"][name]["fid"] == pytest.approx(expected[name]["fid"], rel=1e-6)
    from ddpm.fid import frechet_distance, statistics
    assert floor["all_classes"]["fid"] == pytest.approx(
        frechet_distance(*statistics(test), *layout["mu_sigma"]), rel=1e-6)
    assert result["fp32_check"] is None


def test_fp32_check_and_a_real_stats_without_class_features(layout, tmp_path):
    result = run(layout, "--fp32-check", "--per-class", "1")
    check = result["fp32_check"]
    assert check["run"] == "conditional"
    assert check["largest_difference_to_report"] == pytest.approx(0, abs=1e-6)
    scale = float(np.abs(layout["real_features"]).max())
    assert 0 <= check["largest_feature_difference"] <= scale * 2 ** -10
    assert result["floor"]["images_per_class"] == 1  # --per-class: one image, no covariance
    assert all(c["fid"] is None for c in result["floor"]["per_class"].values())

    old = tmp_path / "data"  # a real_stats from before 852d6bf: features recomputed
    old.mkdir()
    (old / "real_stats.npz").write_bytes((layout["tmp"] / "old_stats.npz").read_bytes())
    (old / "dataset").symlink_to(layout["data"] / "dataset")
    again = run(layout, data=old)
    assert again["class_features"].startswith("recomputed")
    assert again["fp32_check"]["largest_difference"] is not None
    first = run(layout)
    for name in LABELS:  # the same features, rounded as real_stats stores them
        assert again["floor"]["per_class"][name]["fid"] == pytest.approx(
            first["floor"]["per_class"][name]["fid"], rel=1e-5)
