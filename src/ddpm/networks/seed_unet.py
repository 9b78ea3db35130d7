"""The seed notebook's UNet (model.arch = seed): 32,655,651 parameters at its defaults.

A plain encoder-decoder without residual paths: conv-norm-time-conv-norm blocks, each with its own
projection of a fixed sinusoidal time embedding; attention replaces the features where it is on;
stride-2 convolutions down, transposed convolutions up, one concatenated skip per resolution.
The layout, level by level, is in docs/model.md.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.networks.arguments import check_attention, check_levels, require
from ddpm.networks.embedding import add_label, label_embedding, timestep_embedding

GROUPS = 8  # GroupNorm groups in every block


def decoder_resolutions(channels: Sequence[int], image_size: int) -> list[int]:
    """The decoder's resolutions, one per encoder skip: image_size, image_size / 2, ...
    (len(channels) - 1 of them)."""
    return [image_size >> level for level in range(len(channels) - 1)]


def check_arguments(channels: Sequence[int], res_blocks: int, attention_resolutions: Sequence[int],
                    heads: int, time_dim: int, image_size: int) -> None:
    """ArgumentError, naming the argument, for a network this constructor cannot build."""
    check_levels(channels, res_blocks, heads, image_size)
    require(len(channels) >= 2, f"channels = {list(channels)}: the seed network needs at least "
                                "two levels (its first downsampling ends the second)")
    require(all(c % GROUPS == 0 for c in channels),
            f"channels = {list(channels)}: the seed network's GroupNorm has {GROUPS} groups, so "
            f"every width must be a multiple of {GROUPS}")
    require(time_dim >= 4 and time_dim % 2 == 0, f"time_dim = {time_dim}: expected an even "
                                                 "integer >= 4 (sin and cos of time_dim / 2 "
                                                 "frequencies)")
    widths = dict(zip(decoder_resolutions(channels, image_size), channels))
    check_attention("seed", heads, attention_resolutions, widths)


class SeedBlock(nn.Module):
    """conv, GroupNorm, SiLU, + SiLU(Linear(emb)), conv, GroupNorm, SiLU, dropout [, attention]."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float,
                 heads: int | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm1 = nn.GroupNorm(GROUPS, out_ch)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(GROUPS, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.attn = nn.MultiheadAttention(out_ch, heads, batch_first=True) if heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (B, in_ch, H, W); emb: (B, time_dim), the raw sinusoidal embedding
        h = F.silu(self.norm1(self.conv1(x)))
        h = h + F.silu(self.time_proj(emb))[:, :, None, None]
        h = self.dropout(F.silu(self.norm2(self.conv2(h))))
        if self.attn is None:
            return h
        B, C, H, W = h.shape
        tokens = h.flatten(2).transpose(1, 2)                                # (B, HW, C)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)      # (B, HW, C)
        return out.transpose(1, 2).reshape(B, C, H, W)                      # replaces h


class SeedUNet(nn.Module):
    """eps_theta(x_t, t[, labels]): (B, C, H, W) images, (B,) integer timesteps and, for a
    conditional network, (B,) class labels (K = the null label, also taken for None) ->
    (B, C, H, W)."""

    def __init__(
        self,
        channels: Sequence[int],               # width per encoder level, e.g. (96, 192, 384, 384)
        res_blocks: int,                       # blocks per level, bottleneck and decoder stage
        attention_resolutions: Sequence[int],  # decoder resolutions whose first block attends
        heads: int,                            # attention heads
        dropout: float,                        # dropout at the end of every block
        time_dim: int,                         # width of the sinusoidal time embedding
        image_size: int,                       # input height and width (the data's)
        in_channels: int,                      # image channels in and out (the data's)
        classes: int = 0,                      # K class labels (+ the null label K); 0: none
    ):
        super().__init__()
        check_arguments(channels, res_blocks, attention_resolutions, heads, time_dim, image_size)
        self.time_dim = time_dim

        def stage(in_ch: int, width: int, heads_first: int | None = None) -> nn.ModuleList:
            return nn.ModuleList([SeedBlock(in_ch if i == 0 else width, width, time_dim, dropout,
                                            heads_first if i == 0 else None)
                                  for i in range(res_blocks)])

        self.encoder, self.down, ch = nn.ModuleList(), nn.ModuleList(), in_channels
        for level, width in enumerate(channels):
            self.encoder.append(stage(ch, width))
            ch = width
            if level > 0:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.bottleneck = stage(ch, ch)

        self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
        resolutions = decoder_resolutions(channels, image_size)
        for level in reversed(range(len(resolutions))):
            width = channels[level]
            attends = resolutions[level] in attention_resolutions
            self.up.append(nn.ConvTranspose2d(ch, width, 4, stride=2, padding=1))
            self.decoder.append(stage(2 * width, width, heads if attends else None))
            ch = width
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        # Last, zero: every other weight is initialised as without it (docs/model.md)
        self.label_embed = label_embedding(classes, time_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = timestep_embedding(t, self.time_dim).to(x_t.dtype)   # (B, time_dim), no MLP
        emb = add_label(emb, self.label_embed, labels)             # + the class's row
        h, skips = x_t, []
        for level, blocks in enumerate(self.encoder):
            for block in blocks:
                h = block(h, emb)
            if level > 0:
                h = self.down[level - 1](h)                        # (B, C, H/2, W/2)
            if level < len(self.encoder) - 1:
                skips.append(h)                                    # s32, s16, s8, ...
        for block in self.bottleneck:
            h = block(h, emb)
        for up, blocks in zip(self.up, self.decoder):
            h = torch.cat([up(h), skips.pop()], dim=1)             # (B, 2 C, 2H, 2W)
            for block in blocks:
                h = block(h, emb)
        return self.conv_out(h)
