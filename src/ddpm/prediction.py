"""What the network predicts (diffusion.prediction), and the conversions between its output and
the noise eps that the samplers use: one registry, so that a new parameterisation is one entry.

With alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t) and x_t = alpha x0 + sigma eps
(Ho et al. 2020 eq. 4; alpha^2 + sigma^2 = 1):
  eps  the noise (Ho et al. 2020, the seed)
  v    alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4 and Appendix D)
  x0   the clean image (Ho et al. 2020, Sec. 4.2's "predicting x0")
The coefficients are (B, 1, 1, 1) tensors or floats; every function is pure tensor arithmetic.
x0_error_scale: how much a prediction's squared error weighs per unit of the x0 error it implies
at a fixed x_t, as a function of SNR = alpha^2 / sigma^2 (Hang et al. 2023, Sec. 3.4).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

Tensor = torch.Tensor


class Prediction(NamedTuple):
    target: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x0, eps, alpha, sigma) -> y
    to_eps: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (y, x_t, alpha, sigma) -> eps
    to_x0: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]   # (y, x_t, alpha, sigma) -> x0
    x0_error_scale: Callable[[Tensor], Tensor]  # SNR -> ||y error||^2 / ||x0 error||^2 at x_t
    diffusers: str  # diffusers' prediction_type of the same output


PREDICTIONS = {
    "eps": Prediction(target=lambda x0, eps, alpha, sigma: eps,
                      to_eps=lambda y, x_t, alpha, sigma: y,
                      to_x0=lambda y, x_t, alpha, sigma: (x_t - sigma * y) / alpha,
                      x0_error_scale=lambda snr: snr,  # eps = (x_t - alpha x0) / sigma
                      diffusers="epsilon"),
    "v": Prediction(target=lambda x0, eps, alpha, sigma: alpha * eps - sigma * x0,
                    to_eps=lambda y, x_t, alpha, sigma: alpha * y + sigma * x_t,
                    to_x0=lambda y, x_t, alpha, sigma: alpha * x_t - sigma * y,
                    x0_error_scale=lambda snr: snr + 1.0,  # v = (alpha x_t - x0) / sigma
                    diffusers="v_prediction"),
    "x0": Prediction(target=lambda x0, eps, alpha, sigma: x0,
                     to_eps=lambda y, x_t, alpha, sigma: (x_t - alpha * y) / sigma,
                     to_x0=lambda y, x_t, alpha, sigma: y,
                     x0_error_scale=lambda snr: torch.ones_like(snr),
                     diffusers="sample"),
}


def get(name: str) -> Prediction:
    if name not in PREDICTIONS:
        raise ValueError(f"diffusion.prediction = {name!r}: expected {', '.join(PREDICTIONS)}")
    return PREDICTIONS[name]
