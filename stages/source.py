"""source: what identifies data.source's content, written only where it changed.

DVC cannot depend on a path that a params value names, so this stage runs every time (dvc.yaml:
always_changed) and records the content (CIFAR-10: data.url and data.md5; an archive: its
sha256; a folder: its images' names and contents): the data stage depends on this file, and
re-runs when one image changes, and only then.
"""
import argparse
import json
import sys
from pathlib import Path

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm.cli import run
from ddpm.files import write_json
from ddpm.params import load_params_or_exit
from ddpm.sources import listing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="JSON listing to write")
    args = parser.parse_args()
    params = load_params_or_exit()
    record = listing(params.data)
    try:
        unchanged = json.loads(args.out.read_text()) == record
    except (OSError, ValueError):
        unchanged = False
    if not unchanged:  # rewritten only when it changed: its bytes stay those dvc.lock holds
        write_json(args.out, record)
    print(f"source: {params.data.source} {'unchanged' if unchanged else 'listed'} -> {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    run(main)
