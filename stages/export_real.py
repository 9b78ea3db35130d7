"""export_real: the data.real_split images as lossless PNGs 0.png ... N-1.png, in dataset order."""
import argparse

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm import dataset
from ddpm.cli import run
from ddpm.files import atomic_dir
from ddpm.images import write_pngs
from ddpm.params import load_params_or_exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="the data stage's dataset folder")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    args = parser.parse_args()
    params = load_params_or_exit()
    images = dataset.load(args.data, params.data.real_split, params.data.limit)  # (N, C, H, W)
    with atomic_dir(args.out) as staging:
        write_pngs(images.transpose(0, 2, 3, 1), staging, progress=True)
    print(f"export_real: {len(images)} {params.data.real_split} images -> {args.out}")


if __name__ == "__main__":
    run(main)
