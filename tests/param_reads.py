"""Run stage scripts and record which params.yaml keys each reads (tests/test_dvc_yaml.py).

    python tests/param_reads.py READS.json stages/a.py [its arguments] -- stages/b.py [...] ...

The stages run one after the other in this one process (one import of torch), as `python
stages/x.py ...` would run them; READS.json maps each script to the sorted keys it read.

Every attribute read of the validated params (ddpm.params' dataclasses, as load_params returns
them) is recorded by its dotted key, also through copies made with dataclasses.replace (a copy's
field counts as the original key only where it was not replaced). Reads that are not uses are
not recorded: the validation inside load_params, Params.to_dict (the resolved config a checkpoint
records) and the copying inside dataclasses.replace.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import ddpm.params as P  # noqa: E402

CLASSES = (P.Params, P.DataParams, P.ModelParams, P.DiffusionParams, P.TrainParams,
           P.SampleParams, P.FidParams)
reads: set[str] = set()
origin: dict[int, tuple[object, dict[str, str]]] = {}  # id -> (object, field -> dotted key)
paused = 0


def getattribute(self, name):
    value = object.__getattribute__(self, name)
    if not paused:
        found = origin.get(id(self))
        if found is not None and found[0] is self and name in found[1]:
            reads.add(found[1][name])
    return value


def track(params: P.Params) -> None:
    """Register the root's leaves (seed, device) and each section's fields."""
    leaves = {}
    for field in dataclasses.fields(params):
        value = object.__getattribute__(params, field.name)
        if dataclasses.is_dataclass(value):
            origin[id(value)] = (value, {f.name: f"{field.name}.{f.name}"
                                         for f in dataclasses.fields(value)})
        else:
            leaves[field.name] = field.name
    origin[id(params)] = (params, leaves)


def install() -> None:
    parse, replace, to_dict = P.parse_params, dataclasses.replace, P.Params.to_dict

    def parse_params(raw):
        params = parse(raw)
        track(params)
        return params

    def quiet(function):
        def call(*args, **kwargs):
            global paused
            paused += 1
            try:
                return function(*args, **kwargs)
            finally:
                paused -= 1
        return call

    def replacing(obj, /, **changes):
        new = quiet(replace)(obj, **changes)
        found = origin.get(id(obj))
        if found is not None and found[0] is obj:
            origin[id(new)] = (new, {k: v for k, v in found[1].items() if k not in changes})
        return new

    for cls in CLASSES:
        cls.__getattribute__ = getattribute
    P.parse_params = parse_params
    P.Params.to_dict = quiet(to_dict)
    dataclasses.replace = replacing


def main() -> None:
    out, *commands = sys.argv[1:]
    found: dict[str, list[str]] = {}
    atexit.register(lambda: Path(out).write_text(json.dumps(found, indent=1)))
    install()
    while commands:
        script, *args = commands[:commands.index("--")] if "--" in commands else commands
        commands = commands[len(args) + 2:]
        sys.argv = [script, *args]
        sys.path.insert(0, str(Path(script).resolve().parent))  # as `python stages/x.py` would
        reads.clear()
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
        found[script] = sorted(reads)


if __name__ == "__main__":
    main()
