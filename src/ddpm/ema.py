"""Exponential moving average of a model's weights (the weights that sample uses)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def warmup_decay(decay: float, step: int) -> float:
    """The decay of EMA update `step` (0 = after the first optimizer step) under EMA warmup:
    min(decay, (1 + step) / (10 + step)), as diffusers' EMAModel and improved-diffusion's
    successors ramp it, so early averages are not dominated by the random initialisation."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, once per optimizer step, as one fused lerp."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = list(self.model.parameters())

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0) -> None:
        """step: the optimizer steps taken before this one (only the warmup reads it)."""
        decay = warmup_decay(self.decay, step) if self.warmup else self.decay
        torch._foreach_lerp_(self._ema, list(model.parameters()), 1.0 - decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
