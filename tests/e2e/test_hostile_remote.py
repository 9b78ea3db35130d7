"""A DVC remote that serves a crafted dataset file: `dvc pull` brings it, the next stage runs
nothing from it and stops in one line.

DVC does not re-hash what it pulls (its `verify` is off for most remotes), so whoever can write
to the remote can replace data/dataset/train.npy; the data stage's md5 check never sees it. Only
the data stages run here (seconds), not the pipeline.
"""
from __future__ import annotations

import hashlib
import os

import pytest

import hostile
from dvc_repo import commit, dvc, sh

pytestmark = pytest.mark.e2e


def test_a_crafted_array_from_the_remote_runs_nothing(new_repo, tmp_path):
    repo = new_repo()
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "shared", str(remote))
    dvc(repo, "repro", "download")
    commit(repo, "the CIFAR-10 dataset and a remote")
    dvc(repo, "push")

    # Whoever writes to the remote swaps the object behind data/dataset/train.npy for an object
    # array, which np.load(allow_pickle=True) would unpickle, running os.system.
    array = repo / "data/dataset/train.npy"
    digest = hashlib.md5(array.read_bytes()).hexdigest()
    stored = remote / "files" / "md5" / digest[:2] / digest[2:]
    assert stored.is_file(), sorted(p.name for p in remote.rglob("*"))
    marker = tmp_path / "created_by_the_pickle"
    crafted = hostile.object_array(marker)
    os.chmod(stored, 0o644)
    stored.write_bytes(crafted)

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    dvc(clone, "pull", "download")
    assert (clone / "data/dataset/train.npy").read_bytes() == crafted  # DVC took it as is

    result = dvc(clone, "repro", "export_real", check=False)
    assert result.returncode != 0
    assert not marker.exists()
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stdout
    assert errors[0].startswith("error: data/dataset/train.npy: not a readable array")
    assert "Python objects" in errors[0] and "Traceback" not in result.stdout
    assert not (clone / "data/real_png").exists()
