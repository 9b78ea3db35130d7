"""fid: FID of the generated PNGs against the cached statistics of the real ones."""
import argparse
from pathlib import Path

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm.cli import done, run
from ddpm.fid import folder_statistics, frechet_distance, load_statistics
from ddpm.files import write_json
from ddpm.params import load_params_or_exit
from ddpm.runtime import keep_freed_host_memory, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True, type=Path, help="folder of generated PNGs")
    parser.add_argument("--real-stats", required=True, type=Path, help="real_stats' .npz file")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics JSON to write (fid)")
    parser.add_argument("--report", required=True, type=Path, help="JSON of the run's facts")
    args = parser.parse_args()
    params = load_params_or_exit()
    fid = params.fid
    device = resolve_device(params.device)
    keep_freed_host_memory(device)  # on CPUs: no page faults on every batch's activations
    mu_real, sigma_real, num_real = load_statistics(args.real_stats, fid.dims)  # fail fast
    mu, sigma, num_generated = folder_statistics(args.images, fid.dims, fid.batch_size,
                                                 fid.weights, device,
                                                 f"fid: Inception features of {args.images}")
    value = frechet_distance(mu, sigma, mu_real, sigma_real)
    done(f"FID {value:.4f} ({num_generated} generated vs {num_real} real images)")
    write_json(args.metrics, {"fid": value})
    write_json(args.report, {"num_generated": num_generated, "num_real": num_real,
                             "dims": fid.dims})
    print(f"fid: {value:.4f} ({num_generated} generated vs {num_real} real images, "
          f"{fid.dims} dims)")


if __name__ == "__main__":
    run(main)
