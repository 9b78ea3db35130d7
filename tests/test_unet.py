"""The noise-prediction UNet: parameter counts, shapes, shape validation, gradients, embedding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm.params import ParamsError
from ddpm.unet import UNet, Upsample, _Interleave, timestep_embedding

PAPER_PARAMETERS = 35_746_307  # Ho et al.'s TF code and diffusers' google/ddpm-cifar10-32
SEED_PARAMETERS = 54_681_795   # params.yaml's defaults (the seed notebook), same layout


def small_unet(**overrides) -> UNet:
    kwargs = dict(channels=[16, 32], res_blocks=1, attention_resolutions=[16], heads=2, dropout=0.0)
    return UNet(**{**kwargs, **overrides})


def perturbed(model: UNet, seed: int = 0) -> UNet:
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


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("channels, heads, expected", [
    ([128, 256, 256, 256], 1, PAPER_PARAMETERS),
    ([96, 192, 384, 384], 8, SEED_PARAMETERS),
])
def test_parameter_count_matches_the_paper_layout(channels, heads, expected):
    """The DDPM CIFAR-10 config has the original implementation's 35,746,307 parameters."""
    model = UNet(channels=channels, res_blocks=2, attention_resolutions=[16], heads=heads,
                 dropout=0.1)
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
    """A UNet that cannot be built raises ParamsError (a ValueError) whose message names the key."""
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        small_unet(**kwargs)


def test_every_parameter_gets_a_finite_nonzero_gradient():
    """No dead branch: one backward of a loss reaches every parameter (after leaving the
    zero initialisation, whose zeros would otherwise block most gradients)."""
    model = perturbed(small_unet(channels=[16, 32, 32], res_blocks=2,
                                 attention_resolutions=[16, 8]))
    x_t, t = inputs(3)
    model(x_t, t).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


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


@pytest.mark.parametrize("dim", [32, 128, 33])
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


def test_images_do_not_interact_across_the_batch_in_eval_mode():
    """GroupNorm and attention act per image: an image's output does not depend on its batch."""
    model = perturbed(small_unet(dropout=0.1))
    model.eval()
    x_t, t = inputs(4)
    with torch.no_grad():
        batched = model(x_t, t)
        for i in range(4):
            torch.testing.assert_close(batched[i:i + 1], model(x_t[i:i + 1], t[i:i + 1]),
                                       rtol=0, atol=1e-5)
