"""Outputs that appear whole or not at all: a failure never leaves half a file or folder."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from ddpm.errors import PipelineError
from ddpm.locations import mask


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
    server cannot fill the disk). Raises OSError (urllib's URLError is one; so is what http.client
    raises for a URL it cannot use or a connection cut short) for the caller to say what to do
    offline; neither it nor the progress bar shows the URL's credentials (ddpm.locations.mask)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True,
                      desc=f"download {mask(url, url)}") as bar:
                while f.tell() < limit and (block := response.read(min(1 << 20,
                                                                        limit - f.tell()))):
                    f.write(block)
                    bar.update(len(block))
    except OSError as e:
        if e.errno in NO_SPACE:  # the caller's or ddpm.cli's disk-full line
            raise
        raise OSError(mask(str(e), url)) from None
    except (ValueError, http.client.HTTPException) as e:  # InvalidURL, IncompleteRead, ...
        raise OSError(mask(f"{type(e).__name__}: {e}", url)) from None


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
    refuse_links(dest.parent)
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
        os.link(path, keep, follow_symlinks=False)  # a link is kept as the link, not followed
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
        if folder.is_symlink() or not folder.is_dir():  # never swept through a link
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
    refuse_links(dest.parent)
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


KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder", stat.S_IFREG: "a file",
         stat.S_IFLNK: "a link"}


def kind(mode: int) -> str:
    """What an lstat's st_mode is, in words ("a FIFO", "a link", ...)."""
    return KINDS.get(stat.S_IFMT(mode), "not a file")


def refuse_links(*paths: Path) -> None:
    """Stop, in one line, if one of `paths` is a symbolic link: outputs, staging folders, locks
    and temporary files are never followed out of the repository (nor emptied through a link)."""
    for path in paths:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise PipelineError(f"{path} is a link (to {target}): outputs are not written through "
                                f"links. Remove the link (rm {path}) and run again")


def refuse_non_folder(*paths: Path) -> None:
    """Stop, in one line, if one of `paths` is a link, or is there and is not a folder (a FIFO,
    a file, a device): an output or staging folder is emptied and replaced, never followed."""
    refuse_links(*paths)
    for path in paths:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(mode):
            raise PipelineError(f"{path} is {kind(mode)}, not a folder: remove it (rm {path}) "
                                "and run again")


def open_regular(path: Path, flags: int, mode: int = 0o666) -> int:
    """os.open without following a link and without waiting on a FIFO (O_NONBLOCK), for a
    regular file only; anything else is a PipelineError in one line. Returns the descriptor."""
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            refuse_links(path)
        if e.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket, a FIFO with no reader
            raise PipelineError(f"{path} is {kind(os.lstat(path).st_mode)}, not a regular file: "
                                f"remove it (rm {path}) and run again") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise PipelineError(f"{path} is {kind(info.st_mode)}, not a regular file: remove it "
                            f"(rm {path}) and run again")
    return fd


def read_regular(path: Path, limit: int = 1 << 20) -> bytes | None:
    """The first `limit` bytes of `path` if it is a regular file (not a link, FIFO, device...);
    None if it is anything else or cannot be read. Never waits."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except (OSError, PipelineError):
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def write_json(path: str | Path, data: dict) -> None:
    """Pretty JSON, replaced atomically (dvc exp show may read it while training runs)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_tsv(path: str | Path, header: list[str], rows: list[list[float]]) -> None:
    """A tab-separated table with a header line, replaced atomically."""
    lines = ["\t".join(header)] + ["\t".join(f"{v:.6g}" for v in row) for row in rows]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
