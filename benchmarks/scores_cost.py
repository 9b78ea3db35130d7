"""What the fid stage's KID, precision/recall and Inception Score cost beside the Inception pass.

    python benchmarks/scores_cost.py [--sizes 500x5085,5000x5085,5000x50000] [--json OUT]

Each size (generated x real images) runs in a fresh process, on the CPU, with ddpm.scores as the
fid stage calls it, on random non-negative 2048-d features shaped like Inception's (the cost
depends on the sizes, not on the values); it prints seconds per metric and the process's peak
resident memory. The Inception pass itself costs far more on a CPU (docs/fid.md).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def measure(n_gen: int, n_real: int) -> dict:
    """In this process: the three metrics on (n_gen, 2048) float64 generated features (as
    pytorch-fid returns them) and (n_real, 2048) float32 real ones (as real_stats stores them)."""
    import numpy as np
    import torch

    from ddpm.scores import inception_score, kid, logits_unbiased, precision_recall
    rng = np.random.default_rng(0)
    generated = np.maximum(rng.normal(0.2, 0.4, size=(n_gen, 2048)), 0)
    real = np.maximum(rng.normal(0.2, 0.4, size=(n_real, 2048)), 0).astype(np.float32)
    fc = torch.randn(1008, 2048) / 45
    seconds = {}
    for name, compute in (("kid", lambda: kid(generated, real)),
                          ("precision_recall", lambda: precision_recall(generated, real)),
                          ("inception_score",
                           lambda: inception_score(logits_unbiased(generated, fc)))):
        start = time.perf_counter()
        compute()
        seconds[name] = round(time.perf_counter() - start, 4)
    return {"generated": n_gen, "real": n_real, "seconds": seconds,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500x5085,5000x5085,5000x50000",
                        help="comma-separated GENERATEDxREAL image counts")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # GENERATEDxREAL, in the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*map(int, args.one.split("x")))))
        return
    rows = []
    for size in args.sizes.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", size], capture_output=True,
                              text=True, timeout=3600, check=True)
        rows.append(json.loads(done.stdout.splitlines()[-1]))
        row = rows[-1]
        print(f"{row['generated']:>6} x {row['real']:>6}: KID {row['seconds']['kid']:7.2f} s, "
              f"precision/recall {row['seconds']['precision_recall']:7.2f} s, IS "
              f"{row['seconds']['inception_score']:5.2f} s, peak {row['peak_rss_mib']:,} MiB",
              flush=True)
    import torch
    from record import machine, write
    if args.json:
        write(args.json, {**machine(torch.device("cpu")), "runs": 1, "rows": rows})


if __name__ == "__main__":
    main()
