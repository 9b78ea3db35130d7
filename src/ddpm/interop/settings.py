"""This project's settings as the formats carry them: model.*, diffusion.*, the sampler settings
and the image shape, from plain values, checked as params.yaml's are (InteropError naming the
file or the other format's key)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from ddpm import checkpoint, networks, schema
from ddpm.errors import ParamsError, PipelineError
from ddpm.interop.errors import InteropError
from ddpm.labels import recorded_classes
from ddpm.params import (OBJECTIVE_DEFAULTS, VARIANCES, DiffusionParams, ModelParams, plain,
                         recorded_diffusion)
from ddpm.schema import short


def sections(config: Any, where: str) -> tuple[ModelParams, DiffusionParams]:
    """config's "model" and "diffusion" as the params classes, or one line naming the key."""
    if not isinstance(config, dict):
        raise InteropError(f"{where}: no config (model and diffusion settings) in it")
    raw_model = config.get("model")
    if isinstance(raw_model, dict) and "arch" not in raw_model:  # files from before model.arch
        raw_model = {"arch": "ddpm", **raw_model}
    if isinstance(raw_model, dict):  # unconditional networks' files leave it out
        raw_model = {"conditional": False, **raw_model}
    try:
        model = schema.parse(ModelParams, raw_model, "model.")
    except ParamsError as e:
        raise InteropError(f"{where}: {e}") from None
    return model, parse_diffusion(config.get("diffusion"), where)


def parse_diffusion(raw: Any, where: Path | str, names: dict[str, str] | None = None
                    ) -> DiffusionParams:
    """diffusion.* from plain values, checked as params.yaml's are (the rule across keys too);
    names: the other format's key of each setting, for the errors."""
    try:
        diffusion = schema.parse(DiffusionParams, recorded_diffusion(raw), "diffusion.")
    except ParamsError as e:
        raise InteropError(f"{where}: {as_ours(e, names) if names else e}") from None
    if diffusion.beta_end < diffusion.beta_start:
        raise InteropError(f"{where}: diffusion.beta_end = {diffusion.beta_end}: below "
                           f"diffusion.beta_start = {diffusion.beta_start}")
    return diffusion


def as_ours(error: ParamsError, names: dict[str, str]) -> str:
    """A params error about a setting read from another format, naming that format's key."""
    theirs = next((key for ours, key in names.items() if str(error).startswith(ours)), None)
    return f"{theirs}, as this project's {error}" if theirs else str(error)


def sample_settings(sample: Any, where: str) -> dict:
    if not (isinstance(sample, dict) and sample.get("variance") in VARIANCES
            and type(sample.get("clip_denoised")) is bool):
        raise InteropError(f"{where}: sample = {short(sample)}: expected variance "
                           f"({' | '.join(VARIANCES)}) and clip_denoised (true | false)")
    return {"variance": sample["variance"], "clip_denoised": sample["clip_denoised"]}


def check_size(model: ModelParams, shape: Sequence[int], where: Path | str,
               classes: int = 0) -> None:
    try:
        networks.checked_size(model, shape, classes)
    except ParamsError as e:
        raise InteropError(f"{where}: {e}") from None


def classes(state: dict, model: ModelParams, where: Path | str) -> list[str]:
    """A conditional network's class names (ddpm.labels.recorded_classes); [] otherwise."""
    try:
        return recorded_classes(state, where, model.conditional)
    except PipelineError as e:
        raise InteropError(str(e)) from None


def image_shape(state: dict, where: Path | str) -> tuple[int, int, int]:
    try:
        return checkpoint.image_shape(state, where)
    except checkpoint.CheckpointError as e:
        raise InteropError(str(e)) from None


def tensor_shapes(model: ModelParams, shape: Sequence[int], classes: int = 0
                  ) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of the network's state_dict (built on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape)
                for k, v in networks.build(model, shape, classes).state_dict().items()}


def plain_section(section: Any) -> dict:
    """A params section as plain values; an unconditional model's leaves model.conditional out
    and an eps model's diffusion.prediction, as its run config does (ddpm.params.run_config):
    files say what they said before those keys existed."""
    values = plain(dataclasses.asdict(section))
    if isinstance(section, ModelParams) and not section.conditional:
        del values["conditional"]
    if isinstance(section, DiffusionParams) and (
            section.prediction == OBJECTIVE_DEFAULTS["diffusion.prediction"]):
        del values["prediction"]
    return values
