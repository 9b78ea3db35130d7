"""The presets run end to end through `dvc exp run` (the quick preset also runs in
test_workflows' queued sweep), shrunk to seconds by -S values, which win over the presets; and
each run is the committed defaults + its presets + its -S values, whatever ran before."""
from __future__ import annotations

import json

import pytest
import yaml

from ddpm.presets import compose
from dvc_repo import TINY_QUICK, dvc

pytestmark = pytest.mark.e2e

# The DDPM paper's network at tiny widths, one epoch, a few samples in a few steps
SHRINK = ["model.channels=[32,32,32]", "model.res_blocks=1", "train.epochs=1",
          "train.batch_size=16", "train.preview_steps=3", "sample.num_images=12",
          "sample.steps=8"]


def exp_run(repo, *overrides: str) -> str:
    """`dvc exp run -S o ...` in the workspace; checks that params.yaml is then the committed
    defaults composed with exactly these overrides (ddpm.presets.compose: DVC's function)."""
    out = dvc(repo, "exp", "run", *[arg for o in overrides for arg in ("-S", o)]).stdout
    assert (repo / "params.yaml").read_text() == compose(repo, overrides), overrides
    return out


def test_quick_then_ddpm_then_fast_each_run_what_it_names(reproduced):
    """The README's presets in one workspace, one after the other: each run's params are its own
    composition, so the ddpm run keeps none of the quick run's values (fid_every, previews,
    learning rate), and the fast run is the defaults sampled fast, not the ddpm network."""
    repo, _ = reproduced
    defaults = yaml.safe_load((repo / "params.defaults.yaml").read_text())
    presets = {name: yaml.safe_load((repo / f"presets/{name}.yaml").read_text())
               for name in ("quick", "ddpm", "fast")}
    exp_run(repo, "+presets=quick", *TINY_QUICK)
    quick = yaml.safe_load((repo / "params.yaml").read_text())
    assert quick["train"]["fid_every"] == 1
    assert quick["train"]["lr"] == presets["quick"]["train"]["lr"]

    out = exp_run(repo, "+presets=[ddpm,fast]", *SHRINK)
    for stage in ("train", "sample", "fid"):
        assert f"Running stage '{stage}'" in out, out
    ddpm = yaml.safe_load((repo / "params.yaml").read_text())
    assert ddpm["train"]["fid_every"] == defaults["train"]["fid_every"] == 0  # not quick's 1
    assert quick["diffusion"]["prediction"] == presets["quick"]["diffusion"]["prediction"]
    assert ddpm["diffusion"]["prediction"] == defaults["diffusion"]["prediction"] == "eps"
    assert ddpm["train"]["snr_gamma"] == defaults["train"]["snr_gamma"] == 0
    assert ddpm["train"]["log_every"] == defaults["train"]["log_every"]
    assert ddpm["model"]["arch"] == "ddpm" and ddpm["model"]["heads"] == 1
    train = json.loads((repo / "reports/train.json").read_text())
    assert train["arch"] == "ddpm" and train["steps"] == 48 // 16
    sample = json.loads((repo / "reports/sample.json").read_text())
    assert sample["sampler"] == presets["fast"]["sample"]["sampler"] and sample["steps"] == 8
    assert json.loads((repo / "metrics/fid.json").read_text())["fid"] > 0

    exp_run(repo, "+presets=fast", "sample.steps=8")  # the tiny run has 40 timesteps
    fast = yaml.safe_load((repo / "params.yaml").read_text())
    assert fast["model"] == defaults["model"] and fast["train"] == defaults["train"]
    assert fast["sample"] == {**defaults["sample"], **presets["fast"]["sample"], "steps": 8}
    assert json.loads((repo / "reports/train.json").read_text())["arch"] == "seed"

    rows = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    shown = [e["revs"][0]["data"]["params"]["params.yaml"]["data"]
             for row in rows for e in (row.get("experiments") or [])]
    assert len(shown) == 3, rows
    assert sorted(p["model"]["arch"] for p in shown) == ["ddpm", "seed", "seed"]
    assert all("presets" not in p for p in shown)  # the resolved values, not the presets' names
