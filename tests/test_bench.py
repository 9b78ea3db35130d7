"""A smoke run of the benchmark (tiny sizes): every section runs and prints its table row."""
import subprocess
import sys

import pytest

from fakes import ROOT


def test_the_benchmark_runs_every_section(tmp_path):
    import json
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench.py"), "--quick", "--json",
                          str(tmp_path / "bench.json")],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    table = out[out.index("| measurement"):]
    recorded = json.loads((tmp_path / "bench.json").read_text())
    assert recorded["argv"] == ["--quick", "--json", str(tmp_path / "bench.json")]
    assert ["| " + " | ".join(row.values()) + " |" for row in recorded["rows"]] == \
        table.splitlines()[2:2 + len(recorded["rows"])]  # the printed table, row by row
    for row in ("train step, seed network vs DDPM network", "GFLOP per image, fwd+bwd",
                "train step, DDPM config", "achieved FLOP/s", "sampling forwards/s",
                "DDIM-100 vs DDPM-1000", "peak measured", "train step, seed config",
                "vs fp32",
                "fid stage", "Frechet distance"):
        assert row in table, row


def test_the_gpu_benchmark_runs_on_the_cpu_as_a_dry_run(tmp_path):
    """benchmarks/gpu.py --quick: every network and batch_gpu row, with the projected hours."""
    import json
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--device", "cpu",
                          "--quick", "--json", str(tmp_path / "gpu.json")],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert "| network | mode | batch_gpu | rounds | images_per_second" in out
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert [(r["network"], r["batch_gpu"], r["rounds"]) for r in rows] == [
        ("seed", 4, 2), ("seed", 8, 1), ("ddpm", 4, 2), ("ddpm", 8, 1)]
    for r in rows:  # 600 epochs of 390 steps of 128 images at the measured speed
        assert r["hours_600_epochs"] == pytest.approx(600 * 390 * 128 / r["images_per_second"]
                                                      / 3600, rel=0.01)
