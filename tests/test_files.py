"""Outputs appear whole and follow the user's umask, like files that any other tool writes."""
from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm import checkpoint, images, previews
from ddpm.errors import PipelineError
from ddpm.files import atomic_file, sweep_temporaries, write_json

from fakes import ROOT

WRITE_ALL = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from ddpm import checkpoint
from ddpm.files import atomic_dir, write_json, write_tsv
out = Path(sys.argv[2])
write_json(out / "metrics" / "train.json", {"loss": 1.0})
write_tsv(out / "loss.tsv", ["step", "loss"], [[1, 0.5]])
checkpoint.save({"w": torch.zeros(1)}, out / "models" / "last.pt")
with atomic_dir(out / "pngs") as staging:
    (staging / "0.png").write_bytes(b"png")
"""


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_modes_the_umask_gives_any_file(tmp_path, umask):
    """mkstemp and mkdtemp make 0600 and 0700; what they stage comes out as open() and mkdir()
    would have made it under the process's umask (0644 and 0755 under 022)."""
    subprocess.run([sys.executable, "-c", WRITE_ALL, str(ROOT / "src"), str(tmp_path)],
                   check=True, umask=umask, timeout=120)
    for name in ("metrics/train.json", "loss.tsv", "models/last.pt", "pngs/0.png"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    for name in ("metrics", "models", "pngs"):
        assert mode(tmp_path / name) == 0o777 & ~umask, name
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporary left behind


# -- durable, swept, and a full disk in one line ---------------------------------------------

def disk_calls(monkeypatch) -> list[tuple]:
    """Spy on os.fsync, os.replace, os.link and shutil.rmtree as every module calls them
    (os.<name>, shutil.rmtree): the calls in order, paths as strings. An fsync is ("fsync", the
    path of its descriptor, what it held at that moment: a file's size, a folder's entries)."""
    calls: list[tuple] = []
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        held = sorted(os.listdir(path)) if os.path.isdir(path) else os.fstat(fd).st_size
        calls.append(("fsync", path, held))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for module, name in ((os, "replace"), (os, "link"), (shutil, "rmtree")):
        real = getattr(module, name)

        def record(*args, name=name, real=real, **kwargs):
            calls.append((name, *map(str, args)))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, record)
    return calls


def test_a_durable_write_fsyncs_the_file_before_and_the_folder_after_the_rename(tmp_path,
                                                                               monkeypatch):
    """The order a power loss needs: the new file's data on disk before the rename, the old file
    kept under a second name (so that it survives until the new one is there, and the file's
    name is never missing, whenever a Ctrl-C comes), then the folder's entries."""
    from ddpm import files
    dest, keep = tmp_path / "last.pt", tmp_path / "previous.pt"
    dest.write_bytes(b"old")
    calls = disk_calls(monkeypatch)
    with files.atomic_file(dest, durable=True, keep=keep) as tmp:
        tmp.write_bytes(b"new")
    assert calls == [("fsync", str(tmp), 3), ("link", str(dest), str(keep)),
                     ("replace", str(tmp), str(dest)),
                     ("fsync", str(tmp_path), ["last.pt", "previous.pt"])]
    assert tmp.parent == tmp_path and tmp.name.endswith(".tmp") and not tmp.exists()
    assert dest.read_bytes() == b"new" and keep.read_bytes() == b"old"
    calls.clear()
    with files.atomic_file(tmp_path / "metrics.json") as tmp:  # not durable: no fsync at all
        tmp.write_text("{}")
    assert [c[0] for c in calls] == ["replace"]


@pytest.mark.parametrize("keep", [None, "previous.pt"])
def test_a_checkpoint_is_on_the_disk_whole_before_its_name_and_its_folder_after(
        tmp_path, monkeypatch, keep):
    """checkpoint.save (last.pt with previous.pt kept, ema.pt without): the file is fsynced once
    torch.save has written all of it and closed it, then renamed over the old one, then its
    folder is fsynced; a power loss leaves the old checkpoint or the new one, never a name
    pointing at data that never reached the disk (issue 29: without these fsyncs all passed)."""
    dest = tmp_path / "last.pt"
    checkpoint.save({"w": torch.zeros(3)}, dest)
    calls = disk_calls(monkeypatch)
    checkpoint.save({"w": torch.arange(1000.0)}, dest, keep=keep and tmp_path / keep)
    assert calls and calls[0][0] == "fsync", calls
    tmp = calls[0][1]
    assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".tmp")
    linked = [("link", str(dest), str(tmp_path / keep))] if keep else []
    assert calls == [("fsync", tmp, dest.stat().st_size), *linked, ("replace", tmp, str(dest)),
                     ("fsync", str(tmp_path), sorted(["last.pt", *([keep] if keep else [])]))]
    assert torch.equal(checkpoint.load(dest)["w"], torch.arange(1000.0))


def test_a_finished_run_is_on_the_disk_in_the_published_folder_before_its_work_folder_goes(
        tmp_path, monkeypatch):
    """RunFolders.finish renames the run's checkpoint and previews into models/checkpoints, then
    fsyncs that folder, and only then removes models/runs/<id>: a power loss at any point leaves
    the checkpoint under one of its two names (issue 29: without the fsync all passed)."""
    from ddpm.runs import RunFolders
    folders = RunFolders(published=tmp_path / "checkpoints", work=tmp_path / "runs" / "abc")
    checkpoint.save({"w": torch.ones(2)}, folders.work / "last.pt")
    checkpoint.save({"w": torch.zeros(2)}, folders.work / "last.pt",
                    keep=folders.work / "previous.pt")
    folders.previews.mkdir()
    (folders.previews / "epoch_0001.png").write_bytes(b"png")
    calls = disk_calls(monkeypatch)
    folders.finish()
    published, work = folders.published, folders.work
    moved = [("replace", str(work / "last.pt"), str(published / "last.pt")),
             ("replace", str(work / "previews"), str(published / "previews"))]
    synced = ("fsync", str(published), ["last.pt", "previews"])
    removed = ("rmtree", str(work))
    assert all(call in calls for call in [*moved, synced, removed]), calls
    assert max(map(calls.index, moved)) < calls.index(synced) < calls.index(removed), calls
    assert torch.equal(checkpoint.load(published / "last.pt")["w"], torch.zeros(2))
    assert not work.exists() and (published / "previews" / "epoch_0001.png").is_file()


def test_stale_temporaries_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    """A name's pid decides: a process that no longer runs left it (swept); a running one may
    still be writing it (kept), as may files that are not this module's temporaries."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".ema.pt.{dead_pid}.k2j4_x8a.tmp", tmp_path / f".last.pt.{dead_pid}.q.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (tmp_path / f".real_png.{dead_pid}.abc.tmp").mkdir()  # an atomic_dir's staging folder
    live = tmp_path / f".loss.tsv.{os.getpid()}.abc.tmp"
    live.write_text("being written")
    others = [tmp_path / "ema.pt", tmp_path / ".0.png.tmp", tmp_path / ".samples.partial"]
    for path in others:
        path.write_bytes(b"")
    removed = sweep_temporaries(tmp_path, tmp_path / "missing")
    assert sorted(removed) == sorted(stale + [tmp_path / f".real_png.{dead_pid}.abc.tmp"])
    assert live.exists() and all(path.exists() for path in others)
    assert not any(path.exists() for path in removed)
    with atomic_file(tmp_path / "x.json") as tmp:  # what atomic_file names its temporaries
        assert f".x.json.{os.getpid()}." in tmp.name and sweep_temporaries(tmp_path) == []


def test_a_full_disk_keeps_the_old_checkpoint_and_says_so_in_one_line(small_disk):
    """A real ENOSPC (a 256 KiB tmpfs): torch.save fails midway; the error names the file, the
    old checkpoint is byte-identical, the one it was to be kept as is not touched, and no
    temporary is left."""
    disk = small_disk(256)
    path, keep = disk / "last.pt", disk / "previous.pt"
    checkpoint.save({"w": torch.zeros(1000)}, path)
    before = path.read_bytes()
    with pytest.raises(PipelineError) as info:
        checkpoint.save({"w": torch.zeros(100_000)}, path, keep=keep)  # 400 KB
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    assert message.startswith(f"the disk is full: {path} was not written (")
    assert "its previous version is intact" in message
    assert path.read_bytes() == before and sorted(os.listdir(disk)) == ["last.pt"]


def big_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # 197 KB


@pytest.mark.parametrize("what", ["grid", "progression", "json", "pngs"])
def test_every_output_on_a_full_disk_is_one_line_and_leaves_the_old_file(small_disk, tmp_path,
                                                                         what):
    """Preview grids and plots/sample_grid.png (save_png), the progression figure, metrics
    (write_json) and the sample stage's PNGs, on a disk with 8 KiB left."""
    disk = small_disk(512)
    grid = tmp_path / "epoch_0001.png"
    images.save_png(big_image()[:64], grid)
    writers = {
        "grid": (disk / "sample_grid.png", lambda: images.save_png(big_image(), disk /
                                                                   "sample_grid.png")),
        "progression": (disk / "progression.png", lambda: previews.progression_figure(
            [1] * 12, [grid] * 12, disk / "progression.png", 32)),
        "json": (disk / "train.json", lambda: write_json(disk / "train.json",
                                                         {"rows": list(range(10_000))})),
        "pngs": (disk / "0.png", lambda: images.write_pngs(big_image()[None], disk)),
    }
    dest, write = writers[what]
    dest.write_bytes(b"the old file")
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * (free - 8 * 1024))
    with pytest.raises(PipelineError) as info:
        write()
    assert str(info.value).startswith(f"the disk is full: {dest} was not written")
    assert dest.read_bytes() == b"the old file"
    assert sorted(p.name for p in disk.iterdir() if p.name.endswith(".tmp")) in (
        [], [".0.png.tmp"])  # the sample stage's PNG temporaries are swept by its next start


class FullDisk(io.FileIO):
    """A file on a disk that fills after `room` bytes: write() then raises ENOSPC, as the
    kernel does, under whatever is writing (torch.save's C++ writer here)."""
    room = 1000

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_enospc_inside_torch_save_is_found_behind_its_runtime_error(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: torch's own writer meets the OSError and raises
    RuntimeError("[enforce fail at inline_container.cc...]"); the one-line error still says
    that the disk is full, and the old file stays."""
    path = tmp_path / "ema.pt"
    checkpoint.save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint, "open", lambda file, mode: FullDisk(file, mode),
                        raising=False)
    with pytest.raises(RuntimeError, match="inline_container"), \
            FullDisk(tmp_path / "direct.pt", "wb") as f:
        torch.save({"w": torch.zeros(1000)}, f)  # what torch itself raises
    with pytest.raises(PipelineError, match=f"^the disk is full: {path} was not written"):
        checkpoint.save({"w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.pt", "ema.pt"]


def test_sigterm_inside_torch_save_is_the_stop_not_torchs_error(tmp_path, monkeypatch):
    """SIGTERM's Terminated raised inside torch.save's write (a Python file's write runs the
    signal handler) makes torch raise a RuntimeError of its own on closing the zip; the stop,
    not that error, comes out, so the stage says where it stopped. The old file stays."""
    from ddpm.errors import Terminated

    class Stopped(io.FileIO):
        def write(self, data) -> int:
            if self.tell() > 1000:
                raise Terminated
            return super().write(data)

    path = tmp_path / "last.pt"
    checkpoint.save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint, "open", lambda file, mode: Stopped(file, mode),
                        raising=False)
    with pytest.raises(RuntimeError, match="inline_container") as info, \
            Stopped(tmp_path / "direct.pt", "wb") as f:
        torch.save({"w": torch.zeros(1000)}, f)  # what torch itself raises
    assert isinstance(info.value.__context__, Terminated)
    with pytest.raises(Terminated):
        checkpoint.save({"w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.pt", "last.pt"]


def test_equal_checkpoints_are_equal_bytes_wherever_they_are_written(tmp_path):
    """The bytes of a checkpoint depend on its state alone, not on the (temporary) file name, so
    that DVC sees a re-run that ends at once as no change (tests/e2e/test_fid_change.py)."""
    import torch

    from ddpm import checkpoint
    state = {"ema": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {"seed": 0}, "epochs": 2}
    checkpoint.save(state, tmp_path / "a" / "ema.pt")
    checkpoint.save(state, tmp_path / "b" / "other.pt")
    assert (tmp_path / "a/ema.pt").read_bytes() == (tmp_path / "b/other.pt").read_bytes()
    assert torch.equal(checkpoint.load(tmp_path / "b/other.pt")["ema"]["w"], state["ema"]["w"])
