"""Interrupt and resume the way users do, with `dvc exp run`: a kill -9 or a Ctrl-C, then the same
command again, in a repository whose dvc.lock already records an earlier run (so `dvc exp run`
puts that run's models/checkpoints back before the stage starts). The experiment trains another
objective than the committed run's (v-prediction, min-SNR-5 weights), end to end through sample
and fid."""
from __future__ import annotations

import json
import re
import shutil
import signal

import pytest
import torch

from dvc_repo import dvc, dvc_killed_when, unfinished_epoch

pytestmark = pytest.mark.e2e

EPOCHS = 10  # seven epochs of training after the Ctrl-C point (epoch 3), even on an idle machine
EXPERIMENT = ["exp", "run", "-S", "diffusion.prediction=v", "-S", "train.snr_gamma=5",
              "-S", "train.lr=1e-4", "-S", f"train.epochs={EPOCHS}",
              "-S", "train.checkpoint_every=1", "-S", "train.sample_every=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, reproduced_template):
    """The experiment's EMA weights from an uninterrupted `dvc exp run`, in a copy of the repo."""
    repo = tmp_path_factory.mktemp("straight") / "repo"
    shutil.copytree(reproduced_template[0], repo, symlinks=True)
    dvc(repo, *EXPERIMENT)
    return torch.load(repo / "models/ema.pt", weights_only=True)


def test_kill_and_ctrl_c_during_exp_run_then_the_same_command_finishes_the_same_run(
        reproduced, uninterrupted):
    repo, _ = reproduced
    assert (repo / "dvc.lock").is_file() and (repo / "models/checkpoints/last.pt").is_file()
    dvc_killed_when(repo, EXPERIMENT, lambda: unfinished_epoch(repo) >= 2)           # kill -9
    out = dvc_killed_when(repo, EXPERIMENT, lambda: unfinished_epoch(repo) >= 3, 0.2,
                          sig=signal.SIGINT)                                          # Ctrl-C
    stopped_at = unfinished_epoch(repo)
    assert 3 <= stopped_at < EPOCHS, out
    assert "resuming from models/runs/" in out and "at epoch 2" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    lines = [line for line in out.splitlines() if "train: interrupted" in line]
    assert len(lines) == 1 and f"(epoch {stopped_at}), is kept" in lines[0], out
    assert "Run the same command again" in lines[0]

    out = dvc(repo, *EXPERIMENT).stdout
    assert re.search(rf"resuming from models/runs/\w+/last.pt at epoch {stopped_at}", out), out
    got = torch.load(repo / "models/ema.pt", weights_only=True)
    assert got["steps"] == uninterrupted["steps"]
    for name, tensor in uninterrupted["ema"].items():
        assert torch.equal(got["ema"][name], tensor), name  # bitwise, on the CPU
    assert not list((repo / "models/runs").iterdir())

    rows = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    experiments = [e["revs"][0]["data"] for row in rows for e in (row.get("experiments") or [])]
    finished = [d for d in experiments
                if d["params"]["params.yaml"]["data"]["diffusion"]["prediction"] == "v"]
    assert finished, rows
    assert finished[0]["params"]["params.yaml"]["data"]["train"]["snr_gamma"] == 5
    assert got["config"]["diffusion"]["prediction"] == "v"
    assert got["config"]["train"]["snr_gamma"] == 5
    assert finished[0]["metrics"]["metrics/train.json"]["data"]["epochs"] == EPOCHS
    assert "fid" in finished[0]["metrics"]["metrics/fid.json"]["data"]
