"""download: fetch cifar-10-python.tar.gz (data.url), verify data.md5, extract the batches."""
import argparse

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm.cli import run
from ddpm.data import download_cifar10
from ddpm.params import load_params_or_exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder for the extracted python batches")
    args = parser.parse_args()
    params = load_params_or_exit()
    download_cifar10(params.data.url, params.data.md5, args.out)
    print(f"download: CIFAR-10 batches in {args.out}")


if __name__ == "__main__":
    run(main)
