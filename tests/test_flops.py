"""The FLOP counts docs/benchmarks.md and the README quote, from the benchmark's own counter
(benchmarks/bench.py flops_per_image: FlopCounterMode, attention through the math kernel), so a
network change that moves them fails here rather than leaving a stale figure."""
from __future__ import annotations

import sys

import pytest
import torch

from fakes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402
import references  # noqa: E402

from ddpm import networks  # noqa: E402
from ddpm.params import ModelParams  # noqa: E402

CPU = torch.device("cpu")


def build(config: dict) -> torch.nn.Module:
    model = ModelParams(**{"time_dim": 64, "conditional": False, **config})
    return networks.build(model, (3, 32, 32))


@pytest.mark.parametrize("config, train, gflop", [
    (references.SEED, True, 28.7),          # benchmarks.md, README: a seed training image
    (references.DDPM_CIFAR10, True, 35.05),  # benchmarks.md: a DDPM-paper training image
])
def test_the_quoted_flops_per_image(config, train, gflop):
    counted = bench.flops_per_image(build(config), CPU, train=train) / 1e9
    assert round(counted, 2 if gflop == 35.05 else 1) == gflop


def test_diffusers_reference_flops_per_training_image():
    pytest.importorskip("diffusers")  # requirements-bench.txt
    counted = bench.flops_per_image(references.diffusers_unet(), CPU, train=True) / 1e9
    assert round(counted, 1) == 37.3
