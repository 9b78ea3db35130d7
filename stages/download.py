"""download: data.source's images, fetched, checked and converted once (RGB, data.resolution)
into the dataset every later stage reads (ddpm.dataset), with a report of what it holds."""
import argparse
import json
from pathlib import Path

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm.cli import done, run
from ddpm.errors import PipelineError
from ddpm.files import atomic_dir, write_json
from ddpm.params import load_params_or_exit
from ddpm.sources import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listing", required=True, type=Path, help="the source stage's JSON")
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    parser.add_argument("--report", required=True, type=Path, help="JSON report to write")
    args = parser.parse_args()
    params = load_params_or_exit()
    try:
        listed = json.loads(args.listing.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{args.listing}: no readable source listing ({e}); run the source "
                            "stage first (dvc repro source)") from None
    if not isinstance(listed, dict):
        raise PipelineError(f"{args.listing}: not a source listing (a {type(listed).__name__}, "
                            "not a JSON object); run the source stage again (dvc repro source)")
    with atomic_dir(args.out) as staging:
        report = prepare(params.data, staging, listed)
        empty = [split for split, entry in report["splits"].items() if entry["images"] == 0]
        if empty:  # no later stage could read it (ddpm.dataset); the last good dataset stays
            raise PipelineError(f"data.source = {params.data.source}: its {' and '.join(empty)} "
                                f"split{'s hold' if len(empty) > 1 else ' holds'} no images; "
                                f"{args.out} is left as it was. Check the "
                                "source (data.url, data.md5 or your folder) and run the data "
                                "stage again (dvc repro download)")
    done(f"the dataset is in {args.out}")
    write_json(args.report, report)
    counts = ", ".join(f"{split} {entry['images']:,}" for split, entry in report["splits"].items())
    classes = f", {len(report['classes'])} classes" if report["classes"] else ", no classes"
    print(f"download: {params.data.source}: {counts} images at {params.data.resolution} x "
          f"{params.data.resolution}{classes} -> {args.out}")


if __name__ == "__main__":
    run(main)
