"""The training objective as one small object built once from params (as EDM's training/loss.py):
what the network is trained to predict (diffusion.prediction: ddpm.prediction) and how each
noise level is weighted (train.snr_gamma: min_snr_weights). The training step calls it; a new
target is an entry in ddpm.prediction's registry and a new weighting a function here, not a
change of the step.

    loss = E_{x0, t, eps} [ w(t) || y(x0, eps, t) - net(x_t, t) ||^2 ],  x_t = q_sample(x0, t, eps)

with t and eps drawn by the trainer (ddpm.batches). eps with w = 1 is Ho et al. 2020's eq. 14,
the seed's objective, computed exactly as diffusion.loss computes it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ddpm import diffusion, prediction
from ddpm.diffusion import Schedule


def min_snr_weights(snr: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556, eq. 7 and Sec. 3.4): the x0 error
    weighted by min(SNR(t), gamma), SNR = alpha_bar / (1 - alpha_bar), written in the target's
    own error: min(SNR, gamma) / x0_error_scale(SNR), which is min(SNR, gamma) / SNR for eps,
    min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for x0 (as diffusers'
    train_text_to_image.py --snr_gamma). snr: (T,) float64, > 0."""
    return (torch.minimum(snr, torch.full_like(snr, gamma))
            / prediction.get(prediction_type).x0_error_scale(snr))


class Loss:
    """loss(net, x0, t, noise, labels) -> the batch's mean weighted MSE, a scalar in float32 (or
    wider: float64 networks keep float64). x0: (B, C, H, W) in [-1, 1]; t: (B,) long; noise:
    (B, C, H, W); labels: (B,) for a conditional network, else None."""

    def __init__(self, sched: Schedule, snr_gamma: float = 0.0):
        self.sched = sched                                           # its prediction: the target
        self.snr_gamma = snr_gamma                                   # 0 = uniform weights
        self.target = prediction.get(sched.prediction).target
        ab = sched.alpha_bar64
        # (T,) float32 weights on the schedule's device; None = uniform (the seed)
        self.weights = (min_snr_weights(ab / (1.0 - ab), sched.prediction, snr_gamma).float()
                        .to(sched.device) if snr_gamma else None)

    def __call__(self, net: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # 1. the noisy images and the network's prediction (eq. 4)
        x_t = diffusion.q_sample(self.sched, x0, t, noise)
        y = net(x_t, t) if labels is None else net(x_t, t, labels)
        # 2. the target: noise, v or x0, with the schedule's coefficients of each image's t
        alpha = self.sched.sqrt_alpha_bar[t][:, None, None, None].to(x0.dtype)
        sigma = self.sched.sqrt_one_minus_alpha_bar[t][:, None, None, None].to(x0.dtype)
        target = self.target(x0, noise, alpha, sigma)
        dtype = torch.promote_types(y.dtype, torch.float32)
        # 3. the mean squared error over pixels, weighted per image, mean over the batch
        if self.weights is None:
            return F.mse_loss(y.to(dtype), target.to(dtype))  # eq. 14 for eps
        error = (y.to(dtype) - target.to(dtype)).square().mean(dim=tuple(range(1, y.dim())))
        return (self.weights[t].to(dtype) * error).mean()

    @property
    def label(self) -> str:
        """What the loss is, in a few words (the loss curve's axis): "eps-prediction MSE" for
        the seed's, "v-prediction MSE, min-SNR-5 weights" for another."""
        weights = f", min-SNR-{self.snr_gamma:g} weights" if self.snr_gamma else ""
        return f"{self.sched.prediction}-prediction MSE{weights}"

    def __repr__(self) -> str:
        return f"Loss({self.label})"


def build(sched: Schedule, snr_gamma: float) -> Loss:
    """The objective of params: Schedule(**params.diffusion) (its prediction) and
    train.snr_gamma."""
    return Loss(sched, snr_gamma)
