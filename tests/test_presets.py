"""Named configurations: presets/*.yaml composed into params.yaml by DVC's Hydra composition.

.dvc/config makes `dvc exp run -S ...` compose params.yaml from the committed defaults
(params.defaults.yaml), then the presets named with +presets=..., then the -S values, whatever
params.yaml held before. These tests compose exactly as DVC does (ddpm.presets.compose calls
dvc.utils.hydra.compose_and_dump with .dvc/config's settings) without running it; the real
`dvc exp run` in a workspace is tests/e2e/test_presets_run.py.
"""
from __future__ import annotations

import configparser
import shutil

import pytest
import yaml

from ddpm.networks import checked_size
from ddpm.params import load_params, reference
from ddpm.presets import compose
from fakes import ROOT, python_m_ddpm


def composed(tmp_path, *overrides: str) -> str:
    """params.yaml after `dvc exp run -S override ...` in this project: its text (also written to
    tmp_path/params.yaml)."""
    text = compose(ROOT, overrides)
    (tmp_path / "params.yaml").write_text(text)
    return text


def composable_copy(tmp_path, params: str):
    """What the composition reads of this project (presets, defaults, .dvc/config), copied, with
    `params` as the workspace's params.yaml."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "presets", repo / "presets")
    shutil.copy(ROOT / "params.defaults.yaml", repo)
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")
    (repo / "params.yaml").write_text(params)
    return repo


def test_dvc_composes_params_yaml_from_the_committed_defaults():
    """The committed .dvc/config: Hydra on, config_dir `.`, config_name `params.defaults`."""
    config = configparser.ConfigParser()
    config.read_string((ROOT / ".dvc/config").read_text())
    assert dict(config["hydra"]) == {"enabled": "true", "config_dir": ".",
                                     "config_name": "params.defaults"}


def test_params_yaml_is_the_composition_of_the_defaults():
    """The committed params.yaml is params.defaults.yaml composed with no override, byte for
    byte, so a fresh clone's `dvc repro` runs the defaults, and they are the seed's values."""
    assert compose(ROOT, []) == (ROOT / "params.yaml").read_text()
    defaults = yaml.safe_load((ROOT / "params.defaults.yaml").read_text())
    assert defaults == yaml.safe_load((ROOT / "params.yaml").read_text())


def test_a_run_does_not_depend_on_what_params_yaml_held_before(tmp_path):
    """quick, then ddpm, then fast in one workspace: each composes from the committed defaults,
    so the ddpm run does not inherit the quick run's data.limit, fid_every or previews."""
    repo = composable_copy(tmp_path, (ROOT / "params.yaml").read_text())
    alone = {name: compose(ROOT, [f"+presets={name}"]) for name in ("quick", "ddpm", "fast")}
    for name in ("quick", "ddpm", "fast"):
        # what the previous run left, as a user's hand edit would be
        (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace(
            "limit: ", "limit: 1").replace("seed: 0", "seed: 7"))
        done = python_m_ddpm(repo, "params", f"+presets={name}")
        assert done.returncode == 0, done.stderr
        assert (repo / "params.yaml").read_text() == alone[name], name
    ddpm = yaml.safe_load(alone["ddpm"])
    assert ddpm["data"]["limit"] == 0 and ddpm["train"]["fid_every"] == 0


def test_a_bad_override_is_one_line_and_writes_nothing(tmp_path):
    repo = composable_copy(tmp_path, "seed: 3\n")
    for override, says in [("train.lrr=1", "To append to your config use +train.lrr=1"),
                           ("+presets=quik", "Could not find 'presets/quik'"),
                           ("train.lr=2", "train.lr = 2: expected a finite number in (0, 1]")]:
        done = python_m_ddpm(repo, "params", override)
        assert done.returncode == 2 and says in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert (repo / "params.yaml").read_text() == "seed: 3\n"


@pytest.mark.parametrize("overrides, expected", [
    (["+presets=quick"], {"data.limit": 2000, "model.channels": (32, 64, 64), "train.epochs": 57,
                          "train.fid_every": 19, "train.fid_images": 250,
                          "diffusion.prediction": "x0", "train.snr_gamma": 5.0,
                          "sample.sampler": "ddim", "sample.steps": 50,
                          "data.url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"}),
    (["+presets=objective"], {"diffusion.prediction": "x0", "train.snr_gamma": 5.0,
                              "model.arch": "seed", "model.channels": (96, 192, 384, 384),
                              "train.epochs": 600}),
    (["+presets=[ddpm,objective]"], {"model.arch": "ddpm", "diffusion.prediction": "x0"}),
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
    (["+presets=[quick,conditional]"], {"model.channels": (32, 64, 64),
                                        "model.conditional": True, "train.label_dropout": 0.1,
                                        "sample.guidance": 0.3, "sample.labels": "balanced"}),
    (["+presets=conditional", "sample.labels=[cat,dog]"], {"sample.labels": ("cat", "dog")}),
])
def test_each_preset_composes_into_valid_params(tmp_path, overrides, expected):
    """Every preset passes check_params (schema, rules, the network on the meta device), sets
    what it says, and combines with other presets and -S values (later wins)."""
    composed(tmp_path, *overrides)
    params = load_params(tmp_path / "params.yaml")
    checked_size(params.model, (3, params.data.resolution, params.data.resolution), classes=10)
    for key, value in expected.items():
        section, _, name = key.rpartition(".")
        assert getattr(getattr(params, section) if section else params, name) == value, key


def test_the_ddpm_preset_is_the_papers_network():
    """Ho et al.'s CIFAR-10 UNet has 35,746,307 parameters (their code, diffusers' port)."""
    preset = yaml.safe_load((ROOT / "presets/ddpm.yaml").read_text())
    base = yaml.safe_load((ROOT / "params.defaults.yaml").read_text())
    base["model"].update(preset["model"])
    from ddpm.params import parse_params
    assert checked_size(parse_params(base).model, (3, 32, 32)) == 35_746_307


def test_docs_params_md_is_generated_from_the_schema():
    """docs/params.md is `python -m ddpm.params reference` of the committed params.yaml."""
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert (ROOT / "docs/params.md").read_text() == reference(values)
