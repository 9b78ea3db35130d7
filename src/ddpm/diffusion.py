"""The diffusion process of Ho et al. 2020 and its samplers, as pure functions over a Schedule.

Equation numbers refer to Ho et al. 2020 ("DDPM", arXiv:2006.11239) and Song et al. 2021
("DDIM", arXiv:2010.02502); DPM-Solver++ is Lu et al. 2022 (arXiv:2211.01095). The model is
passed in, never owned: any callable eps = model(x_t, t), or eps = model(x_t, t, labels) for a
conditional one, which `guided` turns into the former (classifier-free guidance, Ho & Salimans
2022, arXiv:2207.12598). A network may predict v or x0 instead of eps (Schedule.prediction):
`denoise` is the one place its output becomes the eps and x0 that the samplers' steps use.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ddpm import prediction as predictions

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Ho et al. 2020, Sec. 4: betas increasing linearly from beta_start to beta_end."""
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0),
    f(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    t = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


class Schedule:
    """The noise schedule and the quantities derived from it.

    Computed in float64 (kept as `alpha_bar64` on the CPU for the samplers' coefficients) and
    stored as float32 tensors that follow `.to(device)`; index them with t in [0, T).
    prediction: what the network outputs (ddpm.prediction.PREDICTIONS: eps, v or x0).
    """

    def __init__(self, timesteps: int, beta_start: float, beta_end: float, schedule: str,
                 prediction: str = "eps"):
        if schedule == "linear":
            betas = linear_betas(timesteps, beta_start, beta_end)
        elif schedule == "cosine":
            betas = cosine_betas(timesteps)
        else:
            raise ValueError(f"diffusion.schedule = {schedule!r}: expected linear or cosine")
        predictions.get(prediction)  # a ValueError naming the choices
        self.timesteps, self.prediction = timesteps, prediction
        self.config = dict(timesteps=timesteps, beta_start=beta_start, beta_end=beta_end,
                           schedule=schedule, prediction=prediction)
        alpha_bar = np.cumprod(1.0 - betas)
        self.alpha_bar64 = torch.from_numpy(alpha_bar)                           # (T,) float64
        self.betas = torch.from_numpy(betas).float()                             # beta_t
        self.alpha_bar = torch.from_numpy(alpha_bar).float()                     # prod_s<=t alpha_s
        self.sqrt_alpha_bar = torch.from_numpy(np.sqrt(alpha_bar)).float()
        self.sqrt_one_minus_alpha_bar = torch.from_numpy(np.sqrt(1.0 - alpha_bar)).float()

    def to(self, device: torch.device | str) -> "Schedule":
        moved = object.__new__(Schedule)
        for name, value in vars(self).items():
            on_device = isinstance(value, torch.Tensor) and value.dtype == torch.float32
            setattr(moved, name, value.to(device) if on_device else value)
        return moved

    @property
    def device(self) -> torch.device:
        return self.betas.device


def _expand(coef: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return coef[t][:, None, None, None]  # (B,) -> (B, 1, 1, 1), broadcast over C, H, W


def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """Eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.
    x0, noise: (B, C, H, W); t: (B,)."""
    return (_expand(sched.sqrt_alpha_bar, t) * x0
            + _expand(sched.sqrt_one_minus_alpha_bar, t) * noise)


def loss(model: EpsModel, sched: Schedule, x0: torch.Tensor,
         generator: torch.Generator | None = None, t: torch.Tensor | None = None,
         noise: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 14, the simplified objective: || eps - eps_theta(x_t, t) ||^2, t ~ U{0..T-1}.

    x0: (B, C, H, W) in [-1, 1]; t and noise are drawn from `generator` unless given (the trainer
    draws them per image of the whole batch); labels: (B,) classes of a conditional model (the
    null label where dropped), None for an unconditional one. Returns the mean over batch and
    pixels, a scalar in float32 or wider (float64 models keep float64).
    """
    if t is None:
        t = torch.randint(0, sched.timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = q_sample(sched, x0, t, noise)
    eps = model(x_t, t) if labels is None else model(x_t, t, labels)
    dtype = torch.promote_types(eps.dtype, torch.float32)
    return F.mse_loss(eps.to(dtype), noise.to(dtype))


def timesteps_for(timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spaced over [0, T - 1], both ends included, ascending."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps = {steps}: expected 1..{timesteps}")
    if steps == 1:
        return [timesteps - 1]
    return sorted({int(round(x)) for x in np.linspace(0, timesteps - 1, steps)})


def log_snr_timesteps(sched: Schedule, steps: int, lambda_min: float = -5.1) -> list[int]:
    """`steps` distinct timesteps over [0, T - 1], both ends included, ascending: T - 1 (x_T's)
    and the rest evenly spaced in lambda = log(alpha_bar / (1 - alpha_bar)) / 2 from lambda_0 to
    max(lambda_{T-1}, lambda_min), rounded (Lu et al.'s spacing for low-resolution images).
    The floor is diffusers' lambda_min_clipped for the cosine schedule, whose clipped last betas
    would else spend steps where alpha_bar < 4e-5; the linear schedule's grid is unaffected.
    """
    if not 1 <= steps <= sched.timesteps:
        raise ValueError(f"steps = {steps}: expected 1..{sched.timesteps}")
    last = sched.timesteps - 1
    if steps == 1:
        return [last]
    ab = sched.alpha_bar64.numpy()
    lam = 0.5 * np.log(ab / (1.0 - ab))  # (T,), decreasing in t
    targets = np.linspace(lam[0], max(lam[-1], lambda_min), steps)
    ts = np.rint(np.interp(-targets, -lam, np.arange(len(lam)))).astype(int).tolist()
    for k in range(1, steps):  # near t = 0 several targets round to one step: keep them distinct
        ts[k] = max(ts[k], ts[k - 1] + 1)
    ts[-1] = last
    for k in reversed(range(steps - 1)):
        ts[k] = min(ts[k], ts[k + 1] - 1)
    return ts


def randn_like_per_image(shape: Sequence[int], generator: Generators,
                         device: torch.device) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`.

    With a list of generators (one per image), image i's noise comes from generator i only, so
    an image does not depend on the batch it was drawn in (as EDM's StackedRandomGenerator).
    """
    if generator is None:
        return torch.randn(shape, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} images")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device)
                        for g in generator]).to(device)


def guided(model: Callable[..., torch.Tensor], labels: torch.Tensor | None,
           guidance: float = 0.0, null_label: int | None = None) -> EpsModel:
    """The eps model that the samplers call, eps(x_t, t), for the classes `labels` (B,) of a
    conditional `model`, with classifier-free guidance w = `guidance`:

        eps = eps(x_t, t, null) + (1 + w) (eps(x_t, t, labels) - eps(x_t, t, null))

    (Ho & Salimans 2022, eq. 6). w = 0 is the conditional model alone, one forward pass of B
    images; w > 0 evaluates the conditional and the unconditional (null_label) predictions in
    one forward pass of 2B images and combines them in float32. labels None: `model` itself."""
    if labels is None:
        if guidance:
            raise ValueError("guidance needs labels (a conditional model)")
        return model
    if null_label is None and guidance:
        raise ValueError("guidance needs the model's null label")
    both = torch.cat([labels, torch.full_like(labels, null_label)]) if guidance else labels

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if len(labels) != len(x):  # a network would broadcast one label over the batch
            raise ValueError(f"{len(labels)} labels for a batch of {len(x)} images")
        if not guidance:
            return model(x, t, labels)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), both).float().chunk(2)
        return uncond + (1.0 + guidance) * (cond - uncond)
    return eps


def _eps(model: EpsModel, x: torch.Tensor, t: int) -> torch.Tensor:
    """The network's output at (x_t, t) for every image of x, in float32 (eps for an eps model)."""
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    return model(x, t_batch).float()


def predict_x0(x: torch.Tensor, eps: torch.Tensor, ab_t: float) -> torch.Tensor:
    """Eq. 4 solved for x0: (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (x - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)


def denoise(model: EpsModel, sched: Schedule, x: torch.Tensor, t: int, ab_t: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's prediction at (x_t, t), ab_t = alpha_bar_t, as both the noise eps and the
    image x0, each computed directly from what the network predicts (sched.prediction: eps, v
    or x0; ddpm.prediction), so that neither is a difference of nearly equal terms: an eps
    model's x0 is eq. 4 solved for x0 (predict_x0), an x0 model's x0 its output."""
    y, alpha, sigma = _eps(model, x, t), math.sqrt(ab_t), math.sqrt(1.0 - ab_t)
    if sched.prediction == "eps":  # the seed's arithmetic, exactly
        return y, predict_x0(x, y, ab_t)
    parameterisation = predictions.get(sched.prediction)
    return (parameterisation.to_eps(y, x, alpha, sigma),
            parameterisation.to_x0(y, x, alpha, sigma))


def ddpm_steps(model: EpsModel, sched: Schedule, x: torch.Tensor, ts: Sequence[int],
               randn: Callable[[], torch.Tensor], variance: str = "beta",
               clip_denoised: bool = False, progress: Callable[[], None] | None = None
               ) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 and eq. 11, from x = x_T down to x_0.

    Over a subsequence ts of the T timesteps the chain is respaced (Nichol & Dhariwal 2021,
    Sec. 4): beta_i = 1 - alpha_bar(ts[i]) / alpha_bar(ts[i-1]); with ts = 0..T-1 this is the
    paper's chain exactly. sigma_i^2 = beta_i ("beta") or beta-tilde_i ("beta_tilde", eq. 7).
    clip_denoised: the mean is eq. 7's posterior mean of the predicted x0 clipped to [-1, 1], as
    in Ho et al.'s code (unclipped, eq. 7 and eq. 11 are the same mean).
    """
    ab = sched.alpha_bar64.tolist()
    for i in reversed(range(len(ts))):
        ab_t = ab[ts[i]]
        ab_prev = ab[ts[i - 1]] if i > 0 else 1.0
        alpha = ab_t / ab_prev
        beta = 1.0 - alpha
        # 1. predict the noise in x_t (and x0)
        eps, x0 = denoise(model, sched, x, ts[i], ab_t)
        if clip_denoised:
            # 2'. eq. 7: mu = sqrt(ab_prev) beta / (1 - ab_t) x0
            #                 + sqrt(alpha) (1 - ab_prev) / (1 - ab_t) x_t
            x0 = x0.clamp(-1.0, 1.0)
            x = (math.sqrt(ab_prev) * beta / (1.0 - ab_t)) * x0 + (
                math.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab_t)) * x
        else:
            # 2. eq. 11: mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)
            x = (x - (beta / math.sqrt(1.0 - ab_t)) * eps) / math.sqrt(alpha)
        # 3. x_{t-1} = mu + sigma_t z, z ~ N(0, I); no noise at the last step (Algorithm 2)
        if i > 0:
            var = beta if variance == "beta" else beta * (1.0 - ab_prev) / (1.0 - ab_t)
            x = x + math.sqrt(var) * randn()
        if progress:
            progress()
    return x


def ddim_steps(model: EpsModel, sched: Schedule, x: torch.Tensor, ts: Sequence[int],
               randn: Callable[[], torch.Tensor], eta: float = 0.0, clip_denoised: bool = False,
               progress: Callable[[], None] | None = None) -> torch.Tensor:
    """DDIM, Song et al. 2021 eq. 12, over the timesteps ts; eta = 0 is deterministic.

    clip_denoised: the predicted x0 is clipped to [-1, 1] and eps recomputed from it (eq. 4), as
    in Song et al.'s and improved-diffusion's code.
    """
    ab = sched.alpha_bar64.tolist()
    for i in reversed(range(len(ts))):
        ab_t = ab[ts[i]]
        ab_prev = ab[ts[i - 1]] if i > 0 else 1.0
        # 1. predict the noise and x0 ("predicted x0" of eq. 12)
        eps, x0 = denoise(model, sched, x, ts[i], ab_t)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1.0 - ab_t)
        # 2. eq. 16: sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)
        sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev))
        # 3. eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn()
        if progress:
            progress()
    return x


def _half_log_snr(ab: float) -> float:
    """lambda = log(alpha / sigma), alpha = sqrt(ab), sigma = sqrt(1 - ab); +inf for clean data."""
    return 0.5 * math.log(ab / (1.0 - ab)) if ab < 1.0 else math.inf


def dpm_solver_pp_steps(model: EpsModel, sched: Schedule, x: torch.Tensor, ts: Sequence[int],
                        clip_denoised: bool = False,
                        progress: Callable[[], None] | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2, over the timesteps ts (one evaluation each):
    the probability-flow ODE solved with the data prediction x0_theta, x = x_T down to x_0.

    alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma). The first
    step (no earlier x0_theta) and the last (to sigma = 0, an infinite h) are first order, which
    is DDIM's eta = 0 step. clip_denoised: x0_theta is clipped to [-1, 1] before the step uses it
    (static thresholding), which for a first-order step is DDIM's clipping exactly.
    """
    ab = sched.alpha_bar64.tolist()
    x0_last, h_last = None, 0.0
    for i in reversed(range(len(ts))):
        ab_t = ab[ts[i]]
        ab_prev = ab[ts[i - 1]] if i > 0 else 1.0
        # 1. the data prediction x0_theta(x_t, t) (of an eps model: (x_t - sigma_t eps) / alpha_t)
        x0 = denoise(model, sched, x, ts[i], ab_t)[1]
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        # 2. h = lambda_prev - lambda_t > 0: the step in half log-SNR (Algorithm 2's h_i)
        h = _half_log_snr(ab_prev) - _half_log_snr(ab_t)
        # 3. D = (1 + 1 / 2r) x0 - 1 / 2r x0_last, r = h_last / h (Algorithm 2's D_i): x0_theta
        #    extrapolated linearly in lambda to the step's midpoint; first order, D = x0
        d = x0 if x0_last is None or i == 0 else x0 + (h / (2.0 * h_last)) * (x0 - x0_last)
        # 4. x_prev = sigma_prev / sigma_t x_t - alpha_prev (e^{-h} - 1) D: the ODE's exact
        #    solution for a D constant over the step (Algorithm 2's update of x_{t_i})
        x = (math.sqrt(1.0 - ab_prev) / math.sqrt(1.0 - ab_t)) * x - (
            math.sqrt(ab_prev) * math.expm1(-h)) * d
        x0_last, h_last = x0, h
        if progress:
            progress()
    return x


@torch.inference_mode()
def sample(model: EpsModel, sched: Schedule, shape: Sequence[int], sampler: str = "ddpm",
           steps: int | None = None, generator: Generators = None, eta: float = 0.0,
           variance: str = "beta", clip_denoised: bool = False,
           progress: Callable[[], None] | None = None, labels: torch.Tensor | None = None,
           guidance: float = 0.0, null_label: int | None = None) -> torch.Tensor:
    """Draw images x0 ~ p_theta on sched.device: (B, C, H, W) float32 clipped to [-1, 1].
    model: a network that predicts sched.prediction (eps, v or x0), with labels if conditional.

    sampler: "ddpm" (ancestral, eq. 11), "ddim" (eq. 12) or "dpm-solver++" (deterministic,
    second order); steps: network evaluations per image, None = all T timesteps.
    labels, guidance, null_label: a conditional model's classes (B,), drawn with classifier-free
    guidance w (`guided`; null_label: the model's null label K).
    generator: None, one torch.Generator, or a list with one per image (batch-size independent).
    clip_denoised: clip the predicted x0 to [-1, 1] inside every step (Ho et al.'s code).
    progress: called after every denoising step.
    """
    if sampler not in ("ddpm", "ddim", "dpm-solver++"):
        raise ValueError(f"sampler = {sampler!r}: expected ddpm, ddim or dpm-solver++")
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance = {variance!r}: expected beta or beta_tilde")
    # DPM-Solver++ steps evenly in log-SNR: evenly in t, the steps into t = 0 span log-SNR
    # ranges that hardly shrink as steps are added, and it loses its order (docs/model.md)
    n = steps or sched.timesteps
    ts = (log_snr_timesteps(sched, n) if sampler == "dpm-solver++" else
          timesteps_for(sched.timesteps, n))
    device = sched.device
    model = guided(model, None if labels is None else labels.to(device), guidance, null_label)

    def randn() -> torch.Tensor:
        return randn_like_per_image(shape, generator, device)

    x = randn()  # x_T ~ N(0, I)
    if sampler == "ddpm":
        x = ddpm_steps(model, sched, x, ts, randn, variance, clip_denoised, progress)
    elif sampler == "ddim":
        x = ddim_steps(model, sched, x, ts, randn, eta, clip_denoised, progress)
    else:
        x = dpm_solver_pp_steps(model, sched, x, ts, clip_denoised, progress)
    return x.clamp(-1.0, 1.0)
