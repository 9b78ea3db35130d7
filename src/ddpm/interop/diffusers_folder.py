"""diffusers' folders of the ddpm network: a UNet2DModel folder (config.json +
diffusion_pytorch_model.safetensors) read, a DDPMPipeline folder (model_index.json, unet/,
scheduler/) written, and the tensor names between DDPMUNet and UNet2DModel, tensor for tensor
(the attention's q, k and v are one matrix here, three there)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ddpm import networks
from ddpm.interop.diffusers_config import (DIFFUSERS_VERSION, diffusion_from_scheduler,
                                           model_from_unet, scheduler_config, unet_config)
from ddpm.interop.errors import InteropError
from ddpm.interop.settings import plain_section
from ddpm.interop.storage import read_json, read_weights, write_json, write_weights
from ddpm.networks.ddpm_unet import DDPMUNet, Downsample, ResAttn, Upsample
from ddpm.params import DiffusionParams, ModelParams
from ddpm.schema import short

UNET_CONFIG, UNET_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
PIPELINE, SCHEDULER_CONFIG = "model_index.json", "scheduler_config.json"

# DDPMUNet's module names -> UNet2DModel's, within a residual block and an attention layer.
RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
             "conv2": "conv2", "skip": "conv_shortcut"}
ATTN_NAMES = {"norm": ("group_norm",), "qkv": ("to_q", "to_k", "to_v"), "proj": ("to_out.0",)}
# diffusers before 0.14 named the attention's layers so; its loader renames them, as read does.
LEGACY = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_diffusers(unet: Path, scheduler: Path | None) -> dict:
    """The UNet2DModel folder `unet` and the scheduler config `scheduler` (None: DDPMScheduler's
    defaults) as an EMA file's dict, as ddpm.interop.read_exported returns it."""
    model, shape = model_from_unet(read_json(unet / UNET_CONFIG), unet / UNET_CONFIG)
    if scheduler is not None:
        diffusion, sample = diffusion_from_scheduler(read_json(scheduler), scheduler)
    else:
        diffusion, sample = diffusion_from_scheduler({}, Path("DDPMScheduler"))[0], None
    with torch.device("meta"):
        net = networks.build(model, shape)
    names, ours = diffusers_names(net), net.state_dict()
    expected = {theirs: (ours[name].shape[0] // len(group), *ours[name].shape[1:])
                for name, group in names.items() for theirs in group}
    tensors = read_weights(unet / UNET_WEIGHTS, expected, rename=_modern_name)
    state = {"ema": {name: torch.cat([tensors[t] for t in names[name]]) for name in ours},
             "config": {"model": plain_section(model), "diffusion": diffusion},
             "image_shape": list(shape)}
    return state if sample is None else {**state, "sample": sample}


def check_pipeline(path: Path) -> None:
    """A model_index.json whose unet (if it names one) is a UNet2DModel."""
    index = read_json(path)
    if index.get("unet", ["diffusers", "UNet2DModel"]) != ["diffusers", "UNet2DModel"]:
        raise InteropError(f"{path}: unet = {short(index['unet'])}: only diffusers' UNet2DModel "
                           "maps to this project's ddpm network")


def _modern_name(key: str) -> str:
    match = LEGACY.fullmatch(key)
    return f"{match[1]}.{LEGACY_NAMES[match[2]]}.{match[3]}" if match else key


def diffusers_names(net: DDPMUNet) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the UNet2DModel parameter names it holds, concatenated along dim 0
    (several only for the attention's qkv: (3C, C) here, to_q, to_k, to_v (C, C) there)."""
    modules = {"time_embed.0": ("time_embedding.linear_1",),
               "time_embed.2": ("time_embedding.linear_2",), "conv_in": ("conv_in",),
               "norm_out": ("conv_norm_out",), "conv_out": ("conv_out",)}
    for side, theirs, sampler in (("down", "down_blocks", "downsamplers"),
                                  ("up", "up_blocks", "upsamplers")):
        level, j = 0, 0  # their block (one per resolution) and layer in it
        for i, layer in enumerate(getattr(net, side)):
            if isinstance(layer, (Downsample, Upsample)):  # ends their block
                modules[f"{side}.{i}.conv"] = (f"{theirs}.{level}.{sampler}.0.conv",)
                level, j = level + 1, 0
            else:
                modules.update(_block_names(layer, f"{side}.{i}", f"{theirs}.{level}", j))
                j += 1
    for j, layer in enumerate(net.mid):  # resnet 0, attention 0, resnet 1
        modules.update(_block_names(layer, f"mid.{j}", "mid_block", j))
    return {f"{ours}.{p}": tuple(f"{t}.{p}" for t in theirs)
            for ours, theirs in modules.items() for p in ("weight", "bias")}


def _block_names(layer: ResAttn, ours: str, theirs: str, j: int) -> dict[str, tuple[str, ...]]:
    names = {f"{ours}.res.{a}": (f"{theirs}.resnets.{j}.{b}",) for a, b in RES_NAMES.items()
             if a != "skip" or isinstance(layer.res.skip, nn.Conv2d)}
    if layer.attn is not None:
        names.update({f"{ours}.attn.{a}": tuple(f"{theirs}.attentions.{j}.{n}" for n in b)
                      for a, b in ATTN_NAMES.items()})
    return names


def write_pipeline(tmp: Path, model: ModelParams, diffusion: DiffusionParams,
                   shape: Sequence[int], weights: dict[str, torch.Tensor], sample: dict) -> None:
    """A DDPMPipeline folder in `tmp`: model_index.json, unet/, scheduler/."""
    with torch.device("meta"):
        names = diffusers_names(networks.build(model, shape))
    theirs = {}
    for name, group in names.items():
        # .clone(): safetensors refuses tensors that share memory, as the chunks of qkv do
        theirs.update(zip(group, (piece.clone() for piece in weights[name].chunk(len(group)))))
    write_json(tmp / PIPELINE, {"_class_name": "DDPMPipeline",
                                "_diffusers_version": DIFFUSERS_VERSION,
                                "scheduler": ["diffusers", "DDPMScheduler"],
                                "unet": ["diffusers", "UNet2DModel"]})
    write_json(tmp / "unet" / UNET_CONFIG, unet_config(model, shape))
    write_weights(tmp / "unet" / UNET_WEIGHTS, theirs)
    write_json(tmp / "scheduler" / SCHEDULER_CONFIG, scheduler_config(diffusion, sample))
