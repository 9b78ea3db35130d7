"""Run a pipeline command (the README's quick run), time it stage by stage, and record what it
measured in a results file, so that docs/quick_run.md's figures point at a file.

    python benchmarks/quick_run.py --out benchmarks/results/quick_run.json -- \\
        dvc exp run -S +presets=quick

Run it from the repository root. The file holds the command, its wall time, each stage's
seconds (from DVC's "Running stage" lines to the next), the metrics files as the run left them,
the FIDs during training (plots/train/fid.tsv), the params it ran with and the machine.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "src"), str(Path(__file__).parent)]

import record  # noqa: E402
from ddpm.runtime import resolve_device  # noqa: E402

STAGE = re.compile(r"Running stage '(\w+)'")
METRICS = {"train": "metrics/train.json", "sample": "metrics/sample.json",
           "fid": "metrics/fid.json"}


def run_timed(command: list[str]) -> tuple[int, float, dict[str, float]]:
    """(exit code, wall seconds, seconds per stage): the output passes through as it comes."""
    starts: list[tuple[str, float]] = []
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            match = STAGE.search(line)
            if match:
                starts.append((match[1], time.perf_counter()))
    end = time.perf_counter()
    ends = [t for _, t in starts[1:]] + [end]
    return proc.returncode, end - start, {name: round(stop - t, 1)
                                          for (name, t), stop in zip(starts, ends)}


def read_tsv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    header, *rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [dict(zip(header, map(float, row))) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results file (JSON) to write")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    code, seconds, stages = run_timed(command)
    if code:
        raise SystemExit(f"{' '.join(command)} exited {code}: nothing recorded")
    params = yaml.safe_load(Path("params.yaml").read_text())
    record.write(args.out, {
        **record.machine(resolve_device(params["device"])), "command": command,
        "wall_seconds": round(seconds, 1), "stage_seconds": stages,
        "metrics": {name: json.loads(Path(path).read_text()) for name, path in METRICS.items()
                    if Path(path).is_file()},
        "fid_during_training": read_tsv(Path("plots/train/fid.tsv")),
        "params": params})


if __name__ == "__main__":
    main()
