"""The training objectives against closed forms: the v and x0 targets and their conversions
(Salimans & Ho 2022), min-SNR-gamma's weights (Hang et al. 2023) for each prediction type, and
the loss object the training step calls (the seed's eq. 14 exactly, by default)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ddpm import diffusion, losses, model_file, networks, prediction
from ddpm.diffusion import Schedule
from ddpm.params import parse_params, read_yaml, run_config
from fakes import ROOT

T = 1000
LINEAR = dict(timesteps=T, beta_start=1e-4, beta_end=0.02, schedule="linear")
MU, S = 0.1, 0.2  # Gaussian data x0 ~ N(MU, S^2 I)


def linear_alpha_bar() -> np.ndarray:
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(T) / (T - 1)
    return np.exp(np.cumsum(np.log1p(-betas)))


def draws(n: int = 512, seed: int = 0):
    """Gaussian x0, noise eps and timesteps t, float64, with x_t = q_sample(x0, t, eps)."""
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S * torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (n,), generator=g)
    ab = torch.from_numpy(linear_alpha_bar())[t][:, None, None, None]
    return x0, eps, t, ab.sqrt(), (1 - ab).sqrt()


# -- targets and conversions -------------------------------------------------------------------

def test_targets_are_the_papers_definitions_and_convert_back_exactly():
    """eps; v = alpha eps - sigma x0 (Salimans & Ho eq. in Sec. 4); x0: and from each target and
    x_t = alpha x0 + sigma eps both eps and x0 come back (float64, 1e-12)."""
    x0, eps, t, alpha, sigma = draws()
    x_t = alpha * x0 + sigma * eps
    expected = {"eps": eps, "v": alpha * eps - sigma * x0, "x0": x0}
    for name, p in prediction.PREDICTIONS.items():
        y = p.target(x0, eps, alpha, sigma)
        torch.testing.assert_close(y, expected[name], rtol=0, atol=1e-15)
        torch.testing.assert_close(p.to_eps(y, x_t, alpha, sigma), eps, rtol=0, atol=1e-9)
        torch.testing.assert_close(p.to_x0(y, x_t, alpha, sigma), x0, rtol=0, atol=1e-9)


def test_conversions_map_the_optimal_predictors_onto_each_other():
    """For Gaussian data the optimal predictors are closed forms: E[eps | x_t] =
    sigma (x_t - alpha MU) / v_t and E[x0 | x_t] = MU + alpha S^2 (x_t - alpha MU) / v_t,
    v_t = alpha^2 S^2 + sigma^2; the conversions are affine in the prediction, so they carry
    one onto the other, and E[v | x_t] = alpha E[eps | x_t] - sigma E[x0 | x_t]."""
    x0, eps, t, alpha, sigma = draws()
    x_t = alpha * x0 + sigma * eps
    v_t = alpha**2 * S**2 + sigma**2
    e_eps = sigma * (x_t - alpha * MU) / v_t
    e_x0 = MU + alpha * S**2 * (x_t - alpha * MU) / v_t
    e_v = alpha * e_eps - sigma * e_x0
    for name, optimum in (("eps", e_eps), ("v", e_v), ("x0", e_x0)):
        p = prediction.get(name)
        torch.testing.assert_close(p.to_eps(optimum, x_t, alpha, sigma), e_eps, rtol=0,
                                   atol=1e-9)
        torch.testing.assert_close(p.to_x0(optimum, x_t, alpha, sigma), e_x0, rtol=0, atol=1e-9)


def test_an_unknown_prediction_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="expected eps, v, x0"):
        Schedule(**LINEAR, prediction="score")


# -- min-SNR-gamma -------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights_are_the_papers_for_each_prediction(gamma):
    """Hang et al. 2023: SNR = alpha_bar / (1 - alpha_bar); the x0 loss weighted min(SNR, gamma),
    the eps loss min(SNR, gamma) / SNR, the v loss min(SNR, gamma) / (SNR + 1)."""
    ab = linear_alpha_bar()
    snr = ab / (1 - ab)
    expected = {"eps": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1),
                "x0": np.minimum(snr, gamma)}
    for name, weights in expected.items():
        got = losses.min_snr_weights(torch.from_numpy(snr), name, gamma).numpy()
        np.testing.assert_allclose(got, weights, rtol=1e-12, atol=0)
    # where SNR < gamma (noisy steps) eps is weighted 1, where SNR > gamma gamma / SNR
    assert expected["eps"][-1] == 1.0 and expected["eps"][0] == gamma / snr[0]


@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_every_prediction_weighs_the_same_image_error_the_same(gamma):
    """The weighting is one of the image (Hang et al., Sec. 3.4): a prediction whose x0 misses
    by d costs min(SNR, gamma) ||d||^2 whichever the target, eps, v or x0; unweighted (gamma 0)
    SNR ||d||^2, (SNR + 1) ||d||^2 and ||d||^2. Through losses.Loss, image by image, on a
    network that returns the prediction of (x0 + d, the eps that goes with it at x_t)."""
    x0, eps, t, _, _ = draws(128)
    d = 0.05 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    image_error = d.square().mean(dim=(1, 2, 3))
    for name, p in prediction.PREDICTIONS.items():
        sched = Schedule(**LINEAR, prediction=name)
        a = sched.sqrt_alpha_bar[t][:, None, None, None].double()
        s = sched.sqrt_one_minus_alpha_bar[t][:, None, None, None].double()
        x_t = a * x0 + s * eps
        y = p.target(x0 + d, (x_t - a * (x0 + d)) / s, a, s)
        loss = losses.Loss(sched, gamma)
        got = torch.stack([loss(lambda x, t_, y_i=y[i:i + 1]: y_i, x0[i:i + 1], t[i:i + 1],
                                eps[i:i + 1]) for i in range(len(t))])
        snr = (a**2 / s**2).flatten()
        scale = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[name]
        weight = torch.minimum(snr, torch.full_like(snr, gamma)) / scale if gamma else 1.0
        torch.testing.assert_close(got, weight * scale * image_error, rtol=1e-5, atol=1e-12,
                                   msg=name)


# -- the loss object ----------------------------------------------------------------------------

def test_the_default_loss_is_eq_14_bitwise():
    """eps with uniform weights is diffusion.loss, the seed's objective: the same value, bit for
    bit, in float32 and float64, and the same gradients."""
    sched = Schedule(**LINEAR)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1
    t = torch.randint(0, T, (8,))
    noise = torch.randn(8, 3, 8, 8)
    for dtype in (torch.float32, torch.float64):
        model = net.to(dtype)

        def eps(x, t_, model=model):
            return model(x)
        ours = losses.build(sched, 0.0)(eps, x0.to(dtype), t, noise.to(dtype))
        seed = diffusion.loss(eps, sched, x0.to(dtype), t=t, noise=noise.to(dtype))
        assert ours.dtype == seed.dtype == dtype and torch.equal(ours, seed)
        g_ours = torch.autograd.grad(ours, list(model.parameters()))
        g_seed = torch.autograd.grad(diffusion.loss(eps, sched, x0.to(dtype), t=t,
                                                    noise=noise.to(dtype)),
                                     list(model.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(g_ours, g_seed))


@pytest.mark.parametrize("name", ["eps", "v", "x0"])
def test_the_weighted_loss_is_the_mean_of_weighted_per_image_errors(name):
    """loss = mean_i w(t_i) mean_pixels (net(x_t)_i - y_i)^2, y the prediction's target from
    the same x0 and noise (float64, a network of known output)."""
    sched = Schedule(**LINEAR, prediction=name)
    x0, eps, t, alpha, sigma = draws(64)
    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = {"eps": eps, "v": alpha * eps - sigma * x0, "x0": x0}[name]
    ab = torch.from_numpy(linear_alpha_bar())[t]
    snr = ab / (1 - ab)
    w = losses.min_snr_weights(snr, name, 5.0).float().double()  # the table is float32
    expected = (w * (out - target).square().mean(dim=(1, 2, 3))).mean()
    got = losses.Loss(sched, 5.0)(lambda x, t_: out, x0, t, eps)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert losses.Loss(sched, 5.0).label == f"{name}-prediction MSE, min-SNR-5 weights"
    assert losses.Loss(sched).label == f"{name}-prediction MSE"


def test_a_conditional_network_gets_its_labels():
    sched, seen = Schedule(**LINEAR, prediction="v"), []
    x0 = torch.zeros(4, 3, 4, 4)

    def net(x, t, labels):
        seen.append(labels)
        return torch.zeros_like(x)
    losses.Loss(sched, 5.0)(net, x0, torch.arange(4), torch.randn(4, 3, 4, 4),
                            torch.tensor([1, 2, 3, 10]))
    assert torch.equal(seen[0], torch.tensor([1, 2, 3, 10]))


# -- params --------------------------------------------------------------------------------------

def committed() -> dict:
    return read_yaml(ROOT / "params.yaml")


def test_the_seed_objective_is_not_in_the_run_config_and_another_is():
    """An eps run without weights records neither key (its checkpoints and models/ema.pt are
    those of before the keys existed); any other objective is part of what a checkpoint must
    match to resume."""
    raw = committed()
    assert (raw["diffusion"]["prediction"], raw["train"]["snr_gamma"]) == ("eps", 0.0)
    config = run_config(parse_params(raw))
    assert "prediction" not in config["diffusion"] and "snr_gamma" not in config["train"]
    raw["diffusion"]["prediction"], raw["train"]["snr_gamma"] = "v", 5
    config = run_config(parse_params(raw))
    assert config["diffusion"]["prediction"] == "v" and config["train"]["snr_gamma"] == 5.0
    raw["diffusion"]["prediction"] = "eps"
    config = run_config(parse_params(raw))
    assert "prediction" not in config["diffusion"] and config["train"]["snr_gamma"] == 5.0


def test_the_train_stage_builds_the_objective_of_params():
    raw = committed()
    raw["diffusion"]["prediction"], raw["train"]["snr_gamma"] = "x0", 2.5
    params = parse_params(raw)
    sched = Schedule(**dataclasses.asdict(params.diffusion))
    loss = losses.build(sched, params.train.snr_gamma)
    assert loss.label == "x0-prediction MSE, min-SNR-2.5 weights"
    ab = sched.alpha_bar64
    assert math.isclose(float(loss.weights[0]), min(float(ab[0] / (1 - ab[0])), 2.5),
                        rel_tol=1e-6)


@pytest.mark.parametrize("objective, recorded", [({}, "eps"), ({"prediction": "v"}, "v"),
                                                 ({"prediction": "x0"}, "x0")])
def test_a_model_file_says_what_its_network_predicts(tmp_path, objective, recorded):
    """models/ema.pt records the run config: `python -m ddpm sample` and export read the
    prediction from it; a file of the seed's objective (or from before the key) is eps."""
    raw = committed()
    raw["model"].update(channels=[16, 32], attention_resolutions=[], heads=1)
    raw["diffusion"].update(objective)
    params = parse_params(raw)
    net = networks.build(params.model, (3, 16, 16))
    path = tmp_path / "ema.pt"
    torch.save({"ema": net.state_dict(), "config": run_config(params), "image_shape": [3, 16, 16],
                "epochs": 1, "steps": 1}, path)
    assert ("prediction" in torch.load(path)["config"]["diffusion"]) == bool(objective)
    assert model_file.read(path).diffusion.prediction == recorded


@pytest.mark.parametrize("name", ["v", "x0"])
def test_guidance_on_raw_predictions_is_guidance_on_eps(name):
    """Classifier-free guidance combines the network's raw outputs (weights 1 + w and -w, which
    sum to one) and denoise converts after: the same images as combining the eps of the
    conditional and unconditional outputs, each converted first (an eps model of the same
    network), up to float32 rounding."""
    sched, eps_sched = Schedule(**LINEAR, prediction=name), Schedule(**LINEAR)
    to_eps = prediction.get(name).to_eps

    def net(x, t, labels):  # a conditional "network": its output depends on x, t and the label
        return torch.tanh(x * (1 + labels[:, None, None, None] / 3) + t[:, None, None, None] / T)

    def as_eps(x, t, labels):
        a = sched.sqrt_alpha_bar[t][:, None, None, None]
        s = sched.sqrt_one_minus_alpha_bar[t][:, None, None, None]
        return to_eps(net(x, t, labels), x, a, s)

    labels = torch.tensor([0, 1, 2, 0])
    for sampler in ("ddpm", "ddim", "dpm-solver++"):
        got, expected = (diffusion.sample(model, s, (4, 1, 4, 4), sampler, 20,
                                          torch.Generator().manual_seed(0), labels=labels,
                                          guidance=2.0, null_label=3)
                         for model, s in ((net, sched), (as_eps, eps_sched)))
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-4, msg=sampler)
