"""Helpers for the end-to-end tests: a temporary git + DVC copy of this project, the real CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ["dvc.yaml", "params.yaml", "stages", "src", ".dvcignore", ".gitignore", ".dvc/config",
           ".dvc/.gitignore"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def env() -> dict[str, str]:
    """The test's Python first on PATH (DVC runs `python stages/...`), no analytics, a git author."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
                GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")


def sh(repo: Path, *cmd: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command in the repo; stdout and stderr together in .stdout."""
    result = subprocess.run(cmd, cwd=repo, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}")
    return result


def dvc(repo: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "dvc", *args, **kwargs)


def make_repo(path: Path, params: dict) -> Path:
    """Copy the project into `path`, write `params`, and commit it to a new git repository."""
    path.mkdir(parents=True, exist_ok=True)
    for name in PROJECT:
        src, dst = ROOT / name, path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=IGNORE)
        else:
            shutil.copy2(src, dst)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(path, "git", "init", "-q", "-b", "main")
    commit(path, "project with tiny params")
    return path


def commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", message)
