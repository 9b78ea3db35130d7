"""A bad params value through `dvc exp run` costs no output, and the README's recovery works."""
from __future__ import annotations

import hashlib

import pytest

from dvc_repo import dvc, sh

pytestmark = pytest.mark.e2e

KEPT = ["models/ema.pt", "models/checkpoints/last.pt", "metrics/train.json", "metrics/fid.json",
        "data/real_stats.npz", "data/cifar10/data_batch_1", "data/samples/0.png"]


def digests(repo) -> dict[str, str]:
    return {path: hashlib.sha256((repo / path).read_bytes()).hexdigest() for path in KEPT}


@pytest.mark.parametrize("override, error", [
    ("train.lr=-1", "error: params.yaml: train.lr = -1.0: expected a positive number"),
    ("data.md5=xyz", "error: params.yaml: data.md5 = 'xyz': expected 32 lowercase hex digits"),
    ("+train.lrr=1", "error: params.yaml: train.lrr: unknown key (accepted here: epochs, "),
])
def test_a_bad_value_stops_before_any_output_is_deleted_and_checkout_recovers(reproduced,
                                                                             override, error):
    """check_params runs first and fails: every output is byte for byte what it was. `git
    checkout params.yaml` is then all it takes: dvc status is clean again. (`+train.lrr` is DVC's
    own advice for a key it does not know.)"""
    repo, _ = reproduced
    before = digests(repo)
    result = dvc(repo, "exp", "run", "-S", override, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(error), result.stdout
    assert "Running stage 'check_params'" in result.stdout
    assert result.stdout.count("Running stage") == 1, result.stdout
    assert digests(repo) == before
    sh(repo, "git", "checkout", "params.yaml")
    assert "up to date" in dvc(repo, "status").stdout
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


def test_dvc_refuses_an_unknown_key_itself(reproduced):
    repo, _ = reproduced
    result = dvc(repo, "exp", "run", "-S", "train.lrr=1", check=False)
    assert result.returncode != 0 and "+train.lrr" in result.stdout  # its hint, tested above
    assert "Running stage" not in result.stdout
