"""Fixtures for the end-to-end tests, which drive the real dvc CLI."""
from __future__ import annotations

import pytest
import yaml

import shutil
from pathlib import Path

from dvc_repo import commit, dvc, make_repo


@pytest.fixture
def new_repo(tmp_path, tiny):
    """A factory: new_repo(**section_overrides) -> a committed repository with tiny params."""
    def make(name: str = "repo", **overrides: dict) -> Path:
        params = yaml.safe_load(yaml.safe_dump(tiny))
        for section, values in overrides.items():
            params[section].update(values)
        return make_repo(tmp_path / name, params)
    return make


@pytest.fixture(scope="session")
def reproduced_template(tmp_path_factory, tiny):
    """(repo, output): `dvc repro` run once with tiny params, its results committed.

    Modules copy it (copy_of_reproduced) rather than paying for the whole pipeline again.
    """
    repo = make_repo(tmp_path_factory.mktemp("template") / "repo", tiny)
    out = dvc(repo, "repro").stdout
    commit(repo, "baseline results")
    return repo, out


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, reproduced_template):
    """This module's own copy of the reproduced repository (git, DVC cache and outputs)."""
    template, out = reproduced_template
    repo = tmp_path_factory.mktemp("copy") / "repo"
    shutil.copytree(template, repo, symlinks=True)
    return repo, out
