"""Every `dvc exp run` command of the README, as written, composes into params that check_params
accepts: its presets and -S values through DVC's own Hydra composition (sweeps expanded into
each value), then the schema, the cross-section rules and the network on the meta device.

The other commands run as written elsewhere: the comparison commands, `dvc queue start` and
`dvc exp apply` in tests/e2e/test_workflows.py, the quick run's preset at tiny scale in
tests/e2e/test_workflows.py and tests/e2e/test_presets.py, gpu_check in tests/test_bench.py.
Here too: the dvc extras the README names exist, its pytest selections select what it says, and
the error it quotes for a misspelt key is DVC's.
"""
from __future__ import annotations

import itertools
import os
import shlex

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
    from ddpm.presets import compose  # as dvc exp run composes (DVC's own function)
    words = shlex.split(os.path.expandvars(command))
    overrides = [words[i + 1] for i, word in enumerate(words) if word in ("-S", "--set-param")]
    # a sweep (a,b,c with --queue) is one experiment per value
    choices = [[f"{o.split('=')[0]}={v}" for v in o.split("=", 1)[1].split(",")]
               if "--queue" in words and "," in o and "[" not in o else [o] for o in overrides]
    for n, combination in enumerate(itertools.product(*choices)):
        (tmp_path / f"{n}.yaml").write_text(compose(ROOT, combination))
        checked_size((p := load_params(tmp_path / f"{n}.yaml")).model,
                     (3, p.data.resolution, p.data.resolution), classes=10)  # CIFAR-10's


def test_every_dvc_extra_the_readme_names_exists():
    """`pip install "dvc[s3]"` and the others: extras of the installed dvc distribution."""
    import importlib.metadata
    import re
    named = set(re.findall(r"dvc\[([\w-]+)\]", (ROOT / "README.md").read_text()))
    assert {"s3", "gs", "ssh", "azure"} <= named
    assert named <= set(importlib.metadata.metadata("dvc").get_all("Provides-Extra"))


def test_the_readmes_pytest_selections_select_what_it_says(tmp_path):
    """`python -m pytest -n 2 -m "slow or not slow"` as written (collected, without -n) selects
    every test, two of them marked slow: the two that `-m slow` runs alone and that CI's
    selection, pyproject.toml's addopts, leaves out."""
    import re
    import subprocess
    import sys
    text = " ".join((ROOT / "README.md").read_text().split())
    commands = re.findall(r"`(python -m pytest -n 2 -m [^`]*)`", text)
    assert "python -m pytest -n 2 -m slow" in commands
    assert """addopts = '-ra -m "not slow"'""" in (ROOT / "pyproject.toml").read_text()
    everything, = [shlex.split(c) for c in commands if c != "python -m pytest -n 2 -m slow"]
    (tmp_path / "count_slow.py").write_text(
        "def pytest_collection_finish(session):\n"
        "    slow = sum(item.get_closest_marker('slow') is not None for item in session.items)\n"
        "    print(f'\\nselected {len(session.items)}, slow {slow}')\n")
    words = [w for w in everything[1:] if w not in ("-n", "2")]
    done = subprocess.run([sys.executable, *words, "-p", "no:xdist", "-p", "count_slow",
                           "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    selected, slow = map(int, re.search(r"selected (\d+), slow (\d+)", done.stdout).groups())
    assert slow == 3 and "deselected" not in done.stdout.splitlines()[-1]
    assert re.search(rf"^{selected} tests collected", done.stdout.splitlines()[-1])


def test_the_error_quoted_for_a_misspelt_key_is_dvcs(tmp_path):
    """The README's first line for `dvc exp run -S train.lrr=...`, from the dvc installed here in
    a repository with DVC's Hydra composition on."""
    import re
    import subprocess
    quoted, = re.findall(r"\| `(ERROR: [^`]*train\.lrr[^`]*)`", (ROOT / "README.md").read_text())
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.0002\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo\n    params: [train.lr]\n")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"],
                    ["dvc", "config", "hydra.enabled", "true"],
                    ["dvc", "config", "hydra.config_dir", "."],
                    ["dvc", "config", "hydra.config_name", "params"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True,
                       timeout=120)
    done = subprocess.run(["dvc", "exp", "run", "-S", "train.lrr=1e-4"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert quoted in (done.stdout + done.stderr).splitlines(), done.stdout + done.stderr
