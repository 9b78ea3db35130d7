"""The sinusoidal timestep embedding that both networks start from."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, as in the original DDPM code.

    t: (B,) integers -> (B, dim) float32, [sin | cos] of t * 10000^(-i / (dim/2 - 1)).
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * (-math.log(10000.0) / max(half - 1, 1)))
    args = t.float()[:, None] * freqs[None, :]                    # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)   # (B, 2 * half)
    return F.pad(emb, (0, dim % 2))
