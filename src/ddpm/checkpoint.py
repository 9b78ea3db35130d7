"""Checkpoints: state_dicts plus the resolved config, written atomically, read weights-only."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ddpm.errors import PipelineError
from ddpm.files import atomic_file
from ddpm.params import plain


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


def save(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves half a checkpoint."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


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
