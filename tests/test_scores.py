"""KID, precision and recall, Inception Score (ddpm.scores) against torch-fidelity 0.4's own
metric functions on the same features, closed forms, and the fid stage that reports them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fakes
from fakes import run_stage
from ddpm.errors import PipelineError
from ddpm.fid import folder_features, save_statistics, statistics
from ddpm.images import write_pngs
from ddpm.scores import (classifier, inception_score, kid, load_features, logits_unbiased,
                         precision_recall)

fidelity_kid = pytest.importorskip("torch_fidelity.metric_kid")
fidelity_prc = pytest.importorskip("torch_fidelity.metric_prc")
fidelity_isc = pytest.importorskip("torch_fidelity.metric_isc")

REL = 1e-6  # the tolerance, on the same features
STAGE_REL = 1e-5  # the stage's features come from another process, whose thread count changes
                  # the Inception pass's float rounding (as test_fid's FID tolerance)


def pool_features(n: int, dims: int = 2048, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    """Non-negative, skewed, correlated features like Inception's pool3 (averages of ReLUs), as
    float64 holding float32 values (what pytorch-fid's get_activations returns)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(32, dims)) / 6
    latent = rng.normal(size=(n, 32)) + shift
    return np.maximum(latent @ mixing + rng.gamma(0.5, 0.3, size=(n, dims)), 0.0).astype(
        np.float32).astype(np.float64)


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


# --- KID -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_gen, n_real, subsets, size", [
    (300, 250, 20, 100),    # subsets smaller than both sets
    (120, 400, 10, 1000),   # capped at the generated set's 120 (torch-fidelity is told 120)
    (64, 64, 5, 64),        # subsets of the whole sets
])
def test_kid_equals_torch_fidelity(n_gen, n_real, subsets, size):
    generated, real = pool_features(n_gen, seed=1, shift=0.3), pool_features(n_real, seed=2)
    ours = kid(generated, real, subsets=subsets, subset_size=size)
    theirs = fidelity_kid.kid_features_to_metric(
        t(generated), t(real), kid_subsets=subsets, kid_subset_size=min(size, n_gen, n_real),
        rng_seed=2020, verbose=False)
    assert ours[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=REL)
    assert ours[1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=REL)
    assert ours[0] > 10 * ours[1] / np.sqrt(subsets)  # the shifted set is told apart


def test_kid_is_the_unbiased_mmd_of_the_paper():
    """One subset of the whole sets: the U-statistic over i != j of k(x_i, x_j) and k(y_i, y_j)
    minus twice the mean of k(x_i, y_j), k = (x.y / d + 1)^3, written out as double sums."""
    rng = np.random.default_rng(5)
    x, y = rng.random((7, 3)), rng.random((7, 3)) + 0.2
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = within / (m * (m - 1)) - 2 * across / m ** 2
    mean, std = kid(x, y, subsets=3, subset_size=m)  # every subset is the whole set, reordered
    assert mean == pytest.approx(expected, rel=1e-12) and std == pytest.approx(0, abs=1e-15)


def test_kid_of_two_draws_of_one_distribution_is_near_zero():
    """Unbiased: for two independent sets of one distribution, E KID = 0 (here within 3 std
    errors of the 50 subsets' mean), while the FID of the same sets is far above 0."""
    a, b = pool_features(400, dims=256, seed=3), pool_features(400, dims=256, seed=4)
    mean, std = kid(a, b, subsets=50, subset_size=200)
    assert abs(mean) < 3 * std / np.sqrt(50) + 1e-12
    from ddpm.fid import frechet_distance
    assert frechet_distance(*statistics(a), *statistics(b)) > 1000 * abs(mean)


def test_kid_refuses_sets_of_one_image():
    with pytest.raises(ValueError, match="two images a side"):
        kid(pool_features(1), pool_features(10))


# --- precision and recall ------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [10_000, 70])  # one block; blocks of 70 rows and columns
@pytest.mark.parametrize("save_cpu_ram", [True, False])
def test_precision_recall_equal_torch_fidelity(batch, save_cpu_ram):
    """prc_features_to_metric(generated, real): generated is its features_1 (issue #58's
    question, answered by its 0.4 convention and the paper's: precision = generated images inside
    the real manifold). Its full and part computations, in one block or many."""
    generated, real = pool_features(200, seed=6, shift=0.5), pool_features(230, seed=7)
    generated = np.concatenate([generated, real[:40]])  # some generated images inside for sure
    ours = precision_recall(generated, real, batch=batch)
    theirs = fidelity_prc.prc_features_to_metric(
        t(generated).float(), t(real).float(), prc_neighborhood=3, prc_batch_size=batch,
        save_cpu_ram=save_cpu_ram, verbose=False)
    assert ours == (pytest.approx(theirs["precision"], rel=REL),
                    pytest.approx(theirs["recall"], rel=REL))
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1


def test_precision_and_recall_are_not_swapped():
    """Generated images all piled on one real image: precise (each inside that real image's
    ball), no recall (the generated balls are tiny and cover only that one real image)."""
    real = pool_features(100, dims=64, seed=8)
    generated = real[:1] + np.random.default_rng(9).normal(0, 0.05, size=(50, 64))
    precision, recall = precision_recall(generated, real)
    assert precision == 1.0 and recall == pytest.approx(1 / 100)


def test_precision_and_recall_of_a_set_against_itself_are_one():
    features = pool_features(150, seed=10)
    assert precision_recall(features, features) == (1.0, 1.0)


def test_precision_recall_refuses_sets_of_k_images():
    with pytest.raises(ValueError, match="more than 3 images"):
        precision_recall(pool_features(3), pool_features(10))


# --- Inception Score -----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [100, 1003])  # splits of equal and of unequal sizes
def test_inception_score_equals_torch_fidelity(n):
    logits = torch.from_numpy(np.random.default_rng(n).normal(0, 3, size=(n, 1008))).float()
    ours = inception_score(logits)
    theirs = fidelity_isc.isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=REL)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=REL)


def test_inception_score_closed_forms():
    """Equal logits: p(y|x) = p(y), IS 1. Confident (p(y|x) = 1 - 1e-10) and balanced over C
    classes, in one split: exp(H(p(y)) - E H(p(y|x))) = C."""
    assert inception_score(torch.zeros(200, 1008))[0] == pytest.approx(1.0, abs=1e-12)
    confident = torch.full((500, 1008), -30.0)
    confident[torch.arange(500), torch.arange(500) % 25] = 0.0  # 20 images of each of 25 classes
    assert inception_score(confident, splits=1)[0] == pytest.approx(25.0, rel=1e-6)


def test_logits_are_torch_fidelitys_logits_unbiased():
    """pool3 features @ fc.weight.T in float32, no bias: the extractor's own layer, run on it."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    fc = torch.nn.Linear(2048, 1008)
    features = pool_features(20, seed=11)
    with torch.no_grad():
        expected = torch.from_numpy(features).float().mm(fc.weight.T)  # its forward's line
        assert "x.mm(self.fc.weight.T)" in Path(
            __import__("inspect").getsourcefile(FeatureExtractorInceptionV3)).read_text()
        assert torch.equal(logits_unbiased(features, fc.weight), expected)


# --- the classifier and the real features ---------------------------------------------------------

def test_classifier_of_pytorch_fid_weights_and_of_converted_ones(inception_weights, tmp_path):
    state = torch.load(inception_weights, weights_only=True)
    assert torch.equal(classifier(str(inception_weights)), state["fc.weight"])
    state["fc.weight"].zero_()  # what python -m ddpm.fid_weights convert writes: no classifier
    torch.save(state, tmp_path / "converted.pth")
    assert classifier(str(tmp_path / "converted.pth")) is None


def test_load_features_of_files_with_and_without_them(tmp_path):
    features = pool_features(6, dims=8)
    save_statistics(tmp_path / "with.npz", *statistics(features), 6,
                    features=features.astype(np.float16))
    np.testing.assert_array_equal(load_features(tmp_path / "with.npz", 8),
                                  features.astype(np.float16).astype(np.float32))
    np.savez(tmp_path / "pytorch_fid.npz", mu=np.zeros(8), sigma=np.eye(8))  # pytorch-fid's own
    assert load_features(tmp_path / "pytorch_fid.npz", 8) is None
    save_statistics(tmp_path / "before.npz", *statistics(features), 6)  # before features were kept
    assert load_features(tmp_path / "before.npz", 8) is None
    save_statistics(tmp_path / "wrong.npz", *statistics(features), 7, features=features)
    with pytest.raises(PipelineError, match=r"wrong\.npz: not 8-dim Inception features .*"
                                            r"dvc repro real_stats"):
        load_features(tmp_path / "wrong.npz", 8)


# --- the fid stage -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage_run(inception_weights, tmp_path_factory) -> tuple[Path, Path, Path]:
    """real_stats, then fid, at 2048 dims with random weights that carry a classifier: the
    stages as DVC runs them. Returns the work folder and the two image folders."""
    work = tmp_path_factory.mktemp("scores_stage")
    real, fake = work / "real", work / "fake"
    for folder, images in ((real, fakes.cifar_images("train", 4)),            # 20 images
                           (fake, fakes.cifar_images("test", 16, seed=3) // 2 + 60)):
        folder.mkdir()
        write_pngs(images.transpose(0, 2, 3, 1), folder)
    params = {"device": "cpu", "fid__dims": 2048, "fid__weights": str(inception_weights)}
    for script, args in (("real_stats.py", ["--images", str(real), "--out", "stats.npz"]),
                         ("fid.py", ["--images", str(fake), "--real-stats", "stats.npz",
                                     "--metrics", "fid.json", "--report", "report.json"])):
        result = run_stage(script, work, *args, **params)
        assert result.returncode == 0, result.stderr
    return work, real, fake


def test_the_fid_stage_reports_what_torch_fidelity_computes(stage_run, inception_weights):
    """metrics/fid.json's kid, kid_std, precision, recall and inception_score equal
    torch-fidelity's functions on the same Inception features (the real ones as real_stats
    stores them, float16) and on the logits of the weights' own classifier; fid as before.
    (tests above hold 1e-6 on the very same features; here they are this process's.)"""
    work, real, fake = stage_run
    weights = str(inception_weights)
    generated = folder_features(fake, 2048, 50, weights, torch.device("cpu"))
    reference = folder_features(real, 2048, 50, weights, torch.device("cpu"))
    stored = reference.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(load_features(work / "stats.npz", 2048), stored)
    metrics = json.loads((work / "fid.json").read_text())
    report = json.loads((work / "report.json").read_text())
    assert set(metrics) == {"fid", "kid", "kid_std", "precision", "recall", "inception_score"}
    from ddpm.fid import frechet_distance
    assert metrics["fid"] == pytest.approx(
        frechet_distance(*statistics(generated), *statistics(reference)), rel=1e-5)
    theirs = fidelity_kid.kid_features_to_metric(t(generated), t(stored.astype(np.float64)),
                                                 kid_subset_size=16, rng_seed=2020, verbose=False)
    prc = fidelity_prc.prc_features_to_metric(t(generated).float(), t(stored), verbose=False)
    fc = torch.load(inception_weights, weights_only=True)["fc.weight"]
    logits = torch.from_numpy(generated).float().mm(fc.T)
    isc = fidelity_isc.isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    expected = {"kid": theirs["kernel_inception_distance_mean"],
                "kid_std": theirs["kernel_inception_distance_std"],
                "precision": prc["precision"], "recall": prc["recall"],
                "inception_score": isc["inception_score_mean"]}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=STAGE_REL), key
    assert report["inception_score_std"] == pytest.approx(isc["inception_score_std"],
                                                          rel=STAGE_REL)
    assert report["kid_subsets"] == 100 and report["kid_subset_size"] == 16
    assert report["kid_seed"] == 2020 and report["nearest_k"] == 3
    assert report["inception_score_splits"] == 10


def test_without_real_features_or_a_classifier_the_stage_says_why(stage_run, inception_weights,
                                                                   tmp_path):
    """pytorch-fid's own statistics file (mu, sigma only) and converted weights (classifier zero):
    FID alone, and one line for each missing number, in stderr and reports/fid.json."""
    work, real, fake = stage_run
    mu, sigma = statistics(folder_features(real, 64, 50, str(inception_weights),
                                           torch.device("cpu")))
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
    state = torch.load(inception_weights, weights_only=True)
    state["fc.weight"].zero_()
    torch.save(state, tmp_path / "converted.pth")
    result = run_stage("fid.py", tmp_path, "--images", str(fake), "--real-stats",
                       "pytorch_fid.npz", "--metrics", "fid.json", "--report", "report.json",
                       device="cpu", fid__dims=64, fid__weights=str(tmp_path / "converted.pth"))
    assert result.returncode == 0, result.stderr
    assert set(json.loads((tmp_path / "fid.json").read_text())) == {"fid"}
    report = json.loads((tmp_path / "report.json").read_text())
    lines = [line for line in result.stderr.splitlines() if line.startswith("fid: no ")]
    assert len(lines) == 2, result.stderr
    assert "holds no real features" in lines[0] and "dvc repro real_stats" in lines[0]
    assert "carries no classifier" in lines[1] and "converted.pth" in lines[1]
    assert report["kid_note"] in lines[0] and report["inception_score_note"] in lines[1]


def test_too_few_images_for_a_number_leave_it_out_in_one_line(stage_run, inception_weights,
                                                               tmp_path):
    """Three generated images: FID and KID (two a side suffice), but no precision and recall
    (k = 3 neighbours), said in one line; the stage does not fail."""
    work, real, fake = stage_run
    features = folder_features(real, 64, 50, str(inception_weights), torch.device("cpu"))
    save_statistics(tmp_path / "stats.npz", *statistics(features), len(features),
                    features=features.astype(np.float16))
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        (few / f"{i}.png").write_bytes((fake / f"{i}.png").read_bytes())
    result = run_stage("fid.py", tmp_path, "--images", str(few), "--real-stats", "stats.npz",
                       "--metrics", "fid.json", "--report", "report.json", device="cpu",
                       fid__dims=64, fid__weights=str(inception_weights))
    assert result.returncode == 0, result.stderr
    assert set(json.loads((tmp_path / "fid.json").read_text())) == {"fid", "kid", "kid_std"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kid_subset_size"] == 3
    assert report["precision_note"] == ("3 nearest neighbours need more than 3 images a side, "
                                        "not 3 and 20")
    assert f"fid: no precision or recall: {report['precision_note']}" in result.stderr
