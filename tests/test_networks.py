"""The noise-prediction networks: the seed's UNet and Ho et al.'s, their parameter counts and
structure against the published counts, shapes, shape validation, gradients, the time embedding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddpm import networks
from ddpm.networks import DDPMUNet, SeedUNet, parameter_count
from ddpm.networks.ddpm_unet import Upsample, _Interleave
from ddpm.networks.embedding import timestep_embedding
from ddpm.params import ParamsError, parse_params

PAPER_PARAMETERS = 35_746_307  # Ho et al.'s TF code and diffusers' google/ddpm-cifar10-32
SEED_PARAMETERS = 32_655_651   # the seed notebook printed "Model parameters: 32,655,651"
CIFAR = dict(image_size=32, in_channels=3)  # the networks' images in these tests
SEED = dict(channels=[96, 192, 384, 384], res_blocks=2, attention_resolutions=[16], heads=8,
            dropout=0.1, **CIFAR)
SMALL = dict(channels=[16, 32], res_blocks=1, attention_resolutions=[16], heads=2, dropout=0.0,
             **CIFAR)
SMALL_SEED = dict(SMALL, channels=[16, 32, 32], time_dim=16)


def small_unet(**overrides) -> DDPMUNet:
    return DDPMUNet(**{**SMALL, **overrides})


def small_network(arch: str, **overrides) -> torch.nn.Module:
    if arch == "seed":
        return SeedUNet(**{**SMALL_SEED, **overrides})
    return small_unet(**overrides)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add small noise to every parameter: the zero-initialised layers make a fresh net output 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return model


def inputs(batch: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x_t, t


n_parameters = parameter_count


# -- the seed's network ---------------------------------------------------------------------------

def test_the_seed_network_has_the_notebooks_parameter_count_part_by_part():
    """32,655,651 in all: blocks 25,831,584 (attention 148,224), stride-2 convs 2,986,944,
    transposed convs 3,834,528, output conv 2,595."""
    model = SeedUNet(**SEED, time_dim=64)
    blocks = [b for stage in (*model.encoder, model.bottleneck, *model.decoder) for b in stage]
    assert n_parameters(model) == SEED_PARAMETERS
    assert sum(map(n_parameters, blocks)) == 25_831_584
    assert sum(n_parameters(b.attn) for b in blocks if b.attn is not None) == 148_224
    assert n_parameters(model.down) == 2_986_944
    assert n_parameters(model.up) == 3_834_528
    assert n_parameters(model.conv_out) == 2_595


def test_the_seed_network_costs_9_56_gflop_per_image():
    """FlopCounterMode over one forward, attention through the math kernel: within 2%."""
    model = SeedUNet(**SEED, time_dim=64)
    x_t, t = inputs(1)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x_t, t)
    assert counter.get_total_flops() == pytest.approx(9.56e9, rel=0.02)


def test_the_seed_network_has_one_attention_layer_three_skips_and_no_residual_paths(monkeypatch):
    """One MultiheadAttention (the decoder's first block at 16x16); the decoder concatenates three
    skips (8, 16 and 32 px); and no block has a residual path: with its last layer zeroed
    (conv2, or the attention's output projection) a block outputs exactly zero."""
    model = SeedUNet(**SEED, time_dim=64).eval()
    attention = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(attention) == 1 and attention[0] is model.decoder[1][0].attn
    assert attention[0].num_heads == 8 and attention[0].embed_dim == 192

    concatenated, cat = [], torch.cat
    monkeypatch.setattr(torch, "cat", lambda ts, dim=0: concatenated.append(
        [tuple(t.shape) for t in ts]) or cat(ts, dim=dim))
    x_t, t = inputs(1)
    with torch.no_grad():
        model(x_t, t)
    skips = [shapes for shapes in concatenated if len(shapes[0]) == 4]  # not the [sin | cos]
    assert skips == [[(1, 384, 8, 8)] * 2, [(1, 192, 16, 16)] * 2, [(1, 96, 32, 32)] * 2]
    monkeypatch.undo()

    emb = timestep_embedding(t, 64)
    for block in [b for stage in (*model.encoder, model.bottleneck, *model.decoder) for b in stage]:
        last = block.attn.out_proj if block.attn is not None else block.conv2
        with torch.no_grad():
            last.weight.zero_(), last.bias.zero_()
            x = torch.randn(1, block.conv1.in_channels, 8, 8)
            assert torch.equal(block(x, emb), torch.zeros(1, block.conv1.out_channels, 8, 8))


def test_the_seed_network_is_the_default_and_the_paper_network_one_switch_away(base_params):
    """params.yaml builds the seed's network;
    the README's DDPM-paper overrides build Ho et al.'s."""
    import copy
    seed = networks.build(parse_params(base_params).model, (3, 32, 32))
    assert n_parameters(seed) == SEED_PARAMETERS
    raw = copy.deepcopy(base_params)
    raw["model"].update(arch="ddpm", channels=[128, 256, 256, 256], heads=1)
    model = networks.build(parse_params(raw).model, (3, 32, 32))
    assert isinstance(model, DDPMUNet) and n_parameters(model) == PAPER_PARAMETERS


@pytest.mark.parametrize("overrides, message", [
    (dict(attention_resolutions=[4]), "model.attention_resolutions: 4 is not a resolution where "
                                      "the seed network can attend ([32, 16, 8])"),
    (dict(channels=[96, 100, 384, 384]), "model.channels = [96, 100, 384, 384]: the seed "
                                          "network's GroupNorm has 8 groups"),
    (dict(channels=[96]), "model.channels = [96]: the seed network needs at least two levels"),
    (dict(heads=5), "model.heads = 5: must divide the width 192"),
    (dict(time_dim=63), "model.time_dim = 63: expected an even integer >= 4"),
])
def test_what_the_seed_network_cannot_honour_is_a_params_error(base_params, overrides, message):
    """check_params builds the network on the meta device: its constructor's own checks name the
    model.* key."""
    import copy
    raw = copy.deepcopy(base_params)
    raw["model"].update(overrides)
    with pytest.raises(ParamsError) as info:
        networks.checked_size(parse_params(raw).model, (3, 32, 32))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_network_too_large_to_train_is_a_params_error_with_its_size(base_params):
    """Built on the meta device, so counting 6.5 billion parameters allocates nothing."""
    import copy
    raw = copy.deepcopy(base_params)
    raw["model"]["channels"] = [4096] * 4
    with pytest.raises(ParamsError, match=r"^model\.\*: the seed network of these values has "
                                          r"6,464,143,363 parameters \(129 GB of weights"):
        networks.checked_size(parse_params(raw).model, (3, 32, 32))
    assert networks.checked_size(parse_params(base_params).model, (3, 32, 32)) == SEED_PARAMETERS


# -- both networks --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["seed", "ddpm"])
def test_both_networks_map_images_and_timesteps_to_an_image_shaped_prediction(arch):
    x_t, t = inputs(2)
    eps = perturbed(small_network(arch))(x_t, t)
    assert eps.shape == x_t.shape and eps.dtype == torch.float32
    assert torch.isfinite(eps).all() and eps.abs().sum() > 0


@pytest.mark.parametrize("arch", ["seed", "ddpm"])
def test_every_parameter_gets_a_finite_nonzero_gradient(arch):
    """No dead branch: one backward of a loss reaches every parameter (after leaving the
    zero initialisation, whose zeros would otherwise block most gradients)."""
    if arch == "seed":
        model = perturbed(small_network("seed", channels=[16, 32, 32], res_blocks=2,
                                        attention_resolutions=[32, 16]))
    else:
        model = perturbed(small_unet(channels=[16, 32, 32], res_blocks=2,
                                     attention_resolutions=[16, 8]))
    x_t, t = inputs(3)
    model(x_t, t).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["seed", "ddpm"])
def test_images_do_not_interact_across_the_batch_in_eval_mode(arch):
    """GroupNorm and attention act per image: an image's output does not depend on its batch."""
    model = perturbed(small_network(arch, dropout=0.1))
    model.eval()
    x_t, t = inputs(4)
    with torch.no_grad():
        batched = model(x_t, t)
        for i in range(4):
            torch.testing.assert_close(batched[i:i + 1], model(x_t[i:i + 1], t[i:i + 1]),
                                       rtol=0, atol=1e-5)


# -- Ho et al.'s network --------------------------------------------------------------------------

@pytest.mark.parametrize("channels, heads, expected", [
    ([128, 256, 256, 256], 1, PAPER_PARAMETERS),
    ([96, 192, 384, 384], 8, 54_681_795),  # the paper's layout at the seed's widths
])
def test_parameter_count_matches_the_paper_layout(channels, heads, expected):
    """The DDPM CIFAR-10 config has the original implementation's 35,746,307 parameters."""
    model = DDPMUNet(channels=channels, res_blocks=2, attention_resolutions=[16], heads=heads,
                     dropout=0.1, **CIFAR)
    assert n_parameters(model) == expected


@pytest.mark.parametrize("kwargs", [
    dict(),                                                           # two levels
    dict(channels=[8, 16, 16, 16], res_blocks=2, heads=1),            # the paper's four levels
    dict(channels=[24, 40], attention_resolutions=[32, 16], heads=8),  # GroupNorm: 8 groups
    dict(channels=[15, 33], heads=3),                                  # odd widths: 1 group
])
def test_forward_maps_images_and_timesteps_to_an_image_shaped_prediction(kwargs):
    """forward((B, 3, 32, 32) float, (B,) long) -> (B, 3, 32, 32) float, finite."""
    x_t, t = inputs(2)
    eps = perturbed(small_unet(**kwargs))(x_t, t)
    assert eps.shape == x_t.shape and eps.dtype == torch.float32
    assert torch.isfinite(eps).all()


def test_fresh_network_predicts_zero():
    """Ho et al. zero-initialise the output conv, so eps_theta = 0 before any training."""
    x_t, t = inputs(2)
    assert torch.equal(small_unet()(x_t, t), torch.zeros_like(x_t))


@pytest.mark.parametrize("kwargs, key", [
    (dict(attention_resolutions=[8]), "model.attention_resolutions"),  # levels are 32 and 16
    (dict(heads=3), "model.heads"),                                   # 3 divides neither 16 nor 32
    (dict(channels=[30, 60], attention_resolutions=[], heads=8), "model.heads"),  # middle attends
    (dict(channels=[8] * 7), "model.channels"),                       # 32 cannot halve 6 times
])
def test_impossible_shapes_fail_at_construction_naming_the_key(kwargs, key):
    """A UNet that cannot be built raises ArgumentError (a ValueError) whose message starts with
    the argument's name, which check_params turns into the model.* key."""
    with pytest.raises(networks.ArgumentError, match="^" + key.split(".")[1]):
        small_unet(**kwargs)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [(1, 1), (4, 4), (3, 5)])
def test_upsample_is_nearest_x2_then_the_3x3_convolution(size, layout):
    """Upsample computes the paper's layer (nearest x2, then a 3x3 conv with padding 1) by its
    sub-pixel equivalent: the same output and the same gradients for the input, weight and bias,
    in float64, and the output keeps the input's memory layout."""
    torch.manual_seed(0)
    layer = Upsample(6).double()
    x = torch.randn(2, 6, *size, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    reference = layer.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = layer(x)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-12)
    if min(size) > 1:
        assert got.is_contiguous(memory_format=layout)
    upstream = torch.randn_like(reference)
    wrt = (x, layer.conv.weight, layer.conv.bias)
    for g, r in zip(torch.autograd.grad(got, wrt, upstream),
                    torch.autograd.grad(reference, wrt, upstream)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_parity_interleave_backward_matches_finite_differences():
    """The hand-written backward of the parity interleave, against torch's numerical gradient
    (it also checks that the plane borders no output reads get a zero gradient)."""
    z = torch.randn(2, 2, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: _Interleave.apply(z, torch.contiguous_format), z)


@pytest.mark.parametrize("dim", [32, 64, 128, 33])
def test_timestep_embedding_is_the_original_closed_form(dim):
    """emb = [sin(t f_i) | cos(t f_i)], f_i = exp(-ln(10000) i / (half - 1)), half = dim // 2,
    zero-padded to an odd dim (Ho et al.'s get_timestep_embedding), computed here in float64."""
    t = np.array([0, 1, 17, 500, 999])
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
    args = t[:, None] * freqs[None, :]
    expected = np.concatenate([np.sin(args), np.cos(args), np.zeros((len(t), dim % 2))], axis=1)
    got = timestep_embedding(torch.tensor(t), dim)
    assert got.shape == (len(t), dim) and got.dtype == torch.float32
    # float32 rounding of t * f_i at t ~ 1000 moves the angle by up to ~3e-5 rad
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=1e-4)
