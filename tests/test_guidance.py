"""Class-conditional sampling and classifier-free guidance against closed forms.

The data are K = 3 Gaussian classes, x0 | k ~ N(MUS[k], SCALES[k]^2 I) with the prior PRIORS,
whose optimal noise predictors are known exactly: per class (the conditional model, labels
0..K-1) and for the mixture (the unconditional one, the null label K). With guidance 0 a sampler
must give back each class's Gaussian (and, given the null label, the mixture); with guidance w
the eps it is given must be eps_u + (1 + w) (eps_c - eps_u) of those closed forms, from one
forward pass of 2B images (Ho & Salimans 2022, eq. 6). Tolerances as tests/test_diffusion.py's.
"""
from __future__ import annotations

import math

import pytest
import torch

from ddpm.diffusion import Schedule, guided, log_snr_timesteps, sample, timesteps_for
from test_diffusion import exact_std, linear_alpha_bar  # the closed forms for one Gaussian

T = 1000
LINEAR = dict(timesteps=T, beta_start=1e-4, beta_end=0.02, schedule="linear")

# Three overlapping classes, each 3.4 or more of its stds inside [-1, 1] (clipping negligible),
# the scales no narrower than test_diffusion's S = 0.2, whose chain biases its tolerances allow
MUS = torch.tensor([-0.25, 0.0, 0.25], dtype=torch.float64)
SCALES = torch.tensor([0.2, 0.25, 0.22], dtype=torch.float64)
PRIORS = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
K = 3
NULL = K                      # the null label: the unconditional model
IMAGE = (1, 2, 2)             # C, H, W: 4 pixels that share their image's class
PER_CLASS = 20_000            # images per class in a sampler run
N = PER_CLASS * math.prod(IMAGE)  # pixels per class
MEAN_TOL = 0.005              # |mean - mu_k|: >= 5.6 standard errors (0.25 / sqrt(N) = 0.0009)

# test_diffusion.py's allowed |std / s - 1| (its SAMPLER_CASES); the chain biases for s = 0.2,
# 0.22, 0.25 are within them (exact_std: ddpm T=1000 +0.5%, ddpm 100 +6.0%, ddim 100 -6.2%)
STD_TOL_FULL_CHAIN = 0.02
STD_TOL_FEW_STEPS = 0.08
SAMPLER_CASES = [  # (sampler, steps, variance, tolerance)
    ("ddpm", None, "beta", STD_TOL_FULL_CHAIN),
    ("ddpm", 100, "beta", STD_TOL_FEW_STEPS),
    ("ddim", 100, "beta", STD_TOL_FEW_STEPS),
    ("dpm-solver++", 25, "beta", STD_TOL_FULL_CHAIN),
]
SAMPLERS = [("ddpm", 0.0), ("ddim", 0.5), ("dpm-solver++", 0.0)]  # (sampler, eta)


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule(**LINEAR)


AB = torch.from_numpy(linear_alpha_bar())


# --- the closed forms (float64) -------------------------------------------------------------

def class_eps(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The optimal conditional predictor, per pixel, for image i of class labels[i], in x_t's
    dtype (the samplers' float32 as test_diffusion's gaussian_eps, or float64):

        E[eps | x_t, k] = sqrt(1 - ab) (x_t - sqrt(ab) mu_k) / (ab s_k^2 + 1 - ab)
    """
    ab = AB[t].view(-1, 1, 1, 1).to(x_t.dtype)
    mu = MUS[labels].view(-1, 1, 1, 1).to(x_t.dtype)
    s2 = SCALES[labels].view(-1, 1, 1, 1).to(x_t.dtype) ** 2
    return (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * s2 + 1 - ab)


def class_posterior(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """p(k | x_t), (B, K): pi_k N(x_t; sqrt(ab) mu_k, (ab s_k^2 + 1 - ab) I) over all the pixels
    of the image (they share its class), normalised with logsumexp; in x_t's dtype."""
    ab = AB[t].view(-1, 1, 1, 1, 1).to(x_t.dtype)
    mu = MUS.view(1, K, 1, 1, 1).to(x_t.dtype)
    var = ab * SCALES.view(1, K, 1, 1, 1).to(x_t.dtype) ** 2 + 1 - ab
    d = x_t[:, None] - ab.sqrt() * mu                                  # (B, K, C, H, W)
    log_n = (-0.5 * torch.log(2 * math.pi * var) - d**2 / (2 * var)).sum((2, 3, 4))
    log_joint = PRIORS.log().to(x_t.dtype) + log_n
    return (log_joint - log_joint.logsumexp(1, keepdim=True)).exp()


def mixture_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The optimal unconditional predictor: E[eps | x_t] = sum_k p(k | x_t) E[eps | x_t, k]."""
    post = class_posterior(x_t, t)
    per_class = torch.stack([class_eps(x_t, t, torch.full_like(t, k)) for k in range(K)], 1)
    return (post[:, :, None, None, None] * per_class).sum(1)


def guided_eps(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w: float) -> torch.Tensor:
    """Ho & Salimans eq. 6 on the closed forms: eps_u + (1 + w) (eps_c - eps_u), in float64."""
    x_t = x_t.double()
    eps_u = mixture_eps(x_t, t)
    return eps_u + (1 + w) * (class_eps(x_t, t, labels) - eps_u)


def model(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The optimal conditional model in x_t's dtype: class_eps for labels 0..K-1, mixture_eps
    for NULL (each image's form computed for that image only, for speed)."""
    assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
    assert labels.dtype == torch.long and labels.shape == (x_t.shape[0],)
    assert ((labels >= 0) & (labels <= NULL)).all()
    null = labels == NULL
    if not null.any():
        return class_eps(x_t, t, labels)
    if null.all():
        return mixture_eps(x_t, t)
    eps = torch.empty_like(x_t)
    eps[null] = mixture_eps(x_t[null], t[null])
    eps[~null] = class_eps(x_t[~null], t[~null], labels[~null])
    return eps


class Spy:
    """model, recording every call's (x_t, t, labels)."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_t, t, labels):
        self.calls.append((x_t.clone(), t.clone(), labels.clone()))
        return model(x_t, t, labels)


def random_inputs(batch: int = 6, seed: int = 0):
    """x_t (float64) over the whole range of t, and labels cycling through the classes."""
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn((batch, *IMAGE), generator=gen, dtype=torch.float64)
    t = torch.linspace(0, T - 1, batch).round().long()
    return x_t, t, torch.arange(batch) % K


# --- the closed forms themselves ------------------------------------------------------------

def test_closed_forms_are_tweedies_formula():
    """E[eps | x_t] = -sqrt(1 - ab) grad log p_t(x_t) (Tweedie), with p_t the class's Gaussian
    N(sqrt(ab) mu_k, v_k I) or the mixture sum_k pi_k N(...) over the whole image, by autograd;
    and the posterior sums to 1."""
    x_t, t, labels = random_inputs(12)
    ab = AB[t].view(-1, 1, 1, 1)
    x = x_t.clone().requires_grad_(True)
    log_n = []
    for k in range(K):
        var = ab * SCALES[k] ** 2 + 1 - ab
        log_n.append((-0.5 * torch.log(2 * math.pi * var)
                      - (x - ab.sqrt() * MUS[k]) ** 2 / (2 * var)).sum((1, 2, 3)))
    log_n = torch.stack(log_n, 1)                                      # (B, K)
    (grad_u,) = torch.autograd.grad((PRIORS.log() + log_n).logsumexp(1).sum(), x,
                                    retain_graph=True)
    (grad_c,) = torch.autograd.grad(log_n.gather(1, labels[:, None]).sum(), x)
    torch.testing.assert_close(mixture_eps(x_t, t), -(1 - ab).sqrt() * grad_u, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(class_eps(x_t, t, labels), -(1 - ab).sqrt() * grad_c, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(class_posterior(x_t, t).sum(1), torch.ones(12, dtype=torch.float64))
    # the classes are told apart at small t and not at all at T - 1 (x_T carries no class)
    assert class_posterior(x_t, t)[0].max() > 0.9
    torch.testing.assert_close(class_posterior(x_t, t)[-1], PRIORS, rtol=0, atol=1e-3)


# --- guidance 0: the conditional model alone ------------------------------------------------

def balanced_labels(per_class: int) -> torch.Tensor:
    return torch.arange(K).repeat_interleave(per_class)


@pytest.mark.parametrize("sampler, steps, variance, data_tol", SAMPLER_CASES)
def test_sampler_recovers_each_class_without_guidance(sched, sampler, steps, variance, data_tol):
    """Driven by the optimal conditional model, guidance 0: the images of class k are
    N(mu_k, s_k^2): mean within MEAN_TOL of mu_k, std within data_tol of s_k and within 5
    standard errors of the chain's closed-form std (as test_sampler_recovers_gaussian_data)."""
    labels = balanced_labels(PER_CLASS)
    x = sample(model, sched, (len(labels), *IMAGE), sampler, steps,
               torch.Generator().manual_seed(0), variance=variance, labels=labels)
    assert x.shape == (len(labels), *IMAGE) and x.dtype == torch.float32
    for k in range(K):
        xk, mu, s = x[labels == k].double(), MUS[k].item(), SCALES[k].item()
        assert abs(xk.mean().item() - mu) < MEAN_TOL, k
        assert abs(xk.std().item() / s - 1) < data_tol, k
        assert abs(xk.std().item() - exact_std(sampler, steps or T, variance, s)) < \
            5 * s / math.sqrt(2 * N), k


def test_the_null_label_draws_the_mixture(sched):
    """Every label the null label, guidance 0, DPM-Solver++ at 25 steps (close to the exact
    probability-flow ODE, which maps N(0, I) onto the data): the images are the mixture, mean
    sum pi_k mu_k and variance sum pi_k (s_k^2 + mu_k^2) - mean^2 per pixel, and two pixels of
    one image correlated by their shared class: covariance Var(mu_k) = 0.0475 (0 had the model's
    posterior been per pixel). Mean within MEAN_TOL, std within 2%, covariance within 0.004
    (about 10 standard errors). (DDPM's 1000 steps through the mixture take ~45 s.)"""
    labels = torch.full((K * PER_CLASS,), NULL)
    x = sample(model, sched, (len(labels), *IMAGE), "dpm-solver++", 25,
               torch.Generator().manual_seed(0), labels=labels).double().flatten(1)
    mean = (PRIORS * MUS).sum().item()
    class_var = (PRIORS * MUS**2).sum().item() - mean**2
    var = (PRIORS * SCALES**2).sum().item() + class_var
    assert abs(x.mean().item() - mean) < MEAN_TOL
    assert abs(x.std().item() / math.sqrt(var) - 1) < STD_TOL_FULL_CHAIN
    centred = x - x.mean()
    cov = (centred[:, :1] * centred[:, 1:]).mean().item()  # pixel 0 against the other 3
    assert abs(cov - class_var) < 0.004, cov


def test_guidance_0_calls_the_model_once_per_step_with_the_labels(sched):
    """w = 0: `guided` is the conditional model alone, one call of the B images with their
    labels and nothing else; in `sample`, once per timestep, no null label anywhere."""
    x_t, t, labels = random_inputs()
    spy = Spy()
    eps = guided(spy, labels, 0.0, NULL)(x_t, t)
    ((x_seen, t_seen, labels_seen),) = spy.calls
    assert torch.equal(x_seen, x_t) and torch.equal(t_seen, t) and torch.equal(labels_seen, labels)
    torch.testing.assert_close(eps, class_eps(x_t, t, labels), rtol=1e-12, atol=0)
    for sampler, _ in SAMPLERS:
        spy = Spy()
        sample(spy, sched, (6, *IMAGE), sampler, 10, torch.Generator().manual_seed(0),
               labels=labels, null_label=NULL)
        assert len(spy.calls) == 10, sampler
        for x_seen, _, labels_seen in spy.calls:
            assert x_seen.shape == (6, *IMAGE) and torch.equal(labels_seen, labels), sampler


# --- guidance w > 0 -------------------------------------------------------------------------

@pytest.mark.parametrize("w", [0.5, 1.0, 3.0])
def test_guided_eps_is_eq_6_from_one_forward_pass_of_2b_images(w):
    """`guided` calls the model once, on cat([x, x]), cat([t, t]) and cat([labels, null]), and
    returns eps_u + (1 + w) (eps_c - eps_u) of the closed forms. It combines the halves in
    float32 (its docstring), so float32's precision: 1e-6 on eps of size ~1."""
    x_t, t, labels = random_inputs()
    spy = Spy()
    eps = guided(spy, labels, w, NULL)(x_t, t)
    ((x_seen, t_seen, labels_seen),) = spy.calls
    assert x_seen.shape == (12, *IMAGE)
    assert torch.equal(x_seen[:6], x_t) and torch.equal(x_seen[6:], x_t)
    assert torch.equal(t_seen, torch.cat([t, t]))
    assert torch.equal(labels_seen[:6], labels) and (labels_seen[6:] == NULL).all()
    assert eps.shape == x_t.shape
    torch.testing.assert_close(eps.double(), guided_eps(x_t, t, labels, w), rtol=1e-6, atol=1e-6)
    # and it is not the conditional or the unconditional model alone
    assert (eps.double() - class_eps(x_t, t, labels)).abs().max() > 1e-3
    assert (eps.double() - mixture_eps(x_t, t)).abs().max() > 1e-3


@pytest.mark.parametrize("sampler, eta", SAMPLERS)
def test_samplers_get_the_guided_eps_once_per_step(sched, sampler, eta):
    """With w = 2 the sampler calls the model once per timestep (from the last down), each time
    with 2B images, the two halves the same x_t and t, labels then null labels; and its images
    are those it draws from the same noise when handed eq. 6 of the closed forms directly, as
    an unconditional model (1e-5: float32 rounding, the halves combined in float32 or float64)."""
    labels, w, steps = torch.tensor([0, 1, 2, 2, 0]), 2.0, 20
    spy = Spy()
    x = sample(spy, sched, (5, *IMAGE), sampler, steps, torch.Generator().manual_seed(0), eta,
               labels=labels, guidance=w, null_label=NULL)
    grid = log_snr_timesteps(sched, steps) if sampler == "dpm-solver++" else timesteps_for(T, steps)
    assert [int(t_seen[0]) for _, t_seen, _ in spy.calls] == grid[::-1]
    for x_seen, t_seen, labels_seen in spy.calls:
        assert x_seen.shape == (10, *IMAGE) and torch.equal(x_seen[:5], x_seen[5:])
        assert (t_seen == t_seen[0]).all()
        assert torch.equal(labels_seen[:5], labels) and (labels_seen[5:] == NULL).all()
    expected = sample(lambda x_t, t: guided_eps(x_t, t, labels, w), sched, (5, *IMAGE), sampler,
                      steps, torch.Generator().manual_seed(0), eta)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    unguided = sample(model, sched, (5, *IMAGE), sampler, steps,
                      torch.Generator().manual_seed(0), eta, labels=labels)
    assert (x - unguided).abs().max() > 1e-3  # guidance changed the images


def test_guidance_needs_a_conditional_model_and_its_null_label(sched):
    """Guidance without labels (an unconditional model) or without the null label is a
    ValueError, raised before the model is called; without guidance, no labels is the
    unconditional model itself, called as model(x_t, t)."""
    x_t, t, labels = random_inputs()
    spy = Spy()
    with pytest.raises(ValueError, match="labels"):
        guided(spy, None, 1.0, NULL)
    with pytest.raises(ValueError, match="null label"):
        guided(spy, labels, 1.0)
    with pytest.raises(ValueError, match="labels"):
        sample(spy, sched, (6, *IMAGE), "ddim", 10, guidance=1.0, null_label=NULL)
    with pytest.raises(ValueError, match="null label"):
        sample(spy, sched, (6, *IMAGE), "ddim", 10, labels=labels, guidance=1.0)
    assert spy.calls == []
    unconditional = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert guided(unconditional, None) is unconditional
    for w in (0.0, 1.0):  # one label per image, or a network would broadcast the first
        with pytest.raises(ValueError, match="1 labels for a batch of 6 images"):
            guided(spy, labels[:1], w, NULL)(x_t, t)
    assert spy.calls == []


@pytest.mark.parametrize("sampler, eta", SAMPLERS)
def test_guided_images_are_independent_of_the_batch(sched, sampler, eta):
    """Per-image generators (seed 1000 + i), guidance 3: image i drawn in a batch of 5 is the
    one drawn alone (the null-label posterior is per image; ddim with eta = 0.5 draws noise at
    every step, DPM-Solver++ keeps each image's previous x0)."""
    labels = torch.tensor([2, 0, 1, 1, 0])

    def draw(ids):
        gens = [torch.Generator().manual_seed(1000 + i) for i in ids]
        return sample(model, sched, (len(ids), *IMAGE), sampler, 20, gens, eta,
                      labels=labels[list(ids)], guidance=3.0, null_label=NULL)
    together = draw(range(5))
    for i in range(5):
        torch.testing.assert_close(draw([i])[0], together[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler, steps", [("dpm-solver++", 25), ("ddpm", 100)])
def test_guidance_pushes_each_class_away_from_the_others(sched, sampler, steps):
    """Guidance adds w grad log p(k | x_t) to the class's score: as w goes 0, 1, 3 the outer
    classes' means move outwards, away from the mixture mean -0.05 (class 0 below -0.25, class 2
    above 0.25), and for every class the images' true posterior p(k | x0) rises: its
    complement, the weight of the other classes, shrinks. Measured (5000 images a class, same
    noise): each step at least 0.03 in the means (ddpm 100 steps, 1 -> 3: 0.032 and 0.044) and
    a factor of 1.49 or more in 1 - p(k | x0) (the middle class's; the outer ones' 1.8 to 4)."""
    labels = balanced_labels(5000)
    means, posteriors = [], []
    for w in (0.0, 1.0, 3.0):
        x = sample(model, sched, (len(labels), *IMAGE), sampler, steps,
                   torch.Generator().manual_seed(1), labels=labels, guidance=w,
                   null_label=NULL).double()
        post = class_posterior(x, torch.zeros(len(labels), dtype=torch.long))
        post = post.gather(1, labels[:, None])[:, 0]
        means.append(torch.stack([x[labels == k].mean() for k in range(K)]))
        posteriors.append(torch.stack([post[labels == k].mean() for k in range(K)]))
    others = [1 - p for p in posteriors]
    for before, after in zip(means, means[1:]):
        assert after[0] < before[0] - 0.02 and after[2] > before[2] + 0.02, means
    for before, after in zip(others, others[1:]):
        assert (after < before / 1.3).all(), posteriors
