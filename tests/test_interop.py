"""ddpm.interop against diffusers itself: the paper's network as diffusers' UNet2DModel and as this
project's DDPMUNet gives the same eps from the same weights, in both directions (to 1e-5 in
float32 on the CPU); an export is a DDPMPipeline folder diffusers loads, with this pipeline's
betas; this project's own format round-trips any network bitwise; and every file that cannot be
read, or model that cannot be held, is one line naming the file, the key and the value."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ddpm import interop, networks
from ddpm.diffusion import Schedule, ddpm_steps, denoise
from ddpm.generate import load_ema_model
from ddpm.interop import InteropError, export, import_diffusers, read_exported
from ddpm.networks import DDPMUNet
from ddpm.networks.ddpm_unet import Downsample
from ddpm.params import (DiffusionParams, ModelParams, parse_params, recorded_diffusion,
                         run_config)
from fakes import ROOT

TOLERANCE = 1e-5
PAPER_PARAMETERS = 35_746_307
# google/ddpm-cifar10-32's unet config.json (its keys; diffusers' defaults for the rest)
GOOGLE = {"_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
          "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
          "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
          "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
          "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
          "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
          "time_embedding_type": "positional",
          "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
GOOGLE_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
                    "trained_betas": None, "variance_type": "fixed_large"}
# Reduced layouts, a fraction of a second each: attention in the middle, at every level with two
# heads, and one-channel images with three blocks per level.
SMALL = dict(GOOGLE, sample_size=16, block_out_channels=[32, 64, 64], layers_per_block=1,
             down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
LAYOUTS = {
    "attention in the middle": SMALL,
    "two heads everywhere": dict(SMALL, block_out_channels=[64, 64], attention_head_dim=32,
                                 down_block_types=["AttnDownBlock2D", "AttnDownBlock2D"],
                                 up_block_types=["AttnUpBlock2D", "AttnUpBlock2D"]),
    "grey images, deeper": dict(SMALL, sample_size=8, in_channels=1, out_channels=1,
                                layers_per_block=3, block_out_channels=[32, 32], dropout=0.1,
                                down_block_types=["DownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "UpBlock2D"]),
}
SMALL_MODEL = dict(arch="ddpm", channels=[32, 64, 64], res_blocks=1, attention_resolutions=[8],
                   heads=1, dropout=0.1, time_dim=64)
SMALL_SEED = dict(arch="seed", channels=[16, 32, 32], res_blocks=1, attention_resolutions=[16],
                  heads=2, dropout=0.1, time_dim=16)


def needs_diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is not installed here")


def diffusers_unet(config: dict, seed: int = 0):
    """A randomly initialised UNet2DModel (diffusers initialises no layer to zero)."""
    torch.manual_seed(seed)
    return needs_diffusers().UNet2DModel(**{k: v for k, v in config.items()
                                            if not k.startswith("_")}).eval()


def inputs(shape, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=gen), torch.randint(0, 1000, (batch,),
                                                                    generator=gen)


def theirs_and_ours(unet, net, shape, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x_t, t = inputs(shape, batch)
    with torch.no_grad():
        return unet(x_t, t).sample, net(x_t, t)


def network_of(state: dict) -> torch.nn.Module:
    """The network an EMA-file-shaped dict describes, with its weights, in eval mode."""
    model = ModelParams(**{"conditional": False, **{
        k: tuple(v) if isinstance(v, list) else v for k, v in state["config"]["model"].items()}})
    net = networks.build(model, state["image_shape"])
    net.load_state_dict(state["ema"])
    return net.eval()


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.abs().max() > 0.1  # a real output, not zeros
    return (a - b).abs().max().item()


def params_with(base_params: dict, model: dict | None = None, **diffusion) -> object:
    """params.yaml as committed, with the ddpm preset's model.* (or `model`) and `diffusion`."""
    raw = copy.deepcopy(base_params)
    preset = yaml.safe_load((ROOT / "presets" / "ddpm.yaml").read_text())
    raw["model"].update(model or preset["model"])
    raw["diffusion"].update(diffusion)
    raw["sample"]["steps"] = raw["diffusion"]["timesteps"]  # at most T
    return parse_params(raw)


def ema_state(params, shape=(3, 16, 16), seed: int = 0) -> dict:
    """An EMA file's dict (as train writes it) of a freshly built network whose every parameter,
    the zero-initialised output layers included, is perturbed: a test of it can fail."""
    torch.manual_seed(seed)
    net = networks.build(params.model, shape)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {"ema": net.state_dict(), "config": run_config(params), "image_shape": list(shape),
            "epochs": 3, "steps": 30}


@pytest.fixture(scope="module")
def google(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A DDPMPipeline folder of a random UNet2DModel in google/ddpm-cifar10-32's configuration
    and its scheduler, as DDPMPipeline.save_pretrained writes it; and that UNet."""
    diffusers = needs_diffusers()
    unet = diffusers_unet(GOOGLE)
    folder = tmp_path_factory.mktemp("google") / "ddpm-cifar10-32"
    scheduler = diffusers.DDPMScheduler(**{k: v for k, v in GOOGLE_SCHEDULER.items()
                                           if not k.startswith("_")})
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder, unet


@pytest.fixture
def small_export(tmp_path, base_params) -> Path:
    """An export (a DDPMPipeline folder) of a small ddpm network, made without diffusers."""
    state = ema_state(params_with(base_params, SMALL_MODEL))
    export(state, tmp_path / "small")
    return tmp_path / "small"


# -- diffusers -> this project -------------------------------------------------------------------

def test_the_papers_network_from_diffusers_gives_the_same_eps_here(google, base_params):
    """google/ddpm-cifar10-32's layout, full size: read as the ddpm preset's network, 35,746,307
    parameters, with the scheduler's settings; one forward of a batch of 2 agrees to 1e-5."""
    folder, unet = google
    state = read_exported(folder)
    preset = params_with(base_params)
    model = state["config"]["model"]
    assert {k: model[k] for k in ("arch", "channels", "res_blocks", "attention_resolutions",
                                  "heads")} == {
        "arch": "ddpm", "channels": list(preset.model.channels), "res_blocks": 2,
        "attention_resolutions": [16], "heads": 1}
    assert recorded_diffusion(state["config"]["diffusion"]) == base_params["diffusion"]
    assert state["sample"] == {"variance": "beta", "clip_denoised": True}
    assert state["image_shape"] == [3, 32, 32]
    net = network_of(state)
    assert isinstance(net, DDPMUNet) and networks.parameter_count(net) == PAPER_PARAMETERS
    assert max_difference(*theirs_and_ours(unet, net, (3, 32, 32))) <= TOLERANCE


def test_the_hub_layout_with_the_files_at_the_root_reads_the_same(google, tmp_path):
    """The hub repositories keep the UNet and the scheduler config at the root beside
    model_index.json (diffusers' loader looks there when unet/ is absent); a bare UNet folder
    has no scheduler: DDPMScheduler's defaults, and no sampler settings."""
    folder, _ = google
    root = tmp_path / "hub"
    root.mkdir()
    for source in ("model_index.json", "unet/config.json", f"unet/{interop.UNET_WEIGHTS}",
                   "scheduler/scheduler_config.json"):
        os.link(folder / source, root / Path(source).name)
    pipeline, hub, bare = (read_exported(f) for f in (folder, root, folder / "unet"))
    assert hub["config"] == pipeline["config"] and hub["sample"] == pipeline["sample"]
    assert "sample" not in bare and bare["config"]["diffusion"] == {
        "timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "schedule": "linear"}
    for state in (hub, bare):
        assert state["ema"].keys() == pipeline["ema"].keys()
        assert all(torch.equal(state["ema"][k], v) for k, v in pipeline["ema"].items())


def test_an_imported_file_is_what_the_sample_stage_loads(google, base_params, tmp_path):
    """import_diffusers writes an EMA file that the sample stage's loader accepts with the ddpm
    preset's model.*, and its network gives diffusers' eps."""
    folder, unet = google
    saved = import_diffusers(folder, tmp_path / "models" / "ema.pt")
    assert saved["source"] == str(folder.resolve())
    model, shape = load_ema_model(tmp_path / "models" / "ema.pt", params_with(base_params),
                                  torch.device("cpu"))
    assert shape == (3, 32, 32)
    assert max_difference(*theirs_and_ours(unet, model, shape)) <= TOLERANCE


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reduced_layouts_agree_with_diffusers_both_ways(layout, tmp_path):
    """diffusers -> read_exported -> our network: the same eps; exported back, diffusers loads
    exactly the tensors it started from."""
    diffusers = needs_diffusers()
    config = LAYOUTS[layout]
    unet = diffusers_unet(config)
    unet.save_pretrained(tmp_path / "unet")
    state = read_exported(tmp_path / "unet")
    shape = tuple(state["image_shape"])
    assert max_difference(*theirs_and_ours(unet, network_of(state), shape)) <= TOLERANCE
    export(state, tmp_path / "back")
    again = diffusers.UNet2DModel.from_pretrained(tmp_path / "back" / "unet")
    original = unet.state_dict()
    assert again.state_dict().keys() == original.keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in original.items())


def test_a_wrong_padding_would_exceed_the_tolerance(monkeypatch, tmp_path):
    """The comparison can fail: with the symmetric padding DDPMUNet's Downsample had before, the
    eps differ by far more than the tolerance."""
    unet = diffusers_unet(SMALL)
    unet.save_pretrained(tmp_path / "unet")
    net = network_of(read_exported(tmp_path / "unet"))
    monkeypatch.setattr(Downsample, "forward", lambda self, x, emb=None: torch.nn.functional
                        .conv2d(x, self.conv.weight, self.conv.bias, stride=2, padding=1))
    assert max_difference(*theirs_and_ours(unet, net, (3, 16, 16))) > 1000 * TOLERANCE


def test_diffusers_legacy_attention_names_are_read(tmp_path):
    """Files saved before diffusers 0.14 name the attention's layers query, key, value and
    proj_attn; diffusers' loader renames them, and so does read_exported."""
    unet = diffusers_unet(SMALL)
    unet.save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / interop.UNET_WEIGHTS
    modern = read_exported(tmp_path / "unet")
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
              .replace("to_out.0", "proj_attn"): v for k, v in load_file(weights).items()}
    assert any(".query." in k for k in legacy)
    save_file(legacy, weights)
    state = read_exported(tmp_path / "unet")
    assert all(torch.equal(state["ema"][k], v) for k, v in modern["ema"].items())


def test_the_defaults_assumed_for_missing_keys_are_diffusers_own():
    """A config.json that leaves a key out means diffusers' constructor default (google's
    configs predate most keys): interop's tables are the installed diffusers' defaults."""
    diffusers = needs_diffusers()
    for cls, table in ((diffusers.UNet2DModel, interop.UNET_DEFAULTS),
                       (diffusers.DDPMScheduler, interop.SCHEDULER_DEFAULTS)):
        defaults = {name: list(p.default) if isinstance(p.default, tuple) else p.default
                    for name, p in inspect.signature(cls.__init__).parameters.items()
                    if name != "self"}
        assert table == defaults, cls.__name__


# -- this project -> diffusers -------------------------------------------------------------------

@pytest.mark.parametrize("diffusion, sample, scheduler", [
    ({}, None, {"variance_type": "fixed_large", "clip_sample": True}),  # Ho et al.'s sampler
    ({}, {"variance": "beta_tilde", "clip_denoised": False},
     {"variance_type": "fixed_small", "clip_sample": False}),
    ({"schedule": "cosine"}, {"variance": "beta", "clip_denoised": True},
     {"variance_type": "fixed_large", "beta_schedule": "squaredcos_cap_v2"}),
    ({"timesteps": 400, "beta_start": 2e-4, "beta_end": 0.04}, None,
     {"beta_start": 2e-4, "beta_end": 0.04, "beta_schedule": "linear"}),
])
def test_an_export_is_a_ddpm_pipeline_that_diffusers_loads(base_params, tmp_path, diffusion,
                                                            sample, scheduler):
    """Our network (random, every layer perturbed) -> export -> DDPMPipeline.from_pretrained:
    its UNet gives our eps, its scheduler has our betas and the sampler settings."""
    diffusers = needs_diffusers()
    params = params_with(base_params, SMALL_MODEL, **diffusion)
    state = ema_state(params)
    if sample is not None:
        state["sample"] = sample
    export(state, tmp_path / "out")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    ours = network_of(state)
    assert max_difference(*theirs_and_ours(pipe.unet.eval(), ours, (3, 16, 16))) <= TOLERANCE
    ddpm_scheduler = pipe.scheduler
    assert isinstance(ddpm_scheduler, diffusers.DDPMScheduler)
    assert {k: ddpm_scheduler.config[k] for k in scheduler} == scheduler
    assert ddpm_scheduler.config.num_train_timesteps == params.diffusion.timesteps
    # diffusers computes linear betas in float32, this pipeline in float64: equal to rounding
    torch.testing.assert_close(ddpm_scheduler.betas, Schedule(**vars_of(params.diffusion)).betas,
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("prediction, theirs", [("v", "v_prediction"), ("x0", "sample")])
def test_a_v_or_x0_model_exports_its_prediction_type_and_diffusers_converts_it_as_we_do(
        base_params, tmp_path, prediction, theirs):
    """diffusion.prediction travels as diffusers' prediction_type and back; for the same network
    output, diffusers' DDPMScheduler.step (its own conversion) and ours (diffusion.denoise)
    recover the same x0, and DDPM steps to the same mean at t = 0 (no noise there)."""
    diffusers = needs_diffusers()
    params = params_with(base_params, SMALL_MODEL, prediction=prediction)
    state = ema_state(params)
    export(state, tmp_path / "out")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    assert pipe.scheduler.config.prediction_type == theirs
    back = read_exported(tmp_path / "out")
    assert back["config"]["diffusion"]["prediction"] == prediction
    sched, net = Schedule(**dataclasses.asdict(params.diffusion)), network_of(state)
    pipe.scheduler.config.clip_sample = False
    x_t, _ = inputs((3, 16, 16))
    for t in (0, 10, 500, 999):
        t_batch = torch.full((2,), t)
        with torch.no_grad():
            y = net(x_t, t_batch)
            eps, x0 = denoise(net, sched, x_t, t, sched.alpha_bar64[t].item())
        out = pipe.scheduler.step(y, t, x_t)
        torch.testing.assert_close(out.pred_original_sample, x0, rtol=1e-5, atol=1e-5)
        if t == 0:  # our DDPM sampler's last step (eq. 11, no noise added)
            with torch.no_grad():
                mean = ddpm_steps(net, sched, x_t, [0], randn=None)
            torch.testing.assert_close(out.prev_sample, mean, rtol=1e-5, atol=1e-5)


def vars_of(diffusion: DiffusionParams) -> dict:
    return {k: getattr(diffusion, k) for k in ("timesteps", "beta_start", "beta_end", "schedule")}


def test_ours_to_diffusers_and_back_is_bitwise(base_params, tmp_path):
    params = params_with(base_params, SMALL_MODEL)
    state = ema_state(params)
    export(state, tmp_path / "out")
    back = read_exported(tmp_path / "out")
    assert list(back["ema"]) == list(state["ema"])
    assert all(torch.equal(back["ema"][k], v) for k, v in state["ema"].items())
    # time_dim is the seed's setting alone; the ddpm network's embedding is channels[0] wide
    assert back["config"]["model"] == dict(run_config(params)["model"], time_dim=32)
    assert back["config"]["diffusion"] == run_config(params)["diffusion"]
    assert back["sample"] == interop.HO_SAMPLING


# -- this project's own format ---------------------------------------------------------------------

@pytest.mark.parametrize("model", [
    SMALL_SEED,
    dict(SMALL_MODEL, channels=[16, 32], attention_resolutions=[16]),  # GroupNorms of 16
                                                # groups: diffusers has no such UNet
])
def test_networks_diffusers_cannot_hold_round_trip_bitwise_in_this_projects_format(
        base_params, tmp_path, model):
    params = params_with(base_params, model)
    state = ema_state(params, shape=(3, 32, 32))
    state["sample"] = {"variance": "beta_tilde", "clip_denoised": True}
    assert interop.diffusers_refusal(params.model, (3, 32, 32)) is not None
    export(state, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                    "model.safetensors"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["format"], config["version"]) == (interop.FORMAT, interop.VERSION)
    back = read_exported(tmp_path / "out")
    assert back["config"] == run_config(params) and back["sample"] == state["sample"]
    assert (back["image_shape"], back["epochs"], back["steps"]) == ([3, 32, 32], 3, 30)
    assert list(back["ema"]) == list(state["ema"])
    assert all(torch.equal(back["ema"][k], v) for k, v in state["ema"].items())
    x_t, t = inputs((3, 32, 32))
    with torch.no_grad():
        assert torch.equal(network_of(back)(x_t, t), network_of(state)(x_t, t))


def test_export_replaces_a_previous_export_but_nothing_else(base_params, tmp_path):
    state = ema_state(params_with(base_params, SMALL_MODEL))
    out = tmp_path / "out"
    export(state, out)
    export(dict(state, sample={"variance": "beta_tilde", "clip_denoised": False}), out)
    assert read_exported(out)["sample"]["variance"] == "beta_tilde"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InteropError) as info:
        export(state, out)
    assert one_line(info) == (f"{out}: holds notes.txt, which no export writes: export replaces "
                              "the folder whole, so name a new or empty folder or a previous "
                              "export")
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


# -- refusals --------------------------------------------------------------------------------------

def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and info.type is InteropError
    return message


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("file, changes, message", [
    ("unet/config.json", {"flip_sin_to_cos": True},
     "flip_sin_to_cos = True: this project's ddpm network computes false only"),
    ("unet/config.json", {"downsample_padding": 1},
     "downsample_padding = 1: this project's ddpm network computes 0 only"),
    ("unet/config.json", {"norm_num_groups": 16},
     "norm_num_groups = 16: this project's ddpm network computes 32 only"),
    ("unet/config.json", {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"]},
     "down_block_types = ['DownBlock2D', 'CrossAttnDownBlock2D',"),
    ("unet/config.json", {"up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"]},
     'up_block_types = [\'UpBlock2D\', \'UpBlock2D\', \'UpBlock2D\']: ["UpBlock2D", '
     '"AttnUpBlock2D", "UpBlock2D"], down_block_types reversed'),
    ("unet/config.json", {"attention_head_dim": 48},
     "attention_head_dim = 48: null, or a width giving every attention layer"),
    ("unet/config.json", {"out_channels": 6}, "out_channels = 6: in_channels (3)"),
    ("unet/config.json", {"block_out_channels": [32, 64, 4096 * 32]},
     "block_out_channels, as this project's model.channels[2] = 131072: expected an integer"),
    ("unet/config.json", {"layers_per_block": 17},
     "layers_per_block, as this project's model.res_blocks = 17: expected an integer in [1, 16]"),
    ("unet/config.json", {"sample_size": 18},
     "model.channels: 3 levels halve the image 2 times, so the image size must be divisible"),
    ("unet/config.json", {"cross_attention_dim": 768},
     "cross_attention_dim = 768: not a UNet2DModel setting of diffusers 0.42.1"),
    ("unet/config.json", {"_class_name": "UNet2DConditionModel"},
     "_class_name = 'UNet2DConditionModel': only diffusers' UNet2DModel"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "scaled_linear"},
     "beta_schedule = 'scaled_linear': linear | squaredcos_cap_v2"),
    ("scheduler/scheduler_config.json", {"variance_type": "learned_range"},
     "variance_type = 'learned_range': fixed_large | fixed_small"),
    ("scheduler/scheduler_config.json", {"prediction_type": "flow_prediction"},
     "prediction_type = 'flow_prediction': epsilon | v_prediction | sample (diffusion.prediction "
     "eps | v | x0)"),
    ("scheduler/scheduler_config.json", {"trained_betas": [0.1, 0.2]},
     "trained_betas = [0.1, 0.2]: this pipeline's diffusion has null only"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 0},
     "num_train_timesteps, as this project's diffusion.timesteps = 0: expected an integer"),
    ("scheduler/scheduler_config.json", {"beta_start": 0.5, "beta_end": 0.1},
     "diffusion.beta_end = 0.1: below diffusion.beta_start = 0.5"),
    ("scheduler/scheduler_config.json", {"_class_name": "EulerDiscreteScheduler"},
     "_class_name = 'EulerDiscreteScheduler': only DDPMScheduler's settings are read"),
    ("model_index.json", {"unet": ["diffusers", "UNet2DConditionModel"]},
     "unet = ['diffusers', 'UNet2DConditionModel']: only diffusers' UNet2DModel"),
])
def test_a_setting_this_network_does_not_compute_is_one_line(small_export, file, changes,
                                                             message):
    edit_json(small_export / file, **changes)
    with pytest.raises(InteropError) as info:
        read_exported(small_export)
    assert one_line(info).startswith(f"{small_export / file}: ") and message in str(info.value)


def rewrite_weights(folder: Path, change) -> Path:
    path = folder / "unet" / interop.UNET_WEIGHTS
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda w: w.pop("conv_in.weight"), "no tensor conv_in.weight for this network"),
    (lambda w: w.update(extra=torch.zeros(1)), "extra is not a tensor of this network"),
    (lambda w: w.update({"conv_in.weight": torch.zeros(32, 3, 5, 5)}),
     "conv_in.weight is F32 of shape [32, 3, 5, 5]; expected float of shape [32, 3, 3, 3]"),
    (lambda w: w.update({"conv_in.bias": torch.zeros(32, dtype=torch.int64)}),
     "conv_in.bias is I64 of shape [32]; expected float of shape [32]"),
    (lambda w: w["mid_block.attentions.0.to_k.weight"].__setitem__((0, 0), float("nan")),
     "mid_block.attentions.0.to_k.weight holds NaN or infinite values"),
    (lambda w: w.update({"mid_block.attentions.0.query.weight":
                         w["mid_block.attentions.0.to_q.weight"].clone()}),
     "both mid_block.attentions.0.query.weight and mid_block.attentions.0.to_q.weight hold"),
])
def test_weights_that_do_not_fit_are_one_line(small_export, change, message):
    path = rewrite_weights(small_export, change)
    with pytest.raises(InteropError) as info:
        read_exported(small_export)
    assert one_line(info).startswith(f"{path}: ") and message in str(info.value)


def test_a_pickle_is_never_read(small_export):
    """A .bin beside config.json (the older hub layout) is refused unopened: unpickling this one
    would create a file."""
    marker = small_export / "unpickled"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    (small_export / "unet" / interop.UNET_WEIGHTS).unlink()
    (small_export / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InteropError) as info:
        read_exported(small_export)
    assert "diffusion_pytorch_model.bin is there, but only safetensors is read" in one_line(info)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"{" + b" " * interop.MAX_JSON_BYTES + b"}", "over 1,048,576 bytes; a config is a few KB"),
    (b'{"sample_size": NaN}', "not valid JSON (NaN is not a number JSON allows)"),
    (b"[1, 2]", "a JSON list, not an object of settings"),
    (b"[" * 100_000, "not valid JSON"),
    (b"\xff\xfe", "not a text file"),
])
def test_a_config_that_is_not_a_small_json_object_is_one_line(small_export, content, message):
    path = small_export / "unet" / "config.json"
    path.write_bytes(content)
    with pytest.raises(InteropError) as info:
        read_exported(small_export)
    assert one_line(info).startswith(f"{path}: ") and message in str(info.value)


def test_a_file_that_is_not_safetensors_is_one_line(small_export):
    path = small_export / "unet" / interop.UNET_WEIGHTS
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(InteropError) as info:
        read_exported(small_export)
    assert one_line(info).startswith(f"{path}: not a readable safetensors file (")


def test_a_folder_of_neither_format_is_one_line(tmp_path):
    with pytest.raises(InteropError) as info:
        read_exported(tmp_path)
    assert one_line(info).startswith(f"{tmp_path}: neither a diffusers folder")
    with pytest.raises(InteropError) as info:
        read_exported(tmp_path / "absent")
    assert one_line(info).startswith(f"{tmp_path / 'absent'}: not a folder")


def test_this_projects_format_of_another_version_is_one_line(base_params, tmp_path):
    export(ema_state(params_with(base_params, SMALL_SEED)), tmp_path / "out")
    edit_json(tmp_path / "out" / "config.json", version=2)
    with pytest.raises(InteropError) as info:
        read_exported(tmp_path / "out")
    assert one_line(info).endswith("version 2: not this project's export ('ddpm-cifar10 "
                                   "export' version 1)")


def test_a_state_without_usable_weights_is_not_exported(base_params, tmp_path):
    state = ema_state(params_with(base_params, SMALL_MODEL))
    bad = dict(state, ema={**state["ema"], "conv_in.bias": torch.full((32,), float("inf"))})
    for broken, message in ((bad, "conv_in.bias holds NaN or infinite values"),
                            (dict(state, config={}), "model = None: expected a mapping"),
                            (dict(state, ema=None), "no 'ema' state_dict in it")):
        with pytest.raises(InteropError) as info:
            export(broken, tmp_path / "out")
        assert one_line(info).startswith("the model to export: ") and message in str(info.value)
    assert not (tmp_path / "out").exists()
