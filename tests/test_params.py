"""params.yaml -> frozen dataclasses: the seed's values, and every bad value named by its key."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from ddpm.params import ParamsError, load_params, parse_params
from fakes import ROOT, committed_params

# The seed notebook's hyperparameters, as DESIGN.md lists them.
SEED = {
    "seed": 0, "device": "auto",
    "data": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                 md5="c58f30108f718f92721af3b95e74349a", real_split="train", limit=0),
    "model": dict(arch="seed", channels=(96, 192, 384, 384), res_blocks=2,
                  attention_resolutions=(16,), heads=8, dropout=0.1, time_dim=64),
    "diffusion": dict(timesteps=1000, beta_start=1e-4, beta_end=0.02, schedule="linear"),
    "train": dict(epochs=600, batch_size=128, batch_gpu="auto", lr=2e-4, warmup_steps=0, ema_decay=0.9999,
                  ema_warmup=False,
                  grad_clip=1.0, precision="auto", gpus=1, checkpoint_every=2, sample_every=5),
    "sample": dict(num_images=5000, batch_size=250, sampler="ddpm", steps=1000,
                   clip_denoised=False),
    "fid": dict(dims=2048, batch_size=64, weights=""),
}


def test_the_repository_params_are_the_seed_notebook(base_params):
    params = parse_params(base_params)
    assert params.seed == SEED["seed"] and params.device == SEED["device"]
    for section in ("data", "model", "diffusion", "train", "sample", "fid"):
        values = dataclasses.asdict(getattr(params, section))
        assert {k: values[k] for k in SEED[section]} == SEED[section], section
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0


@pytest.fixture
def raw(base_params):
    return copy.deepcopy(base_params)


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "lr", -1.0, "train.lr = -1.0: expected a positive number"),
    ("train", "lr", "fast", "train.lr = 'fast': expected a number"),
    ("train", "batch_size", 0, "train.batch_size = 0: expected a positive integer"),
    ("train", "batch_size", 2.5, "train.batch_size = 2.5: expected an integer"),
    ("train", "precision", "fp8", "train.precision = 'fp8': expected auto | fp32 | fp16 | bf16"),
    ("train", "ema_decay", 1.0, "train.ema_decay = 1.0: expected a number in [0, 1)"),
    ("train", "compile", "yes", "train.compile = 'yes': expected auto, true or false"),
    ("sample", "compile", 1, "sample.compile = 1: expected auto, true or false"),
    ("model", "channels", [], "model.channels = []: expected one positive width"),
    ("model", "channels", [64, "x"], "model.channels[1] = 'x': expected an integer"),
    ("model", "heads", 5, "model.heads = 5: must divide the width"),
    ("model", "arch", "dit", "model.arch = 'dit': expected seed | ddpm"),
    ("model", "attention_resolutions", [2], "model.attention_resolutions: 2 is not a resolution"),
    ("train", "warmup_steps", -1, "train.warmup_steps = -1: expected 0 (off) or a number of steps"),
    ("sample", "clip_denoised", "yes", "sample.clip_denoised = 'yes': expected true or false"),
    ("model", "dropout", 1.0, "model.dropout = 1.0: expected a probability in [0, 1)"),
    ("diffusion", "schedule", "quadratic", "diffusion.schedule = 'quadratic': expected linear"),
    ("diffusion", "beta_end", 1e-5, "diffusion.beta_end = 1e-05: expected a number in [beta_start"),
    ("data", "md5", "xyz", "data.md5 = 'xyz': expected 32 lowercase hex digits"),
    ("data", "real_split", "valid", "data.real_split = 'valid': expected train or test"),
    ("sample", "sampler", "euler", "sample.sampler = 'euler': expected ddpm | ddim"),
    ("sample", "steps", 1001, "sample.steps = 1001: expected at most diffusion.timesteps=1000"),
    ("fid", "dims", 100, "fid.dims = 100: expected 64 | 192 | 768 | 2048"),
])
def test_a_bad_value_is_one_line_naming_the_key_and_what_is_accepted(raw, section, key, value,
                                                                     message):
    raw[section][key] = value
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_top_level_values_are_checked(raw):
    raw["device"] = "tpu"
    with pytest.raises(ParamsError, match="^device = 'tpu': expected auto | cpu | cuda"):
        parse_params(raw)


def test_unknown_and_missing_keys_are_named(raw):
    raw["train"]["learning_rate"] = 1e-4
    with pytest.raises(ParamsError, match=r"^train\.learning_rate: unknown key \(accepted here: epochs"):
        parse_params(raw)
    del raw["train"]["learning_rate"], raw["sample"]["eta"]
    with pytest.raises(ParamsError, match=r"^sample\.eta: missing"):
        parse_params(raw)
    raw["sample"] = 5
    with pytest.raises(ParamsError, match="^sample = 5: expected a mapping"):
        parse_params(raw)


def test_yaml_quirks_are_accepted(raw):
    """PyYAML reads 1e-4 (no dot) as a string and integers where floats are meant."""
    raw["train"].update(lr="1e-4", grad_clip=1)
    params = parse_params(raw)
    assert params.train.lr == 1e-4 and params.train.grad_clip == 1.0
    assert isinstance(params.train.grad_clip, float)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: -1\n")
    with pytest.raises(ParamsError, match="params.yaml: device: missing"):
        load_params(tmp_path / "params.yaml")


def test_to_dict_round_trips(raw):
    params = parse_params(raw)
    assert parse_params(params.to_dict()) == params


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_compile_settings_resolve_per_device(raw, setting, monkeypatch):
    """auto compiles on CUDA GPUs with Triton only; true and false are taken as they are."""
    import torch.utils._triton
    from ddpm.runtime import resolve_compile
    raw["train"]["compile"] = raw["sample"]["compile"] = setting
    params = parse_params(raw)
    assert params.train.compile == params.sample.compile == setting
    for triton in (True, False):
        monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: triton)
        assert resolve_compile(setting, torch.device("cpu")) is (setting is True)
        on_gpu = triton if setting == "auto" else setting
        assert resolve_compile(setting, torch.device("cuda", 0)) is on_gpu


def test_the_tests_read_the_committed_params_not_the_working_copy(tmp_path):
    """`dvc exp run -S train.lr=1e-4` rewrites the working params.yaml; the tests' defaults still
    come from the commit. In a clone whose working copy says lr 1e-4 and arch ddpm, this file's
    seed-notebook test passes."""
    import subprocess
    import sys
    import yaml
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True,
                   timeout=120)
    (clone / "params.yaml").write_text((ROOT / "params.yaml").read_text()
                                       .replace("lr: 2.0e-4", "lr: 1.0e-4")
                                       .replace("arch: seed", "arch: ddpm"))
    assert yaml.safe_load((clone / "params.yaml").read_text())["train"]["lr"] == 1e-4
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_params.py", "-k", "repository_params"], cwd=clone,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:]
    assert committed_params()["train"]["lr"] == 2e-4
