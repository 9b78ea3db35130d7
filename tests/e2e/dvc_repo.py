"""Helpers for the end-to-end tests: a temporary git + DVC copy of this project, the real CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ["dvc.yaml", "params.yaml", "params.defaults.yaml", "presets", "stages", "src",
           ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"]
# -S values that shrink the quick preset back to the tiny run of tests/fakes.tiny_params
TINY_QUICK = ["data.limit=48", "train.epochs=1", "train.batch_size=16", "train.preview_images=4",
              "train.preview_steps=3", "train.fid_every=1", "train.fid_images=6",
              "sample.num_images=12", "sample.steps=8"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def env() -> dict[str, str]:
    """The test's Python first on PATH (DVC runs `python stages/...`),
    no analytics, a git author."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
                GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")


def sh(repo: Path, *cmd: str, check: bool = True,
       timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command in the repo; stdout and stderr together in .stdout."""
    result = subprocess.run(cmd, cwd=repo, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}")
    return result


def dvc(repo: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "dvc", *args, **kwargs)


def assert_up_to_date(repo: Path) -> None:
    """`dvc status` has nothing to run but the source stage, which always runs (dvc.yaml:
    always_changed, since DVC cannot follow the path data.source names)."""
    status = json.loads(dvc(repo, "status", "--json").stdout)
    assert status == {"source": ["always changed"]}, status


def make_repo(path: Path, params: dict) -> Path:
    """Copy the project into `path`, write `params` as its defaults and its params.yaml (so that
    `dvc exp run -S` composes from them), and commit it to a new git repository."""
    path.mkdir(parents=True, exist_ok=True)
    for name in PROJECT:
        src, dst = ROOT / name, path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=IGNORE)
        else:
            shutil.copy2(src, dst)
    for name in ("params.defaults.yaml", "params.yaml"):
        (path / name).write_text(yaml.safe_dump(params, sort_keys=False))
    sh(path, "git", "init", "-q", "-b", "main")
    commit(path, "project with tiny params")
    return path


def commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", message)


def unfinished_epoch(repo: Path) -> int:
    """The epoch of the unfinished run's checkpoint in models/runs (0 if there is none)."""
    import torch
    found = sorted((repo / "models/runs").glob("*/last.pt"))
    if not found:
        return 0
    try:
        return torch.load(found[0], weights_only=True)["progress"]["epoch"]  # replaced atomically
    except FileNotFoundError:  # moved into models/checkpoints as the run finished
        return 0


def dvc_killed_when(repo: Path, args: Sequence[str], ready: Callable[[], bool],
                    extra_delay: float = 0.0, sig: int = signal.SIGKILL,
                    timeout: float = 180, group: bool = True, shell: str | None = None) -> str:
    """Start `dvc *args`, wait until ready() is true, then send `sig` to dvc and its children (as
    Ctrl-C in a terminal reaches the whole foreground process group), or with group=False to
    dvc's process alone (`kill <pid>`); return what it printed once every process that dvc had
    started has ended (an assertion fails if one outlives it by a minute). shell: the $SHELL
    that DVC runs the stage's command with (None: this process's)."""
    import psutil
    log = repo / f".dvc-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        environ = env() if shell is None else dict(env(), SHELL=shell)
        proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo, env=environ,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=default_sigint)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                assert proc.poll() is None, f"dvc ended before the kill point:\n{log.read_text()}"
                assert time.monotonic() < deadline, "kill point not reached"
                time.sleep(0.02)
            time.sleep(extra_delay)
            started = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
            proc.wait(timeout=120)
            _, alive = psutil.wait_procs(started, timeout=60)
            survivors = [p for p in alive if running(p)]
            assert not survivors, f"outlived dvc: {survivors}\n{log.read_text()}"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            forget_dvc_lock_torn_by_the_kill(repo)
    text = log.read_text()
    log.unlink()
    return text


def running(process) -> bool:
    """Alive and not a zombie (an orphan whose exit a container's PID 1 may never collect)."""
    import psutil
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def default_sigint() -> None:
    """Give dvc (and so the stages it starts) the SIGINT of a terminal: a shell without job
    control, as a CI script's `cmd &`, starts commands with SIGINT ignored, and an ignored
    signal stays ignored in every child, so Ctrl-C would never reach the stage."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def forget_dvc_lock_torn_by_the_kill(repo: Path) -> None:
    """DVC rewrites .dvc/tmp/rwlock in place: killed at that moment, it leaves the file empty and
    every later dvc command fails with "Unable to read RWLock-file" (treeverse/dvc#7615). No
    dvc runs any more, so delete it, as the README's troubleshooting says."""
    rwlock = repo / ".dvc/tmp/rwlock"
    if not rwlock.exists():
        return
    try:
        json.loads(rwlock.read_text())
    except json.JSONDecodeError:
        rwlock.unlink()
