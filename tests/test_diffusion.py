"""The diffusion process against closed forms: schedules, eq. 4, the eq. 14 loss and the samplers.

The samplers are checked on Gaussian data x0 ~ N(MU, S^2 I), whose optimal noise predictor is
known exactly, so a correct sampler must give back (nearly) that Gaussian; so is the exact
solution of the probability-flow ODE, which DPM-Solver++ must approach at its order.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import (Schedule, log_snr_timesteps, loss, q_sample, sample,
                            timesteps_for)

T = 1000
LINEAR = dict(timesteps=T, beta_start=1e-4, beta_end=0.02, schedule="linear")

MU, S = 0.1, 0.2              # Gaussian data, far enough inside [-1, 1] that clipping is negligible
SHAPE = (20_000, 1, 2, 2)     # N independent pixels per sampler run
N = math.prod(SHAPE)
MEAN_TOL = 0.005              # |mean - MU|: ~7 standard errors (S / sqrt(N) = 0.0007)
STD_SE = S / math.sqrt(2 * N)  # standard error of a sample std, 0.0005


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule(**LINEAR)


def linear_alpha_bar() -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), beta_t = 1e-4 + (0.02 - 1e-4) t / (T-1); float64."""
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(T) / (T - 1)
    return np.exp(np.cumsum(np.log1p(-betas)))


def gaussian_eps(sched: Schedule, scale: float = 1.0):
    """The optimal predictor for x0 ~ N(MU, S^2 I):

        E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) MU) / (ab S^2 + 1 - ab)
    """
    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        ab = sched.alpha_bar64[t].float()[:, None, None, None]
        return scale * (1 - ab).sqrt() * (x_t - ab.sqrt() * MU) / (ab * S**2 + 1 - ab)
    return model


def gaussian_model(sched: Schedule, prediction: str):
    """The optimal predictor of `prediction` for x0 ~ N(MU, S^2 I), each in its closed form:
    eps as gaussian_eps, x0 = E[x0 | x_t] = MU + sqrt(ab) S^2 (x_t - sqrt(ab) MU) / v_t, and
    v = E[alpha eps - sigma x0 | x_t] = sqrt(ab) E[eps | x_t] - sqrt(1 - ab) E[x0 | x_t]
    (Salimans & Ho 2022), v_t = ab S^2 + 1 - ab the variance of x_t."""
    eps_model = gaussian_eps(sched)

    def x0_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = sched.alpha_bar64[t][:, None, None, None]
        return (MU + ab.sqrt() * S**2 * (x_t.double() - ab.sqrt() * MU) / (ab * S**2 + 1 - ab)
                ).float()

    def v_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = sched.alpha_bar64[t][:, None, None, None]
        return (ab.sqrt() * eps_model(x_t, t).double() - (1 - ab).sqrt() * x0_model(x_t, t)
                ).float()
    return {"eps": eps_model, "x0": x0_model, "v": v_model}[prediction]


def exact_std(sampler: str, steps: int, variance: str, s: float = S) -> float:
    """The std the sampler must produce with gaussian_eps (data N(MU, s^2)), propagated in closed
    form (float64).

    With that predictor every step is affine in d = x_t - sqrt(ab_t) MU, whose variance
    starts at 1 (x_T ~ N(0, I)). DDPM (eq. 11): d' = (1 - beta / v_t) / sqrt(alpha) d + sigma z;
    DDIM (eq. 12, eta = 0): d' = (sqrt(ab' ab) S^2 + sqrt((1 - ab')(1 - ab))) / v_t d;
    where v_t = ab S^2 + 1 - ab is the variance of x_t and ' marks the previous timestep.
    DPM-Solver++: the std of the exact probability-flow ODE's sample (exact_ode_sample).
    """
    ab_all, ts, var, S = linear_alpha_bar(), timesteps_for(T, steps), 1.0, s
    if sampler == "dpm-solver++":  # not its chain's: the exact ODE's, which it approximates
        v_0, v_T = ab_all[0] * S**2 + 1 - ab_all[0], ab_all[-1] * S**2 + 1 - ab_all[-1]
        return math.sqrt(ab_all[0]) * S**2 / math.sqrt(v_0 * v_T)  # exact_ode_sample's gain
    for i in reversed(range(len(ts))):
        ab = ab_all[ts[i]]
        ab_prev = ab_all[ts[i - 1]] if i > 0 else 1.0
        v_t, beta = ab * S**2 + 1 - ab, 1 - ab / ab_prev
        if sampler == "ddim":
            gain = (math.sqrt(ab_prev * ab) * S**2 + math.sqrt((1 - ab_prev) * (1 - ab))) / v_t
            var *= gain**2
            continue
        var *= (1 - beta / v_t) ** 2 / (1 - beta)
        if i > 0:
            var += beta if variance == "beta" else beta * (1 - ab_prev) / (1 - ab)
    return math.sqrt(var)


def exact_ode_sample(ab: np.ndarray, x_T: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's exact image from x_T at t = T-1 for data N(MU, S^2), then the
    last step every deterministic sampler takes, x0 = E[x0 | x_0] from t = 0 (float64).

    With gaussian_eps the ODE, d(x / alpha) = eps d(sigma / alpha), keeps the standardised
    z = (x_t - sqrt(ab_t) MU) / sqrt(v_t) constant (v_t = ab_t S^2 + 1 - ab_t), so x at t = 0 is
    sqrt(ab_0) MU + sqrt(v_0) z, and its predicted x0 is MU + sqrt(ab_0) S^2 z / sqrt(v_0).
    """
    z = (x_T.double() - math.sqrt(ab[-1]) * MU) / math.sqrt(ab[-1] * S**2 + 1 - ab[-1])
    return MU + math.sqrt(ab[0]) * S**2 * z / math.sqrt(ab[0] * S**2 + 1 - ab[0])


# --- the schedule ---------------------------------------------------------------------------

def test_linear_schedule_is_the_closed_form(sched):
    """Ho et al. Sec. 4: betas linear from 1e-4 to 0.02; alpha_bar their cumulative product."""
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(T) / (T - 1)
    ab = linear_alpha_bar()
    assert sched.alpha_bar64.dtype == torch.float64
    np.testing.assert_allclose(sched.alpha_bar64.numpy(), ab, rtol=1e-12, atol=0)
    for got, expected in [(sched.betas, betas), (sched.alpha_bar, ab),
                          (sched.sqrt_alpha_bar, np.sqrt(ab)),
                          (sched.sqrt_one_minus_alpha_bar, np.sqrt(1 - ab))]:
        assert got.dtype == torch.float32 and got.shape == (T,)
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=1e-6)


def test_to_returns_a_schedule_with_the_same_values(sched):
    """.to(device) keeps every value and dtype (alpha_bar64 stays float64)."""
    moved = sched.to("cpu")
    assert isinstance(moved, Schedule) and moved.timesteps == T and moved.device.type == "cpu"
    for name in ["betas", "alpha_bar", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", "alpha_bar64"]:
        assert torch.equal(getattr(moved, name), getattr(sched, name)), name
        assert getattr(moved, name).dtype == getattr(sched, name).dtype, name


def test_cosine_schedule_is_nichol_and_dhariwal_eq_17():
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) pi/2), s = 0.008, for
    t = 1..T (index t-1) until beta_t = 1 - alpha_bar(t) / alpha_bar(t-1) is clipped at 0.999."""
    sched = Schedule(T, 1e-4, 0.02, "cosine")
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    clipped = int(np.argmax(betas > 0.999))
    assert 0 < clipped < T  # the last steps are clipped, the rest is not
    np.testing.assert_allclose(sched.alpha_bar64[:clipped].numpy(), f[1:clipped + 1] / f[0],
                               rtol=1e-12)
    assert (sched.betas <= torch.tensor(0.999)).all() and (sched.betas > 0).all()


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="schedule"):
        Schedule(T, 1e-4, 0.02, "quadratic")


# --- the forward process and the loss -------------------------------------------------------

def test_q_sample_has_the_moments_of_eq_4(sched):
    """Eq. 4: x_t ~ N(sqrt(ab_t) x0, (1 - ab_t) I); 200k draws per image, a different t per
    image; mean and variance within 5 standard errors (sqrt((1-ab)/n) and (1-ab) sqrt(2/n))."""
    n, gen = 200_000, torch.Generator().manual_seed(0)
    t = torch.tensor([0, 100, 500, 999])
    x0 = torch.tensor([0.9, -0.5, 0.3, 1.0]).view(4, 1, 1, 1).expand(4, 1, 1, n)
    x_t = q_sample(sched, x0, t, torch.randn(x0.shape, generator=gen)).double().flatten(1)
    ab = torch.from_numpy(linear_alpha_bar())[t]
    mean_se, var_se = ((1 - ab) / n).sqrt(), (1 - ab) * math.sqrt(2 / n)
    assert ((x_t.mean(1) - ab.sqrt() * x0[:, 0, 0, 0]).abs() < 5 * mean_se).all()
    assert ((x_t.var(1) - (1 - ab)).abs() < 5 * var_se).all()


def uniform_images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, 2, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loss_of_a_zero_predictor_is_the_noise_energy(sched):
    """Eq. 14 with eps_theta = 0 is mean(eps^2) -> 1; 5 standard errors (sqrt(2 / n))."""
    x0 = uniform_images(50_000)
    value = loss(lambda x_t, t: torch.zeros_like(x_t), sched, x0, torch.Generator().manual_seed(1))
    assert value.shape == () and value.dtype == torch.float32
    assert abs(value.item() - 1.0) < 5 * math.sqrt(2 / x0.numel())


def test_loss_of_an_oracle_that_inverts_eq_4_is_zero(sched):
    """Knowing x0, eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t) exactly: loss 0, or c^2 when
    the oracle is off by c. Also checks the model sees the t that made its x_t."""
    x0, ab_all = uniform_images(1000), torch.from_numpy(linear_alpha_bar())

    def oracle(offset: float):
        def model(x_t, t):
            ab = ab_all[t][:, None, None, None]
            return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt() + offset
        return model

    assert loss(oracle(0.0), sched, x0, torch.Generator().manual_seed(2)).item() < 1e-6
    assert loss(oracle(0.5), sched, x0, torch.Generator().manual_seed(2)).item() == \
        pytest.approx(0.25, abs=1e-4)


def test_loss_is_reproducible_from_its_generator(sched):
    """t and eps come from the generator alone: same seed, same loss; another seed, another."""
    x0, model = uniform_images(64), lambda x_t, t: 0.5 * x_t
    values = [loss(model, sched, x0, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert values[0] == values[1] != values[2]


def test_loss_draws_t_uniformly_from_0_to_T_minus_1(sched):
    """t ~ U{0, ..., T-1}: both ends reached and Pearson's chi-square (T - 1 degrees of freedom)
    within 5 of its standard deviations sqrt(2 (T - 1)) of its mean (a too-regular t fails too)."""
    seen = []

    def recorder(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)

    loss(recorder, sched, torch.zeros(200_000, 1, 1, 1), torch.Generator().manual_seed(5))
    (t,) = seen
    assert t.dtype == torch.long and t.shape == (200_000,)
    assert t.min() == 0 and t.max() == T - 1
    counts, expected = torch.bincount(t, minlength=T).double(), 200_000 / T
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert abs(chi2 - (T - 1)) < 5 * math.sqrt(2 * (T - 1))


# --- timesteps ------------------------------------------------------------------------------

@pytest.mark.parametrize("timesteps", [1000, 37])
def test_timesteps_for_spreads_the_steps_evenly(timesteps):
    """Every step count 2..T: ascending, both ends, len == steps, and ts[i] within 0.5 of the
    ideal i (T - 1) / (steps - 1)."""
    for steps in range(2, timesteps + 1):
        ts = np.array(timesteps_for(timesteps, steps))
        ideal = np.arange(steps) * (timesteps - 1) / (steps - 1)
        assert len(ts) == steps and ts[0] == 0 and ts[-1] == timesteps - 1, steps
        assert (np.diff(ts) > 0).all() and (np.abs(ts - ideal) <= 0.5).all(), steps
    assert timesteps_for(timesteps, timesteps) == list(range(timesteps))


def test_timesteps_for_edge_cases():
    """One step goes straight from x_{T-1} to x0; 0 or more than T steps are refused."""
    assert timesteps_for(T, 1) == [T - 1]
    for steps in (0, T + 1):
        with pytest.raises(ValueError, match="steps"):
            timesteps_for(T, steps)


# --- the samplers ---------------------------------------------------------------------------

# Allowed |std / S - 1| against the data itself. The finite chains are biased even with the
# optimal predictor (exact_std gives ddpm T=1000 +0.5%, beta_tilde -1.9%, ddpm 100 steps +6.0%,
# ddim 100 steps -6.2%, ddim 1000 steps -0.8%), plus 0.25% Monte-Carlo noise (STD_SE / S).
STD_TOL_FULL_CHAIN = 0.02   # all 1000 steps, sigma^2 = beta (ddpm) or deterministic (ddim)
STD_TOL_BETA_TILDE = 0.03   # all 1000 steps, sigma^2 = beta-tilde: a little too narrow
STD_TOL_FEW_STEPS = 0.08    # 100 of the 1000 steps (respaced ddpm, or ddim)
SAMPLER_CASES = [  # (sampler, steps, variance, tolerance)
    ("ddpm", None, "beta", STD_TOL_FULL_CHAIN),
    ("ddpm", None, "beta_tilde", STD_TOL_BETA_TILDE),
    ("ddpm", 100, "beta", STD_TOL_FEW_STEPS),
    ("ddim", 100, "beta", STD_TOL_FEW_STEPS),
    ("ddim", None, "beta", STD_TOL_FULL_CHAIN),
    ("dpm-solver++", 25, "beta", STD_TOL_FULL_CHAIN),  # within 5 SE of the exact ODE's std
]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler, steps, variance, data_tol", SAMPLER_CASES)
def test_sampler_recovers_gaussian_data(sampler, steps, variance, data_tol, prediction):
    """Driven by the optimal predictor for N(MU, S^2), of the noise, of v or of x0 (the
    schedule's diffusion.prediction), the sampler returns that Gaussian: mean within MEAN_TOL
    of MU, std within data_tol of S and within 5 standard errors of the chain's closed-form
    std."""
    sched = Schedule(**LINEAR, prediction=prediction)
    x = sample(gaussian_model(sched, prediction), sched, SHAPE, sampler, steps,
               torch.Generator().manual_seed(0), variance=variance)
    assert x.shape == SHAPE and x.dtype == torch.float32
    assert abs(x.mean().item() - MU) < MEAN_TOL
    assert abs(x.std().item() / S - 1) < data_tol
    assert abs(x.std().item() - exact_std(sampler, steps or T, variance)) < 5 * STD_SE


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
@pytest.mark.parametrize("steps", [T, 10])
def test_samplers_query_the_model_once_per_timestep_from_the_last_down(sched, sampler, steps):
    """Algorithm 2 / eq. 12 / Lu et al.'s Algorithm 2: eps_theta(x_t, t) for t = ts[-1], ...,
    ts[0], each exactly once, the whole batch at the same t; DPM-Solver++'s ts are even in
    log-SNR, the others' even in t."""
    seen = []

    def recorder(x_t, t):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],) and (t == t[0]).all()
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)

    sample(recorder, sched, (2, 1, 2, 2), sampler, steps, torch.Generator().manual_seed(0))
    grid = log_snr_timesteps(sched, steps) if sampler == "dpm-solver++" else timesteps_for(T, steps)
    assert seen == grid[::-1]


def test_the_last_ddpm_step_adds_no_noise(sched):
    """Algorithm 2 sets z = 0 at the last step, so a one-step chain returns the predicted x0,
    (x_t - sqrt(1 - ab) eps) / sqrt(ab), exactly as one deterministic DDIM step does."""
    ddpm, ddim = (sample(gaussian_eps(sched), sched, (64, 1, 2, 2), sampler, 1,
                         torch.Generator().manual_seed(0)) for sampler in ("ddpm", "ddim"))
    torch.testing.assert_close(ddpm, ddim, rtol=0, atol=1e-6)


def test_ddim_with_eta_1_is_ddpm_with_beta_tilde(sched):
    """Song et al. Sec. 4.1: eta = 1 makes sigma_t^2 = beta-tilde_t and the DDIM chain the DDPM
    one; with the same noise, the two samplers agree image for image."""
    ddim = sample(gaussian_eps(sched), sched, (64, 1, 2, 2), "ddim", 50,
                  torch.Generator().manual_seed(0), eta=1.0)
    ddpm = sample(gaussian_eps(sched), sched, (64, 1, 2, 2), "ddpm", 50,
                  torch.Generator().manual_seed(0), variance="beta_tilde")
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_sampler_check_fails_with_a_wrong_predictor(sched, sampler):
    """The test above can fail: half the optimal eps leaves far too much noise in the samples."""
    x = sample(gaussian_eps(sched, scale=0.5), sched, SHAPE, sampler, 100,
               torch.Generator().manual_seed(0))
    assert x.std().item() / S - 1 > 1.0


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_a_prediction_read_as_another_fails_the_check(sampler, prediction):
    """...and fails when a v or x0 model's output is taken for eps (the schedule says eps): the
    conversion is what makes the samplers recover the Gaussian above."""
    x = sample(gaussian_model(Schedule(**LINEAR, prediction=prediction), prediction),
               Schedule(**LINEAR), SHAPE, sampler, 100, torch.Generator().manual_seed(0))
    assert abs(x.std().item() / S - 1) > 0.5 or abs(x.mean().item() - MU) > 0.1


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.5), ("dpm-solver++", 0.0)])
def test_same_seed_gives_the_same_images(sched, sampler, eta):
    """One generator seeds x_T and every z: same seed, bitwise the same images."""
    def draw(seed):
        return sample(gaussian_eps(sched), sched, (4, 3, 4, 4), sampler, 20,
                      torch.Generator().manual_seed(seed), eta=eta)
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.5), ("dpm-solver++", 0.0)])
def test_per_image_generators_make_images_independent_of_the_batch(sched, sampler, eta):
    """Image i drawn with its own generator (seed 1000 + i) is bitwise the same in a batch of 6
    as in batches of 2 and 4 (ddim with eta = 0.5 draws noise at every step too; DPM-Solver++
    only x_T, and keeps each image's previous x0 for its second-order steps)."""
    def draw(ids):
        gens = [torch.Generator().manual_seed(1000 + i) for i in ids]
        return sample(gaussian_eps(sched), sched, (len(ids), 3, 4, 4), sampler, 20, gens, eta=eta)
    assert torch.equal(draw(range(6)), torch.cat([draw(range(2)), draw(range(2, 6))]))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_output_is_clipped_to_the_data_range(sched, sampler):
    """A predictor that drives x outwards still yields images in [-1, 1], both bounds reached."""
    x = sample(lambda x_t, t: -10 * x_t, sched, (8, 3, 4, 4), sampler, 10,
               torch.Generator().manual_seed(0))
    assert x.min() == -1.0 and x.max() == 1.0


def test_bad_sampler_arguments_raise_value_error(sched):
    """An unknown sampler name, or a generator list not one per image, is a ValueError."""
    model = gaussian_eps(sched)
    with pytest.raises(ValueError, match="sampler"):
        sample(model, sched, (2, 1, 2, 2), "ddmp", 10)
    with pytest.raises(ValueError, match="generators"):
        sample(model, sched, (2, 1, 2, 2), "ddpm", 10, [torch.Generator()])


def one_step_then_record(sched: Schedule, sampler: str, x_t: torch.Tensor, eps: torch.Tensor,
                         t: int, t_prev: int, clip_denoised: bool) -> torch.Tensor:
    """Run the chain over timesteps (t_prev, t) with no added noise and return the x_{t_prev}
    that the model is given at its second call: the result of exactly one step from x_t."""
    seen = []

    def model(x, t_batch):
        seen.append(x.clone())
        return eps if len(seen) == 1 else torch.zeros_like(x)

    ts = [t_prev, t]
    from ddpm.diffusion import ddim_steps, ddpm_steps, dpm_solver_pp_steps
    zeros = lambda: torch.zeros_like(x_t)  # noqa: E731  (sigma z = 0: the mean itself)
    if sampler == "ddpm":
        ddpm_steps(model, sched, x_t.clone(), ts, zeros, clip_denoised=clip_denoised)
    elif sampler == "dpm-solver++":
        dpm_solver_pp_steps(model, sched, x_t.clone(), ts, clip_denoised=clip_denoised)
    else:
        ddim_steps(model, sched, x_t.clone(), ts, zeros, clip_denoised=clip_denoised)
    return seen[1].double()


def clipping_case() -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and a predicted eps whose x0 estimate spans about [-4, 4]: well outside [-1, 1]."""
    x_t = torch.linspace(-3.0, 3.0, 48).reshape(1, 3, 4, 4)
    eps = 0.5 * torch.linspace(1.0, -1.0, 48).reshape(1, 3, 4, 4)
    return x_t, eps


@pytest.mark.parametrize("t, t_prev", [(500, 499), (600, 400)])
def test_clip_denoised_ddpm_step_is_the_posterior_mean_of_the_clipped_x0(sched, t, t_prev):
    """Ho et al.'s code: x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), clipped to [-1, 1]; the
    step's mean is E[x_prev | x_t, x0] of the forward process, derived here by Gaussian
    conditioning (x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) e1, x_t = sqrt(alpha) x_prev +
    sqrt(beta) e2), not by eq. 7's coefficients; the respaced pair (600, 400) is one step too."""
    x_t, eps = clipping_case()
    ab = linear_alpha_bar()
    ab_t, ab_prev = ab[t], ab[t_prev]
    alpha = ab_t / ab_prev
    x0 = (x_t.double() - math.sqrt(1 - ab_t) * eps.double()) / math.sqrt(ab_t)
    assert x0.min() < -2 and x0.max() > 2  # the case tests clipping
    x0 = x0.clamp(-1, 1)
    cov = math.sqrt(alpha) * (1 - ab_prev)         # Cov(x_prev, x_t | x0)
    var = 1 - ab_t                                 # Var(x_t | x0)
    expected = math.sqrt(ab_prev) * x0 + cov / var * (x_t.double() - math.sqrt(ab_t) * x0)
    got = one_step_then_record(sched, "ddpm", x_t, eps, t, t_prev, clip_denoised=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    unclipped = one_step_then_record(sched, "ddpm", x_t, eps, t, t_prev, clip_denoised=False)
    assert (unclipped - expected).abs().max() > 0.01  # clipping changed the step (1000x atol)


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_clip_denoised_ddim_step_recomputes_eps_from_the_clipped_x0(sched, sampler):
    """DDIM (eta 0) with clipping: x_prev = sqrt(ab_prev) x0_c + sqrt(1 - ab_prev) eps_c, where
    eps_c is the noise that maps x0_c to x_t under eq. 4, so x_t stays on the same trajectory.
    DPM-Solver++'s first step, sigma_prev / sigma_t x_t - alpha_prev (e^-h - 1) x0_c, is the same
    step (Lu et al.): its clip_denoised means what DDIM's does."""
    x_t, eps = clipping_case()
    ab = linear_alpha_bar()
    ab_t, ab_prev = ab[600], ab[400]
    x0 = ((x_t.double() - math.sqrt(1 - ab_t) * eps.double()) / math.sqrt(ab_t)).clamp(-1, 1)
    eps_c = (x_t.double() - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    expected = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps_c
    got = one_step_then_record(sched, sampler, x_t, eps, 600, 400, clip_denoised=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_clip_denoised_changes_nothing_while_x0_stays_in_range(sched, sampler):
    """With the Gaussian data's optimal predictor (x0 inside [-1, 1] almost surely) the clipped
    and unclipped chains agree image for image."""
    draw = lambda clip: sample(gaussian_eps(sched), sched, (64, 1, 2, 2), sampler, 20,  # noqa: E731
                               torch.Generator().manual_seed(0), clip_denoised=clip)
    torch.testing.assert_close(draw(True), draw(False), rtol=0, atol=1e-5)


# --- DPM-Solver++ against the exact probability-flow ODE -------------------------------------

ODE_SHAPE = (2000, 1, 2, 2)


def ode_error(sched: Schedule, sampler: str, steps: int) -> float:
    """RMS difference between the sampler's images and the exact ODE's from the same x_T."""
    x = sample(gaussian_eps(sched), sched, ODE_SHAPE, sampler, steps,
               torch.Generator().manual_seed(0))
    x_T = torch.randn(ODE_SHAPE, generator=torch.Generator().manual_seed(0))  # sample()'s x_T
    exact = exact_ode_sample(sched.alpha_bar64.numpy(), x_T).clamp(-1, 1)
    return (x.double() - exact).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_converges_to_the_exact_ode_solution_at_second_order(schedule):
    """Lu et al.'s DPM-Solver++(2M) is second order: from 20 to 40 to 80 steps (log-SNR steps of
    half the size each time) its error against the exact solution falls about 4x per doubling
    (measured 3.8-4.1), where first-order DDIM's halves; at 20 steps it is a tenth of DDIM's or
    less (measured 1/10 cosine, 1/19 linear)."""
    sched = Schedule(T, 1e-4, 0.02, schedule)
    errors = [ode_error(sched, "dpm-solver++", steps) for steps in (20, 40, 80)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.4 < r < 4.7 for r in ratios), ratios
    ddim = [ode_error(sched, "ddim", steps) for steps in (20, 40)]
    assert 1.8 < ddim[0] / ddim[1] < 2.2, ddim  # first order
    assert errors[0] < ddim[0] / 8, (errors[0], ddim[0])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_log_snr_timesteps_are_even_in_log_snr(schedule):
    """Every step count 1..T gives that many distinct timesteps, ascending, from 0 to T-1. At 20
    steps (where no two targets round to one timestep) each timestep but the last is one of the
    two that bracket its target, evenly spaced in lambda = log(ab / (1 - ab)) / 2 from lambda_0
    to max(lambda_{T-1}, -5.1); the last, T-1, is x_T's."""
    sched = Schedule(T, 1e-4, 0.02, schedule)
    for steps in range(1, T + 1):
        ts = log_snr_timesteps(sched, steps)
        assert len(ts) == steps and ts[-1] == T - 1 and ts[0] == (0 if steps > 1 else T - 1)
        assert all(a < b for a, b in zip(ts, ts[1:])), steps
    ab = sched.alpha_bar64.numpy()
    lam = 0.5 * np.log(ab / (1 - ab))
    targets = np.linspace(lam[0], max(lam[-1], -5.1), 20)
    ts = log_snr_timesteps(sched, 20)
    for t, target in zip(ts[1:-1], targets[1:-1]):
        assert lam[t + 1] <= target <= lam[t - 1], (t, target)
    assert lam[ts[-2]] > -5.1 > lam[-1] if schedule == "cosine" else lam[-1] > -5.1
