"""The optimizer steps' images under EDM's batch semantics (NVlabs/edm train.py): what each image
of a batch draws, whatever the split, and the micro-batch size that fits the device.

train.batch_size is the optimizer's batch over all processes; train.batch_gpu caps the images
one process puts through forward+backward at once (params.split_batch derives the rounds).
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist

from ddpm.errors import PipelineError
from ddpm.images import to_float
from ddpm.params import TrainParams, split_batch
from ddpm.runtime import World, autocast, derive_seed

CPU_BATCH_GPU = 32  # batch_gpu auto on a CPU, where host memory is no limit to probe for


class Draws(NamedTuple):
    """This process's share of one optimizer step, image by image: data indices (B,), left-right
    flips (B,), timesteps (B,), noise (B, C, H, W) and, for a conditional model, the labels it
    trains with (B,: the image's class, or the null label where dropped), all on the device."""
    idx: torch.Tensor
    flip: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    labels: torch.Tensor | None = None


def draw(generator: torch.Generator, batch: int, timesteps: int, shape: Sequence[int]
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The randomness of one optimizer step, per image k of its batch: a left-right flip
    (probability 1/2), t ~ U{0..T-1} and eps ~ N(0, I), (B,), (B,) and (B, *shape). Every
    process draws the whole batch's and takes its share, so image k's draws never depend on how
    the batch is split."""
    device = generator.device
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    t = torch.randint(0, timesteps, (batch,), device=device, generator=generator)
    noise = torch.randn((batch, *shape), device=device, generator=generator)
    return flip, t, noise


def drop_labels(generator: torch.Generator, labels: torch.Tensor, dropout: float,
                null: int) -> torch.Tensor:
    """Classifier-free guidance's training labels (Ho & Salimans 2022, Algorithm 1): each of
    `labels` (B,) replaced by the null label with probability `dropout`, from `generator`."""
    drop = torch.rand(len(labels), device=generator.device, generator=generator) < dropout
    return torch.where(drop.to(labels.device), torch.full_like(labels, null), labels)


def epoch_draws(seed: int, epoch: int, num_images: int, batch: int, timesteps: int,
                shape: Sequence[int], world: World, device: torch.device,
                labels: torch.Tensor | None = None, label_dropout: float = 0.0,
                null: int = 0) -> Iterator[Draws]:
    """Every optimizer step of an epoch, this process's share: the data order and the draws
    come from (seed, epoch) alone and are the same on every process, so a resumed epoch replays
    an uninterrupted one. The N % batch images left over by the shuffle wait for another epoch.
    labels: the (N,) classes of a conditional model's images on the device, dropped to `null`
    at the rate label_dropout from a stream of their own, so that a conditional run draws the
    images, flips, timesteps and noise of the unconditional run of the same seed (and that run
    what it drew before labels existed); None for an unconditional model."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(
        derive_seed(seed, epoch, "order"))).to(device)
    generator = torch.Generator(device).manual_seed(derive_seed(seed, epoch, "noise"))
    dropping = (torch.Generator(device).manual_seed(derive_seed(seed, epoch, "labels"))
                if labels is not None else None)
    share = batch // world.size
    mine = slice(world.rank * share, (world.rank + 1) * share)
    for step in range(num_images // batch):
        idx = order[step * batch:(step + 1) * batch]
        flip, t, noise = draw(generator, batch, timesteps, shape)
        y = None if labels is None else drop_labels(dropping, labels[idx], label_dropout, null)
        yield Draws(idx[mine], flip[mine], t[mine], noise[mine], None if y is None else y[mine])


def augment(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) on the device -> float [-1, 1], image i flipped left-right if flip[i]."""
    x = to_float(images)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def probe(model: torch.nn.Module, timesteps: int, shape: Sequence[int], precision: str,
          device: torch.device) -> Callable[[int], bool]:
    """fits(n): whether one eager forward+backward of n random images runs without running out
    of memory. It leaves no gradients and advances no random stream."""
    def fits(images: int) -> bool:
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    autocast(precision, device):
                x = torch.randn(images, *shape, device=device,
                                dtype=next(model.parameters()).dtype)
                t = torch.randint(0, timesteps, (images,), device=device)
                model(x, t).float().square().mean().backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return fits


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
    raise PipelineError(f"out of memory with a single image per forward pass on {device}: the "
                        "network does not fit this GPU (try train.precision=bf16 or a smaller "
                        "model.channels)")


def split(train: TrainParams, world: World, device: torch.device,
          fits: Callable[[int], bool]) -> tuple[int, int]:
    """(images per micro-batch, accumulation rounds) of this run, the same on every process."""
    share = train.batch_size // world.size
    micro = resolve_batch_gpu(train.batch_gpu, share, device, fits)
    if world.size > 1:  # the ranks must agree on the rounds (DDP synchronises in the last)
        agreed = torch.tensor(micro, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        micro = int(agreed)
    _, micro, rounds = split_batch(train.batch_size, world.size, micro)
    return micro, rounds
