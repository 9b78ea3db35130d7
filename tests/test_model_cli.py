"""`python -m ddpm sample`: images from a model file alone (no params.yaml), the network, diffusion
and image size read from the file, the very images the sample stage draws from it."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddpm import checkpoint, networks
from ddpm.params import parse_params, run_config
from fakes import ROOT, python_m_ddpm

SAMPLING = ["--num-images", "5", "--batch-size", "2", "--sampler", "ddim", "--steps", "4",
            "--precision", "fp32", "--device", "cpu"]


def perturbed(params, shape, seed: int = 0) -> dict:
    """A network's state_dict with every weight moved off its initialisation (the zero-initialised
    output layers would make every image the same)."""
    torch.manual_seed(seed)
    model = networks.build(params.model, shape)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.state_dict()


def pngs(folder, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(n)])


@pytest.mark.parametrize("arch", ["seed", "ddpm"])
def test_it_draws_the_sample_stages_images_from_the_file_alone(tiny, tmp_path, arch):
    """Same file, seed and sample settings: byte-identical PNGs to stages/sample.py's, though the
    command reads no params.yaml (it runs in a folder without one)."""
    raw = yaml.safe_load(yaml.safe_dump(tiny))
    raw["model"]["arch"] = arch
    raw["sample"].update(num_images=5, batch_size=2, sampler="ddim", steps=4, eta=0.0)
    raw["train"]["precision"] = "fp32"
    params = parse_params(raw)
    stage, alone = tmp_path / "stage", tmp_path / "alone"
    stage.mkdir(), alone.mkdir()
    checkpoint.save({"ema": perturbed(params, (3, 32, 32)), "config": run_config(params),
                     "image_shape": [3, 32, 32]}, stage / "ema.pt")
    (stage / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, str(ROOT / "stages/sample.py"), "--ema", "ema.pt",
                           "--out", "samples", "--metrics", "m.json", "--report", "r.json",
                           "--grid", "grid.png"], cwd=stage, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    done = python_m_ddpm(alone, "sample", stage / "ema.pt", "--out", "samples", "--grid",
                         "grid.png", *SAMPLING)
    assert done.returncode == 0, done.stderr
    assert "5 images of 32 x 32" in done.stderr.splitlines()[-1]
    assert pngs(stage / "samples", 5).std() > 10  # images, not a constant
    assert np.array_equal(pngs(stage / "samples", 5), pngs(alone / "samples", 5))
    assert sorted(p.name for p in (alone / "samples").iterdir()) == [f"{i}.png" for i in range(5)]
    assert (Image.open(alone / "grid.png").tobytes() == Image.open(stage / "grid.png").tobytes())


def test_a_checkpoint_gives_its_ema_or_raw_weights_at_its_own_image_size(tiny, tmp_path):
    """A training checkpoint holds both weight sets; a 16 px run's images are 16 px."""
    params = parse_params(tiny)
    ckpt = {"model": perturbed(params, (3, 16, 16), seed=1),
            "ema": perturbed(params, (3, 16, 16), seed=2), "config": run_config(params),
            "image_shape": [3, 16, 16], "progress": {"step": 3}}
    checkpoint.save(ckpt, tmp_path / "last.pt")
    drawn = {}
    for weights in ("ema", "model"):
        done = python_m_ddpm(tmp_path, "sample", "last.pt", "--out", weights, "--weights", weights,
                             *SAMPLING)
        assert done.returncode == 0, done.stderr
        drawn[weights] = pngs(tmp_path / weights, 5)
    assert drawn["ema"].shape == (5, 16, 16, 3)
    assert not np.array_equal(drawn["ema"], drawn["model"])


def test_help_is_the_documentation_and_the_readme_shows_it():
    done = python_m_ddpm(ROOT, "sample", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--out", "--grid", "--num-images", "--sampler", "--steps", "--eta",
                   "--variance", "--clip-denoised", "--seed", "--batch-size", "--weights",
                   "--device", "--precision", "dpm-solver++"):
        assert option in done.stdout, option
    readme = (ROOT / "README.md").read_text()
    assert any(line.strip().startswith("python -m ddpm sample models/ema.pt")
               for line in readme.splitlines())


@pytest.mark.parametrize("args, code, says", [
    (["sample", "missing.pt", "--out", "x"], 1, "missing.pt: no model file here"),
    (["sample", "ema.pt"], 2, "nothing to write: give --out DIR, --grid PNG or both"),
    (["sample", "ema.pt", "--out", "x", "--steps", "0"], 2, "--steps = 0: expected an integer"),
    (["sample", "ema.pt", "--out", "x", "--steps", "41"], 2,
     "--steps 41: at most the model's diffusion.timesteps = 40"),
    (["sample", "ema.pt", "--out", "x", "--num-images", "0"], 2, "--num-images = 0: expected"),
    (["sample", "ema.pt", "--out", "x", "--weights", "model"], 1,
     "ema.pt: no 'model' weights in it (it holds: ema"),
    (["sample", "noconfig.pt", "--out", "x"], 1,
     "noconfig.pt: its recorded config does not say how to build the network (model = None"),
    (["sample", "nan.pt", "--out", "x"], 1, "nan.pt: its ema weights hold NaN or infinite"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, args, code, says):
    params = parse_params(tiny)  # 40 timesteps
    weights = perturbed(params, (3, 32, 32))
    checkpoint.save({"ema": weights, "config": run_config(params)}, tmp_path / "ema.pt")
    checkpoint.save({"ema": weights}, tmp_path / "noconfig.pt")
    nan = {k: v.clone() for k, v in weights.items()}
    next(v for v in nan.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    checkpoint.save({"ema": nan, "config": run_config(params)}, tmp_path / "nan.pt")
    done = python_m_ddpm(tmp_path, *args)
    assert done.returncode == code, done.stderr
    assert done.stderr.startswith(f"error: {says}") and len(done.stderr.splitlines()) == 1, \
        done.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch, files", [
    ("seed", ["config.json", "model.safetensors"]),
    ("ddpm", ["model_index.json", "scheduler", "unet"]),
])
def test_an_export_folder_draws_what_its_model_file_draws(tiny, tmp_path, arch, files):
    """`export` then `sample` of the folder: the seed network in this project's format, the
    ddpm network as a diffusers pipeline; the same weights, so the same images byte for byte."""
    raw = yaml.safe_load(yaml.safe_dump(tiny))
    raw["model"].update(arch=arch, channels=[32, 32, 64], heads=1)  # diffusers: widths of 32 x k
    params = parse_params(raw)
    checkpoint.save({"ema": perturbed(params, (3, 16, 16)), "config": run_config(params),
                     "image_shape": [3, 16, 16]}, tmp_path / "ema.pt")
    done = python_m_ddpm(tmp_path, "export", "ema.pt", "exported")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == files
    for source in ("ema.pt", "exported"):  # (an export's scheduler clips x0 unless told: Ho's)
        done = python_m_ddpm(tmp_path, "sample", source, "--out", f"from_{source}", *SAMPLING,
                             "--no-clip-denoised")
        assert done.returncode == 0, done.stderr
    assert np.array_equal(pngs(tmp_path / "from_ema.pt", 5), pngs(tmp_path / "from_exported", 5))


def test_an_imported_diffusers_unet_samples_with_its_schedulers_settings(tmp_path):
    """A diffusers UNet2DModel + DDPMScheduler folder (as google/ddpm-cifar10-32, small), imported
    by the command: sampled with the scheduler's clip_sample unless told otherwise."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=40, clip_sample=True,
                                        variance_type="fixed_large")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "hub")
    done = python_m_ddpm(tmp_path, "import-diffusers", "hub", "imported.pt")
    assert done.returncode == 0, done.stderr
    state = checkpoint.load(tmp_path / "imported.pt")
    assert state["sample"] == {"variance": "beta", "clip_denoised": True}
    assert state["config"]["model"]["arch"] == "ddpm" and state["image_shape"] == [3, 16, 16]
    for flag in ("--clip-denoised", "--no-clip-denoised"):
        done = python_m_ddpm(tmp_path, "sample", "imported.pt", "--out", flag.strip("-"),
                             "--sampler", "ddpm", "--num-images", "2", "--precision", "fp32", flag)
        assert done.returncode == 0, done.stderr
        assert "(ddpm, 40 steps, fp32)" in done.stderr.splitlines()[-1]
    # the scheduler's clip_sample is the default: the same images as --clip-denoised
    done = python_m_ddpm(tmp_path, "sample", "imported.pt", "--out", "default", "--sampler",
                         "ddpm", "--num-images", "2", "--precision", "fp32")
    assert np.array_equal(pngs(tmp_path / "default", 2), pngs(tmp_path / "clip-denoised", 2))
    assert not np.array_equal(pngs(tmp_path / "default", 2), pngs(tmp_path / "no-clip-denoised", 2))


def test_every_python_m_ddpm_command_of_the_docs_parses():
    """The commands the README and docs/interop.md show, as written (a backslash joining lines),
    are accepted by the command's own parser."""
    import re
    import shlex

    from ddpm.__main__ import parser
    commands = []
    for name in ("README.md", "docs/interop.md"):
        text = re.sub(r"\\\n\s*", " ", (ROOT / name).read_text())
        commands += [line.strip().split("  #")[0] for line in text.splitlines()
                     if line.strip().startswith("python -m ddpm ")]
    assert {"sample", "export", "import-diffusers", "params"} <= {c.split()[3] for c in commands}
    for command in commands:
        words = shlex.split(command)[3:]
        if "--help" not in words:
            parser().parse_args(words)  # SystemExit(2) on a wrong option
