"""Every `dvc exp run` command of the README, as written, composes into params that check_params
accepts: its presets and -S values through DVC's own Hydra composition (sweeps expanded into
each value), then the schema, the cross-section rules and the network on the meta device.

The other commands run as written elsewhere: the comparison commands, `dvc queue start` and
`dvc exp apply` in tests/e2e/test_workflows.py, the quick run's preset at tiny scale in
tests/e2e/test_workflows.py and tests/e2e/test_presets.py, gpu_check in tests/test_bench.py.
"""
from __future__ import annotations

import itertools
import os
import shlex
import shutil

import pytest

from ddpm.networks import checked_size
from ddpm.params import load_params
from fakes import ROOT


def readme_blocks() -> list[str]:
    """The README's commands: its indented code lines, a trailing backslash joining the next."""
    commands, current = [], ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("    ") and not current:
            continue
        current += line.strip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            commands.append(current.split("  #")[0].strip())
            current = ""
        else:
            current += " "
    return commands


EXP_RUNS = [c for c in readme_blocks() if c.startswith("dvc exp run")]


def test_the_readme_shows_the_presets_and_a_sweep():
    assert any("+presets=quick" in c for c in EXP_RUNS)
    assert any("+presets=ddpm" in c for c in EXP_RUNS)
    assert any("--queue" in c and "," in c for c in EXP_RUNS)


@pytest.mark.parametrize("command", EXP_RUNS)
def test_every_exp_run_of_the_readme_composes_into_valid_params(command, tmp_path):
    from dvc.utils.hydra import compose_and_dump
    words = shlex.split(os.path.expandvars(command))
    overrides = [words[i + 1] for i, word in enumerate(words) if word in ("-S", "--set-param")]
    # a sweep (a,b,c with --queue) is one experiment per value
    choices = [[f"{o.split('=')[0]}={v}" for v in o.split("=", 1)[1].split(",")]
               if "--queue" in words and "," in o and "[" not in o else [o] for o in overrides]
    for n, combination in enumerate(itertools.product(*choices)):
        folder = tmp_path / str(n)
        shutil.copytree(ROOT / "presets", folder / "presets")
        shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
        compose_and_dump(folder / "params.yaml", str(folder), None, "params", "",
                         list(combination))
        checked_size((p := load_params(folder / "params.yaml")).model,
                     (3, p.data.resolution, p.data.resolution))
