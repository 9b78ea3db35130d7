"""Outputs that appear whole or not at all: a failure never leaves half a file or folder."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm


def file_digest(path: str | Path, algorithm: str, chunk: int = 1 << 20) -> str:
    """The hex digest of a file's content (hashlib's algorithm name), read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, limit: int) -> None:
    """An http(s) URL to `dest`, with a progress bar, at most `limit` bytes (a wrong or hostile
    server cannot fill the disk). Raises OSError (urllib's URLError is one) for the caller to say
    what to do offline."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {url}") as bar:
            while f.tell() < limit and (block := response.read(min(1 << 20, limit - f.tell()))):
                f.write(block)
                bar.update(len(block))


def umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it, and setting it
    twice races with threads that create files meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore
    os.umask(mask)
    return mask


def as_created(path: Path, directory: bool = False) -> None:
    """Give a temporary file or folder the mode a plain open() or mkdir() would have given it.

    mkstemp and mkdtemp create 0600 and 0700 (private); outputs follow the user's umask like
    files that any other tool writes, so a team sharing a machine can read each other's results.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_file(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it replaces `dest` in one rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        as_created(Path(tmp))
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success it replaces `dest`.

    What `dest` held before is removed only after the new folder is complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        yield tmp
        as_created(tmp, directory=True)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old."))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: dict) -> None:
    """Pretty JSON, replaced atomically (dvc exp show may read it while training runs)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_tsv(path: str | Path, header: list[str], rows: list[list[float]]) -> None:
    """A tab-separated table with a header line, replaced atomically."""
    lines = ["\t".join(header)] + ["\t".join(f"{v:.6g}" for v in row) for row in rows]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
