"""What training costs, counted rather than timed: parameters, FLOP per image and the GPU hours
they make at a given achieved FLOP/s, for the seed network at 32 px and the res64 preset's at
64 px; the table of docs/benchmarks.md's '64 x 64: the res64 preset'.

    python benchmarks/cost.py --tflops 18.9     # the H100's bf16 eager training step (docs)

The networks are built by their constructors at their image size; FLOP are timing.py's
flops_per_image (FlopCounterMode, attention through the math kernel), on the CPU.
"""
from __future__ import annotations

import argparse

import torch

from timing import flops_per_image
import references  # noqa: E402  (after timing, which puts src/ on the path)
from ddpm import networks  # noqa: E402

# name: (model.* keys, image size)
NETWORKS = {"seed network (defaults)": (references.SEED, 32),
            "res64 preset": (references.RES64, 64)}
IMAGES = 600 * 50_000  # the seed's 600 epochs of CIFAR-10's 50,000 training images
_COUNTED: dict[tuple[str, int], tuple[int, float, float]] = {}


def build(config: dict, image_size: int) -> torch.nn.Module:
    """The network of a model.* dict, by model.arch's constructor, at image_size."""
    kwargs = {key: value for key, value in config.items() if key != "arch"}
    return networks.NETWORKS[config["arch"]](**kwargs, image_size=image_size, in_channels=3)


def counts(config: dict, image_size: int) -> tuple[int, float, float]:
    """Parameters, and FLOP per image forward and forward + backward, of the network of a
    model.* dict at image_size; each configuration is counted once per process."""
    key = (repr(sorted(config.items())), image_size)
    if key not in _COUNTED:
        model, cpu = build(config, image_size), torch.device("cpu")
        _COUNTED[key] = (networks.parameter_count(model),
                         flops_per_image(model, cpu, train=False, image_size=image_size),
                         flops_per_image(model, cpu, train=True, image_size=image_size))
    return _COUNTED[key]


def table(tflops: float, images: int = IMAGES) -> str:
    """The markdown table: per network, parameters, GFLOP per image and the hours of `images`
    training images at `tflops` achieved TFLOP/s."""
    lines = [f"| | image size | parameters | GFLOP per image, forward | forward + backward | "
             f"{images / 1e6:,.0f}M training images | hours at {tflops} TFLOP/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, (config, size) in NETWORKS.items():
        parameters, forward, train = counts(config, size)
        hours = train * images / (tflops * 1e12) / 3600
        lines.append(f"| {name} | {size} | {parameters:,} | {forward / 1e9:.2f} | "
                     f"{train / 1e9:.2f} | {train * images / 1e18:.2f} EFLOP | {hours:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", type=float, required=True,
                        help="achieved TFLOP/s of a training step, as measured on a GPU")
    parser.add_argument("--images", type=int, default=IMAGES, help="training images in all")
    args = parser.parse_args()
    print(table(args.tflops, args.images))


if __name__ == "__main__":
    main()
