"""The noise-prediction networks, side by side behind one (x_t, t) -> eps interface.

`build(params.model)` constructs the network that model.arch names: the seed notebook's UNet
(`seed`) or Ho et al.'s (`ddpm`). Nothing else in the package asks which one it has.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ddpm.errors import ParamsError
from ddpm.networks.arguments import ArgumentError
from ddpm.networks.ddpm_unet import DDPMUNet
from ddpm.networks.seed_unet import SeedUNet

if TYPE_CHECKING:
    from ddpm.params import ModelParams

NETWORKS: dict[str, type[nn.Module]] = {"seed": SeedUNet, "ddpm": DDPMUNet}
__all__ = ["ArgumentError", "NETWORKS", "build", "checked_size", "parameter_count", "state_bytes"]
MAX_PARAMETERS = 1_000_000_000  # 20 GB of fp32 weights, gradients, Adam moments and EMA


def build(model: ModelParams) -> nn.Module:
    """The network of params.model, freshly initialised (seed it before calling); under
    `torch.device("meta")` it allocates nothing, which is how params are checked."""
    return NETWORKS[model.arch](**model.network_kwargs())


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_bytes(parameters: int) -> int:
    """fp32 weights, gradients, Adam's two moments and the EMA copy: 5 x 4 bytes a parameter."""
    return 20 * parameters


def checked_size(model: ModelParams) -> int:
    """The network of params.model built on the meta device (nothing allocated): its parameter
    count, or a ParamsError naming the model.* key it rejects or the memory it would take."""
    try:
        with torch.device("meta"):
            count = parameter_count(build(model))
    except ArgumentError as e:
        raise ParamsError(f"model.{e}") from None
    if count > MAX_PARAMETERS:
        raise ParamsError(f"model.*: the {model.arch} network of these values has {count:,} "
                          f"parameters ({state_bytes(count) / 1e9:,.0f} GB of weights, gradients, "
                          f"Adam moments and EMA); at most {MAX_PARAMETERS:,} are accepted")
    return count
