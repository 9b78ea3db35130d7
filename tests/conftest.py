"""Shared fixtures: the fake CIFAR-10 archive and random Inception weights, built once."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/fakes.py

from fakes import PER_BATCH, make_cifar_archive, make_inception_weights  # noqa: E402

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TQDM_MININTERVAL", "5")  # keep test logs short
# Every process the tests start (dvc and its stages, torchrun, the benchmarks) in one OpenMP
# thread: under -n 2 two workers' processes share 2 cores, and OpenMP threads that outnumber the
# cores spin while they wait for each other (an e2e test ran 3x slower beside another than alone)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The files that take longest, in this order, ahead of the rest. With -n 2 (the README's command)
# pytest-xdist hands out whole files in collection order (pytest_xdist_make_scheduler below): the
# long files start first, and the many short ones fill the end, with no long file left to run
# alone while the other worker idles.
LONGEST_FIRST = ("tests/e2e/test_train_stage.py", "tests/e2e/test_exp_resume.py",
                 "tests/e2e/test_workflows.py", "tests/e2e/test_own_images_dvc.py",
                 "tests/e2e/test_bad_values.py",
                 "tests/e2e/test_sample_resume.py", "tests/test_train.py", "tests/e2e/",
                 "tests/test_bench.py", "tests/test_fid_weights.py", "tests/test_sample.py",
                 "tests/test_own_images.py", "tests/test_bitwise_defaults.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)),
                    len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: the order within a file is kept


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; without xdist (a bare GPU node) unused
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Whole files per worker (an e2e module builds its repositories once), in collection order:
    xdist's own file scheduling starts with the files of most tests, the quick ones."""
    from xdist.scheduler import LoadFileScheduling
    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """In-process tests use one thread: their small tensors gain nothing from two, and two
    OpenMP threads contending with other processes ran them 7-25x slower here."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory) -> tuple[Path, str]:
    """(path, md5) of a small archive in exactly the cifar-10-python.tar.gz format."""
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    return path, make_cifar_archive(path, per_batch=PER_BATCH)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A random-weight Inception file in pytorch-fid's format; without pytorch-fid (a bare GPU
    node, benchmarks/gpu_check.py) the tests that need it skip."""
    pytest.importorskip("pytorch_fid", reason="pytorch-fid is not installed here")
    return make_inception_weights(tmp_path_factory.mktemp("inception") / "pt_inception.pth")


@pytest.fixture(scope="session")
def base_params() -> dict:
    """The repository's params.yaml as committed, as a dict (fakes.committed_params)."""
    from fakes import committed_params
    return committed_params()


@pytest.fixture(scope="session")
def tiny(base_params, cifar_archive, request) -> dict:
    """params for a seconds-long run of the whole pipeline on the fake inputs (without pytorch-fid
    its fid.weights names no file: only the tests that compute an FID need one, and they ask for
    inception_weights themselves)."""
    from fakes import tiny_params
    try:
        weights = request.getfixturevalue("inception_weights")
    except pytest.skip.Exception:
        weights = Path("no-inception-weights-without-pytorch-fid.pth")
    return tiny_params(base_params, *cifar_archive, weights)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory, cifar_archive) -> Path:
    """The fake archive downloaded and extracted, as the download stage leaves it."""
    from ddpm.data import download_cifar10
    out = tmp_path_factory.mktemp("data") / "cifar10"
    download_cifar10(str(cifar_archive[0]), cifar_archive[1], out)
    return out


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, cifar_archive) -> Path:
    """The fake archive through the data stage's code: the dataset folder train reads."""
    from fakes import prepare_dataset
    return prepare_dataset(*cifar_archive, tmp_path_factory.mktemp("data") / "dataset")


@pytest.fixture
def small_disk(tmp_path):
    """A factory: small_disk(kib) -> a folder on a tmpfs of that size, where writes beyond it
    fail with ENOSPC as on a full disk. Skipped where mounting is not allowed (not root, or a
    container without CAP_SYS_ADMIN); the ENOSPC tests that inject the error run anyway."""
    import shutil
    import subprocess
    mounts = []

    def make(kib: int) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        if shutil.which("mount") is None or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                capture_output=True, check=False).returncode != 0:
            pytest.skip("cannot mount a small tmpfs here")
        mounts.append(folder)
        return folder

    yield make
    for folder in mounts:
        subprocess.run(["umount", str(folder)], capture_output=True, check=False)
