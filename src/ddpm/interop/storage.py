"""The files of both formats, read within bounds and written: JSON objects under MAX_JSON_BYTES,
safetensors checked from the header (names, shapes, float dtypes) before a tensor is read, and
finite. Never pickle: a .bin, .pt or .ckpt from elsewhere can run code when it is loaded.
safetensors is imported only where a weights file is read or written."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ddpm import checkpoint
from ddpm.interop.errors import InteropError

MAX_JSON_BYTES = 1 << 20      # a config is a few KB; more is not a config
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights formats that are never read here
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def read_json(path: Path) -> dict:
    """A JSON object of plain values, at most MAX_JSON_BYTES; anything else is one line."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_JSON_BYTES + 1)  # never more, whatever the file claims to be
    except OSError as e:
        raise InteropError(f"{path}: cannot be read ({e.strerror})") from None
    if len(text) > MAX_JSON_BYTES:
        raise InteropError(f"{path}: over {MAX_JSON_BYTES:,} bytes; a config is a few KB")

    def constant(name: str) -> None:
        raise ValueError(f"{name} is not a number JSON allows")
    try:
        data = json.loads(text.decode("utf-8"), parse_constant=constant)
    except UnicodeDecodeError as e:
        raise InteropError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting
        raise InteropError(f"{path}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: a JSON {type(data).__name__}, not an object of settings")
    return data


def read_weights(path: Path, expected: dict[str, tuple[int, ...]],
                 rename: Callable[[str], str] = str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as float32, by name (after `rename`): exactly the names
    of `expected` (name -> shape), each of its shape, finite. Shapes and names are checked from
    the header, before any tensor is read."""
    if not path.is_file():
        pickled = sorted(p.name for p in path.parent.glob("*") if p.suffix in PICKLED)
        hint = (f"; {pickled[0]} is there, but only safetensors is read (pickle files can run "
                "code): convert it with diffusers, see docs/interop.md") if pickled else ""
        raise InteropError(f"{path}: not found{hint}")
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = match_names(path, list(f.keys()), expected, rename)
            for name, key in keys.items():
                piece = f.get_slice(key)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                if shape != expected[name] or dtype not in FLOAT_DTYPES:
                    raise InteropError(f"{path}: {key} is {dtype} of shape {list(shape)}; "
                                       f"expected float of shape {list(expected[name])}")
            tensors = {name: f.get_tensor(keys[name]).float() for name in expected}
    except (SafetensorError, OSError) as e:
        raise InteropError(f"{path}: not a readable safetensors file "
                           f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
                           ) from None
    if bad := checkpoint.non_finite(tensors):
        raise InteropError(f"{path}: {keys[bad[0]]} holds NaN or infinite values")
    return tensors


def match_names(path: Path, keys: list[str], expected: dict, rename: Callable[[str], str]
                ) -> dict[str, str]:
    """name (after rename) -> the file's key, with missing, extra or doubled names one line."""
    found: dict[str, str] = {}
    for key in keys:
        name = rename(key)
        if name in found:
            raise InteropError(f"{path}: both {found[name]} and {key} hold {name}")
        found[name] = key
    if missing := sorted(set(expected) - set(found)):
        raise InteropError(f"{path}: no tensor {missing[0]}"
                           + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1
                              else "") + " for this network")
    if extra := sorted(set(found) - set(expected)):
        raise InteropError(f"{path}: {found[extra[0]]} is not a tensor of this network"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return found


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})  # "pt": what diffusers writes


def check_target(out: Path, replaceable: set[str]) -> None:
    """`out` may be absent, or a folder holding nothing but the paths of `replaceable` (relative,
    POSIX): a folder that an atomic write of those may replace whole."""
    if out.exists() and not out.is_dir():
        raise InteropError(f"{out}: exists and is not a folder; export writes a folder")
    if out.is_dir():
        other = next((p for p in out.rglob("*")
                      if p.relative_to(out).as_posix() not in replaceable), None)
        if other is not None:
            raise InteropError(f"{out}: holds {other.relative_to(out)}, which no export writes: "
                               "export replaces the folder whole, so name a new or empty folder "
                               "or a previous export")
