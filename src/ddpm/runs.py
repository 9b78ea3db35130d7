"""Where a training run keeps its resumable state while it is unfinished.

DVC restores declared outputs: `dvc exp run` checks out the models/checkpoints that dvc.lock
records before it runs the stage, over the checkpoint of the run it interrupted. So an unfinished
run keeps its checkpoint and preview grids in a folder DVC does not manage, one per run config,
models/runs/<id>/, and moves them into models/checkpoints (the persistent output that DVC caches,
pushes and commits) when it finishes. The id hashes everything a checkpoint must share with the
run (seed, data, model, diffusion, the train.* keys that change the optimisation), so a resumed
run is still checked key by key, and another config never meets this folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from ddpm import checkpoint
from ddpm.errors import PipelineError
from ddpm.files import fsync, kind, open_regular, refuse_non_folder
from ddpm.params import plain

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

CHECKPOINT = "last.pt"
PREVIOUS = "previous.pt"  # the checkpoint before last.pt, kept while this run is unfinished
PREVIEWS = "previews"
LOCK = "lock"  # holds the pid of the trainer that has the run folder


def run_id(resume_config: dict) -> str:
    """12 hex digits naming a run config (JSON with sorted keys, then sha256)."""
    text = json.dumps(plain(resume_config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass(frozen=True)
class RunFolders:
    published: Path  # models/checkpoints: the finished run's state, a persistent DVC output
    work: Path       # models/runs/<id>: this config's unfinished state, outside DVC

    @property
    def previews(self) -> Path:
        """Where this run's preview grids are kept while it trains."""
        return self.work / PREVIEWS

    def checkpoints(self) -> list[Path]:
        """The checkpoints this run may resume from, its own first: if the newest does not
        load, the one before it still does."""
        return [self.work / CHECKPOINT, self.work / PREVIOUS, self.published / CHECKPOINT]

    def folders(self) -> list[Path]:
        """Every folder of this run that training writes in, empties or moves: none may be a
        link (they would be written, emptied or moved out of the repository) or another kind
        of file."""
        return [self.work.parent, self.work, self.previews, self.work / "fid_images",
                self.published, self.published / PREVIEWS]

    def resumable(self, config: dict, epochs: int,
                  refusal: Callable[[dict], str | None] = lambda state: None
                  ) -> tuple[tuple[Path, dict] | None, list[str]]:
        """The most advanced checkpoint of the run `config` (checkpoint["config"]) with at most
        `epochs` epochs, and its state; and what else was found, in words. refusal(state): what
        makes a checkpoint of this run unfit to resume (keys, shapes, progress, non-finite
        values; ddpm.step.TrainState.refusal), None if nothing."""
        found, notes = None, []
        for path in self.checkpoints():
            try:
                mode = os.stat(path).st_mode  # a link is read (DVC's symlink cache), not written
            except FileNotFoundError:
                continue
            except OSError as e:  # a link loop, a dangling link
                notes.append(f"{path}: not readable ({e.strerror}): not resumed")
                continue
            if not stat.S_ISREG(mode):  # a FIFO would never end the read
                notes.append(f"{path} is {kind(mode)}, not a checkpoint file: not resumed")
                continue
            try:
                state = checkpoint.load(path)
            except checkpoint.CheckpointError as e:
                notes.append(f"{e}: not resumed")
                continue
            progress = state.get("progress")
            epoch = progress.get("epoch", 0) if isinstance(progress, dict) else 0
            if differs := checkpoint.differences(state.get("config", {}), config):
                notes.append(f"{path} is from another run ({', '.join(differs)} differ)")
            elif why := refusal(state):
                notes.append(f"{path}: {why}: not resumed")
            elif epoch > epochs:
                notes.append(f"{path} is at epoch {epoch}, beyond train.epochs")
            elif found is None or state["progress"]["step"] > found[1]["progress"]["step"]:
                found = path, state
        return found, notes

    def lock(self) -> TextIO:
        """Take the run folder for this process: a second trainer of the same run (started by
        hand, or in a clone sharing models/ on a network disk) stops here in one line naming
        this one's pid. The lock is flock(2)'s: it ends with this process, however it ends, so
        no kill leaves a stale one. Keep the returned file open while training."""
        refuse_non_folder(self.work.parent, self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        # Not through a link, and a FIFO is refused without waiting on it (open_regular).
        handle = os.fdopen(open_regular(self.work / LOCK, os.O_RDWR | os.O_CREAT), "r+")
        if fcntl is None:
            return handle
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(32).strip() or "unknown"
            handle.close()
            raise PipelineError(f"{self.work} is in use by another trainer of the same run (pid "
                                f"{holder}): wait for it to finish, or stop it, then run this "
                                "again") from None
        except OSError as e:  # a filesystem without locks (some FUSE mounts): train unlocked
            print(f"train: cannot lock {self.work} ({e.strerror}): make sure that no other "
                  "trainer of this run is running", file=sys.stderr)
        handle.seek(0)
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle

    def adopt_previews(self, source: Path) -> None:
        """Resuming from the published checkpoint: its grids become this run's."""
        if source.parent == self.published and (self.published / PREVIEWS).is_dir():
            shutil.rmtree(self.previews, ignore_errors=True)
            shutil.copytree(self.published / PREVIEWS, self.previews)

    def finish(self) -> None:
        """Move the finished run's checkpoint and grids into the published folder (renames on
        one filesystem), then forget the work folder."""
        self.published.mkdir(parents=True, exist_ok=True)
        if (self.work / CHECKPOINT).exists():
            os.replace(self.work / CHECKPOINT, self.published / CHECKPOINT)
        if self.previews.is_dir():
            shutil.rmtree(self.published / PREVIEWS, ignore_errors=True)
            os.replace(self.previews, self.published / PREVIEWS)
        fsync(self.published)  # the renames reach the disk before the work folder goes
        shutil.rmtree(self.work, ignore_errors=True)

    def others(self) -> list[tuple[Path, int]]:
        """Unfinished runs of other configs beside this one, with their sizes in bytes."""
        parent = self.work.parent
        if not parent.is_dir():
            return []
        return [(p, folder_size(p)) for p in sorted(parent.iterdir())
                if p.is_dir() and p != self.work and {q.name for q in p.iterdir()} - {LOCK}]
