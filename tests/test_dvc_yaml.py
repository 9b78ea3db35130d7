"""dvc.yaml agrees with the code: each stage depends on exactly the ddpm modules (and packages, as\nfolders) its script imports."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from fakes import ROOT

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]

IMPORTED = """
import runpy, sys, json
sys.path.insert(0, sys.argv_dir)  # where `python stages/x.py` finds _src.py
runpy.run_path(sys.argv_path, run_name="not_main")  # imports everything, runs nothing
print(json.dumps(sorted(m for m in sys.modules if m.startswith("ddpm."))))
"""


def imported_modules(script: str) -> set[str]:
    code = IMPORTED.replace("sys.argv_path", repr(str(ROOT / script))).replace(
        "sys.argv_dir", repr(str(ROOT / "stages")))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=ROOT, timeout=120).stdout
    modules = set(json.loads(out.splitlines()[-1]))
    packages = {m.split(".")[1] for m in modules if m.count(".") > 1}  # ddpm.networks.seed_unet
    return {f"src/ddpm/{name}" if name in packages else f"src/ddpm/{name}.py"
            for name in (m.split(".")[1] for m in modules)}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_are_its_script_and_the_modules_it_imports(stage):
    script = f"stages/{stage}.py"
    deps = [d for d in STAGES[stage]["deps"] if not d.startswith("${")]
    assert script in deps and "stages/_src.py" in deps
    listed = {d for d in deps if d.startswith("src/")}
    assert listed == imported_modules(script)


def test_dvcignore_keeps_bytecode_out_of_the_dependencies():
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


def test_the_checkpoint_folder_persists_and_small_outputs_stay_in_git():
    outs = {next(iter(o)) if isinstance(o, dict) else o: o for o in STAGES["train"]["outs"]}
    assert outs["${paths.checkpoints}"]["${paths.checkpoints}"]["persist"] is True
    for stage in STAGES.values():
        for kind in ("metrics", "plots"):
            for entry in stage.get(kind, []):
                (_, options), = entry.items()
                assert options["cache"] is False
