"""Fixtures for the end-to-end tests, which drive the real dvc CLI."""
from __future__ import annotations

import pytest
import yaml

from dvc_repo import make_repo


@pytest.fixture
def new_repo(tmp_path, tiny):
    """A factory: new_repo(**section_overrides) -> a committed repository with tiny params."""
    def make(name: str = "repo", **overrides: dict) -> Path:
        params = yaml.safe_load(yaml.safe_dump(tiny))
        for section, values in overrides.items():
            params[section].update(values)
        return make_repo(tmp_path / name, params)
    return make
