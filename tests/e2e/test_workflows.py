"""The DVC workflows of the README: share with push/pull, sweep with a queue, compare.

All start from one repository where `dvc repro` ran and its results were committed. The tests
that change a repository (a commit, an applied experiment) change a copy of their own, and the
sweep runs once, in a fixture, for each test that needs it: any one test runs alone, or in any
order (issue 29: the comparison test failed alone, as it needed the sweep test's experiments).
"""
from __future__ import annotations

import json
import shlex
import shutil
import time

import pytest

from dvc_repo import TINY_QUICK, assert_up_to_date, commit, dvc, sh

pytestmark = pytest.mark.e2e

SHARED = ["models/ema.pt", "data/real_stats.npz", "metrics/train.json", "metrics/fid.json",
          "metrics/sample.json", "plots/train/loss.tsv"]


@pytest.fixture(scope="module")
def baseline(reproduced):
    """The module's reproduced repository. Tests do not change it; the sweep fixture adds its
    experiments (refs and cache, not the workspace or HEAD)."""
    return reproduced[0]


def copy_of(repo, where):
    """A copy of a repository (git, experiments, DVC cache and outputs) for a test to change."""
    shutil.copytree(repo, where, symlinks=True)
    return where


@pytest.fixture(scope="module")
def sweep(baseline):
    """`dvc exp run --queue -S +presets=quick -S train.lr=1e-4,3e-4` (shrunk to the tiny run, FID
    during training included), run to the end in the baseline: (queue status, its logs)."""
    overrides = [arg for value in ["+presets=quick", *TINY_QUICK, "train.lr=1e-4,3e-4"]
                 for arg in ("-S", value)]
    dvc(baseline, "exp", "run", "--queue", *overrides)
    dvc(baseline, "queue", "start", "-j", "1")
    deadline = time.monotonic() + 600
    while True:
        status = dvc(baseline, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    return status, dvc(baseline, "queue", "logs", "-f", "all", check=False).stdout


def experiments(repo) -> list[dict]:
    """`dvc exp show --json`: each experiment of the workspace's commit, as name and data."""
    rows = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    return [{"name": e["name"], **e["revs"][0]["data"]}
            for row in rows for e in (row.get("experiments") or [])]


def test_push_then_pull_in_a_fresh_clone_restores_results_byte_for_byte(baseline, tmp_path):
    repo = copy_of(baseline, tmp_path / "repo")  # its remote is committed: a change of HEAD
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "local", str(remote))
    commit(repo, "a local remote")
    assert "pushed" in dvc(repo, "push").stdout
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models/ema.pt").exists()
    dvc(clone, "pull")
    for path in SHARED:
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert (len(list((clone / "data/samples").iterdir()))
            == len(list((repo / "data/samples").iterdir())))
    assert_up_to_date(clone)


def test_a_queued_sweep_of_the_quick_preset_runs_and_shows_resolved_values(baseline, sweep):
    """`dvc exp run --queue -S +presets=quick -S train.lr=1e-4,3e-4` (shrunk to the tiny run, FID
    during training included): two experiments, each with the preset's values in dvc exp show."""
    status, logs = sweep
    assert status.count("Success") == 2, status + logs
    found = {}
    for data in experiments(baseline):
        params = data["params"]["params.yaml"]["data"]
        assert params["model"]["channels"] == [32, 64, 64] and params["train"]["ema_warmup"]
        assert params["sample"]["sampler"] == "ddim" and params["data"]["limit"] == 48
        found[params["train"]["lr"]] = data["metrics"]["metrics/fid.json"]["data"]["fid"]
    assert sorted(found) == [1e-4, 3e-4] and all(v > 0 for v in found.values())


def readme_commands(start: str) -> list[list[str]]:
    """The README's command lines that start with `start`, split as a shell would."""
    import shlex
    from dvc_repo import ROOT
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.strip().startswith(start)]
    assert lines, f"no README line starts with {start!r}"
    return [shlex.split(line.split("  #")[0]) for line in lines]


def test_the_readme_comparison_commands_fit_120_columns(baseline, sweep, tmp_path):
    """The README's `dvc exp show ...`, `dvc params diff` and `dvc metrics diff`, as written, over
    the quick sweep next to the committed default: every line within 120 characters, with the
    FIDs, the best training FID, the loss and the learning rates (about 20 params differ from
    the default, which the README's table leaves to `dvc params diff`). Then `dvc exp apply` and
    its commit, in a copy: the baseline's HEAD, whose experiments the others show, stays."""
    status, logs = sweep
    repo = copy_of(baseline, tmp_path / "repo")
    names = [e["name"] for e in experiments(repo)]
    assert len(names) >= 2, status + logs
    show, = readme_commands("dvc exp show")
    out = dvc(repo, *show[1:]).stdout
    assert max(map(len, out.splitlines())) <= 120, out
    header = out.splitlines()[1].split()
    assert header == ["Experiment", "loss", "epochs", "fid_last", "fid_best", "fid_best_epoch",
                      "fid", "train.lr"], out
    assert all(name in out for name in names[:2]) and "0.0001" in out and "0.0003" in out, out
    for command, expected in (("dvc params diff <exp-a> <exp-b>", "train.lr"),
                              ("dvc metrics diff <exp-a> <exp-b>", "metrics/fid.json")):
        diff, = readme_commands(command)
        out = dvc(repo, *[{"<exp-a>": names[0], "<exp-b>": names[1]}.get(a, a)
                              for a in diff[1:]]).stdout
        assert max(map(len, out.splitlines())) <= 120, out
        assert expected in out and names[0] in out and names[1] in out, out
    apply, = readme_commands("dvc exp apply <name>")  # then commit it, as the README says
    sh(repo, "bash", "-c", shlex.join(apply).replace("'<name>'", names[0]).replace("'&&'",
                                                                                         "&&"))
    assert_up_to_date(repo)
    assert sh(repo, "git", "status", "--porcelain").stdout == ""
