"""This project's own export, for any network: config.json (FORMAT, VERSION, model, diffusion,
image_shape, and where known the run config, the sampler settings, epochs and steps) +
model.safetensors (this project's tensor names, float32)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ddpm.interop.errors import InteropError
from ddpm.interop.settings import (check_size, classes, image_shape, plain_section,
                                   sample_settings, sections, tensor_shapes)
from ddpm.interop.storage import read_weights, write_json, write_weights
from ddpm.params import DiffusionParams, ModelParams, plain
from ddpm.schema import short

FORMAT, VERSION = "ddpm-cifar10 export", 1  # this project's config.json: "format", "version"
OWN_CONFIG, OWN_WEIGHTS = "config.json", "model.safetensors"


def read_own(folder: Path, config: dict) -> dict:
    """This project's export: config.json (FORMAT) + model.safetensors, of any network."""
    path = folder / OWN_CONFIG
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise InteropError(f"{path}: format {short(config.get('format'))} version "
                           f"{short(config.get('version'))}: not this project's export "
                           f"({FORMAT!r} version {VERSION})")
    model, diffusion = sections(config, str(path))
    shape = image_shape({"image_shape": config.get("image_shape", [])}, path)
    names = classes({"classes": config.get("classes")}, model, path)
    check_size(model, shape, path, len(names))
    expected = tensor_shapes(model, shape, len(names))
    state: dict[str, Any] = {
        "ema": read_weights(folder / OWN_WEIGHTS, expected),
        "config": {**(run if isinstance(run := config.get("run_config"), dict) else {}),
                   "model": plain_section(model), "diffusion": plain_section(diffusion)},
        "image_shape": list(shape), **({"classes": names} if names else {})}
    if "sample" in config:
        state["sample"] = sample_settings(config["sample"], str(path))
    state.update({key: config[key] for key in ("epochs", "steps")
                  if type(config.get(key)) is int})
    return state


def write_own(tmp: Path, state: dict, model: ModelParams, diffusion: DiffusionParams,
              shape: Sequence[int], weights: dict[str, torch.Tensor], sample: dict | None,
              names: Sequence[str] = ()) -> None:
    config: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                              "model": plain_section(model),
                              "diffusion": plain_section(diffusion), "image_shape": list(shape)}
    if names:  # a conditional network's class names, in label order
        config["classes"] = list(names)
    if sample is not None:
        config["sample"] = sample
    run = state.get("config")
    if isinstance(run, dict) and set(run) - {"model", "diffusion"}:  # provenance: the whole run
        config["run_config"] = plain(run)
    config.update({key: state[key] for key in ("epochs", "steps") if type(state.get(key)) is int})
    write_json(tmp / OWN_CONFIG, config)
    write_weights(tmp / OWN_WEIGHTS, weights)
