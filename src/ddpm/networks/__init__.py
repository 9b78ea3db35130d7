"""The noise-prediction networks, side by side behind one (x_t, t) -> eps interface.

`build(params.model)` constructs the network that model.arch names: the seed notebook's UNet
(`seed`) or Ho et al.'s (`ddpm`). Nothing else in the package asks which one it has.
"""
from __future__ import annotations

from torch import nn

from ddpm.networks.ddpm_unet import DDPMUNet
from ddpm.networks.seed_unet import SeedUNet
from ddpm.params import ModelParams

NETWORKS: dict[str, type[nn.Module]] = {"seed": SeedUNet, "ddpm": DDPMUNet}


def build(model: ModelParams) -> nn.Module:
    """The network of params.model, freshly initialised (seed it before calling)."""
    return NETWORKS[model.arch](**model.network_kwargs())


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
