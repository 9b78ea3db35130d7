"""export_real: the data.real_split images as lossless PNGs 0.png ... N-1.png, in dataset order."""
import argparse

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm.cli import run
from ddpm.data import load_cifar10
from ddpm.files import atomic_dir
from ddpm.images import write_pngs
from ddpm.params import load_params_or_exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cifar", required=True, help="folder of the extracted batches")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    args = parser.parse_args()
    params = load_params_or_exit()
    images = load_cifar10(args.cifar, params.data.real_split, params.data.limit)  # (N, 3, 32, 32)
    with atomic_dir(args.out) as staging:
        write_pngs(images.transpose(0, 2, 3, 1), staging, progress=True)
    print(f"export_real: {len(images)} {params.data.real_split} images -> {args.out}")


if __name__ == "__main__":
    run(main)
