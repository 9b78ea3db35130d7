"""Checkpoints: state_dicts plus the resolved config, written atomically, read weights-only."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ddpm.errors import PipelineError
from ddpm.files import atomic_file
from ddpm.params import ModelParams, plain
from ddpm.safe_files import UnsafeFile, check_torch_zip


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
    """torch.load(weights_only=True) on the CPU; errors name the file and what to do.

    The file's zip is checked first (ddpm.safe_files.check_torch_zip): torch.load then reads
    stored records of at most the file's own size, never a compressed one it would inflate."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no {what} here (run the stage that writes it first)")
    try:
        check_torch_zip(path)
    except UnsafeFile as e:
        raise CheckpointError(f"{path}: not a readable {what} ({e}); refused unread: write "
                              "it again (rerun the stage that writes it)") from None
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
            f"{mismatch(e)}") from None


def check_conditional(saved: dict | None, wanted: ModelParams, path: str | Path) -> None:
    """A file of a conditional network for model.conditional: true, else one line saying what it
    holds (files from before model.conditional hold unconditional networks)."""
    was = bool((saved or {}).get("conditional", False))
    if was != wanted.conditional:
        kind = "a conditional" if was else "an unconditional"
        raise CheckpointError(f"{path}: holds {kind} network, but model.conditional = "
                              f"{str(wanted.conditional).lower()}: retrain (dvc repro train) or "
                              f"set -S model.conditional={str(was).lower()}")


def mismatch(error: RuntimeError) -> str:
    """The first thing load_state_dict's multi-line error names (a missing key, a size mismatch),
    in one line; its first line only says which network."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else "")[:300].rstrip(".")


def ema_weights(state: dict[str, Any], path: str | Path, key: str = "ema",
                redo: str = "retrain (dvc repro train), or restore it (dvc checkout / dvc pull)"
                ) -> dict[str, torch.Tensor]:
    """state[key] if it is a state_dict (a dict of str names to dense tensors), else a
    CheckpointError naming the file, what it holds instead and `redo` (what to do)."""
    weights = state.get(key)
    if weights is None:
        raise CheckpointError(f"{path}: no {key!r} weights in it (keys: "
                              f"{', '.join(sorted(map(str, state)))[:200] or 'none'}); {redo}")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: its {key!r} weights are a {type(weights).__name__}, not a "
                              f"state_dict; {redo}")
    for name, tensor in weights.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: its {key!r} weights hold the key {str(name)[:60]} "
                                  f"({type(name).__name__}), not a parameter name; {redo}")
        if not (isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided):
            raise CheckpointError(f"{path}: its {key!r} weights hold {name[:60]!r}: a "
                                  f"{type(tensor).__name__}, not a dense tensor; {redo}")
    return weights
