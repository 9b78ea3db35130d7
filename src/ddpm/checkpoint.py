"""Checkpoints: state_dicts plus the resolved config, written atomically, read weights-only."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ddpm.errors import PipelineError
from ddpm.files import atomic_file
from ddpm.params import ModelParams, plain


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


def save(state: dict[str, Any], path: str | Path, keep: Path | None = None) -> None:
    """torch.save to a temporary file, fsynced, then renamed: neither a kill nor a power loss
    leaves half a checkpoint, and a full disk is one line (ddpm.files.atomic_file). keep: where
    the file `path` held moves, so that it survives the new one being written."""
    # Through a Python file: a failed write then surfaces as the OSError (ENOSPC) it is, which
    # torch.save(state, path) would report only as "[enforce fail at inline_container.cc]"; and
    # equal states give equal bytes (given a name, torch.save names the archive's folder after
    # the random temporary one), so a finished run re-run rewrites models/ema.pt as it was.
    with atomic_file(path, durable=True, keep=keep) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def non_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in a state_dict holding a NaN or an infinity."""
    return [name for name, tensor in weights.items() if isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def load(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """torch.load(weights_only=True) on the CPU; errors name the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no {what} here (run the stage that writes it first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a {what} (a {type(state).__name__}, not a dict)")
    return state


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested configs (tuples equal lists)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for k in sorted(set(old) | set(new), key=str)
                for key in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if plain(old) == plain(new) else [prefix.rstrip(".") or "config"]


def image_shape(state: dict[str, Any], path: str | Path) -> tuple[int, int, int]:
    """(C, H, W) of the images an EMA file's network was trained on; files written before the
    shape was recorded hold CIFAR-10 networks."""
    shape = state.get("image_shape")
    if shape is None:
        from ddpm.data import SHAPE
        return SHAPE
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3
            and all(type(v) is int and 1 <= v <= 1 << 16 for v in shape)):
        raise CheckpointError(f"{path}: its image_shape {str(shape)[:40]} is not (C, H, W)")
    return tuple(shape)


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], saved: dict | None,
                 wanted: ModelParams, path: str | Path) -> None:
    """Load a state_dict saved with model config `saved` into `model` (built from `wanted`).

    Weights of the other network (model.arch) or of other shapes are a CheckpointError that says
    what the file holds and what params.yaml asks for.
    """
    saved_arch = (saved or {}).get("arch", "ddpm")  # files from before model.arch held ddpm UNets
    if saved_arch != wanted.arch:
        raise CheckpointError(
            f"{path}: holds weights of the {saved_arch!r} network, but model.arch = "
            f"{wanted.arch!r}: retrain (dvc repro train) or set -S model.arch={saved_arch}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: its weights do not fit model.* of params.yaml (trained with {saved}): "
            f"{str(e).splitlines()[0]}") from None
