"""real_stats: pytorch-fid's Inception statistics (mu, sigma) of the real PNGs, computed once."""
import argparse

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm.cli import done, run
from ddpm.fid import folder_statistics, save_statistics
from ddpm.params import load_params_or_exit
from ddpm.runtime import keep_freed_host_memory, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True, help="folder of real PNGs")
    parser.add_argument("--out", required=True, help=".npz statistics file to write")
    args = parser.parse_args()
    params = load_params_or_exit()
    fid = params.fid
    device = resolve_device(params.device)
    keep_freed_host_memory(device)  # on CPUs: no page faults on every batch's activations
    mu, sigma, n = folder_statistics(args.images, fid.dims, fid.batch_size, fid.weights, device,
                                     f"real_stats: Inception features of {args.images}")
    done(f"the Inception statistics of {n} images are computed")
    save_statistics(args.out, mu, sigma, n)
    print(f"real_stats: {fid.dims}-dim Inception statistics of {n} images -> {args.out}")


if __name__ == "__main__":
    run(main)
