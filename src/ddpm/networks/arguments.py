"""The argument checks both UNets share: each network calls them, then checks its own rules."""
from __future__ import annotations

from typing import Sequence

from ddpm.errors import PipelineError


class ArgumentError(PipelineError, ValueError):
    """An argument a network cannot honour; the message starts with the argument's name, so
    that params.yaml's errors can name the key (model.<name>)."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ArgumentError(message)


def check_levels(channels: Sequence[int], res_blocks: int, heads: int, image_size: int) -> None:
    """Widths, blocks and heads are positive, and the image halves once per level below the top."""
    require(len(channels) > 0 and all(c >= 1 for c in channels),
            f"channels = {list(channels)}: expected one positive width per level, "
            "e.g. [96, 192, 384, 384]")
    require(res_blocks >= 1, f"res_blocks = {res_blocks}: expected a positive integer")
    require(heads >= 1, f"heads = {heads}: expected a positive integer")
    factor = 2 ** (len(channels) - 1)
    require(image_size % factor == 0,
            f"channels: {len(channels)} levels halve the image {len(channels) - 1} times, so the "
            f"image size must be divisible by {factor}; got {image_size}")


def check_attention(network: str, heads: int, attention_resolutions: Sequence[int],
                    widths: dict[int, int], always: Sequence[int] = ()) -> None:
    """widths: the width at each resolution that can attend; `always`: widths that attend anyway."""
    for res in attention_resolutions:
        require(res in widths, f"attention_resolutions: {res} is not a resolution where the "
                               f"{network} network can attend ({sorted(widths, reverse=True)})")
    attending = sorted({widths[r] for r in attention_resolutions} | set(always))
    for width in attending:
        require(width % heads == 0, f"heads = {heads}: must divide the width {width} of every "
                                    f"attention layer (widths {attending})")
