"""Named configurations: presets/*.yaml composed into params.yaml by DVC's Hydra composition.

.dvc/config makes `dvc exp run` compose params.yaml from itself (hydra config_dir `.`, config_name
`params`) plus the presets named with -S +presets=..., so a hand edit of params.yaml is kept;
these tests compose exactly as DVC does (dvc.utils.hydra.compose_and_dump) without running it.
"""
from __future__ import annotations

import configparser
import shutil

import pytest
import yaml

from ddpm.networks import checked_size
from ddpm.params import load_params, reference
from fakes import ROOT


def composed(tmp_path, *overrides: str, params: str | None = None) -> str:
    """params.yaml after `dvc exp run -S override ...` in a copy of this project: its text."""
    from dvc.utils.hydra import compose_and_dump
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    (tmp_path / "params.yaml").write_text(params or (ROOT / "params.yaml").read_text())
    compose_and_dump(tmp_path / "params.yaml", str(tmp_path), None, "params", "", list(overrides))
    return (tmp_path / "params.yaml").read_text()


def test_dvc_composes_params_yaml_from_itself():
    """The committed .dvc/config: Hydra on, config_dir `.`, config_name `params`."""
    config = configparser.ConfigParser()
    config.read_string((ROOT / ".dvc/config").read_text())
    assert dict(config["hydra"]) == {"enabled": "true", "config_dir": ".", "config_name": "params"}


def test_params_yaml_is_the_composition_of_the_defaults(tmp_path):
    """`dvc exp run` without -S rewrites params.yaml byte for byte as committed, so a fresh clone's
    `dvc repro` and `dvc exp run` run the same (the seed's) values and leave no diff."""
    assert composed(tmp_path) == (ROOT / "params.yaml").read_text()


def test_a_hand_edit_of_params_yaml_is_kept_by_the_composition(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("lr: 0.0002", "lr: 0.0003")
    assert (yaml.safe_load(composed(tmp_path, "sample.steps=100", params=text))["train"]["lr"]
            == 3e-4)


@pytest.mark.parametrize("overrides, expected", [
    (["+presets=quick"], {"data.limit": 2000, "model.channels": (32, 64, 64), "train.epochs": 35,
                          "train.fid_every": 7, "sample.sampler": "ddim", "sample.steps": 50,
                          "data.url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"}),
    (["+presets=ddpm"], {"model.arch": "ddpm", "model.channels": (128, 256, 256, 256),
                         "model.heads": 1, "train.warmup_steps": 5000, "train.epochs": 2052,
                         "sample.clip_denoised": True, "sample.num_images": 50000}),
    (["+presets=fast"], {"model.arch": "seed", "sample.sampler": "ddim", "sample.steps": 50,
                         "sample.eta": 0.0}),
    (["+presets=res64"], {"data.resolution": 64, "model.channels": (96, 192, 288, 384, 384),
                          "model.attention_resolutions": (32, 16, 8), "data.source": "cifar10"}),
    (["+presets=res64", "data.source=data/pets"], {"data.resolution": 64,
                                                   "data.source": "data/pets"}),
    (["+presets=[quick,fast]", "train.lr=5e-4"], {"model.channels": (32, 64, 64),
                                                   "sample.sampler": "ddim", "train.lr": 5e-4}),
])
def test_each_preset_composes_into_valid_params(tmp_path, overrides, expected):
    """Every preset passes check_params (schema, rules, the network on the meta device), sets
    what it says, and combines with other presets and -S values (later wins)."""
    composed(tmp_path, *overrides)
    params = load_params(tmp_path / "params.yaml")
    checked_size(params.model, (3, params.data.resolution, params.data.resolution))
    for key, value in expected.items():
        section, _, name = key.rpartition(".")
        assert getattr(getattr(params, section) if section else params, name) == value, key


def test_the_ddpm_preset_is_the_papers_network():
    """Ho et al.'s CIFAR-10 UNet has 35,746,307 parameters (their code, diffusers' port)."""
    preset = yaml.safe_load((ROOT / "presets/ddpm.yaml").read_text())
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["model"].update(preset["model"])
    from ddpm.params import parse_params
    assert checked_size(parse_params(base).model, (3, 32, 32)) == 35_746_307


def test_docs_params_md_is_generated_from_the_schema():
    """docs/params.md is `python -m ddpm.params reference` of the committed params.yaml."""
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert (ROOT / "docs/params.md").read_text() == reference(values)
