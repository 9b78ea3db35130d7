"""Crafted inputs that run code when loaded the unsafe way: each one creates a marker file.

A test checks first that plain pickle.load / torch.load(weights_only=False) does create the
marker (so the fixture is truly hostile), then that the pipeline's loader leaves it absent.
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

import fakes


class CreatesFile:
    """Unpickles into a call that creates `marker`: os.system("touch ...") or open(marker, "w")."""

    def __init__(self, marker: Path, how: str = "open"):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        return open, (str(self.marker), "w")


def batch_pickle(marker: Path, how: str = "open", n: int = 4) -> bytes:
    """A protocol-2 CIFAR-10 batch, valid in every key, whose batch_label runs CreatesFile."""
    images = fakes.cifar_images("train", n)[:n]
    batch = {"batch_label": CreatesFile(marker, how), "labels": [i % 10 for i in range(n)],
             "data": images.reshape(n, 3072), "filenames": [f"{i}.png" for i in range(n)]}
    return pickle.dumps(batch, protocol=2)


def weights_file(path: Path, marker: Path) -> Path:
    """A torch.save file, a state_dict in every other key, that runs CreatesFile when loaded
    with weights_only=False (what torch.hub.load_state_dict_from_url does by default)."""
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": CreatesFile(marker)}, path)
    return path


def object_array(marker: Path) -> bytes:
    """A .npy file of an object array holding CreatesFile: np.load(allow_pickle=True) unpickles
    it and creates `marker`."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([CreatesFile(marker, "os.system")], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def tar_gz(path: Path, members: list[tuple[str, bytes | int]]) -> Path:
    """A .tar.gz of (name, bytes) files; (name, n) is n zero bytes, streamed, so a member over
    64 MB costs 65 KB of gzip and no memory."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, int):
                info.size = content
                tar.addfile(info, _Zeros(content))
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n

