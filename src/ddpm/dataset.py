"""The data stage's output: every source's images, converted once, as plain numpy arrays.

    data/dataset/dataset.json        what it holds: source, shape, splits, class names and counts
    data/dataset/train.npy           uint8 (N, C, H, W), in dataset order
    data/dataset/train_labels.npy    int64 (N,) class indices, where the source has classes
    data/dataset/test.npy, ...       the same for a source with a test split (CIFAR-10)

.npy files are read with allow_pickle=False (an object array, which could run code, is refused)
and checked against dataset.json before use, whatever their origin: the data stage or `dvc pull`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.errors import PipelineError
from ddpm.files import write_json
from ddpm.safe_files import npy_header

META = "dataset.json"
FORMAT = 1
MAX_META = 1 << 20  # bytes; a dataset.json is a few KB
REDO = "prepare it again: dvc repro --force download"


def save_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray | None) -> None:
    """(N, C, H, W) uint8 images and their (N,) class indices (or None) as `split`.npy files."""
    np.save(folder / f"{split}.npy", np.ascontiguousarray(images, dtype=np.uint8))
    if labels is not None:
        np.save(folder / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))


def split_counts(labels: np.ndarray | None, classes: list[str], total: int) -> dict[str, Any]:
    """A split's entry in dataset.json: its image count and, with classes, the count of each."""
    if not classes or labels is None:
        return {"images": total}
    counts = np.bincount(labels, minlength=len(classes))
    return {"images": total, "classes": {name: int(n) for name, n in zip(classes, counts)}}


def write_meta(folder: Path, source: str, shape: tuple[int, int, int], classes: list[str],
               splits: dict[str, dict[str, Any]]) -> dict[str, Any]:
    meta = {"format": FORMAT, "source": source, "channels": shape[0], "height": shape[1],
            "width": shape[2], "classes": classes, "splits": splits}
    write_json(folder / META, meta)
    return meta


def read_meta(folder: str | Path) -> dict[str, Any]:
    """dataset.json, checked to be what the data stage writes; errors name the file."""
    path = Path(folder) / META
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_META + 1)
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing; run the data stage first (dvc repro download)"
                            ) from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        meta = json.loads(text) if len(text) <= MAX_META else None
    except ValueError:
        meta = None
    ok = (isinstance(meta, dict) and meta.get("format") == FORMAT
          and all(type(meta.get(k)) is int and 1 <= meta[k] <= 1 << 16
                  for k in ("channels", "height", "width"))
          and isinstance(meta.get("classes"), list)
          and all(isinstance(c, str) for c in meta["classes"])
          and isinstance(meta.get("splits"), dict) and all(
              isinstance(s, dict) and type(s.get("images")) is int and s["images"] > 0
              for s in meta["splits"].values()))
    if not ok:
        raise PipelineError(f"{path}: not a dataset description of format {FORMAT}; {REDO}")
    return meta


def image_shape(folder: str | Path) -> tuple[int, int, int]:
    """(C, H, W) of the dataset's images: what the networks, noise and samples take."""
    meta = read_meta(folder)
    return meta["channels"], meta["height"], meta["width"]


def _array(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """A memory-mapped .npy file of exactly `dtype` and `shape`; anything else is one line. The
    header is read and checked first (ddpm.safe_files.npy_header), and the file must hold all
    the bytes it declares, before the data is mapped: nothing is allocated for the array."""
    try:
        with open(path, "rb") as f:
            found, _, found_dtype = npy_header(f)
            have = os.fstat(f.fileno()).st_size - f.tell()
        if found_dtype.hasobject:  # np.load(allow_pickle=False) refuses it too, in these words
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False (an array of "
                             "Python objects, which only unpickling reads)")
        array = None
        if found_dtype == dtype and found == shape:
            need = int(np.prod(shape, dtype=np.int64)) * found_dtype.itemsize
            if have < need:
                raise ValueError(f"{have:,} bytes of data, not the {need:,} its header declares")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing; {REDO}") from None
    except Exception as e:  # the bytes are untrusted: an object array, a short file, garbage
        message = (str(e).splitlines() or [""])[0][:200]
        raise PipelineError(f"{path}: not a readable array ({type(e).__name__}: {message}); "
                            f"{REDO}") from None
    if array is None or array.dtype != dtype or array.shape != shape:
        got = (found_dtype, found) if array is None else (array.dtype, array.shape)
        raise PipelineError(f"{path}: a {got[0]} array of shape {got[1]}, expected "
                            f"{np.dtype(dtype)} {shape} (dataset.json); {REDO}")
    return array


def load(folder: str | Path, split: str, limit: int = 0, labels: bool = False
         ) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
    """The images of a split as (N, C, H, W) uint8 in dataset order (limit > 0: the first N);
    with labels=True also their (N,) int64 class indices, or None for an unlabelled source."""
    folder = Path(folder)
    meta = read_meta(folder)
    if split not in meta["splits"]:
        raise PipelineError(f"{folder}: the source {meta['source']} has no {split} split "
                            f"(it has: {', '.join(meta['splits'])})")
    n = meta["splits"][split]["images"]
    shape = meta["channels"], meta["height"], meta["width"]
    images = _array(folder / f"{split}.npy", np.uint8, (n, *shape))
    keep = min(limit, n) if limit else n
    images = np.array(images[:keep])  # a copy in memory: the file may be replaced meanwhile
    return (images, load_labels(folder, split, limit)) if labels else images


def load_labels(folder: str | Path, split: str, limit: int = 0) -> np.ndarray | None:
    """The (N,) int64 class indices of a split's images in dataset order (limit > 0: the
    first N), or None for an unlabelled source; the names are read_meta(folder)["classes"]."""
    folder = Path(folder)
    meta = read_meta(folder)
    if not meta["classes"]:
        return None
    if split not in meta["splits"]:
        raise PipelineError(f"{folder}: the source {meta['source']} has no {split} split "
                            f"(it has: {', '.join(meta['splits'])})")
    n = meta["splits"][split]["images"]
    keep = min(limit, n) if limit else n
    found = np.array(_array(folder / f"{split}_labels.npy", np.int64, (n,))[:keep])
    if found.size and not (0 <= found.min() and found.max() < len(meta["classes"])):
        raise PipelineError(f"{folder / f'{split}_labels.npy'}: class indices outside 0.."
                            f"{len(meta['classes']) - 1}; {REDO}")
    return found
