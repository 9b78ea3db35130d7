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



# --- small files that declare gigabytes (issue #30): each costs a few KB to a MB on disk ---------

class _Storage:
    """Pickled by _TorchPickler as torch.save's persistent id of a float32 storage of n items."""

    def __init__(self, n: int):
        self.n = n


class _Tensor:
    """Pickled as torch.save pickles a 1-d float32 tensor over a _Storage of n items."""

    def __init__(self, n: int):
        self.n = n

    def __reduce__(self):
        import collections
        return (torch._utils._rebuild_tensor_v2,
                (_Storage(self.n), 0, (self.n,), (1,), False, collections.OrderedDict()))


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.n)
        return None


def torch_zip_bomb(path: Path, nbytes: int, state: str = "ema") -> Path:
    """A torch.save-format zip whose one storage (float32, nbytes of zeros) is a deflated record:
    torch.load inflates it all, whatever weights_only says. nbytes = 1 GiB costs about 1 MB. The
    dict is {state: {"w": tensor}}, plus an EMA file's or a checkpoint's other keys."""
    import zipfile
    pkl = io.BytesIO()
    _TorchPickler(pkl, protocol=2).dump({state: {"w": _Tensor(nbytes // 4)}, "config": {}})
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in [("data.pkl", pkl.getvalue()), (".format_version", b"1"),
                           (".storage_alignment", b"64"), ("byteorder", b"little")]:
            archive.writestr(f"archive/{name}", data)
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as f:
            chunk, left = bytes(1 << 22), nbytes
            while left:
                f.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
        archive.writestr("archive/version", b"3")
    return path


def npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    """An .npy header (format 1.0) declaring `shape` of `dtype`, without its data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npz_bomb(path: Path, floats: int, dims: int = 64) -> Path:
    """A real_stats.npz whose deflated mu.npy declares `floats` float64 zeros (2^27 = 1 GiB costs
    about 1 MB), beside a good sigma and count: np.load inflates mu before any shape check."""
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("mu.npy", "w", force_zip64=True) as f:
            f.write(npy_header((floats,)))
            chunk, left = bytes(1 << 22), 8 * floats
            while left:
                f.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
        buffer = io.BytesIO()
        np.save(buffer, np.eye(dims))
        archive.writestr("sigma.npy", buffer.getvalue())
        buffer = io.BytesIO()
        np.save(buffer, np.int64(2))
        archive.writestr("num_images.npy", buffer.getvalue())
    return path


def npz_declaring(path: Path, shape: tuple[int, ...]) -> Path:
    """A few hundred bytes of .npz whose stored mu.npy and sigma.npy headers declare `shape`
    (e.g. 8 TiB) and hold no data: np.load asks numpy for all of it."""
    import zipfile
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("mu", "sigma"):
            archive.writestr(f"{name}.npy", npy_header(shape))
    return path
