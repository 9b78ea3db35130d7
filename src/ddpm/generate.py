"""The sample stage's work: N images from the EMA weights, image i a function of (seed, i) only.

The processes draw into a staging folder beside the output, which is renamed when complete. A
killed run's images stay there with a manifest of what they were drawn from, and the next run
with the same weights and params keeps them: it draws only the batches that are missing.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ddpm import checkpoint, networks
from ddpm.diffusion import Schedule, sample, timesteps_for
from ddpm.errors import PipelineError
from ddpm.files import file_digest, read_regular, refuse_non_folder, write_json
from ddpm.images import read_png, to_uint8, write_pngs
from ddpm.labels import class_indices, image_labels, recorded_classes
from ddpm.params import Params, plain
from ddpm.runtime import World, autocast, compile_mode, derive_seed, device_name

MANIFEST = "manifest.json"  # in the staging folder while it fills; never in the output
WEIGHTS_KEY = "ema.sha256"


def load_ema_model(path: str | Path, params: Params, device: torch.device
                   ) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The network of params.model with the EMA weights of models/ema.pt, ready to sample, and
    the (C, H, W) of the images it was trained on (load_sampling_model without the classes)."""
    return load_sampling_model(path, params, device)[:2]


def load_sampling_model(path: str | Path, params: Params, device: torch.device
                        ) -> tuple[torch.nn.Module, tuple[int, int, int], list[str]]:
    """The network of params.model with the EMA weights of models/ema.pt, ready to sample, the
    (C, H, W) of the images it was trained on, and its class names ([]: unconditional)."""
    state = checkpoint.load(path, "EMA weights file")
    weights = checkpoint.ema_weights(state, path)  # a dict of named tensors, or one line
    if bad := checkpoint.non_finite(weights):
        raise checkpoint.CheckpointError(f"{path}: its EMA weights hold NaN or infinite values "
                                         f"({', '.join(bad[:3])}): retrain (dvc repro train)")
    config = state.get("config", {})
    if not isinstance(config, dict) or not isinstance(config.get("model") or {}, dict):
        raise checkpoint.CheckpointError(f"{path}: its recorded config is not a dict of params.yaml"
                                         " sections; retrain (dvc repro train), or restore it "
                                         "(dvc checkout / dvc pull)")
    shape = checkpoint.image_shape(state, path)
    checkpoint.check_conditional(config.get("model"), params.model, path)
    classes = recorded_classes(state, path, params.model.conditional)
    if classes:  # sample.labels names classes it has, or one line
        class_indices(params.sample.labels, classes)
    model = networks.build(params.model, shape, len(classes))
    checkpoint.load_weights(model, weights, config.get("model"), params.model, path)
    return (for_sampling(model.to(device), compile_mode(params.sample.compile, device)), shape,
            classes)


def for_sampling(model: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """The model as the sample stage runs it: eval mode, no gradients, channels_last on a CPU
    (the faster layout per device: docs/benchmarks.md), and compiled in `mode` (None: eager)
    with the weights frozen into the graph as constants, which inference alone allows."""
    model = model.eval().requires_grad_(False)
    if next(model.parameters()).device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    if mode is None:
        return model
    from torch._inductor import list_mode_options  # what a mode stands for, to join freezing
    return torch.compile(model, options={**list_mode_options(mode), "freezing": True})


def shard(num_images: int, world: World) -> range:
    """This process's contiguous share of the image indices 0..N-1."""
    per = -(-num_images // world.size)
    return range(min(world.rank * per, num_images), min((world.rank + 1) * per, num_images))


def batches(indices: range, batch_size: int) -> list[range]:
    """The batches `indices` are drawn in. A resumed run draws the very batches an uninterrupted
    one would: an image drawn in another batch may differ by one level (tests/test_sample.py),
    and the output must be byte-identical."""
    return [range(start, min(start + batch_size, indices.stop))
            for start in range(indices.start, indices.stop, batch_size)]


def sample_manifest(ema: Path, params: Params, precision: str, device: torch.device,
                    world: World, digest: str | None = None,
                    classes: Sequence[str] = ()) -> dict[str, Any]:
    """Everything the bytes of image i depend on, flat, by params.yaml's dotted keys.

    Besides the weights (by content: the file `ema`'s sha256, or `digest` where the weights are
    not one file's), seed, model.* and diffusion.*: every sample.* key, batch size and compile
    included (the batch an image is drawn in and a compiled forward can each move a pixel by one
    level), the resolved precision, the device, the number of processes (the shards decide the
    batches) and torch's version; a conditional model's class names (sample.labels names them).
    """
    flat: dict[str, Any] = {WEIGHTS_KEY: digest or file_digest(ema, "sha256"), "seed": params.seed}
    sample_params = dict(dataclasses.asdict(params.sample),
                         compile=compile_mode(params.sample.compile, device))
    for section, values in (("model", dataclasses.asdict(params.model)),
                            ("diffusion", dataclasses.asdict(params.diffusion)),
                            ("sample", sample_params)):
        flat.update({f"{section}.{key}": value for key, value in values.items()})
    flat.update({"precision": precision, "processes": world.size, "torch": torch.__version__,
                 "device": device_name(device) if device.type == "cuda" else device.type})
    if classes:
        flat["classes"] = list(classes)
    return json.loads(json.dumps(plain(flat)))  # as the manifest will hold it


def generate(model: torch.nn.Module, sched: Schedule, shape: Sequence[int], params: Params,
             precision: str, indices: range, folder: Path, progress: bool = True,
             classes: Sequence[str] = ()) -> None:
    """Sample images `indices` of `shape` (C, H, W) in batches of sample.batch_size and write
    them as {i}.png, skipping the batches whose images are all in `folder` already. A
    conditional model (its `classes` given) draws image i as the class sample.labels gives it,
    with guidance sample.guidance.

    The bar counts images and advances per denoising step, so it moves within a batch; its
    images/s and ETA are for the whole share, and kept images count from the start.
    """
    sp, device = params.sample, sched.device
    present = {path.name for path in folder.iterdir()}
    todo = [ids for ids in batches(indices, sp.batch_size)
            if not all(f"{i}.png" in present for i in ids)]
    steps = len(timesteps_for(sched.timesteps, sp.steps))
    with tqdm(total=len(indices), initial=len(indices) - sum(map(len, todo)), desc="sample",
              unit="img", bar_format="{l_bar}{bar}| {n:,.0f}/{total:,} [{elapsed}<{remaining}, "
              "{rate_fmt}]", disable=not progress, dynamic_ncols=True) as bar:
        for ids in todo:
            gens = [torch.Generator(device).manual_seed(derive_seed(params.seed, i, "sample"))
                    for i in ids]
            # Each step advances the bar by a fraction of the batch, computed from the step count
            # so that fractions do not add up to 2.9999 images.
            done, size, step = bar.n, len(ids), itertools.count(1)
            labels = image_labels(sp.labels, classes, ids) if classes else None
            with autocast(precision, device):
                x = sample(model, sched, (size, *shape), sp.sampler, sp.steps, gens,
                           eta=sp.eta, variance=sp.variance, clip_denoised=sp.clip_denoised,
                           progress=lambda done=done, size=size, step=step: bar.update(
                               done + size * next(step) / steps - bar.n),
                           labels=labels, guidance=sp.guidance if classes else 0.0,
                           null_label=len(classes))
            if not bool(torch.isfinite(x).all()):  # to_uint8 would make them black, silently
                raise PipelineError(
                    f"images {ids.start}-{ids.stop - 1} came out NaN or infinite ({precision}, "
                    f"{sp.sampler}, {sp.steps} steps) and were not written: with fp16 try "
                    "train.precision=bf16 or fp32; else the EMA weights are bad (retrain)")
            write_pngs(to_uint8(x), folder, start=ids.start)


def keep_or_clean(staging: Path, wanted: dict[str, Any], params: Params, world: World,
                  size: int) -> int:
    """Main process: keep the staging folder's images if its manifest is `wanted`, in whole
    batches, else start it afresh; say which, and why. Returns the number of images kept."""
    n = params.sample.num_images
    refuse_non_folder(staging)  # never emptied or filled through a link
    try:  # a regular file only: not through a link, and a FIFO is not waited on
        found = json.loads(read_regular(staging / MANIFEST) or b"null")
    except ValueError:
        found = None
    if found == wanted:
        kept = _keep_whole_batches(staging, n, [ids for rank in range(world.size) for ids in
                                                batches(shard(n, World(rank, world.size)),
                                                        params.sample.batch_size)], size)
        if kept:
            print(f"sample: kept {kept:,} of {n:,} images from an interrupted run (same EMA "
                  f"weights and params); drawing {n - kept:,}", file=sys.stderr, flush=True)
        return kept
    if staging.exists():
        count = sum(1 for path in staging.glob("*.png"))
        print(f"sample: discarding {count:,} images of an interrupted run in {staging}: "
              f"{_why(found, wanted)}; drawing all {n:,}", file=sys.stderr, flush=True)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_json(staging / MANIFEST, wanted)
    return 0


def _why(found: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
    if found is None:
        return "no readable record of the weights and params they were drawn with"
    keys = sorted(key for key in found.keys() | wanted.keys() if found.get(key) != wanted.get(key))
    return "other " + ", ".join("EMA weights" if key == WEIGHTS_KEY else
                                f"{key} ({found.get(key)!r}, now {wanted.get(key)!r})"
                                for key in keys)


def _keep_whole_batches(staging: Path, num_images: int, layout: list[range], size: int) -> int:
    """Remove all but the manifest and the readable size x size images of complete batches (a
    kill leaves temp files and part of the batch it was writing); return how many are kept."""
    names = {f"{i}.png" for i in range(num_images)}
    readable = set()
    for path in staging.iterdir():
        mode = os.lstat(path).st_mode
        if path.name == MANIFEST and stat.S_ISREG(mode):
            continue
        try:  # regular files only: a link is not followed, a FIFO not opened
            if (path.name in names and stat.S_ISREG(mode)
                    and read_png(path, size, pixels=False) is None):
                readable.add(int(path.stem))
                continue
        except PipelineError:
            pass
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)
        else:
            path.unlink()  # a link itself, not what it points to
    kept = {i for ids in layout if readable.issuperset(ids) for i in ids}
    for i in readable - kept:
        (staging / f"{i}.png").unlink()
    return len(kept)


def staging_folder(out: Path) -> Path:
    """Where the images of `out` are drawn, and an interrupted run's wait for the next."""
    return out.parent / f".{out.name}.partial"


def where(out: Path) -> str:
    """What an interrupted sample stage keeps, and how to go on (ddpm.cli.on_interrupt)."""
    return (f"; the images drawn so far are kept in {staging_folder(out)} for a run with the same "
            "EMA weights and params. Run the same command again to draw the rest")


def generate_folder(model: torch.nn.Module, sched: Schedule, shape: Sequence[int],
                    params: Params, precision: str, out: Path, world: World,
                    wanted: dict[str, Any], classes: Sequence[str] = ()) -> int:
    """All sample.num_images images into `out`, split across processes; `out` appears complete,
    without the manifest, as an uninterrupted run's. Returns how many images were kept.

    wanted: sample_manifest(...) of this run. The processes write into one staging folder beside
    `out` (the filesystem is shared, as for the checkpoints); the main process decides what of an
    interrupted run is kept before the others look, and renames the folder once all finished.
    """
    staging = staging_folder(out)
    if world.main:  # before anything is deleted or drawn: no link is followed, emptied or moved
        refuse_non_folder(out, staging)
    kept = keep_or_clean(staging, wanted, params, world, shape[1]) if world.main else 0
    world.barrier()
    generate(model, sched, shape, params, precision, shard(params.sample.num_images, world),
             staging, progress=world.main, classes=classes)
    world.barrier()
    if world.main:
        refuse_non_folder(out, staging)  # nor one made while the images were drawn
        (staging / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return kept
