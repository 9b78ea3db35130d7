"""ddpm.images: quantisation, lossless PNG folders and their errors, preview grids."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.errors import PipelineError
from ddpm.images import (check_pngs, grid, list_pngs, read_png, to_float,
                         to_uint8, write_pngs)


def random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def save(array: np.ndarray, path, fmt: str = "PNG"):
    Image.fromarray(array).save(path, format=fmt)
    return path


# --- quantisation -------------------------------------------------------------------------------

def test_to_uint8_inverts_to_float_on_every_value():
    """Invariant: every uint8 value survives uint8 -> [-1, 1] -> uint8, with 0 -> -1, 255 -> 1."""
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)  # (B, C, H, W)
    x = to_float(u)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(to_uint8(x), u.permute(0, 2, 3, 1))  # (B, H, W, C)


def test_to_uint8_rounds_to_nearest_level_and_clips():
    """Closed form: round((x + 1) / 2 * 255) clipped to [0, 255], also for x outside [-1, 1]."""
    levels = np.arange(256.0)
    offsets = np.random.default_rng(0).uniform(-0.3, 0.3, 256)  # well inside each level's bin
    x = (levels + offsets) / 255 * 2 - 1
    x = np.concatenate([x, [-5.0, -1.01, 1.01, 3.0]])
    expected = np.concatenate([levels, [0, 0, 255, 255]]).astype(np.uint8)
    got = to_uint8(torch.tensor(x, dtype=torch.float32).reshape(1, 1, 1, -1))
    assert np.array_equal(got.numpy().reshape(-1), expected)


# --- PNG folders --------------------------------------------------------------------------------

def test_write_pngs_read_png_round_trip_is_lossless(tmp_path):
    """Invariant: the pixels read back are the pixels written; names are start + i."""
    images = random_images(5)
    write_pngs(images, tmp_path, start=3)
    files = list_pngs(tmp_path)
    assert [f.name for f in files] == ["3.png", "4.png", "5.png", "6.png", "7.png"]
    for f, image in zip(files, images):
        assert np.array_equal(read_png(f, 32), image)
    check_pngs(files)  # all valid: no error


def test_list_pngs_sorts_numerically_and_ignores_other_files(tmp_path):
    """Dataset order: 2.png before 10.png (not string order); non-PNG files are not images."""
    for name in ["10.png", "2.png", "0.png", "1.png"]:
        save(random_images(1)[0], tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    assert [f.name for f in list_pngs(tmp_path)] == ["0.png", "1.png", "2.png", "10.png"]


def test_list_pngs_missing_folder_or_too_few_images(tmp_path):
    """A missing folder, or fewer than min_count PNGs, is an PipelineError naming the folder."""
    missing = tmp_path / "nowhere"
    with pytest.raises(PipelineError, match="nowhere"):
        list_pngs(missing)
    write_pngs(random_images(2), tmp_path)
    with pytest.raises(PipelineError, match=re.escape(str(tmp_path))):
        list_pngs(tmp_path, min_count=3)
    assert len(list_pngs(tmp_path, min_count=2)) == 2


def _bad_images(folder):
    """Files that are not 32x32 RGB PNGs, each named *.png as a stage would see them."""
    folder.mkdir()
    rgb = random_images(1)[0]
    png = folder / "good.png"
    save(rgb, png)
    data = png.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    (folder / "header_only.png").write_bytes(data[:20])
    return [
        save(random_images(1, size=64)[0], folder / "big.png"),
        save(np.dstack([rgb, rgb[..., :1]]), folder / "rgba.png"),
        save(rgb[..., 0], folder / "gray.png"),
        save(rgb, folder / "jpeg.png", fmt="JPEG"),
        folder / "truncated.png",
        folder / "header_only.png",
    ]


def test_read_png_and_check_pngs_name_the_bad_file(tmp_path):
    """Wrong size, RGBA, grayscale, a JPEG, a truncated file: an PipelineError naming it."""
    good = tmp_path / "ok.png"
    save(random_images(1)[0], good)
    for bad in _bad_images(tmp_path / "bad"):
        with pytest.raises(PipelineError, match=bad.name):
            read_png(bad, 32)
        with pytest.raises(PipelineError, match=bad.name):
            check_pngs([good, bad])


# --- grids --------------------------------------------------------------------------------------

def test_grid_places_tiles_row_major_with_white_padding():
    """Layout by hand: 3 tiles of 4x4, 2 per row, 1 px padding -> an 11x11 image."""
    tiles = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)])
    out = grid(tiles, nrow=2, pad=1)
    expected = np.full((11, 11, 3), 255, np.uint8)
    expected[1:5, 1:5] = 10    # row 0, col 0
    expected[1:5, 6:10] = 20   # row 0, col 1
    expected[6:10, 1:5] = 30   # row 1, col 0; row 1, col 1 stays white
    assert np.array_equal(out, expected)


def test_grid_default_is_a_near_square():
    """Default nrow = ceil(sqrt(n)): 5 images of 32x32 with pad 2 -> 3 columns, 2 rows."""
    out = grid(random_images(5))
    assert out.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    assert np.array_equal(out[36:68, 36:68], random_images(5)[4])  # tile 4: row 1, col 1
