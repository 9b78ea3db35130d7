"""The DVC workflows of the README: share with push/pull, sweep with a queue.

Both start from one repository where `dvc repro` ran and its results were committed.
"""
from __future__ import annotations

import json
import shlex
import time

import pytest

from dvc_repo import TINY_QUICK, assert_up_to_date, commit, dvc, sh

pytestmark = pytest.mark.e2e

SHARED = ["models/ema.pt", "data/real_stats.npz", "metrics/train.json", "metrics/fid.json",
          "metrics/sample.json", "plots/train/loss.tsv"]


@pytest.fixture(scope="module")
def baseline(reproduced):
    return reproduced[0]


def test_push_then_pull_in_a_fresh_clone_restores_results_byte_for_byte(baseline, tmp_path):
    remote = tmp_path / "remote"
    dvc(baseline, "remote", "add", "-d", "local", str(remote))
    commit(baseline, "a local remote")
    assert "pushed" in dvc(baseline, "push").stdout
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(baseline), str(clone))
    assert not (clone / "models/ema.pt").exists()
    dvc(clone, "pull")
    for path in SHARED:
        assert (clone / path).read_bytes() == (baseline / path).read_bytes(), path
    assert (len(list((clone / "data/samples").iterdir()))
            == len(list((baseline / "data/samples").iterdir())))
    assert_up_to_date(clone)


def test_a_queued_sweep_of_the_quick_preset_runs_and_shows_resolved_values(baseline):
    """`dvc exp run --queue -S +presets=quick -S train.lr=1e-4,3e-4` (shrunk to the tiny run, FID
    during training included): two experiments, each with the preset's values in dvc exp show."""
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
    assert status.count("Success") == 2, status + dvc(baseline, "queue", "logs", "-f", "all",
                                                      check=False).stdout
    rows = json.loads(dvc(baseline, "exp", "show", "--json").stdout)
    experiments = [e["revs"][0]["data"] for row in rows for e in (row.get("experiments") or [])]
    found = {}
    for data in experiments:
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


def test_the_readme_comparison_commands_fit_120_columns(baseline):
    """The README's `dvc exp show ...`, `dvc params diff` and `dvc metrics diff`, as written, over
    the quick sweep next to the committed default: every line within 120 characters, with the
    FIDs, the best training FID, the loss and the learning rates (about 20 params differ from
    the default, which the README's table leaves to `dvc params diff`)."""
    rows = json.loads(dvc(baseline, "exp", "show", "--json").stdout)
    names = [e["name"] for row in rows for e in (row.get("experiments") or [])]
    assert len(names) >= 2, rows
    show, = readme_commands("dvc exp show")
    out = dvc(baseline, *show[1:]).stdout
    assert max(map(len, out.splitlines())) <= 120, out
    header = out.splitlines()[1].split()
    assert header == ["Experiment", "loss", "epochs", "fid_last", "fid_best", "fid_best_epoch",
                      "fid", "train.lr"], out
    assert all(name in out for name in names[:2]) and "0.0001" in out and "0.0003" in out, out
    for command, expected in (("dvc params diff <exp-a> <exp-b>", "train.lr"),
                              ("dvc metrics diff <exp-a> <exp-b>", "metrics/fid.json")):
        diff, = readme_commands(command)
        out = dvc(baseline, *[{"<exp-a>": names[0], "<exp-b>": names[1]}.get(a, a)
                              for a in diff[1:]]).stdout
        assert max(map(len, out.splitlines())) <= 120, out
        assert expected in out and names[0] in out and names[1] in out, out
    apply, = readme_commands("dvc exp apply <name>")  # then commit it, as the README says
    sh(baseline, "bash", "-c", shlex.join(apply).replace("'<name>'", names[0]).replace("'&&'",
                                                                                         "&&"))
    assert_up_to_date(baseline)
    assert sh(baseline, "git", "status", "--porcelain").stdout == ""
