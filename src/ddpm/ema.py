"""Exponential moving average of a model's weights (the weights that sample uses)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, once per optimizer step, as one fused lerp."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = list(self.model.parameters())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self._ema, list(model.parameters()), 1.0 - self.decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
