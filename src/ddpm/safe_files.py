"""Untrusted files whose memory is bounded by what they declare, checked before anything is read.

A few KB can declare gigabytes: a deflated zip record of zeros (torch.load inflates whatever a
torch file's zip holds; `weights_only` bounds what is built, not the bytes inflated), or an .npy
header declaring 2^40 floats. These checks read only a zip's central directory or an .npy's
header and refuse such a file before its data is touched (docs/trust.md states each bound).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from ddpm.errors import PipelineError

MAX_RECORDS = 1 << 16  # a training checkpoint holds a few thousand tensors, an EMA file hundreds
MAX_PICKLE = 16 << 20  # bytes of a torch file's data.pkl; a training checkpoint's is < 1 MB
MAX_NPY_HEADER = 1 << 16  # numpy's own headers are 128 bytes (a few KB for a structured dtype)


class UnsafeFile(PipelineError):
    """A file that declares more than it may cost; the message says what (the caller names the
    file and what to do)."""


def check_torch_zip(path: Path) -> None:
    """Refuse a torch.save file that torch.load could inflate beyond its size: a compressed record
    (torch.save stores every record), a record whose sizes disagree, records that together declare
    more bytes than the file holds, too many records, or a file that is no zip at all (torch's
    format before 1.6, which is read whole by pickle). Reads the zip's central directory only."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise UnsafeFile("not a zip archive, the format torch.save writes since torch 1.6 "
                         f"({type(e).__name__}: {str(e)[:80]}): a damaged file, another kind of "
                         "file, or one saved by an older torch (load it there and torch.save it "
                         "again with a current torch)") from None
    if len(records) > MAX_RECORDS:
        raise UnsafeFile(f"its zip holds {len(records):,} records, over the {MAX_RECORDS:,} a "
                         "torch file of this pipeline needs")
    total = 0
    for record in records:
        name = record.filename[:100]
        if record.compress_type != zipfile.ZIP_STORED:
            raise UnsafeFile(f"its record {name} is compressed (method {record.compress_type}); "
                             "torch.save never compresses, so it was not written by torch.save "
                             "(refused before inflating)")
        if record.file_size != record.compress_size:
            raise UnsafeFile(f"its record {name} declares {record.file_size:,} bytes but stores "
                             f"{record.compress_size:,}")
        if name.endswith("/data.pkl") and record.file_size > MAX_PICKLE:
            raise UnsafeFile(f"its {name} has {record.file_size:,} bytes, over the "
                             f"{MAX_PICKLE:,} a state_dict's pickle needs")
        total += record.file_size
    if total > size:
        raise UnsafeFile(f"its records declare {total:,} bytes, more than the file's {size:,}")


def npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from an .npy header, reading the header and nothing more."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
    raise ValueError(f".npy format version {version}")


def read_npz(path: Path, expected: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """The arrays `expected` names (name -> (dtype kinds, e.g. "f" or "iu"; shape)) from an .npz,
    each of at most 8-byte items. Before a member is inflated its declared size must fit its
    expected shape (plus a header), and before its data is read its header must state that shape
    and a dtype of those kinds; other members are never read. Raises UnsafeFile or ValueError."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise ValueError(f"not an .npz (zip) file: {e}") from None
    arrays = {}
    with archive:
        for name, (kinds, shape) in expected.items():
            try:
                info = archive.getinfo(f"{name}.npy")
            except KeyError:
                raise ValueError(f"no {name} in it") from None
            most = 8 * int(np.prod(shape, dtype=np.int64)) + MAX_NPY_HEADER + 16
            if info.file_size > most:  # zipfile inflates at most the declared size
                raise UnsafeFile(f"its {name}.npy declares {info.file_size:,} bytes, over the "
                                 f"{most:,} an array of shape {shape} takes")
            with archive.open(info) as f:
                found, fortran, dtype = npy_header(f)
                if found != shape or dtype.kind not in kinds or dtype.itemsize > 8:
                    raise UnsafeFile(f"its {name} is a {dtype} array of shape {found}, expected "
                                     f"shape {shape}")
                arrays[name] = _read_data(f, shape, dtype, fortran)
    return arrays


def _read_data(f: IO[bytes], shape: tuple[int, ...], dtype: np.dtype,
               fortran: bool) -> np.ndarray:
    """The data after an .npy header already read and checked: exactly shape x dtype bytes, read
    into the array itself (no second copy)."""
    array = np.empty(shape[::-1] if fortran else shape, dtype=dtype)
    buffer, done = memoryview(array.reshape(-1).view(np.uint8)), 0
    while done < len(buffer):
        n = f.readinto(buffer[done:])
        if not n:
            raise ValueError(f"truncated: {done:,} of {len(buffer):,} bytes")
        done += n
    return array.T if fortran else array
