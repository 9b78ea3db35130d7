"""ddpm.cli.run, in real processes: Ctrl-C and SIGTERM stop a stage in one line with a shell's
exit codes (130, 143), the sample stage itself included; a full disk is one line; a second trainer
of a run stops at its lock."""
from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

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
    if sys.argv[2] == "swallowing":  # the SIGTERM will land in a __del__, which swallows it
        class Swallows:
            def __del__(self):
                print("in __del__", flush=True)
                time.sleep(60)
        Swallows()
    print("ready", flush=True)
    time.sleep(120)

sys.argv[0] = "stages/sample.py"
run(main)
"""


def default_sigint() -> None:
    """Ctrl-C's default action in the child: started from a shell without job control (a CI
    script's `cmd &`), the test would pass on an ignored SIGINT, which Python keeps ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stage(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STAGE, str(ROOT / "src"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)


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


def test_a_sigterm_that_lands_in_a_del_and_is_swallowed_is_raised_again():
    """Python prints and swallows an exception raised in a __del__ or a weakref callback (it
    happened to the train stage: SIGTERM landed in weakref's remove, and it trained on). The
    stage raises it again until it arrives: the same one line and exit code, in seconds."""
    proc = stage("swallowing")
    assert proc.stdout.readline() == "in __del__\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "ready\n"  # the __del__ ended and the stage went on
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert err.splitlines() == ["sample: interrupted; run the same command again to redo "
                                "this stage"]  # without Python's report of what it swallowed


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


DVC = """
import os, subprocess, sys
stage = subprocess.Popen(sys.argv[1:], env=dict(os.environ, DVC_STAGE="sample"))
print(stage.pid, flush=True)
stage.wait()
"""


@pytest.mark.parametrize("through", ["exec", "a shell that waits"])
def test_a_stage_stops_when_dvc_is_killed_even_through_a_waiting_shell(through):
    """DVC runs a stage as `$SHELL -c cmd` and has no SIGTERM handler. bash execs cmd, so the
    stage is DVC's child (PR_SET_PDEATHSIG); /bin/sh as dash, DVC's shell where SHELL is unset,
    waits for it, and a kill of DVC alone leaves that shell and the stage running. Either way
    the stage stops with its one line once the process that started it (here a stand-in for
    DVC) is killed."""
    command = [sys.executable, "-c", STAGE, str(ROOT / "src"), "wait"]
    if through != "exec":  # `; exit $?`: no shell execs a command that is not its last
        command = ["/bin/sh", "-c", shlex.join(command) + "; exit $?"]
    dvc = subprocess.Popen([sys.executable, "-c", DVC, *command], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    started = int(dvc.stdout.readline())
    assert dvc.stdout.readline() == "ready\n"  # the stage's, on the same pipe
    assert (Path(f"/proc/{started}/cmdline").read_bytes().split(b"\0")[0] == b"/bin/sh") == (
        through != "exec")
    dvc.send_signal(signal.SIGTERM)  # Python's default, as DVC's: it ends, its children run on
    _, err = dvc.communicate(timeout=60)  # EOF once the shell and the stage have ended too
    assert dvc.returncode == -signal.SIGTERM
    assert err.splitlines() == ["sample: interrupted; run the same command again to redo "
                                "this stage"]


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
            # B904: torch chains it implicitly, as here
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904
    except RuntimeError as e:
        assert no_space(e)
    assert not no_space(RuntimeError("[enforce fail at inline_container.cc:672]"))
    assert not no_space(OSError(errno.EACCES, "Permission denied"))


def test_ctrl_c_stops_the_sample_stage_with_130_and_its_own_line(tiny, tmp_path):
    """stages/sample.py itself, interrupted once it has written an image: exit code 130, no
    traceback, and as its last line the stage's own words, naming the folder it keeps."""
    import time

    import torch
    import yaml

    from ddpm import checkpoint, networks
    from ddpm.params import parse_params
    raw = yaml.safe_load(yaml.safe_dump(tiny))
    raw["train"]["precision"] = "fp32"
    raw["sample"].update(num_images=100_000, batch_size=1, steps=raw["diffusion"]["timesteps"])
    params = parse_params(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    torch.manual_seed(0)
    checkpoint.save({"ema": networks.build(params.model, (3, 32, 32)).state_dict(),
                     "config": params.to_dict()}, tmp_path / "ema.pt")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "stages/sample.py"), "--ema", "ema.pt", "--out", "out",
         "--metrics", "m.json", "--report", "r.json", "--grid", "grid.png"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / ".out.partial").glob("*.png")):  # drawing: an image is kept
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no image drawn in 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.replace("\r", "\n").splitlines()[-1] == (
        "sample: interrupted; the images drawn so far are kept in .out.partial for a run with the "
        "same EMA weights and params. Run the same command again to draw the rest")
    assert ((tmp_path / ".out.partial" / "manifest.json").is_file()
            and not (tmp_path / "out").exists())
