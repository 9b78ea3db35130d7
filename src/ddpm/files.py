"""Outputs that appear whole or not at all: a failure never leaves half a file or folder."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from ddpm.errors import PipelineError


def io_workers() -> int:
    """Threads for file and codec work (zlib, Pillow, hashing), which release the GIL."""
    return min(8, os.cpu_count() or 1)


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


# Temporary names carry the writer's pid, so that the next start can tell the leftovers of a
# killed process (swept) from the files another live process is writing (kept).
TEMPORARY = re.compile(r"\..+\.(\d+)\.[^.]+\.tmp")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def temporary_prefix(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_file(dest: str | Path, durable: bool = False, keep: Path | None = None
                ) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it replaces `dest` in one rename.

    durable: fsync the file before the rename and the folder after it, so that a power loss
    leaves the old or the new file, whole (for checkpoints; thousands of PNGs need not pay).
    keep: a second name for the file `dest` held, so that it survives the new one's writing.
    A full disk is a PipelineError naming `dest`, which keeps its old content.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=temporary_prefix(dest), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            fsync(Path(tmp))
        as_created(Path(tmp))
        if keep is not None and dest.exists():
            keep_a_link(dest, keep)
        os.replace(tmp, dest)
        if durable:
            fsync(dest.parent)
    except (OSError, RuntimeError) as e:
        if (interrupt := in_chain(e, KeyboardInterrupt)) is not None:
            # Ctrl-C or SIGTERM inside torch.save's write of a Python file: torch then raises
            # a RuntimeError of its own on closing it; the stop is what happened.
            raise interrupt from None
        if no_space(e):
            raise disk_full(dest) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def keep_a_link(path: Path, keep: Path) -> None:
    """Make `keep` a second name of `path`'s file: a Ctrl-C at any point between here and the
    rename over `path` leaves `path` in place (a rename of `path` to `keep` would not)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(keep)
    try:
        os.link(path, keep)
    except OSError:  # a filesystem without hard links
        os.replace(path, keep)


def fsync(path: Path) -> None:
    """Flush a file's or a folder's content (a folder: its entries, i.e. renames) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a folder; the file itself still was
        if not path.is_dir() or e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def in_chain(error: BaseException | None, kind: type, test=lambda e: True
             ) -> BaseException | None:
    """The first error of type `kind` (and passing `test`) among `error` and the errors it was
    raised from or while handling."""
    for _ in range(8):
        if error is None or isinstance(error, kind) and test(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def no_space(error: BaseException) -> bool:
    """Whether an error comes from a full disk or quota. torch.save into a Python file reports
    a failed write as RuntimeError("[enforce fail at inline_container.cc...]") raised while
    handling the OSError, so the chain of errors is searched."""
    return in_chain(error, OSError, lambda e: e.errno in NO_SPACE) is not None


def disk_full(path: Path) -> PipelineError:
    """The one-line error for a file that a full disk kept from being written."""
    try:
        stat = os.statvfs(path.parent)
        free = f"{stat.f_bavail * stat.f_frsize / 2**20:.0f} MiB free there"
    except OSError:
        free = "no free space"
    old = "its previous version is intact" if path.exists() else "nothing was written"
    return PipelineError(f"the disk is full: {path} was not written ({free}; {old}). Free some "
                         "space and run the same command again")


def sweep_temporaries(*folders: Path) -> list[Path]:
    """Remove what killed writers left in `folders`: temporary files and folders of this module
    whose pid is no running process. Returns what was removed."""
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = TEMPORARY.fullmatch(path.name)
            if match and not alive(int(match[1])):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; or not a pid at all
        return True
    return True


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success it replaces `dest`.

    What `dest` held before is removed only after the new folder is complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=temporary_prefix(dest), suffix=".tmp"))
    try:
        yield tmp
        as_created(tmp, directory=True)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=temporary_prefix(dest),
                                        suffix=".tmp"))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old)
    except OSError as e:
        if no_space(e):
            raise disk_full(dest) from None
        raise
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
