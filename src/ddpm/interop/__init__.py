"""Conversion to and from other formats: weights that move between this pipeline and others.

- diffusers, for the `ddpm` network only: Ho et al.'s UNet is diffusers' UNet2DModel with
  google/ddpm-cifar10-32's settings, tensor for tensor (the attention's q, k and v are one matrix
  here, three there). read_exported reads a UNet2DModel or DDPMPipeline folder (the paper's
  released model is one); export writes a DDPMPipeline folder.
- this project's own export, for any network: config.json + model.safetensors.

Only JSON and safetensors are read, never pickle: a .bin, .pt or .ckpt from elsewhere can run code
when it is loaded. Every problem is one line (InteropError) naming the file, the key and the
value. diffusers itself is not imported (it is heavy, and optional): the files are written and
read directly, and tests/test_interop.py holds them to diffusers' own classes.

This module is the public API and the dispatch between the formats; the parts:
- diffusers_config: UNet2DModel / DDPMScheduler configs <-> model.*, diffusion.*, sampler;
- diffusers_folder: diffusers' folders read and written, and the tensor names between them;
- own: this project's export format;
- settings: this project's settings from plain values, checked (shared by the formats);
- storage: bounded file reading (JSON, safetensors) and writing (shared by the formats);
- errors: InteropError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ddpm import checkpoint
from ddpm.files import atomic_dir
from ddpm.interop.diffusers_config import (BETA_SCHEDULES, DIFFUSERS_VERSION, FROM_SCHEDULER,
                                           FROM_UNET, HO_SAMPLING, SCHEDULER_DEFAULTS,
                                           SCHEDULER_FIXED, UNET_DEFAULTS, UNET_FIXED,
                                           VARIANCE_TYPES, diffusers_refusal,
                                           diffusion_from_scheduler, model_from_unet,
                                           scheduler_config, unet_config)
from ddpm.interop.diffusers_folder import (ATTN_NAMES, LEGACY, LEGACY_NAMES, PIPELINE, RES_NAMES,
                                           SCHEDULER_CONFIG, UNET_CONFIG, UNET_WEIGHTS,
                                           check_pipeline, diffusers_names, read_diffusers,
                                           write_pipeline)
from ddpm.interop.errors import InteropError
from ddpm.interop.own import FORMAT, OWN_CONFIG, OWN_WEIGHTS, VERSION, read_own, write_own
from ddpm.interop.settings import (check_size, classes, image_shape, sample_settings, sections,
                                   tensor_shapes)
from ddpm.interop.storage import (FLOAT_DTYPES, MAX_JSON_BYTES, PICKLED, check_target,
                                  match_names, read_json)
from ddpm.params import ModelParams

__all__ = [
    "InteropError", "read_exported", "export", "import_diffusers", "diffusers_refusal",
    "diffusers_names", "model_from_unet", "diffusion_from_scheduler", "unet_config",
    "scheduler_config",
    "FORMAT", "VERSION", "OWN_CONFIG", "OWN_WEIGHTS", "UNET_CONFIG", "UNET_WEIGHTS", "PIPELINE",
    "SCHEDULER_CONFIG", "EXPORT_PATHS", "DIFFUSERS_VERSION", "MAX_JSON_BYTES", "PICKLED",
    "FLOAT_DTYPES", "UNET_DEFAULTS", "UNET_FIXED", "SCHEDULER_DEFAULTS", "SCHEDULER_FIXED",
    "BETA_SCHEDULES", "VARIANCE_TYPES", "HO_SAMPLING", "FROM_UNET", "FROM_SCHEDULER",
    "RES_NAMES", "ATTN_NAMES", "LEGACY", "LEGACY_NAMES"]

# Every path an export writes: a folder holding only these is a previous export (replaceable).
EXPORT_PATHS = {OWN_CONFIG, OWN_WEIGHTS, PIPELINE, "unet", f"unet/{UNET_CONFIG}",
                f"unet/{UNET_WEIGHTS}", "scheduler", f"scheduler/{SCHEDULER_CONFIG}"}


# -- reading --------------------------------------------------------------------------------------

def read_exported(folder: Path) -> dict:
    """A diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors, at the
    root or in unet/ beside model_index.json and scheduler/, as DDPMPipeline.save_pretrained and
    the google/ddpm-* repositories lay them out), or this project's export of any network, as an
    EMA file's dict: {"ema": state_dict (float32, this project's names), "config": {"model",
    "diffusion": every ModelParams / DiffusionParams field}, "image_shape": [C, H, W], and
    "sample": {"variance", "clip_denoised"} where a scheduler config says them}. Without a
    scheduler config, the diffusion is DDPMScheduler's defaults (Ho et al.'s)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InteropError(f"{folder}: not a folder (a diffusers model or pipeline folder, or "
                           "this project's export)")
    root = read_json(folder / UNET_CONFIG) if (folder / UNET_CONFIG).is_file() else None
    if root is not None and "format" in root:
        return read_own(folder, root)
    if (folder / PIPELINE).is_file():
        check_pipeline(folder / PIPELINE)
    # A pipeline's components in subfolders, else at the root: diffusers' loader looks so too.
    unet = next((path for path in (folder / "unet", folder)
                 if (path / UNET_CONFIG).is_file()), None)
    if unet is None:
        raise InteropError(f"{folder}: neither a diffusers folder (config.json, or "
                           f"model_index.json with unet/) nor this project's export "
                           f"({OWN_CONFIG} + {OWN_WEIGHTS})")
    scheduler = next((path for path in (folder / "scheduler" / SCHEDULER_CONFIG,
                                        folder / SCHEDULER_CONFIG) if path.is_file()), None)
    return read_diffusers(unet, scheduler)


# -- writing --------------------------------------------------------------------------------------

def export(state: dict, out: Path) -> None:
    """Write the network of `state` (an EMA file's dict, as ddpm.checkpoint.load returns it, or
    read_exported's) as a folder `out`:

    - a `ddpm` network that diffusers can compute (diffusers_refusal): a DDPMPipeline folder,
      which diffusers.DDPMPipeline.from_pretrained(out) loads: model_index.json, unet/ (config.json,
      diffusion_pytorch_model.safetensors), scheduler/scheduler_config.json with the diffusion of
      the state's config and its "sample" settings (variance, clip_denoised), else Ho et al.'s
      (beta, true).
    - any other network: this project's format, config.json (FORMAT, model, diffusion,
      image_shape, the run config as "run_config", "sample" if the state has it) +
      model.safetensors, which read_exported (and so `python -m ddpm sample`) reads.

    Weights are written as float32. The folder is built beside `out` and renamed when complete.
    `out` may be absent, an empty folder or a previous export (nothing but the files an export
    writes): anything else is refused, since the new export replaces the folder whole.
    """
    out = Path(out)
    model, diffusion = sections(state.get("config"), "the model to export")
    shape = image_shape(state, "the model to export")
    names = classes(state, model, "the model to export")
    weights = _weights_of(state, model, shape, len(names))
    sample = (sample_settings(state["sample"], "the model to export") if "sample" in state
              else None)
    check_target(out, EXPORT_PATHS)
    with atomic_dir(out) as tmp:
        if diffusers_refusal(model, shape) is None:
            write_pipeline(tmp, model, diffusion, shape, weights, sample or HO_SAMPLING)
        else:
            write_own(tmp, state, model, diffusion, shape, weights, sample, names)


def _weights_of(state: dict, model: ModelParams, shape: Sequence[int], labels: int = 0
                ) -> dict[str, torch.Tensor]:
    """state["ema"] as float32 tensors, checked against the network of `model`."""
    weights = state.get("ema")
    if not (isinstance(weights, dict)
            and all(isinstance(v, torch.Tensor) for v in weights.values())):
        raise InteropError("the model to export: no 'ema' state_dict in it")
    check_size(model, shape, "the model to export", labels)
    expected = tensor_shapes(model, shape, labels)
    where = Path("the model to export")
    match_names(where, list(weights), expected, str)
    for name, tensor in weights.items():
        if tuple(tensor.shape) != expected[name] or not tensor.is_floating_point():
            raise InteropError(f"{where}: {name} is {tensor.dtype} of shape {list(tensor.shape)}; "
                               f"expected float of shape {list(expected[name])}")
    if bad := checkpoint.non_finite(weights):
        raise InteropError(f"{where}: {bad[0]} holds NaN or infinite values")
    return {name: weights[name].detach().float().contiguous() for name in expected}


def import_diffusers(folder: Path, out: Path) -> dict:
    """read_exported(folder) saved as an EMA file `out` (ddpm.checkpoint.save, atomic) that the
    sample stage loads with the matching model.* (the ddpm preset's for google/ddpm-cifar10-32),
    with "source": the folder it came from. Returns the saved dict."""
    state = {**read_exported(folder), "source": str(Path(folder).resolve())}
    checkpoint.save(state, out)
    return state
