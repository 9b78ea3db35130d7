"""CIFAR-10 python version: download, verify, extract safely, load as uint8 arrays."""
from __future__ import annotations

import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
from tqdm.auto import tqdm

from ddpm.errors import PipelineError
from ddpm.files import atomic_dir, file_digest

ARCHIVE_FOLDER = "cifar-10-batches-py"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_FILES = (*SPLITS["train"], *SPLITS["test"], "batches.meta")


class DataError(PipelineError, RuntimeError):
    """A download, archive or batch file that cannot be used; the message names it."""


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
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {url}") as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"could not download {url} ({e}). Without a network, fetch cifar-10-python.tar.gz "
            "on another machine, put it anywhere here and point data.url at it: "
            "dvc exp run -S data.url=/path/to/cifar-10-python.tar.gz (or edit params.yaml)"
        ) from None


def extract_cifar10(archive: Path, dest: Path) -> None:
    """Copy the seven CIFAR-10 batch files from the archive into dest (flat).

    Only regular files with the expected names are read, and dest names are ours, so no member
    can write outside dest (no links, no absolute or ../ paths).
    """
    found = set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if (member.isfile() and name.parts[:1] == (ARCHIVE_FOLDER,)
                        and len(name.parts) == 2 and name.name in CIFAR_FILES):
                    with tar.extractfile(member) as src, open(dest / name.name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found.add(name.name)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: not a readable .tar.gz archive ({e})") from None
    missing = sorted(set(CIFAR_FILES) - found)
    if missing:
        raise DataError(f"{archive}: not the CIFAR-10 python archive: {ARCHIVE_FOLDER}/"
                        f"{', '.join(missing)} missing")


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
            raise DataError(f"data.url = {url!r}: no such file. Put cifar-10-python.tar.gz there "
                            f"or set data.url to its path or URL")
        got = file_digest(archive, "md5")
        if got != md5:
            raise DataError(f"{url}: md5 {got} does not match data.md5 {md5}: the file is "
                            "corrupt, incomplete, or not cifar-10-python.tar.gz")
        with atomic_dir(out_dir) as staging:
            extract_cifar10(archive, staging)


def load_batch(path: Path) -> np.ndarray:
    """One CIFAR-10 batch file -> (N, 3, 32, 32) uint8 in the archive's order."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")  # Python 2 pickles; md5-verified on download
        data = np.asarray(batch["data"], dtype=np.uint8)
        return data.reshape(-1, 3, 32, 32)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the download stage (dvc repro download)") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR-10 batch file ({type(e).__name__}: {e})") from None


def load_cifar10(cifar_dir: str | Path, split: str, limit: int = 0) -> np.ndarray:
    """The images of a split as (N, 3, 32, 32) uint8, in dataset order; limit > 0 keeps the first N."""
    images = []
    for name in SPLITS[split]:
        images.append(load_batch(Path(cifar_dir) / name))
        if limit and sum(map(len, images)) >= limit:
            break
    images = np.concatenate(images)
    return images[:limit] if limit else images
