"""A smoke run of the benchmark (tiny sizes): every section runs and prints its table row."""
import subprocess
import sys

from fakes import ROOT


def test_the_benchmark_runs_every_section():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench.py"), "--quick"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    table = out[out.index("| measurement"):]
    for row in ("train step, seed network vs DDPM network", "GFLOP per image, fwd+bwd",
                "train step, DDPM config", "achieved FLOP/s", "sampling forwards/s",
                "DDIM-100 vs DDPM-1000", "peak measured", "train step, seed config",
                "fid stage", "Frechet distance"):
        assert row in table, row
