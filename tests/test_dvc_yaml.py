"""dvc.yaml agrees with the code: each stage depends on exactly the ddpm modules (and packages, as
folders) its script imports, and lists exactly the params.yaml keys it reads."""
from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys

import pytest
import yaml

from ddpm.params import speed_only_keys
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


# The stages whose params lists name keys (check_params reads the whole file by design), in order.
PARAM_STAGES = ["source", "download", "export_real", "real_stats", "train", "sample", "fid"]


def command(stage: str) -> list[str]:
    """The stage's script and arguments, as its dvc.yaml cmd has them with the paths filled in."""
    text = STAGES[stage]["cmd"]
    for name, value in DVC_YAML["vars"][0]["paths"].items():
        text = text.replace(f"${{paths.{name}}}", value)
    python, script, *args = shlex.split(text)
    assert python == "python" and script == f"stages/{stage}.py"
    return [str(ROOT / script), *args]


def listed(stage: str, params: dict) -> set[str]:
    """The dotted keys a stage's params list names, a whole section standing for all its keys."""
    keys = set()
    for entry in STAGES[stage]["params"]:
        section, _, key = entry.partition(".")
        value = params[section]
        keys |= ({f"{section}.{k}" for k in value} if isinstance(value, dict) and not key
                 else {entry})
    return keys


@pytest.fixture(scope="module")
def stage_reads(tmp_path_factory, tiny) -> tuple[dict, dict[str, set[str]]]:
    """(params, the keys each stage read): every stage run once by its dvc.yaml command, in
    order, at a tiny scale with the FIDs during training on (their keys are read only then),
    once unconditional and once conditional with guidance (the keys of either)."""
    params = copy.deepcopy(tiny)
    params["data"]["limit"] = 16
    params["train"].update(epochs=1, batch_size=16, batch_gpu=16, fid_every=1, fid_images=4,
                           fid_steps=1, preview_images=1, preview_steps=1)
    params["sample"].update(num_images=4, batch_size=2, steps=2)
    found: dict[str, set[str]] = {stage: set() for stage in PARAM_STAGES}
    for conditional in (False, True):
        run = copy.deepcopy(params)
        if conditional:
            run["model"]["conditional"] = True
            run["sample"].update(guidance=1.0, labels=["cat", "dog"])
        work = tmp_path_factory.mktemp("stages")
        (work / "params.yaml").write_text(yaml.safe_dump(run))
        commands = [part for stage in PARAM_STAGES for part in ["--", *command(stage)]][1:]
        done = subprocess.run([sys.executable, str(ROOT / "tests/param_reads.py"), "reads.json",
                               *commands], cwd=work, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        reads = json.loads((work / "reads.json").read_text())
        for stage in PARAM_STAGES:
            found[stage] |= set(reads[command(stage)[0]])
    return params, found


def test_every_stage_lists_its_params_check_params_the_whole_file():
    """No stage escapes the reads check below: each one but check_params is in PARAM_STAGES,
    and check_params, which validates every key, depends on the whole of params.yaml."""
    assert sorted(STAGES) == sorted(["check_params", *PARAM_STAGES])
    assert STAGES["check_params"]["params"] == [{"params.yaml": None}]


@pytest.mark.parametrize("stage", PARAM_STAGES)
def test_stage_params_are_exactly_the_keys_it_reads(stage_reads, stage):
    """Every key a stage reads, and no other; but train leaves out the speed-only keys its FIDs
    during training read (sample.batch_size, fid.batch_size), so a change of one, which cannot
    change a result, does not re-run training (tests/e2e/test_speed_keys.py runs it)."""
    params, reads = stage_reads
    speed = speed_only_keys()
    assert speed == {"sample.batch_size", "fid.batch_size"}
    if stage == "train":
        assert speed <= reads[stage]  # read (the FIDs during training are on here), not listed
        assert listed(stage, params) == reads[stage] - speed
    else:
        assert listed(stage, params) == reads[stage]
