"""One optimizer step's images under EDM's batch semantics (NVlabs/edm train.py): the draws of
each image of the batch, whatever the split, and the micro-batch size that fits the device.

train.batch_size is the optimizer's batch over all processes; train.batch_gpu caps the images
one process puts through forward+backward at once (params.split_batch derives the rounds).
"""
from __future__ import annotations

from typing import Callable

import torch

from ddpm.errors import TrainingError
from ddpm.images import to_float

CPU_BATCH_GPU = 32  # batch_gpu auto on a CPU, where host memory is no limit to probe for


def draw(generator: torch.Generator, batch: int, timesteps: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The randomness of one optimizer step, per image k of its batch: a left-right flip
    (probability 1/2), t ~ U{0..T-1} and eps ~ N(0, I), (B,), (B,) and (B, 3, 32, 32). Every
    process draws the whole batch's and takes its share, so image k's draws never depend on how
    the batch is split."""
    device = generator.device
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    t = torch.randint(0, timesteps, (batch,), device=device, generator=generator)
    noise = torch.randn((batch, 3, 32, 32), device=device, generator=generator)
    return flip, t, noise


def augment(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) on the device -> float [-1, 1], image i flipped left-right if flip[i]."""
    x = to_float(images)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def resolve_batch_gpu(setting: int | str, share: int, device: torch.device,
                      fits: Callable[[int], bool]) -> int:
    """train.batch_gpu -> the images per micro-batch, a divisor of the process's share.

    A number is a cap (EDM's --batch-gpu). auto takes the whole share if it fits, else the
    largest power-of-two divisor of it that does, trying from the largest down (`fits` runs one
    forward+backward and says whether it ran out of memory); on a CPU it is 32 or less, without
    trying, since host memory is no limit there."""
    if setting != "auto":
        return min(int(setting), share)
    candidates = [share] + [2**k for k in range(share.bit_length() - 1, -1, -1)
                            if 2**k < share and share % 2**k == 0]
    if device.type != "cuda":
        return next(c for c in candidates if c <= CPU_BATCH_GPU)
    for candidate in candidates:
        if fits(candidate):
            return candidate
    raise TrainingError(f"out of memory with a single image per forward pass on {device}: the "
                        "network does not fit this GPU (try train.precision=bf16 or a smaller "
                        "model.channels)")
