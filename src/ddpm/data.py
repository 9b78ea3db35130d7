"""CIFAR-10 python version: download, verify, extract safely, load as uint8 arrays.

Batch files are pickles, and files that reach data/cifar10 by `dvc pull` were never md5-checked
here, so they are read by an unpickler that can build only what a batch holds (docs/trust.md).
"""
from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np

from ddpm.errors import PipelineError
from ddpm.files import atomic_dir, download, file_digest
from ddpm.locations import mask

ARCHIVE_FOLDER = "cifar-10-batches-py"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_FILES = (*SPLITS["train"], *SPLITS["test"], "batches.meta")
MAX_MEMBER = 64 << 20  # bytes; an official batch file is 31 MB
MAX_ARCHIVE = 512 << 20  # bytes; the official archive is 170,498,071
MAX_MEMBERS = 100  # entries of the archive; the official one has 9 (a folder and 8 files)
SHAPE = (3, 32, 32)  # every CIFAR-10 image: (C, H, W)
PIXELS = 3 * 32 * 32
NUM_CLASSES = 10
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck")  # batches.meta's label_names, in label order
REDO = "extract it again from the md5-checked archive: dvc repro --force download"


def local_path(url: str) -> Path | None:
    """The file a URL names on this machine (a plain path or file://), or None for http(s)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(url).expanduser()


def fetch(url: str, dest: Path) -> None:
    """Download an http(s) URL to dest, with a progress bar; the error says what to do offline."""
    try:
        download(url, dest, MAX_ARCHIVE)
    except OSError as e:
        raise PipelineError(
            f"could not download {mask(url)} ({mask(str(e), url)}). Without a network, fetch "
            "cifar-10-python.tar.gz on another machine, put it anywhere here and point data.url "
            "at it: dvc exp run -S data.url=/path/to/cifar-10-python.tar.gz (or edit params.yaml)"
        ) from None


def extract_cifar10(archive: Path, dest: Path) -> None:
    """Copy the seven CIFAR-10 batch files from the archive into dest (flat).

    Only regular files with the expected names are read, and dest names are ours, so no member
    can write outside dest (no links, no absolute or ../ paths). A member over MAX_MEMBER bytes
    or a file name that comes twice stops it before its bytes are read; the caller's atomic_dir
    then discards what was copied.
    """
    found, files = set(), set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:  # tarfile keeps every header it has read in memory
                    raise PipelineError(f"{archive}: more than {MAX_MEMBERS} members: not the "
                                        "CIFAR-10 python archive")
                name = PurePosixPath(member.name)
                check_member(archive, member, name, files)
                if (member.isfile() and name.parts[:1] == (ARCHIVE_FOLDER,)
                        and len(name.parts) == 2 and name.name in CIFAR_FILES):
                    with tar.extractfile(member) as src, open(dest / name.name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found.add(name.name)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PipelineError(f"{archive}: not a readable .tar.gz archive ({e})") from None
    missing = sorted(set(CIFAR_FILES) - found)
    if missing:
        raise PipelineError(f"{archive}: not the CIFAR-10 python archive: {ARCHIVE_FOLDER}/"
                            f"{', '.join(missing)} missing")


def check_member(archive: Path, member: tarfile.TarInfo, name: PurePosixPath,
                 files: set[PurePosixPath]) -> None:
    """Refuse a member larger than any CIFAR-10 file (a decompression bomb costs only a few KB
    of gzip) and a second file of one name (which copy wins would be the archive's choice);
    links and folders are never copied, so only files count."""
    if member.size > MAX_MEMBER:
        raise PipelineError(f"{archive}: member {member.name} holds {member.size:,} bytes, over "
                            f"the {MAX_MEMBER:,} any CIFAR-10 file needs: not the CIFAR-10 python "
                            "archive")
    if member.isfile():
        if name in files:  # PurePosixPath folds "a//b" and "./a/b" into "a/b"
            raise PipelineError(f"{archive}: member {member.name} comes twice: not the CIFAR-10 "
                                "python archive")
        files.add(name)


def download_cifar10(url: str, md5: str, out_dir: str | Path) -> None:
    """Fetch (or copy) the archive, check its md5, then extract it into out_dir atomically.

    Nothing is extracted or unpickled before the md5 matches; on any failure out_dir is left as
    it was and no partial download remains.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".download.") as tmp:
        archive = local_path(url)
        if archive is None:
            archive = Path(tmp) / "cifar-10-python.tar.gz"
            fetch(url, archive)
        elif not archive.is_file():
            raise PipelineError(f"data.url = {url!r}: no such file. Put cifar-10-python.tar.gz "
                                f"there or set data.url to its path or URL")
        got = file_digest(archive, "md5")
        if got != md5:
            raise PipelineError(f"{mask(url)}: md5 {got} does not match data.md5 {md5}: the file "
                                "is corrupt, incomplete, or not cifar-10-python.tar.gz")
        with atomic_dir(out_dir) as staging:
            extract_cifar10(archive, staging)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """_codecs.encode as Python 3 uses it to write bytes into a protocol-2 pickle, and no other."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode to {encoding[:20]!r}")
    return text.encode("latin1")


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # the running numpy's ndarray rebuilder


def _reconstruct(subtype: type, shape: tuple, dtype: object) -> np.ndarray:
    """numpy's _reconstruct as numpy's own pickles call it: an empty ndarray, which BUILD then
    fills from bytes the pickle holds. Any other shape would allocate what the pickle declares,
    not what it holds, so it is refused before numpy sees it."""
    if subtype is not np.ndarray or not isinstance(shape, tuple) or shape != (0,):
        raise pickle.UnpicklingError(f"an ndarray rebuilt with shape {str(shape)[:40]}, not as "
                                     "numpy pickles one (refused before allocating it)")
    return _RECONSTRUCT(subtype, shape, dtype)


BATCH_GLOBALS = {  # all that a batch pickle names; numpy 2 moved numpy.core to numpy._core
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): bytes,  # b"" in a protocol-2 pickle of Python 3
    ("builtins", "bytes"): bytes,
}


class BatchUnpickler(pickle.Unpickler):
    """pickle's reader limited to what a CIFAR-10 batch holds: dicts, lists, str, bytes, ints
    and uint8 arrays. Any other global a pickle names (os.system, builtins.open, ...) is refused
    before it is looked up, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        try:
            return BATCH_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR-10 batch "
                                         "holds (refused, not run)") from None


def load_batch(path: Path) -> np.ndarray:
    """One CIFAR-10 batch file -> (N, 3, 32, 32) uint8 in the archive's order."""
    return read_batch(path)[0]


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file -> (N, 3, 32, 32) uint8 images and (N,) int64 labels."""
    batch = unpickle(path, "a CIFAR-10 batch file")
    return check_batch(path, batch).reshape(-1, *SHAPE), np.array(batch["labels"], dtype=np.int64)


def unpickle(path: Path, what: str) -> object:
    """One of the archive's pickles through BatchUnpickler, at most MAX_MEMBER bytes; anything
    else is one line saying it is not `what`."""
    try:
        with open(path, "rb") as f:
            if (size := os.fstat(f.fileno()).st_size) > MAX_MEMBER:  # read whole by pickle
                raise PipelineError(f"{path}: {size:,} bytes, over the {MAX_MEMBER:,} any CIFAR-10 "
                                    f"file needs: not {what}; {REDO}")
            return BatchUnpickler(f, encoding="latin1").load()  # Python 2 pickles
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing; run the download stage "
                            "(dvc repro download)") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot be read ({e})") from None
    except PipelineError:
        raise
    except Exception as e:  # the bytes are untrusted: whatever they make numpy or pickle raise
        message = (str(e).splitlines() or [""])[0][:200]
        raise PipelineError(f"{path}: not {what} ({type(e).__name__}: {message}); "
                            f"{REDO}") from None


def check_batch(path: Path, batch: object) -> np.ndarray:
    """The (N, 3072) uint8 `data` of a batch dict whose `labels` are N class indices."""
    if not isinstance(batch, dict):
        problem = f"a pickled {type(batch).__name__}, not a dict"
    elif "data" not in batch or "labels" not in batch:
        problem = "no 'data' and 'labels' keys"
    else:
        data, labels = batch["data"], batch["labels"]
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == PIXELS):
            problem = f"'data' is not a uint8 (N, {PIXELS}) array"
        elif not (isinstance(labels, list) and len(labels) == len(data)
                  and all(type(y) is int and 0 <= y < NUM_CLASSES for y in labels)):
            problem = f"'labels' is not a list of {len(data)} class indices 0..{NUM_CLASSES - 1}"
        else:
            return data
    raise PipelineError(f"{path}: not a CIFAR-10 batch file ({problem}); {REDO}")


def load_cifar10(cifar_dir: str | Path, split: str, limit: int = 0, labels: bool = False
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The images of a split as (N, 3, 32, 32) uint8, in dataset order (with labels=True also
    their (N,) class indices); limit > 0 keeps the first N."""
    images, classes = [], []
    for name in SPLITS[split]:
        batch, batch_labels = read_batch(Path(cifar_dir) / name)
        images.append(batch)
        classes.append(batch_labels)
        if limit and sum(map(len, images)) >= limit:
            break
    end = limit or None
    images, classes = np.concatenate(images)[:end], np.concatenate(classes)[:end]
    return (images, classes) if labels else images


def class_names(cifar_dir: str | Path) -> list[str]:
    """The ten class names of batches.meta (airplane ... truck), in label order."""
    path = Path(cifar_dir) / "batches.meta"
    meta = unpickle(path, "CIFAR-10's batches.meta")
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == NUM_CLASSES
            and all(isinstance(n, str) and 0 < len(n) <= 100 for n in names)):
        raise PipelineError(f"{path}: no list of {NUM_CLASSES} class names in it; {REDO}")
    return names
