"""check_params: validate all of params.yaml before any other stage runs (and DVC deletes its outputs).

DVC removes a stage's outputs just before it runs the stage's command, so a stage that rejects a
bad value has already lost its old outputs. This stage comes first in the graph (download depends
on its marker file, and every other stage on download), depends on every params.yaml key, and
writes the same marker whatever the values: a bad value stops `dvc repro` / `dvc exp run` here,
and a good change re-runs only the stages that read the changed keys.
"""
import argparse
from pathlib import Path

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm.cli import run
from ddpm.files import atomic_file
from ddpm.params import load_params_or_exit

MARKER = "params.yaml is valid\n"  # constant, so that downstream stages do not re-run on it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="marker file to write")
    args = parser.parse_args()
    load_params_or_exit()
    with atomic_file(args.out) as tmp:
        tmp.write_text(MARKER)


if __name__ == "__main__":
    run(main)
