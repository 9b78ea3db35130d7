"""The noise-prediction networks, side by side behind one (x_t, t[, labels]) -> eps interface.

`build(params.model, shape, classes)` constructs the network that model.arch names: the seed
notebook's UNet (`seed`) or Ho et al.'s (`ddpm`), conditioned on `classes` labels where
model.conditional says so. Nothing else in the package asks which one it has.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

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


def build(model: ModelParams, shape: Sequence[int], classes: int = 0) -> nn.Module:
    """The network of params.model for images of `shape` (C, H, W; square: the data's), with a
    label embedding for `classes` classes (the data's) if model.conditional; freshly initialised
    (seed it before calling). Under `torch.device("meta")` it allocates nothing, which is how
    params are checked."""
    channels, height, width = shape
    if height != width:
        raise ArgumentError(f"image shape {tuple(shape)}: the networks take square images")
    if model.conditional and classes < 1:
        raise ArgumentError("conditional = true: the data has no class labels (CIFAR-10 has "
                            "ten; a folder's are its class subfolders)")
    return NETWORKS[model.arch](**model.network_kwargs(), image_size=height,
                                in_channels=channels,
                                classes=classes if model.conditional else 0)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_bytes(parameters: int) -> int:
    """fp32 weights, gradients, Adam's two moments and the EMA copy: 5 x 4 bytes a parameter."""
    return 20 * parameters


def checked_size(model: ModelParams, shape: Sequence[int], classes: int = 0) -> int:
    """The network of params.model for images of `shape` (C, H, W) built on the meta device
    (nothing allocated): its parameter count, or a ParamsError naming the model.* key it
    rejects at that size or the memory it would take."""
    try:
        with torch.device("meta"):
            count = parameter_count(build(model, shape, classes))
    except ArgumentError as e:
        raise ParamsError(f"model.{e} (for {shape[1]} x {shape[2]} images: data.resolution)"
                          ) from None
    if count > MAX_PARAMETERS:
        raise ParamsError(f"model.*: the {model.arch} network of these values has {count:,} "
                          f"parameters ({state_bytes(count) / 1e9:,.0f} GB of weights, gradients, "
                          f"Adam moments and EMA); at most {MAX_PARAMETERS:,} are accepted")
    return count
