"""check_params: validate all of params.yaml before any other stage runs (and DVC deletes its
outputs).

DVC removes a stage's outputs just before it runs the stage's command, so a stage that rejects a
bad value has already lost its old outputs. This stage comes first in the graph (download depends
on its marker file, and every other stage on download), depends on every params.yaml key, and
writes the same marker whatever the values: a bad value stops `dvc repro` / `dvc exp run` here,
and a good change re-runs only the stages that read the changed keys. It checks the schema, the
rules across sections, the network (built on the meta device), what this machine offers (the
device, and at most one process per GPU, or per core on a CPU) and what the paths and URLs in
data.url, data.source and fid.weights name (ddpm.locations: a typo in a path stops here too).
"""
import argparse
from pathlib import Path

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm.cli import run
from ddpm.data import CLASS_NAMES
from ddpm.errors import ParamsError
from ddpm.files import atomic_file
from ddpm.networks import checked_size, state_bytes
from ddpm.labels import class_indices
from ddpm.locations import check_location
from ddpm.params import load_params_or_exit
from ddpm.runtime import check_hardware
from ddpm.sources import CHANNELS, check

MARKER = "params.yaml is valid\n"  # constant, so that downstream stages do not re-run on it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="marker file to write")
    args = parser.parse_args()
    params = load_params_or_exit()
    try:
        hardware = check_hardware(params.device, params.train.precision, params.train.gpus)
        resolution = params.data.resolution
        cifar10 = params.data.source == "cifar10"  # a folder's classes are known after download
        if cifar10 and params.model.conditional:  # sample.labels names CIFAR-10's classes
            class_indices(params.sample.labels, CLASS_NAMES)
        count = checked_size(params.model, (CHANNELS, resolution, resolution),
                             len(CLASS_NAMES) if cifar10 else 1)
        check(params.data)
        if params.fid.weights:  # a typo stops here, before DVC deletes data/real_stats.npz
            check_location("fid.weights", params.fid.weights, remote=False)
    except ParamsError as e:
        raise ParamsError(f"params.yaml: {e}") from None
    with atomic_file(args.out) as tmp:
        tmp.write_text(MARKER)
    print(f"check_params: params.yaml is valid: the {params.model.arch} network at "
          f"{resolution} x {resolution}, {count:,} "
          f"parameters ({state_bytes(count) / 2**30:.2f} GiB of weights, gradients, Adam moments "
          f"and EMA), {hardware}")


if __name__ == "__main__":
    run(main)
