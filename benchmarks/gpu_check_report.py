"""The report of benchmarks/gpu_check.py: the machine it ran on, pytest's counts, the summary."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def junit_counts(path: Path) -> dict:
    """passed / skipped / failed / errors in a pytest JUnit XML file, the skip reasons (with
    their counts) and the tests that failed or errored (with their messages)."""
    counts, reasons, broken = {"passed": 0, "skipped": 0, "failed": 0, "errors": 0}, {}, []
    for case in ET.parse(path).iter("testcase"):
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        kind = {None: "passed", "failure": "failed", "error": "errors", "skipped": "skipped"}[
            None if outcome is None else outcome.tag]
        counts[kind] += 1
        message = "" if outcome is None else (outcome.get("message") or "")[:200]
        if kind == "skipped":
            reasons[message] = reasons.get(message, 0) + 1
        elif kind != "passed":
            broken.append(f"{case.get('classname')}::{case.get('name')}: {message}")
    return {**counts, "skip_reasons": reasons, "broken": broken}


def setup(device: torch.device, args) -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dry_run": args.dry_run, "device": device.type, "gpu": None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "cpus": os.cpu_count(), "commit": commit(),
            "command": " ".join(sys.argv)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version())
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def commit() -> str | None:
    """The checkout's commit, with + if tracked files differ from it; None outside git."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
        return head + "+" * subprocess.run([*git, "diff", "--quiet", "HEAD"], timeout=30).returncode
    except (OSError, subprocess.SubprocessError):
        return None


COLUMNS = ["network", "mode", "batch_gpu", "rounds", "images_per_second", "gpu_busy_percent",
           "peak_memory_mib", "first_step_seconds", "hours_600_epochs"]


def row_line(row: dict) -> str:
    if "error" in row or "skipped" in row:
        return f"{row['network']} | {row['mode']} | {row.get('error') or row['skipped']}"
    return " | ".join(str(row.get(c, "n/a")) for c in COLUMNS)


def summary(report: dict, out: Path) -> str:
    s, t, tr, sa = (report.get(k, {}) for k in ("setup", "tests", "training", "sampling"))
    lines = [f"# gpu_check {s['date']}: {s['gpu'] or s.get('cpu')}, torch {s['torch']}, "
             f"CUDA {s['cuda']}{' (dry run)' if s['dry_run'] else ''}"]
    if t:
        counts = t.get("error") or "{passed} passed, {skipped} skipped, {failed} failed, " \
                                   "{errors} errors".format(**t)
        lines.append(f"tests: {counts} in {t['seconds']} s (missing modules: "
                     f"{', '.join(t['missing_modules']) or 'none'}; tests.log)")
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += [f"| {row_line(row)} |" for row in timing_rows(report)]
    if "error" in tr or "error" in sa:
        lines.append(f"training and sampling: {tr.get('error') or sa.get('error')}")
    elif tr:
        lines += [f"training: {tr['arch']} ({tr['parameters']:,} parameters), {tr['mode']}, "
                  f"{tr['precision']}, batch {tr['batch_size']} = {tr['rounds']} x "
                  f"{tr['batch_gpu']}: {tr['epochs']} epochs of {tr['images']:,} images, "
                  f"{tr['steps']} steps in {tr['seconds']} s ({tr['steady_images_per_second']} "
                  f"img/s after the first), loss {tr['loss_first']:.4f} -> {tr['loss']:.4f}",
                  f"sampling: {sa['num_images']} images, {sa['sampler']} {sa['steps']} steps, "
                  f"{sa['seconds']} s ({sa['images_per_second']} img/s)"]
    return "\n".join(lines + ["files: " + ", ".join(sorted(p.name for p in out.iterdir()))])


def timing_rows(report: dict) -> list[dict]:
    """The timing rows, or one row with the error that stopped part 2 as a whole."""
    timing = report.get("timing", [])
    return timing if isinstance(timing, list) else [{"network": "-", "mode": "-", **timing}]


def failed(report: dict) -> bool:
    parts = [report.get(k, {}) for k in ("tests", "training", "sampling")]
    return any("error" in p or p.get("failed") or p.get("errors")
               for p in parts + timing_rows(report))
