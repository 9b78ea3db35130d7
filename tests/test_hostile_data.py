"""CIFAR-10 batches and archives that are not what they claim: nothing runs, nothing is extracted.

Each hostile fixture is first shown to do harm the unsafe way (plain pickle.load creates the
marker file); the pipeline's loader must then leave the marker absent and say so in one line.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

import fakes
import hostile
from ddpm.errors import PipelineError
from ddpm.data import MAX_MEMBER, download_cifar10, load_batch, load_cifar10
from fakes import PER_BATCH, run_data_stages
from test_data import md5, real_members, tree


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- batch files -------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["os.system", "open"])
def test_a_batch_that_would_create_a_file_is_refused_and_creates_nothing(tmp_path, how):
    marker = tmp_path / "created_by_the_pickle"
    crafted = hostile.batch_pickle(marker, how)
    pickle.loads(crafted, encoding="latin1")  # the unsafe way: the fixture does run its code
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "data_batch_1"
    path.write_bytes(crafted)
    with pytest.raises(PipelineError) as error:
        load_batch(path)
    assert not marker.exists()
    message = one_line(error)
    assert message.startswith(f"{path}: not a CIFAR-10 batch file")
    assert ("posix.system" if how == "os.system" else "io.open") in message
    assert "dvc repro --force download" in message


def test_the_data_stage_refuses_it_in_one_line(cifar_archive, tmp_path):
    """An archive whose md5 the user vouched for (data.md5 = its md5) with a crafted batch: the
    data stage exits 1 with one error line naming the batch, and writes no dataset."""
    members = real_members(cifar_archive[0])
    marker = tmp_path / "created_by_the_pickle"
    members["cifar-10-batches-py/data_batch_1"] = hostile.batch_pickle(marker, "os.system")
    archive = hostile.tar_gz(tmp_path / "cifar-10-python.tar.gz", list(members.items()))
    result = run_data_stages(tmp_path, data__url=str(archive), data__md5=md5(archive))
    assert result.returncode == 1
    assert re.fullmatch(r"error: \S+/data_batch_1: not a CIFAR-10 batch file \(.*posix\.system.*"
                        r"\n", result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "dataset").exists()


def test_numpy_1_names_in_an_official_batch_load_the_same_pixels(cifar_dir, tmp_path):
    """The official files name numpy.core.multiarray (numpy 1); numpy 2 calls it numpy._core.
    Truth: the same pickle with the other name loads the same array."""
    data = (cifar_dir / "data_batch_1").read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in data  # protocol 2: GLOBAL, as text
    old = tmp_path / "data_batch_1"
    old.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert np.array_equal(load_batch(old), fakes.cifar_images("train", PER_BATCH)[:PER_BATCH])


def batch(n: int = 3, **changes) -> dict:
    images = fakes.cifar_images("train", n)[:n]
    return {"labels": [1] * n, "data": images.reshape(n, 3072), **changes}


@pytest.mark.parametrize("content, problem", [
    (pickle.dumps([1, 2], protocol=2), "a pickled list, not a dict"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "no 'data' and 'labels'"),
    (pickle.dumps(batch(data=np.zeros((3, 3072), np.float32))), "not a uint8 (N, 3072) array"),
    (pickle.dumps(batch(data=np.zeros((3, 3, 1024), np.uint8))), "not a uint8 (N, 3072) array"),
    (pickle.dumps(batch(labels=[1, 2])), "not a list of 3 class indices 0..9"),
    (pickle.dumps(batch(labels=[1, 2, 10])), "not a list of 3 class indices 0..9"),
    (pickle.dumps(batch(labels=(1, 2, 3))), "not a list of 3 class indices 0..9"),
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.", "zlib"),
    (pickle.dumps(batch(), protocol=5), "numpy._core.numeric._frombuffer"),
], ids=["list", "no-labels", "float-data", "3d-data", "short-labels", "label-10", "tuple",
        "codec", "protocol-5"])
def test_anything_but_a_batch_is_one_line_saying_what(tmp_path, content, problem):
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(PipelineError) as error:
        load_batch(path)
    message = one_line(error)
    assert message.startswith(f"{path}: not a CIFAR-10 batch file") and problem in message


def test_a_batch_file_over_64_mb_is_refused_unread(tmp_path):
    """From a remote a batch can have any size: one over the archive's bound is not read."""
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        f.truncate(MAX_MEMBER + 1)  # sparse: no disk, and unread zeros would be a bad pickle
    with pytest.raises(PipelineError) as error:
        load_batch(path)
    assert one_line(error).startswith(f"{path}: {MAX_MEMBER + 1:,} bytes, over the ")


# --- archives -----------------------------------------------------------------------------------

def assert_nothing_extracted(folder: Path, before: set[str]) -> None:
    assert tree(folder) == before  # no out/, no temporary folder, no member anywhere


@pytest.mark.parametrize("member", ["data_batch_1", "readme.html"])
def test_a_member_over_64_mb_is_refused_before_it_is_read(cifar_archive, tmp_path, member):
    """A member of 64 MiB + 1 zero bytes, 65 KB of gzip (the issue saw 204 KB -> 200 MB)."""
    members = real_members(cifar_archive[0])
    name = f"cifar-10-batches-py/{member}"
    members[name] = MAX_MEMBER + 1
    archive = hostile.tar_gz(tmp_path / "bomb.tar.gz", list(members.items()))
    assert archive.stat().st_size < MAX_MEMBER // 100  # the fake batches are most of it
    before = tree(tmp_path)
    with pytest.raises(PipelineError) as error:
        download_cifar10(str(archive), md5(archive), tmp_path / "out")
    message = one_line(error)
    assert message.startswith(f"{archive}: member {name} holds {MAX_MEMBER + 1:,} bytes")
    assert_nothing_extracted(tmp_path, before)


@pytest.mark.parametrize("second", ["cifar-10-batches-py/data_batch_1",
                                    "./cifar-10-batches-py/data_batch_1",
                                    "cifar-10-batches-py//data_batch_1"])
def test_a_file_that_comes_twice_is_refused(cifar_archive, tmp_path, second):
    """Two data_batch_1 files: which one a tool keeps is its choice, so neither is used."""
    members = list(real_members(cifar_archive[0]).items())
    other = pickle.dumps(batch(PER_BATCH), protocol=2)
    archive = hostile.tar_gz(tmp_path / "twice.tar.gz", [*members, (second, other)])
    before = tree(tmp_path)
    with pytest.raises(PipelineError) as error:
        download_cifar10(str(archive), md5(archive), tmp_path / "out")
    assert one_line(error) == (f"{archive}: member {second} comes twice: not the CIFAR-10 "
                               "python archive")
    assert_nothing_extracted(tmp_path, before)


def test_the_refusals_keep_an_earlier_download(cifar_archive, tmp_path):
    """A refused archive leaves the folder of an earlier good download exactly as it was."""
    out = tmp_path / "out"
    download_cifar10(str(cifar_archive[0]), cifar_archive[1], out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    members = real_members(cifar_archive[0])
    members["cifar-10-batches-py/test_batch"] = MAX_MEMBER + 1
    archive = hostile.tar_gz(tmp_path / "bomb.tar.gz", list(members.items()))
    with pytest.raises(PipelineError, match=re.escape("member cifar-10-batches-py/test_batch")):
        download_cifar10(str(archive), md5(archive), out)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert np.array_equal(load_cifar10(out, "test"), fakes.cifar_images("test", PER_BATCH))
