"""A bad params value through `dvc exp run` costs no output, and the README's recovery works."""
from __future__ import annotations

import hashlib

import pytest

from dvc_repo import assert_up_to_date, dvc, sh

pytestmark = pytest.mark.e2e

KEPT = ["models/ema.pt", "models/checkpoints/last.pt", "metrics/train.json", "metrics/fid.json",
        "data/real_stats.npz", "data/dataset/train.npy", "data/samples/0.png"]


def digests(repo) -> dict[str, str]:
    return {path: hashlib.sha256((repo / path).read_bytes()).hexdigest() for path in KEPT}


@pytest.mark.parametrize("override, error", [
    ("train.lr=-1", "train.lr = -1: expected a finite number in (0, 1]"),
    ("data.md5=xyz", "data.md5 = 'xyz': expected 32 lowercase hex digits"),
    ("+train.lrr=1", "train.lrr: unknown key (accepted here: epochs, "),
])
def test_a_bad_value_stops_before_any_output_is_deleted_and_checkout_recovers(reproduced,
                                                                             override, error):
    """check_params runs first and fails with one line and exit code 2: every output is byte for
    byte what it was. `git checkout params.yaml` is then all it takes: dvc status is clean again.
    (`+train.lrr` is DVC's own advice for a key it does not know.)"""
    repo, _ = reproduced
    stops_in_check_params(repo, override, error)
    assert_up_to_date(repo)
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


@pytest.mark.parametrize("override, error", [
    ("train.lr=inf", "train.lr = inf: expected a finite number"),
    ("train.grad_clip=inf", "train.grad_clip = inf: expected a finite number >= 0"),
    ("sample.eta=inf", "sample.eta = inf: expected a finite number in [0, 1]"),
    ("train.epochs=1e30", "train.epochs = 1e+30: expected an integer in [1, 100000]"),
    ("seed=1180591620717411303424", "seed = 1180591620717411303424: expected an integer in [0, "),
    ("device='cuda:99'", "device = cuda:99, but "),
    ("diffusion.timesteps=1000000000000", "diffusion.timesteps = 1000000000000: expected an "
                                          "integer in [1, 100000]"),
    ("model.channels=[1048576,1048576,1048576]", "model.channels[0] = 1048576: expected an "
                                                 "integer in [1, 4096]"),
    ("train.preview_images=1000000000", "train.preview_images = 1000000000: expected an integer "
                                        "in [1, 1024]"),
    # issue 30: a typo in a path, which the data or real_stats stage found after DVC had deleted
    # data/dataset or data/real_stats.npz
    ("data.url=cifar-typo.tar.gz", "data.url = 'cifar-typo.tar.gz': no such file here"),
    ("fid.weights=missing.pth", "fid.weights = 'missing.pth': no such file here"),
    ("data.url=https://user:pass@example.com/c.tar.gz", "data.url = 'https://***@example.com/"),
])
def test_what_used_to_fail_after_dvc_deleted_the_outputs_now_stops_first(reproduced, override,
                                                                         error):
    """Issue 21's values that passed the checks and failed in train or sample with a traceback
    (MemoryError, OverflowError, RuntimeError), after DVC had deleted train's outputs; issue 30's
    typos in data.url and fid.weights, which cost data/dataset and data/real_stats.npz."""
    out = stops_in_check_params(reproduced[0], override, error)
    assert "user:pass" not in out


def stops_in_check_params(repo, override: str, error: str) -> str:
    """`dvc exp run -S override` fails in check_params with the one-line `error`, exit code 2,
    and every output byte for byte as it was; then `git checkout params.yaml`. Returns what dvc
    printed."""
    before = digests(repo)
    result = dvc(repo, "exp", "run", "-S", override, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: params.yaml: {error}"), result.stdout
    assert "Running stage 'check_params'" in result.stdout and "exited with 2" in result.stdout
    assert result.stdout.count("Running stage") == 1, result.stdout
    assert digests(repo) == before
    sh(repo, "git", "checkout", "params.yaml")
    return result.stdout


def test_dvc_refuses_an_unknown_key_itself(reproduced):
    repo, _ = reproduced
    result = dvc(repo, "exp", "run", "-S", "train.lrr=1", check=False)
    assert result.returncode != 0 and "+train.lrr" in result.stdout  # its hint, tested above
    assert "Running stage" not in result.stdout
