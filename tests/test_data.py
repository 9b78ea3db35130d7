"""ddpm.data and the download / export_real stages, against the fake archive's known images."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fakes
from fakes import PER_BATCH, run_data_stages, run_stage
from ddpm import dataset
from ddpm.errors import PipelineError
from ddpm.data import download_cifar10, load_batch, load_cifar10

BATCH_FILES = ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
               "data_batch_5", "test_batch"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> str:
    """A .tar.gz of (name, bytes) files and raw TarInfo entries (links); returns its md5."""
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return md5(path)


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def real_members(archive: Path) -> dict[str, bytes]:
    """The fixture archive's regular files, by name."""
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def tree(folder: Path) -> set[str]:
    """Every path under folder (relative), links included."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --- download_cifar10 / load_cifar10 ------------------------------------------------------------

@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_download_extracts_the_seven_batches_and_loads_the_exact_images(cifar_archive, tmp_path,
                                                                         as_url):
    """Truth: fakes.cifar_images, the pixels the archive was built from, in dataset order."""
    archive, archive_md5 = cifar_archive
    out = tmp_path / "cifar10"
    out.mkdir()
    (out / "stale").write_text("from an older download")
    download_cifar10(archive.as_uri() if as_url else str(archive), archive_md5, out)
    assert sorted(os.listdir(out)) == BATCH_FILES  # flat, readme.html left out, stale replaced
    assert sorted(os.listdir(tmp_path)) == ["cifar10"]  # no temporary leftovers
    train, test = fakes.cifar_images("train", PER_BATCH), fakes.cifar_images("test", PER_BATCH)
    assert np.array_equal(load_cifar10(out, "train"), train)
    assert np.array_equal(load_cifar10(out, "test"), test)
    for limit in (5, PER_BATCH + 4):  # within the first batch, across two batches
        assert np.array_equal(load_cifar10(out, "train", limit=limit), train[:limit])


def test_md5_mismatch_extracts_nothing_and_keeps_the_old_folder(cifar_archive, tmp_path):
    """Nothing a user has is destroyed: a bad md5 leaves out/ as it was and no temp files."""
    archive, _ = cifar_archive
    wrong = "0" * 32
    out = tmp_path / "cifar10"
    with pytest.raises(PipelineError, match=wrong):
        download_cifar10(str(archive), wrong, out)
    assert os.listdir(tmp_path) == []  # out/ not created, no partial download
    out.mkdir()
    (out / "marker").write_text("mine")
    with pytest.raises(PipelineError, match=md5(archive)):  # names the md5 it found, too
        download_cifar10(str(archive), wrong, out)
    assert os.listdir(tmp_path) == ["cifar10"] and os.listdir(out) == ["marker"]
    assert (out / "marker").read_text() == "mine"


def test_malicious_members_never_write_outside_the_target(cifar_archive, tmp_path, monkeypatch):
    """Invariant: ../, absolute and link members write nothing outside out/; out/ holds files."""
    members = real_members(cifar_archive[0])
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    evil = tmp_path / "work" / "sub"
    evil.mkdir(parents=True)
    bad = [
        ("../evil", b"x"), ("cifar-10-batches-py/../../evil2", b"x"),
        (str(tmp_path / "absolute_evil"), b"x"),
        link("cifar-10-batches-py/data_batch_1", str(victim)),  # then written through?
        link("cifar-10-batches-py/data_batch_2", str(victim), tarfile.LNKTYPE),
        link("cifar-10-batches-py/escape", "../../.."),
        ("cifar-10-batches-py/escape/evil3", b"x"),
    ]
    archive = evil / "evil.tar.gz"
    archive_md5 = make_tar(archive, [*bad, *members.items()])
    before = tree(tmp_path)
    monkeypatch.chdir(evil)  # relative paths, if followed, would land under tmp_path
    download_cifar10(str(archive), archive_md5, evil / "out")
    assert victim.read_text() == "untouched"
    assert tree(tmp_path) == before | {"work/sub/out", *(f"work/sub/out/{n}" for n in BATCH_FILES)}
    assert not any((evil / "out" / name).is_symlink() for name in BATCH_FILES)
    assert np.array_equal(load_cifar10(evil / "out", "train"),
                          fakes.cifar_images("train", PER_BATCH))


def test_links_in_place_of_batches_count_as_missing(cifar_archive, tmp_path):
    """A symlink named data_batch_1 pointing outside is not a batch: PipelineError naming it."""
    members = real_members(cifar_archive[0])
    del members["cifar-10-batches-py/data_batch_1"], members["cifar-10-batches-py/test_batch"]
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    archive = tmp_path / "links.tar.gz"
    archive_md5 = make_tar(archive, [link("cifar-10-batches-py/data_batch_1", str(victim)),
                                     *members.items()])
    with pytest.raises(PipelineError, match=r"data_batch_1, test_batch missing"):
        download_cifar10(str(archive), archive_md5, tmp_path / "out")
    assert victim.read_text() == "untouched"
    assert sorted(os.listdir(tmp_path)) == ["links.tar.gz", "victim"]  # no out/, no temp files


def test_wrong_layout_names_the_missing_members(cifar_archive, tmp_path):
    """Batches outside cifar-10-batches-py/ (or absent) are missing; the error lists them."""
    members = real_members(cifar_archive[0])
    flat = {Path(name).name: data for name, data in members.items()}  # no top folder
    archive = tmp_path / "flat.tar.gz"
    archive_md5 = make_tar(archive, list(flat.items()))
    with pytest.raises(PipelineError) as error:
        download_cifar10(str(archive), archive_md5, tmp_path / "out")
    assert str(archive) in str(error.value)
    assert all(name in str(error.value) for name in BATCH_FILES)
    assert not (tmp_path / "out").exists()


def test_truncated_archive_with_matching_md5_names_the_file(cifar_archive, tmp_path):
    """A corrupt gzip stream is a PipelineError naming the archive, not a traceback."""
    data = cifar_archive[0].read_bytes()
    archive = tmp_path / "truncated.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=re.escape(str(archive))):
        download_cifar10(str(archive), md5(archive), tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["truncated.tar.gz"]


@pytest.mark.parametrize("content", [
    b"", b"garbage, not a pickle\n", pickle.dumps({"labels": [1]}, protocol=2),
    pickle.dumps([1, 2, 3], protocol=2), pickle.dumps({"data": np.zeros((2, 100), np.uint8)}),
], ids=["empty", "text", "no-data-key", "list", "wrong-shape"])
def test_load_batch_on_garbage_names_the_file(tmp_path, content):
    """Any file that is not a CIFAR-10 batch: PipelineError naming it."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=re.escape(str(path))):
        load_batch(path)


def test_load_batch_on_a_missing_file_says_to_download(tmp_path):
    with pytest.raises(PipelineError, match="dvc repro download"):
        load_batch(tmp_path / "data_batch_1")


def test_offline_http_error_says_how_to_use_a_local_archive(tmp_path):
    """Connection refused (port 9): the message points at data.url; nothing is left behind."""
    with pytest.raises(PipelineError, match="data.url") as error:
        download_cifar10("http://127.0.0.1:9/cifar-10-python.tar.gz", "0" * 32, tmp_path / "out")
    assert "http://127.0.0.1:9/" in str(error.value)
    assert os.listdir(tmp_path) == []


def test_missing_local_archive_names_data_url(tmp_path):
    with pytest.raises(PipelineError, match="data.url"):
        download_cifar10(str(tmp_path / "nope.tar.gz"), "0" * 32, tmp_path / "out")
    assert os.listdir(tmp_path) == []


# --- the stage scripts --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def downloaded(cifar_archive, tmp_path_factory) -> Path:
    """data/dataset as the source and download stage scripts write it."""
    archive, archive_md5 = cifar_archive
    cwd = tmp_path_factory.mktemp("stage")
    result = run_data_stages(cwd, "data/dataset", data__url=str(archive), data__md5=archive_md5)
    assert result.returncode == 0, result.stderr
    return cwd / "data" / "dataset"


def read_folder(folder: Path) -> np.ndarray:
    """0.png ... N-1.png (exactly those names) as (N, 3, 32, 32), read with PIL alone."""
    names = os.listdir(folder)
    assert sorted(names) == sorted(f"{i}.png" for i in range(len(names)))
    return np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(len(names))]
                    ).transpose(0, 3, 1, 2)


def test_download_stage_writes_the_dataset_and_its_report(downloaded):
    """The archive's images and labels as arrays, nothing else (no pickle reaches data/); the
    report names the classes of batches.meta with their counts."""
    assert sorted(os.listdir(downloaded)) == ["dataset.json", "test.npy", "test_labels.npy",
                                              "train.npy", "train_labels.npy"]
    for split in ("train", "test"):
        images, labels = dataset.load(downloaded, split, labels=True)
        assert np.array_equal(images, fakes.cifar_images(split, PER_BATCH))
        assert labels.tolist() == [i % 10 for i in range(len(images))]  # as fakes labels them
    report = json.loads((downloaded.parent.parent / "data.json").read_text())
    assert report["classes"] == fakes.LABELS and report["resolution"] == 32
    assert report["splits"]["train"] == {"images": 5 * PER_BATCH, "classes": {
        name: 5 * PER_BATCH // 10 for name in fakes.LABELS}}


def test_export_real_stage_writes_the_archive_pixels(downloaded, tmp_path):
    """Each exported PNG equals the archive's image pixel for pixel, in dataset order."""
    result = run_stage("export_real.py", tmp_path, "--data", str(downloaded), "--out", "real")
    assert result.returncode == 0, result.stderr
    assert np.array_equal(read_folder(tmp_path / "real"), fakes.cifar_images("train", PER_BATCH))


def test_export_real_stage_limit_and_test_split(downloaded, tmp_path):
    """data.real_split=test and data.limit=10: the first 10 test images (a limit that valid params
    allow only with a batch that fits it)."""
    result = run_stage("export_real.py", tmp_path, "--data", str(downloaded), "--out", "real",
                       data__real_split="test", data__limit=10, train__batch_size=10)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(read_folder(tmp_path / "real"),
                          fakes.cifar_images("test", PER_BATCH)[:10])


def test_bad_params_value_is_one_line_and_exit_code_2(cifar_archive, tmp_path):
    """DESIGN: a wrong params value is one line naming the key, exit code 2, nothing written."""
    result = run_stage("download.py", tmp_path, "--listing", "source.json", "--out",
                       "data/dataset", "--report", "data.json", data__url=str(cifar_archive[0]),
                       data__md5="xyz")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "data.md5" in lines[0]
    assert not (tmp_path / "data").exists()


def test_download_stage_failure_is_one_error_line(cifar_archive, tmp_path):
    """A wrong md5 from the script: exit 1, the message on stderr, no traceback."""
    result = run_data_stages(tmp_path, "data/dataset", data__url=str(cifar_archive[0]),
                             data__md5="0" * 32)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "md5" in result.stderr
    assert not (tmp_path / "data" / "dataset").exists()
