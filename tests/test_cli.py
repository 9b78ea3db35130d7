"""ddpm.cli.run, in real processes: Ctrl-C and SIGTERM stop a stage in one line with a shell's
exit codes (130, 143); a full disk is one line; a second trainer of a run stops at its lock."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from fakes import ROOT

STAGE = """
import errno, sys, time
sys.path.insert(0, sys.argv[1])
from ddpm.cli import on_interrupt, run
from ddpm.files import disk_full
from pathlib import Path

def main():
    if sys.argv[2] == "disk-full":
        raise disk_full(Path("models/ema.pt"))
    if sys.argv[2] == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device")
    if sys.argv[2] in ("where", "quiet"):  # what the train and sample stages register
        on_interrupt(lambda: " in epoch 2 of 3; its last checkpoint is kept" if sys.argv[2] ==
                     "where" else None)
    print("ready", flush=True)
    time.sleep(120)

sys.argv[0] = "stages/sample.py"
run(main)
"""


def stage(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STAGE, str(ROOT / "src"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_stops_a_stage_as_ctrl_c_does(sig, code):
    """The exit code a shell gives a process that the signal ended (128 + its number), and the
    same one line for both, not a traceback. A second SIGTERM while the first is handled
    changes nothing."""
    proc = stage("wait")
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(sig)
    if sig == signal.SIGTERM:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code == 128 + sig
    assert err.splitlines() == ["sample: interrupted; run the same command again to redo "
                                "this stage"]


@pytest.mark.parametrize("kind, line", [
    ("where", "sample: interrupted in epoch 2 of 3; its last checkpoint is kept"),
    ("quiet", None)])
def test_a_stage_says_where_it_was_interrupted_or_nothing_on_other_ranks(kind, line):
    """ddpm.cli.on_interrupt: the one place that turns an interrupt into the stage's line, with
    what the stage registered; None keeps a process quiet (the ranks other than the main one)."""
    proc = stage(kind)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.splitlines() == ([line] if line else [])


@pytest.mark.parametrize("kind", ["disk-full", "enospc"])
def test_a_full_disk_is_one_line(kind):
    """Named by ddpm.files where it writes; any other write's ENOSPC still one line."""
    proc = stage(kind)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    line, = err.splitlines()
    assert line.startswith("error: the disk is full")
    if kind == "disk-full":
        assert "models/ema.pt was not written" in line


LOCK = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from ddpm.runs import RunFolders
lock = RunFolders(Path(sys.argv[2]) / "checkpoints", Path(sys.argv[2]) / "runs" / "abc").lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_the_run_folder_lock_names_its_holder_and_dies_with_it(tmp_path):
    """flock(2): a second taker fails at once, naming the holder's pid; after a kill -9 of the
    holder nothing stale is left, and the folder can be taken again."""
    from ddpm.runs import RunFolders, PipelineError
    holder = subprocess.Popen([sys.executable, "-c", LOCK, str(ROOT / "src"), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        folders = RunFolders(tmp_path / "checkpoints", tmp_path / "runs" / "abc")
        with pytest.raises(PipelineError) as info:
            folders.lock()
        assert str(info.value) == (
            f"{tmp_path}/runs/abc is in use by another trainer of the same run (pid "
            f"{holder.pid}): wait for it to finish, or stop it, then run this again")
    finally:
        holder.kill()
        holder.wait()
    with folders.lock() as lock:
        assert (tmp_path / "runs/abc/lock").read_text() == f"{os.getpid()}\n"
        assert not lock.closed
    assert folders.others() == []  # a folder with only a lock is no unfinished run


def test_no_space_is_found_in_the_chain_of_errors():
    from ddpm.files import no_space
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    except RuntimeError as e:
        assert no_space(e)
    assert not no_space(RuntimeError("[enforce fail at inline_container.cc:672]"))
    assert not no_space(OSError(errno.EACCES, "Permission denied"))
