"""The noise-prediction UNet of Ho et al. 2020 (Appendix B), generalised by its keyword arguments
(model.arch = ddpm).

nn.Modules only: the network maps (x_t, t) to a prediction of eps and knows nothing about the
noise schedule, the loss or the optimizer. With channels=(128, 256, 256, 256), res_blocks=2,
attention_resolutions=(16,), heads=1 it is the paper's CIFAR-10 network, parameter for parameter
(35,746,307, as in the original TensorFlow code and diffusers' google/ddpm-cifar10-32), and it
computes what they compute: ddpm.interop maps the weights between diffusers' UNet2DModel and it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.networks.arguments import check_attention, check_levels
from ddpm.networks.embedding import add_label, label_embedding, timestep_embedding


def check_arguments(channels: Sequence[int], res_blocks: int, attention_resolutions: Sequence[int],
                    heads: int, image_size: int) -> None:
    """ArgumentError, naming the argument, for a network this constructor cannot build."""
    check_levels(channels, res_blocks, heads, image_size)
    widths = {image_size >> level: width for level, width in enumerate(channels)}
    check_attention("ddpm", heads, attention_resolutions, widths, always=[channels[-1]])


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in the paper; narrower or odd widths get the largest group count dividing them.
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    # The original zero-initialises every layer that ends a residual branch and the output.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, + time embedding, GroupNorm, SiLU, dropout, 3x3 conv; residual."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (B, in_ch, H, W); emb: (B, emb_dim), already through SiLU
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Residual multi-head self-attention over the H*W positions, after a GroupNorm.

    The q, k, v and output projections are per-position linear maps (the original's 1x1 "nin"
    layers), applied to the (B, HW, C) tokens: a matmul is cheaper than a 1x1 convolution.
    """

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = zero_init(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)            # (B, HW, C)
        qkv = self.qkv(tokens).view(B, H * W, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                        # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)                 # softmax(q k^T / sqrt(d)) v
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, C))       # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """A stride-2 3x3 convolution over the input padded with one zero row and column after it
    (bottom and right), as Ho et al.'s TensorFlow code (padding SAME) and diffusers
    (downsample_padding=0) compute it, so that their weights give their outputs here
    (ddpm.interop). A symmetric padding of 1, as this class had before, samples the grid one
    pixel up and left of theirs: 0.7 max abs difference in eps (random weights in the layout of
    google/ddpm-cifar10-32), against 2e-6 now (tests/test_interop.py)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _fold_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum the 3 taps of `w` along `dim` onto the 2 source pixels that each output parity of a
    nearest x2 upsampling reads: (..., 3, ...) -> (2 parities, ..., 2, ...)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)])


def _layout(x: torch.Tensor) -> torch.memory_format:
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


class _Interleave(torch.autograd.Function):
    """(B, 2, 2, C, H+1, W+1) parity planes -> (B, C, 2H, 2W) image: pixel (2i + a, 2j + b) is
    plane (a, b) at (i + a, j + b). One strided copy each way; autograd's own slicing would
    zero-fill and copy a whole plane set per parity in the backward pass."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
        B, _, _, C, H, W = z.shape
        H, W = H - 1, W - 1
        ctx.z_shape, ctx.z_stride = z.shape, z.stride()
        y = torch.empty((B, C, 2 * H, 2 * W), dtype=z.dtype, device=z.device,
                        memory_format=layout)
        pixels = y.view(B, C, H, 2, W, 2)
        for a in (0, 1):
            for b in (0, 1):
                pixels[:, :, :, a, :, b].copy_(z[:, a, b, :, a:a + H, b:b + W])
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        B, _, _, C, H, W = ctx.z_shape
        H, W = H - 1, W - 1
        grad = torch.empty_strided(ctx.z_shape, ctx.z_stride, dtype=grad_y.dtype,
                                   device=grad_y.device)
        pixels = grad_y.unflatten(3, (W, 2)).unflatten(2, (H, 2))
        for a in (0, 1):
            for b in (0, 1):
                grad[:, a, b, :, a:a + H, b:b + W].copy_(pixels[:, :, :, a, :, b])
        for a in (0, 1):  # the row and column of each plane that no output pixel reads
            grad[:, a, :, :, H * (1 - a)].zero_()
            grad[:, :, a, :, :, W * (1 - a)].zero_()
        return grad, None


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution, as in the paper.

    Computed as its exact sub-pixel equivalent: each output pixel of parity (a, b) reads a 2x2
    window of the low-resolution input, with the 3x3 kernel's taps summed per source pixel. One
    2x2 convolution with 4x the output channels on the padded input, then an interleave of the
    four parities: 16 instead of 36 multiply-adds per input pixel and output channel, and the
    upsampled tensor is never built. The parameters are still the 3x3 convolution's (`conv`).
    """

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, _, H, W = x.shape
        out = self.conv.out_channels
        # kernel[a, b]: the 2x2 kernel of output parity (row a, column b); sums stay fp32
        kernel = _fold_taps(_fold_taps(self.conv.weight, -2), -1)     # (b, a, out, in, 2, 2)
        kernel = kernel.transpose(0, 1).reshape(4 * out, -1, 2, 2)
        z = F.conv2d(x, kernel, self.conv.bias.repeat(4), padding=1)  # (B, 4 out, H+1, W+1)
        return _Interleave.apply(z.view(B, 2, 2, out, H + 1, W + 1), _layout(x))


class ResAttn(nn.Module):
    """A residual block, followed by self-attention where the resolution asks for it."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, heads: int | None):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = Attention(out_ch, heads) if heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h


class DDPMUNet(nn.Module):
    """eps_theta(x_t, t[, labels]): (B, C, H, W) images, (B,) integer timesteps and, for a
    conditional network, (B,) class labels (K = the null label, also taken for None) ->
    (B, C, H, W)."""

    def __init__(
        self,
        channels: Sequence[int],               # width per resolution: 32, 16, 8, 4 for four
        res_blocks: int,                       # residual blocks per resolution (encoder side)
        attention_resolutions: Sequence[int],  # resolutions with self-attention, e.g. (16,)
        heads: int,                            # attention heads
        dropout: float,                        # dropout inside every residual block
        image_size: int,                       # input height and width (the data's)
        in_channels: int,                      # image channels in and out (the data's)
        classes: int = 0,                      # K class labels (+ the null label K); 0: none
    ):
        super().__init__()
        check_arguments(channels, res_blocks, attention_resolutions, heads, image_size)
        base, emb_dim = channels[0], 4 * channels[0]
        self.base = base
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)

        def block(in_ch: int, out_ch: int, level: int) -> ResAttn:
            attends = (image_size >> level) in attention_resolutions
            return ResAttn(in_ch, out_ch, emb_dim, dropout, heads if attends else None)

        # Encoder: every block's output is kept as a skip connection for the decoder.
        self.down = nn.ModuleList()
        skip_widths, ch = [base], base
        for level, width in enumerate(channels):
            for _ in range(res_blocks):
                self.down.append(block(ch, width, level))
                ch = width
                skip_widths.append(ch)
            if level < len(channels) - 1:
                self.down.append(Downsample(ch))
                skip_widths.append(ch)

        self.mid = nn.ModuleList([ResAttn(ch, ch, emb_dim, dropout, heads),
                                  ResAttn(ch, ch, emb_dim, dropout, None)])

        # Decoder: res_blocks + 1 blocks per resolution, each eating one skip connection.
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(channels))):
            for _ in range(res_blocks + 1):
                self.up.append(block(ch + skip_widths.pop(), width, level))
                ch = width
            if level > 0:
                self.up.append(Upsample(ch))

        self.norm_out = group_norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, in_channels, 3, padding=1))
        # Last, zero: every other weight is initialised as without it (docs/model.md). Added
        # before the SiLU, as diffusers' UNet2DModel adds its class_embedding.
        self.label_embed = label_embedding(classes, emb_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.base).to(x_t.dtype))  # (B, 4 base)
        emb = F.silu(add_label(emb, self.label_embed, labels))
        h = self.conv_in(x_t)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
