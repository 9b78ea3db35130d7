"""diffusers' settings as this project's: a UNet2DModel config.json as model.* (the ddpm network,
Ho et al.'s UNet, which is UNet2DModel with google/ddpm-cifar10-32's settings) and the image
shape, a DDPMScheduler scheduler_config.json as diffusion.* and the sampler settings; and back.
A setting that would not compute the same is refused in one line naming it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ddpm import networks, schema
from ddpm.errors import ParamsError
from ddpm.interop.errors import InteropError
from ddpm.interop.settings import as_ours, check_size, parse_diffusion, plain_section
from ddpm.params import DiffusionParams, ModelParams
from ddpm.prediction import PREDICTIONS
from ddpm.schema import short

DIFFUSERS_VERSION = "0.42.1"  # the release whose config keys and defaults these files follow

# UNet2DModel's constructor defaults (diffusers 0.42.1): what a config.json that leaves a key out
# means (the google/ddpm-* configs predate most keys). A key not here is refused: its meaning
# is unknown, so equal outputs could not be promised.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-05,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None}
# The UNet2DModel settings that make it compute what DDPMUNet computes, which has no others.
UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False, "time_embedding_type": "positional",
    "freq_shift": 1, "flip_sin_to_cos": False,  # [sin | cos] of t * 10000^(-i / (half - 1))
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1,
    "downsample_padding": 0,  # zero row and column after the input (TF's SAME), not around it
    "downsample_type": "conv", "upsample_type": "conv", "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-6, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None}
# DDPMScheduler's constructor defaults (diffusers 0.42.1), and the values this pipeline's
# diffusion has; the keys of inference-time spacing and of thresholding (off) are ignored.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "variance_type": "fixed_small",
    "clip_sample": True, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}
SCHEDULER_FIXED = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False}
PREDICTION_TYPES = {p.diffusers: name for name, p in PREDICTIONS.items()}  # -> diffusion.prediction
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # theirs -> diffusion.schedule
VARIANCE_TYPES = {"fixed_large": "beta", "fixed_small": "beta_tilde"}  # theirs -> sample.variance
HO_SAMPLING = {"variance": "beta", "clip_denoised": True}  # Ho et al.'s CIFAR-10 sampler
# The diffusers key each of this project's settings is read from: what a range error names.
FROM_UNET = {"model.channels": "block_out_channels", "model.res_blocks": "layers_per_block",
             "model.attention_resolutions": "down_block_types",
             "model.heads": "attention_head_dim", "model.dropout": "dropout"}
FROM_SCHEDULER = {"diffusion.timesteps": "num_train_timesteps",
                  "diffusion.beta_start": "beta_start", "diffusion.beta_end": "beta_end"}


def model_from_unet(config: dict, path: Path) -> tuple[ModelParams, tuple[int, int, int]]:
    """A UNet2DModel config.json as model.* (arch ddpm) and the (C, H, W) of its images; a
    setting DDPMUNet does not compute is one line naming it."""
    def refuse(key: str, expected: str) -> InteropError:
        return InteropError(f"{path}: {key} = {short(config.get(key))}: {expected}")

    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise refuse("_class_name", "only diffusers' UNet2DModel maps to this project's ddpm "
                                    "network")
    if unknown := sorted(k for k in config if not k.startswith("_") and k not in UNET_DEFAULTS):
        raise refuse(unknown[0], f"not a UNet2DModel setting of diffusers {DIFFUSERS_VERSION}")
    config = {**UNET_DEFAULTS, **config}
    for key, value in UNET_FIXED.items():
        if config[key] != value:
            raise refuse(key, f"this project's ddpm network computes {json.dumps(value)} only")
    if config["act_fn"] not in ("silu", "swish"):
        raise refuse("act_fn", "this project's ddpm network computes silu only")
    channels, size = config["block_out_channels"], config["sample_size"]
    if not (isinstance(channels, list) and channels and all(_is_int(c) for c in channels)
            and all(c % 32 == 0 for c in channels)):
        raise refuse("block_out_channels", "a list of widths, each a multiple of "
                                           "norm_num_groups = 32")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not (_is_int(size) and 1 <= size <= 1 << 16):
        raise refuse("sample_size", "the images' height and width (one integer)")
    if not (_is_int(config["in_channels"]) and 1 <= config["in_channels"] <= 4096
            and config["out_channels"] == config["in_channels"]):
        raise refuse("out_channels", f"in_channels ({short(config['in_channels'])}): the network "
                                     "predicts the noise of its input")
    if config["time_embedding_dim"] not in (None, 4 * channels[0]):
        raise refuse("time_embedding_dim", f"null or {4 * channels[0]} (4 x the first width)")
    levels = _attention_levels(config, len(channels), refuse)
    raw = {"arch": "ddpm", "channels": channels, "res_blocks": config["layers_per_block"],
           "attention_resolutions": [size >> level for level in levels],
           "heads": _heads(config, channels, levels, refuse), "dropout": config["dropout"],
           "time_dim": channels[0],  # unused by ddpm; its embedding is channels[0] wide
           "conditional": False}
    try:
        model = schema.parse(ModelParams, raw, "model.")
    except ParamsError as e:
        raise InteropError(f"{path}: {as_ours(e, FROM_UNET)}") from None
    shape = (config["in_channels"], size, size)
    check_size(model, shape, path)
    return model, shape


def _is_int(value: Any) -> bool:
    return type(value) is int


def _attention_levels(config: dict, n: int, refuse: Callable[[str, str], Exception]
                      ) -> list[int]:
    """The levels whose blocks attend: AttnDownBlock2D there, and AttnUpBlock2D on the way back
    (DDPMUNet attends on both sides of a resolution, as Ho et al.'s network)."""
    down, up = config["down_block_types"], config["up_block_types"]
    if not (isinstance(down, list) and len(down) == n
            and all(b in ("DownBlock2D", "AttnDownBlock2D") for b in down)):
        raise refuse("down_block_types", f"{n} of DownBlock2D | AttnDownBlock2D, one per width")
    levels = [level for level, block in enumerate(down) if block == "AttnDownBlock2D"]
    mirror = ["AttnUpBlock2D" if n - 1 - i in levels else "UpBlock2D" for i in range(n)]
    if up != mirror:
        raise refuse("up_block_types", f"{json.dumps(mirror)}, down_block_types reversed")
    return levels


def _heads(config: dict, channels: list[int], levels: list[int],
           refuse: Callable[[str, str], Exception]) -> int:
    """attention_head_dim (null: one head of the whole width) as model.heads: each attention
    layer (those of `levels` and the middle's) must then have the same number of heads."""
    dim = config["attention_head_dim"]
    if dim is None:
        return 1
    widths = {channels[level] for level in levels} | {channels[-1]}
    if not (_is_int(dim) and dim > 0 and all(w % dim == 0 for w in widths)
            and len({w // dim for w in widths}) == 1):
        raise refuse("attention_head_dim", f"null, or a width giving every attention layer "
                                           f"(widths {sorted(widths)}) the same number of heads")
    return channels[-1] // dim


def diffusion_from_scheduler(config: dict, path: Path) -> tuple[dict, dict]:
    """A DDPMScheduler scheduler_config.json as (diffusion.*, {"variance", "clip_denoised"})."""
    def refuse(key: str, expected: str) -> InteropError:
        return InteropError(f"{path}: {key} = {short(config.get(key))}: {expected}")

    if config.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        raise refuse("_class_name", "only DDPMScheduler's settings are read (the training "
                                    "schedule a sampler here starts from)")
    if unknown := sorted(k for k in config if not k.startswith("_")
                         and k not in SCHEDULER_DEFAULTS):
        raise refuse(unknown[0], f"not a DDPMScheduler setting of diffusers {DIFFUSERS_VERSION}")
    config = {**SCHEDULER_DEFAULTS, **config}
    for key, value in SCHEDULER_FIXED.items():
        if config[key] != value:
            raise refuse(key, f"this pipeline's diffusion has {json.dumps(value)} only")
    schedule, variance = (_lookup(BETA_SCHEDULES, config["beta_schedule"]),
                          _lookup(VARIANCE_TYPES, config["variance_type"]))
    if schedule is None:
        raise refuse("beta_schedule", f"{' | '.join(BETA_SCHEDULES)} (diffusion.schedule "
                                      f"{' | '.join(BETA_SCHEDULES.values())})")
    if variance is None:
        raise refuse("variance_type", f"{' | '.join(VARIANCE_TYPES)} (sample.variance "
                                      f"{' | '.join(VARIANCE_TYPES.values())})")
    if (prediction := _lookup(PREDICTION_TYPES, config["prediction_type"])) is None:
        raise refuse("prediction_type", f"{' | '.join(PREDICTION_TYPES)} (diffusion.prediction "
                                        f"{' | '.join(PREDICTION_TYPES.values())})")
    if type(config["clip_sample"]) is not bool or config["clip_sample"] and (
            config["clip_sample_range"] != 1):
        raise refuse("clip_sample_range" if config["clip_sample"] is True else "clip_sample",
                     "clip_sample false, or true with clip_sample_range 1 (x0 in [-1, 1])")
    raw = {"timesteps": config["num_train_timesteps"], "beta_start": config["beta_start"],
           "beta_end": config["beta_end"], "schedule": schedule, "prediction": prediction}
    return (plain_section(parse_diffusion(raw, path, FROM_SCHEDULER)),
            {"variance": variance, "clip_denoised": config["clip_sample"]})


def _lookup(table: dict[str, str], key: Any) -> str | None:
    return table.get(key) if isinstance(key, str) else None


def diffusers_refusal(model: ModelParams, shape: Sequence[int]) -> str | None:
    """Why diffusers' UNet2DModel cannot compute the network of `model` for images of `shape`
    (C, H, W), in one line; None where it can (export then writes a DDPMPipeline folder)."""
    if model.arch != "ddpm":
        return f"model.arch = {model.arch}: diffusers has no class of this network"
    if model.conditional:
        return "model.conditional = true: diffusers' DDPMPipeline draws no classes"
    with torch.device("meta"):
        net = networks.build(model, shape)
    if {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)} != {32}:
        return (f"model.channels = {list(model.channels)}: diffusers' GroupNorm has 32 groups "
                "everywhere, which needs every width a multiple of 32")
    if model.heads > 1 and len({w // model.heads for w in _attending_widths(model, shape[1])}) > 1:
        return (f"model.heads = {model.heads}: diffusers gives every attention layer heads of "
                "one width, and these layers differ in width")
    return None


def _attending_widths(model: ModelParams, size: int) -> set[int]:
    """The widths of the ddpm network's attention layers: its attention levels' and the middle's."""
    return {width for level, width in enumerate(model.channels)
            if size >> level in model.attention_resolutions} | {model.channels[-1]}


def unet_config(model: ModelParams, shape: Sequence[int]) -> dict:
    """The UNet2DModel config.json of the ddpm network `model` for images of `shape` (C, H, W)
    (diffusers_refusal(model, shape) must be None)."""
    n, size = len(model.channels), shape[1]
    attends = [size >> level in model.attention_resolutions for level in range(n)]
    return {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            **UNET_FIXED, "sample_size": size, "in_channels": shape[0], "out_channels": shape[0],
            "time_embedding_dim": None, "act_fn": "silu",
            "block_out_channels": list(model.channels), "layers_per_block": model.res_blocks,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in attends[::-1]],
            "attention_head_dim": (None if model.heads == 1
                                   else model.channels[-1] // model.heads),
            "dropout": model.dropout, "num_train_timesteps": None}


def scheduler_config(diffusion: DiffusionParams, sample: dict) -> dict:
    """The DDPMScheduler scheduler_config.json of diffusion.* and the sampler settings `sample`
    ({"variance", "clip_denoised"})."""
    variance = {ours: theirs for theirs, ours in VARIANCE_TYPES.items()}[sample["variance"]]
    schedule = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}[diffusion.schedule]
    return {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            **SCHEDULER_DEFAULTS, "num_train_timesteps": diffusion.timesteps,
            "beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end,
            "beta_schedule": schedule, "variance_type": variance,
            "clip_sample": sample["clip_denoised"],
            "prediction_type": PREDICTIONS[diffusion.prediction].diffusers}
