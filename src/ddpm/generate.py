"""The sample stage's work: N images from the EMA weights, image i a function of (seed, i) only."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddpm import checkpoint, networks
from ddpm.diffusion import Schedule, sample, timesteps_for
from ddpm.images import to_uint8, write_pngs
from ddpm.params import Params
from ddpm.runtime import World, autocast, derive_seed, resolve_compile


def load_ema_model(path: str | Path, params: Params, device: torch.device) -> torch.nn.Module:
    """The network of params.model with the EMA weights of models/ema.pt, ready to sample."""
    state = checkpoint.load(path, "EMA weights file")
    if "ema" not in state:
        raise checkpoint.CheckpointError(f"{path}: no 'ema' weights in it (keys: {sorted(state)})")
    model = networks.build(params.model)
    checkpoint.load_weights(model, state["ema"], state.get("config", {}).get("model"),
                            params.model, path)
    return for_sampling(model.to(device), resolve_compile(params.sample.compile, device))


def for_sampling(model: torch.nn.Module, compile: bool) -> torch.nn.Module:
    """The model as the sample stage runs it: eval mode, no gradients, and on a CPU channels_last.

    The layout is the faster one per device, measured for the whole forward: on an AVX2 CPU,
    oneDNN's NHWC convolutions made it 1.2x faster than NCHW (benchmarks/bench.py); on an H100
    in bf16 at batch 250, eager NCHW ran 9,352 images/s and NHWC 7,641, and compiled both ran
    19,600 (one run each, README). With compile, inductor gets the weights frozen into the graph
    as constants (for inference only), so it can prepack them and fuse the GroupNorm, SiLU and
    additions around the convolutions.
    """
    model = model.eval().requires_grad_(False)
    if next(model.parameters()).device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model, options={"freezing": True}) if compile else model


def shard(num_images: int, world: World) -> range:
    """This process's contiguous share of the image indices 0..N-1."""
    per = -(-num_images // world.size)
    return range(min(world.rank * per, num_images), min((world.rank + 1) * per, num_images))


def generate(model: torch.nn.Module, sched: Schedule, params: Params, precision: str,
             indices: range, folder: Path, progress: bool = True) -> None:
    """Sample images `indices` in batches of sample.batch_size and write them as {i}.png.

    The progress bar counts denoising steps of whole batches, so it moves within a batch.
    """
    sp, device = params.sample, sched.device
    batches = range(indices.start, indices.stop, sp.batch_size)
    with tqdm(total=len(indices) * len(timesteps_for(sched.timesteps, sp.steps)), desc="sample",
              unit="img-step", unit_scale=True, disable=not progress, dynamic_ncols=True) as bar:
        for start in batches:
            ids = range(start, min(start + sp.batch_size, indices.stop))
            gens = [torch.Generator(device).manual_seed(derive_seed(params.seed, i, "sample"))
                    for i in ids]
            with autocast(precision, device):
                x = sample(model, sched, (len(ids), 3, 32, 32), sp.sampler, sp.steps, gens,
                           eta=sp.eta, variance=sp.variance, clip_denoised=sp.clip_denoised,
                           progress=lambda: bar.update(len(ids)))
            write_pngs(to_uint8(x), folder, start=start)


def generate_folder(model: torch.nn.Module, sched: Schedule, params: Params, precision: str,
                    out: Path, world: World) -> None:
    """All sample.num_images images into `out`, split across processes; `out` appears complete.

    The processes write into one staging folder beside `out` (the filesystem is shared, as for
    the checkpoints); the main process renames it once every process has finished.
    """
    staging = out.parent / f".{out.name}.partial"
    if world.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    world.barrier()
    generate(model, sched, params, precision, shard(params.sample.num_images, world), staging,
             progress=world.main)
    world.barrier()
    if world.main:
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
