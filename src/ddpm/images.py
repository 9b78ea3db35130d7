"""Images between tensors and lossless PNG files: one quantisation for real and generated images."""
from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ddpm.errors import PipelineError
from ddpm.files import atomic_file, disk_full, io_workers, no_space


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1] (the model's data space), any shape."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1], (B, C, H, W) -> uint8 (B, H, W, C): round((x + 1) / 2 * 255), clipped.

    The exact inverse of to_float on uint8 values, so a real image survives the round trip.
    """
    x = torch.round((x.float() + 1.0) * 127.5).clamp_(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu()


def write_pngs(images: np.ndarray | torch.Tensor, folder: str | Path, start: int = 0,
               progress: bool = False) -> None:
    """Write (N, H, W, 3) uint8 images as lossless `{start + i}.png` files in `folder`.

    Each file is written under a temporary name (`.{i}.png.tmp`) and renamed, so a file under its
    final name is always whole, even after a kill: the sample stage keeps such files on resume.
    """
    folder = Path(folder)
    images = np.asarray(images)

    def save(i: int) -> None:
        name = f"{start + i}.png"
        try:
            Image.fromarray(images[i]).save(folder / f".{name}.tmp", format="PNG",
                                            compress_level=1)
        except OSError as e:
            if no_space(e):
                raise disk_full(folder / name) from None
            raise
        os.replace(folder / f".{name}.tmp", folder / name)

    with ThreadPoolExecutor(io_workers()) as pool:  # zlib and file I/O release the GIL
        list(tqdm(pool.map(save, range(len(images))), total=len(images), desc="write PNGs",
                  unit="img", disable=not progress))


def list_pngs(folder: str | Path, min_count: int = 1) -> list[Path]:
    """The PNG files of `folder`, sorted by their numeric names (0.png, 1.png, ...)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: not a folder of PNG images (does the stage before "
                            "this one have to run first?)")
    files = [p for p in folder.iterdir() if p.suffix.lower() == ".png"]
    if len(files) < min_count:
        raise PipelineError(f"{folder}: {len(files)} PNG images, at least {min_count} needed")
    return sorted(files, key=lambda p: (not p.stem.isdigit(),
                                        int(p.stem) if p.stem.isdigit() else 0, p.name))


def png_size(path: str | Path) -> int:
    """The side of a square RGB PNG, from its header; anything else is a PipelineError."""
    try:
        with Image.open(path, formats=["PNG"]) as img:
            if img.mode == "RGB" and img.width == img.height:
                return img.width
            raise PipelineError(f"{path}: a {img.mode} {img.width}x{img.height} image, expected "
                                f"a square RGB PNG; {_redo(path)}")
    except UNREADABLE as e:
        raise PipelineError(f"{path}: not a readable PNG image ({_reason(e)}); "
                            f"{_redo(path)}") from None


# What Pillow raises for a damaged file: OSError (truncated, unidentified, bad CRC), SyntaxError
# (a malformed chunk), zlib.error and ValueError (bad deflate data, bad fields), EOFError, and a
# header of more pixels than Pillow's bound.
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _redo(path: str | Path) -> str:
    folder = Path(path).parent
    return (f"restore the folder with `dvc checkout {folder}` or re-run the stage that wrote it "
            "(dvc repro)")


def read_png(path: str | Path, size: int, pixels: bool = True) -> np.ndarray | None:
    """One PNG as (size, size, 3) uint8; anything else is a PipelineError naming the file.

    Every chunk's checksum is checked and every pixel decoded, so a truncated or corrupted file
    (bad deflate data behind valid checksums included) fails here, in one line, rather than
    inside pytorch-fid's loader. pixels=False returns None instead of the array (a check).
    """
    try:
        with Image.open(path, formats=["PNG"]) as img:
            if img.mode != "RGB" or img.size != (size, size):
                raise PipelineError(f"{path}: a {img.format} {img.mode} {img.size[0]}x"
                                    f"{img.size[1]} image, expected a {size}x{size} RGB PNG; "
                                    f"{_redo(path)}")
            img.verify()  # the checksums of all chunks: a truncated or altered file raises
        with Image.open(path, formats=["PNG"]) as img:  # verify() leaves no pixels to decode
            if img.mode != "RGB" or img.size != (size, size):  # replaced in between
                raise OSError("the file changed while it was read")
            img.load()  # the pixels: bad deflate data raises
            return np.asarray(img) if pixels else None
    except UNREADABLE as e:
        raise PipelineError(f"{path}: not a readable PNG image ({_reason(e)}); "
                            f"{_redo(path)}") from None


def check_pngs(files: list[Path], size: int | None = None) -> None:
    """Raise PipelineError for the first file that is not a readable size x size RGB PNG (size
    None: the first file's, which must be square): header, checksums and pixels, in threads
    (zlib and file I/O release the GIL)."""
    size = size or png_size(files[0])
    with ThreadPoolExecutor(io_workers()) as pool:
        list(pool.map(lambda path: read_png(path, size, pixels=False), files))


def grid(images: np.ndarray | torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one (rows, cols) image with `pad` white pixels."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y:y + h, x:x + w] = images[i]
    return out


def labelled_grid(rows: Sequence[tuple[str, Any]], pad: int = 2) -> np.ndarray:
    """One row per (name, (n, H, W, 3) uint8 images), the name written left of its row in a
    white margin (PIL's built-in font; names cut to 16 characters)."""
    from PIL import ImageDraw, ImageFont
    rows = [(name, np.asarray(images)) for name, images in rows]
    width = max(len(images) for _, images in rows)
    h, w, c = rows[0][1].shape[1:]
    blank = np.full((h, w, c), 255, dtype=np.uint8)
    tiles = np.stack([row[i] if i < len(row) else blank for _, row in rows for i in range(width)])
    body = grid(tiles, nrow=width, pad=pad)
    font = ImageFont.load_default()
    names = [name[:16] for name, _ in rows]
    margin = 4 + max(int(math.ceil(font.getlength(name))) for name in names)
    canvas = Image.new("RGB", (margin + body.shape[1], body.shape[0]), "white")
    canvas.paste(Image.fromarray(body).convert("RGB"), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        draw.text((2, pad + r * (h + pad) + h // 2), name, fill="black", font=font, anchor="lm")
    return np.asarray(canvas)


def save_png(image: np.ndarray, path: str | Path) -> None:
    """One (H, W, 3) uint8 image, replacing `path` whole (a full disk leaves the old file)."""
    with atomic_file(path) as tmp:
        Image.fromarray(np.asarray(image)).save(tmp, format="PNG")
