"""ddpm.fid against pytorch-fid itself (its functions and its CLI) and closed forms."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path

import fakes
import pytorch_fid_compat  # pytorch-fid on SciPy releases without sqrtm(disp=)
from fakes import run_stage
from ddpm.errors import PipelineError
from ddpm.fid import (WEIGHTS_FILE, folder_statistics, frechet_distance,
                      load_statistics, save_statistics)
from ddpm.images import write_pngs

DIMS = 64        # only Inception's first block runs: cheap on a CPU
NUM_IMAGES = 40  # per folder
CPU = torch.device("cpu")

# pytorch-fid 0.3 passes sqrtm(disp=...), deprecated by SciPy 1.16 and 1.17 (later: compat shim)
pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")


def random_covariance(rng: np.random.Generator, dims: int) -> np.ndarray:
    """A well-conditioned SPD matrix: A A^T / n + 0.01 I."""
    a = rng.normal(size=(dims, 2 * dims))
    return a @ a.T / (2 * dims) + 0.01 * np.eye(dims)


# --- the Frechet distance -----------------------------------------------------------------------

@pytest.mark.parametrize("dims", [64, 256])
def test_frechet_distance_equals_pytorch_fid(dims):
    """Reference: pytorch-fid's calculate_frechet_distance (scipy sqrtm), 1e-6 relative."""
    rng = np.random.default_rng(dims)
    mu1, mu2 = rng.normal(size=dims), rng.normal(size=dims)
    s1, s2 = random_covariance(rng, dims), random_covariance(rng, dims)
    expected = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_the_reference_runs_on_a_scipy_without_sqrtm_disp(monkeypatch):
    """pytorch_fid_compat: on a SciPy whose sqrtm takes no disp (a GPU machine's did), pytorch-fid
    fails as it did there, then, patched, gives the value it gives on SciPy 1.17."""
    from scipy import linalg
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    s1, s2 = random_covariance(rng, 32), random_covariance(rng, 32)
    expected = calculate_frechet_distance(mu1, s1, mu2, s2)
    sqrtm = linalg.sqrtm
    monkeypatch.setattr(linalg, "sqrtm", lambda A: sqrtm(A))  # the signature without disp
    with pytest.raises(TypeError):
        calculate_frechet_distance(mu1, s1, mu2, s2)
    pytorch_fid_compat.patch_sqrtm()
    assert calculate_frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_rank_deficient_equals_pytorch_fid():
    """Fewer images than dims (singular covariances, as in the small-folder tests): still equal."""
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(40, DIMS)), rng.normal(0.3, 1.5, size=(40, DIMS))
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (f1, f2)]
    expected = calculate_frechet_distance(*stats[0], *stats[1])
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_of_identical_statistics_is_zero():
    """d(N(mu, S), N(mu, S)) = 0."""
    rng = np.random.default_rng(2)
    mu, s = rng.normal(size=256), random_covariance(rng, 256)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)


def test_frechet_distance_of_diagonal_covariances_is_the_closed_form():
    """Diagonal S1, S2: sum (mu1 - mu2)^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    v1, v2 = rng.uniform(0.1, 4, size=32), rng.uniform(0.1, 4, size=32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected,
                                                                                 rel=1e-10)


# --- statistics of image folders ----------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two folders of NUM_IMAGES PNGs from different distributions (so the FID is clearly > 0)."""
    root = tmp_path_factory.mktemp("fid_images")
    real = fakes.cifar_images("train", NUM_IMAGES // 5)                          # (N, 3, 32, 32)
    fake = fakes.cifar_images("test", NUM_IMAGES, seed=7) // 2 + 64              # low contrast
    for name, images in (("real", real), ("fake", fake)):
        (root / name).mkdir()
        write_pngs(images.transpose(0, 2, 3, 1), root / name)
    return root / "real", root / "fake"


def run_pytorch_fid_cli(folders: tuple[Path, Path], weights: Path, work: Path,
                        dims: int = DIMS):
    """`python -m pytorch_fid real fake --dims 64` (or `dims`) with the given weights in its hub
    cache (through pytorch_fid_compat, which is that command on any SciPy)."""
    checkpoints = work / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(weights, checkpoints / WEIGHTS_FILE)  # pytorch-fid has no weights option
    return subprocess.run(
        [sys.executable, str(fakes.ROOT / "tests" / "pytorch_fid_compat.py"), *map(str, folders),
         "--dims", str(dims),
         "--device", "cpu"],
        env={**os.environ, "TORCH_HOME": str(work / "torch_home"),
             "OMP_NUM_THREADS": "1"},  # it runs beside this process: one thread each, as conftest
        capture_output=True, text=True, timeout=300)


def run_fid_stages(folders: tuple[Path, Path], weights: Path, work: Path):
    """real_stats.py on the real folder, then fid.py on the fake one, as DVC would run them;
    returns both results and the folder they ran in."""
    real, fake = folders
    params = {"device": "cpu", "fid__dims": DIMS, "fid__weights": str(weights)}
    real_stats = run_stage("real_stats.py", work, "--images", str(real), "--out", "stats.npz",
                           **params)
    fid = run_stage("fid.py", work, "--images", str(fake), "--real-stats", "stats.npz",
                    "--metrics", "metrics/fid.json", "--report", "reports/fid.json", **params)
    return real_stats, fid, work


@pytest.fixture(scope="module")
def subprocesses(folders, inception_weights, tmp_path_factory) -> dict[str, Future]:
    """The pytorch-fid CLI and the two stage scripts, started in the background: they overlap
    with each other and with our_stats (much of their time is importing torch)."""
    cli_work, stages_work = tmp_path_factory.mktemp("cli"), tmp_path_factory.mktemp("stages")
    with ThreadPoolExecutor(2) as pool:
        yield {"cli": pool.submit(run_pytorch_fid_cli, folders, inception_weights, cli_work),
               "stages": pool.submit(run_fid_stages, folders, inception_weights, stages_work)}


@pytest.fixture(scope="module")
def our_stats(subprocesses, folders, inception_weights) -> dict[str, tuple]:
    """(mu, sigma, n) of each folder, computed in this process with fid.weights = the fixture
    (after starting the subprocesses, so that they run meanwhile)."""
    return {folder.name: folder_statistics(folder, DIMS, 50, str(inception_weights), CPU)
            for folder in folders}


def test_folder_fid_equals_the_pytorch_fid_cli(our_stats, subprocesses):
    """Reference: `python -m pytorch_fid real fake --dims 64` with the same weights, 1e-4 rel."""
    result = subprocesses["cli"].result()
    assert result.returncode == 0, result.stderr
    expected = float(re.search(r"FID:\s+(\S+)", result.stdout).group(1))
    ours = frechet_distance(*our_stats["real"][:2], *our_stats["fake"][:2])
    assert expected > 1.0  # the folders really differ
    assert ours == pytest.approx(expected, rel=1e-4)
    assert our_stats["real"][2] == our_stats["fake"][2] == NUM_IMAGES


def test_real_stats_and_fid_stages_match_the_in_process_fid(our_stats, subprocesses):
    """metrics/fid.json: fid equals frechet_distance of the in-process statistics; reports/fid.json:
    the counts and dims."""
    real_stats, fid, work = subprocesses["stages"].result()
    assert real_stats.returncode == 0, real_stats.stderr
    mu, sigma, count = load_statistics(work / "stats.npz", DIMS)
    assert count == NUM_IMAGES
    np.testing.assert_allclose(mu, our_stats["real"][0], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(sigma, our_stats["real"][1], rtol=1e-5, atol=1e-8)
    assert fid.returncode == 0, fid.stderr
    for stage, result in (("real_stats", real_stats), ("fid", fid)):  # bars that say what they do
        bar = re.search(rf"{stage}: Inception features of \S+: 100%.*\| (\d+)/(\d+) "
                        r"\[.*(?:img/s|s/img)\]", result.stderr)  # s/img: under 1 img/s
        assert bar and bar.groups() == (str(NUM_IMAGES),) * 2, result.stderr
    metrics = json.loads((work / "metrics" / "fid.json").read_text())
    report = json.loads((work / "reports" / "fid.json").read_text())
    # the numbers to compare (tests/test_scores.py checks the others); the facts go to the report
    assert set(metrics) == {"fid", "kid", "kid_std", "precision", "recall"}
    assert report == {"num_generated": NUM_IMAGES, "num_real": NUM_IMAGES, "dims": DIMS,
                      "kid_subsets": 100, "kid_subset_size": NUM_IMAGES, "kid_seed": 2020,
                      "nearest_k": 3, "inception_score_note": "it classifies the 2048-dim pool "
                      "features, and fid.dims is 64"}
    expected = frechet_distance(*our_stats["fake"][:2], *our_stats["real"][:2])
    assert metrics["fid"] == pytest.approx(expected, rel=1e-5)


def test_statistics_file_round_trip_and_pytorch_fid_reads_it(tmp_path):
    """save -> load returns the arrays and count; pytorch-fid's own .npz loader reads mu, sigma."""
    rng = np.random.default_rng(4)
    mu, sigma = rng.normal(size=DIMS), random_covariance(rng, DIMS)
    path = tmp_path / "stats.npz"
    save_statistics(path, mu, sigma, 123)
    assert os.listdir(tmp_path) == ["stats.npz"]  # atomic write: no temp file left
    got_mu, got_sigma, count = load_statistics(path, DIMS)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma) and count == 123
    pf_mu, pf_sigma = compute_statistics_of_path(str(path), None, 50, DIMS, "cpu")
    assert np.array_equal(pf_mu, mu) and np.array_equal(pf_sigma, sigma)


def test_statistics_of_other_dims_or_garbage_name_the_file(tmp_path):
    """Stats of 64 dims read with fid.dims = 2048, or not an .npz: PipelineError naming the file."""
    path = tmp_path / "stats.npz"
    save_statistics(path, np.zeros(DIMS), np.eye(DIMS), 2)
    with pytest.raises(PipelineError, match=re.escape(str(path)) + ".*fid.dims"):
        load_statistics(path, 2048)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not numpy")
    with pytest.raises(PipelineError, match=re.escape(str(garbage))):
        load_statistics(garbage, DIMS)
    single_array = tmp_path / "array.npz"  # np.save's .npy format: np.load gives an ndarray
    with open(single_array, "wb") as f:
        np.save(f, np.zeros(DIMS))
    with pytest.raises(PipelineError, match=re.escape(str(single_array))):
        load_statistics(single_array, DIMS)


# --- errors -------------------------------------------------------------------------------------

def small_folder(path: Path, n: int, size: int = 32) -> Path:
    path.mkdir(parents=True)
    images = np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    write_pngs(images, path)
    return path


def test_unusable_folders_are_image_folder_errors(tmp_path, inception_weights):
    """Empty, one image (no covariance), a 64x64 PNG: PipelineError naming the folder / file."""
    weights = str(inception_weights)
    empty = small_folder(tmp_path / "empty", 0)
    with pytest.raises(PipelineError, match=re.escape(str(empty))):
        folder_statistics(empty, DIMS, 50, weights, CPU)
    one = small_folder(tmp_path / "one", 1)
    with pytest.raises(PipelineError, match=re.escape(str(one))):
        folder_statistics(one, DIMS, 50, weights, CPU)
    mixed = small_folder(tmp_path / "mixed", 3)
    write_pngs(np.zeros((1, 64, 64, 3), np.uint8), mixed, start=3)
    with pytest.raises(PipelineError, match=re.escape(str(mixed / "3.png"))):
        folder_statistics(mixed, DIMS, 50, weights, CPU)


def test_missing_weights_file_names_fid_weights(tmp_path):
    folder = small_folder(tmp_path / "images", 2)
    with pytest.raises(PipelineError, match="fid.weights"):
        folder_statistics(folder, DIMS, 50, str(tmp_path / "nope.pth"), CPU)


@pytest.mark.parametrize("content", ["state_dict", "bytes"])
def test_weights_that_are_not_inception_name_the_file(tmp_path, content):
    """A torch file of other tensors, or not a torch file at all: PipelineError naming it."""
    folder = small_folder(tmp_path / "images", 2)
    weights = tmp_path / "other.pth"
    if content == "state_dict":
        torch.save({"x": torch.zeros(1)}, weights)
    else:
        weights.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match=re.escape(str(weights))):
        folder_statistics(folder, DIMS, 50, str(weights), CPU)


def test_default_weights_offline_say_where_to_put_them(tmp_path, monkeypatch):
    """weights "" without a network: the error names the torch hub checkpoint path to fill."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = small_folder(tmp_path / "images", 2)
    try:
        folder_statistics(folder, DIMS, 50, "", CPU)
    except PipelineError as e:
        assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILE) in str(e)
        assert "fid.weights" in str(e)
    else:
        pytest.skip("pytorch-fid's weights downloaded: this machine is online")
