"""FID of pure-noise images against a real_stats file: what a sampler that learnt nothing scores.

    python benchmarks/noise_fid.py --real-stats data/real_stats.npz --num 500 [--weights W]
                                   [--out benchmarks/results/noise_fid.json]

Each image is x_T ~ N(0, I), clipped to [-1, 1] and quantised as the sample stage quantises its
images (ddpm.images.to_uint8), then scored by the fid stage's own code (ddpm.fid) against the
given statistics. The figure to put beside a run's FID with the same number of images; --out
also writes it, with the machine and the statistics file's sha256, as JSON.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import record  # noqa: E402  (the script's folder is on the path)
from ddpm.files import file_digest  # noqa: E402
from ddpm.fid import folder_statistics, frechet_distance, load_statistics  # noqa: E402
from ddpm.images import to_uint8, write_pngs  # noqa: E402
from ddpm.runtime import keep_freed_host_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-stats", required=True, type=Path)
    parser.add_argument("--num", type=int, default=500, help="noise images")
    parser.add_argument("--weights", default="", help="fid.weights, as in params.yaml")
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = parser.parse_args()
    device = torch.device("cpu")
    keep_freed_host_memory(device)
    start = time.perf_counter()
    mu_real, sigma_real, num_real = load_statistics(args.real_stats, args.dims)
    noise = torch.randn(args.num, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory() as folder:
        write_pngs(to_uint8(noise.clamp(-1, 1)), folder)
        mu, sigma, n = folder_statistics(folder, args.dims, 64, args.weights, device)
    fid = frechet_distance(mu, sigma, mu_real, sigma_real)
    print(f"FID of {n} pure-noise images against {num_real} real images ({args.dims} dims): "
          f"{fid:.2f}")
    if args.out:
        weights = Path(args.weights) if args.weights else None
        record.write(args.out, {
            **record.machine(device), "fid": round(fid, 4), "num_generated": n,
            "num_real": num_real, "dims": args.dims, "seed": args.seed,
            "real_stats": str(args.real_stats),
            "real_stats_sha256": file_digest(args.real_stats, "sha256"),
            "weights": weights.name if weights else "pytorch-fid's download",
            "weights_sha256": file_digest(weights, "sha256") if weights else None,
            "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
