"""The sinusoidal timestep embedding that both networks start from, and the class-label
embedding that conditional networks add to it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def label_embedding(classes: int, dim: int) -> nn.Embedding | None:
    """The class-label embedding of a conditional network: K + 1 rows of `dim`, the last (K) the
    null label of classifier-free guidance; None for an unconditional network (classes = 0).

    Zero at initialisation, so that a conditional network starts as the unconditional one: the
    same outputs for every label, and, built after every other layer, without consuming the
    random numbers they are initialised from (the other weights equal the unconditional
    network's for the same seed)."""
    if classes == 0:
        return None
    return nn.Embedding(classes + 1, dim, _weight=torch.zeros(classes + 1, dim))


def add_label(emb: torch.Tensor, table: nn.Embedding | None,
              labels: torch.Tensor | None) -> torch.Tensor:
    """emb + table[labels]: (B, dim). Without a table, labels must be None (an unconditional
    network); with one, None stands for the null label (the unconditional prediction)."""
    if table is None:
        if labels is not None:
            raise ValueError("labels given to an unconditional network (model.conditional: "
                             "false)")
        return emb
    if labels is None:
        labels = torch.full(emb.shape[:1], table.num_embeddings - 1, dtype=torch.long,
                            device=emb.device)
    return emb + table(labels).to(emb.dtype)
