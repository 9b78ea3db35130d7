"""Training speed on one GPU, as the train stage runs it: the projected time of the seed's 600
epochs.

    python benchmarks/gpu.py                        # the full table: ~4 min on an H100-class GPU
    python benchmarks/gpu.py --json gpu.json        # also keep the rows as JSON
    python benchmarks/gpu.py --device cpu --quick   # a dry run of this script (tests, CI)

For the seed network and the DDPM network, eager / compiled (train.compile=true) / CUDA graphs
(train.compile=reduce-overhead), at train.batch_gpu 32 and 128 of an optimizer batch of 128
(4 accumulation rounds and 1): images/s of whole optimizer steps (forward, backward, clipping,
fused Adam, EMA; the data already on the device, its draws included), the GPU's busy fraction
during those steps, peak memory, and the hours 600 epochs of 50,000 images take at that speed.
Compilation happens in the first step, reported apart; the timed steps come after warm-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import references  # noqa: E402
import timing  # noqa: E402  (also puts src/ on the path)
from ddpm.runtime import resolve_device, resolve_precision  # noqa: E402

BATCH = 128              # the seed's optimizer batch (32 x 4)
EPOCHS, STEPS_PER_EPOCH = 600, 50_000 // BATCH
MODES = {"eager": False, "compiled": True, "graphs": "reduce-overhead"}
NETS = {"seed": references.SEED, "ddpm": references.DDPM_CIFAR10}
QUICK_NETS = {"seed": timing.TINY_SEED, "ddpm": timing.TINY}


def trainer_step(model: dict, images: torch.Tensor, batch: int, batch_gpu: int | str, compile,
                 device: torch.device) -> timing.Step:
    """params.yaml with these overrides (batch_gpu a number or "auto") and its training step."""
    params = timing.base_params(model, "auto", device, batch, 1, compile)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                   batch_gpu=batch_gpu))
    return timing.training_step(params, images, device)


def measure(net: str, model: dict, mode: str, batch_gpu: int | str, args, device,
            images) -> dict:
    """One row: `net` in `mode` at train.batch_gpu `batch_gpu` (the row holds the images per
    forward pass it resolved to); args: batch, steps, warmup, busy_steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = trainer_step(model, images, args.batch, batch_gpu, MODES[mode], device)
    step = trainer.run
    first = timing.seconds_of(step, device)  # compiles, records graphs
    for _ in range(args.warmup):
        step()
    timing.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    timing.synchronize(device)
    ips = args.batch * args.steps / (time.perf_counter() - start)
    row = {"network": net, "mode": mode, "batch_gpu": trainer.micro, "rounds": trainer.rounds,
           "precision": trainer.precision, "images_per_second": round(ips, 3),
           "first_step_seconds": round(first, 1),
           "hours_600_epochs": round(EPOCHS * STEPS_PER_EPOCH * BATCH / ips / 3600, 2)}
    if device.type == "cuda":
        row["gpu_busy_percent"] = round(100 * timing.gpu_busy(step, device, args.busy_steps), 1)
        row["peak_memory_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20)
    del trainer, step
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--nets", default="seed,ddpm")
    parser.add_argument("--modes", default="eager,compiled,graphs",
                        help="eager | compiled (train.compile=true) | graphs (reduce-overhead)")
    parser.add_argument("--batch-gpu", default="32,128",
                        help="comma list of train.batch_gpu (numbers or auto)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--busy-steps", type=int, default=5, help="profiled steps (GPU busy)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny networks, batch 8, eager only: a dry run of the script")
    args = parser.parse_args()
    args.batch = BATCH
    nets = QUICK_NETS if args.quick else NETS
    batch_gpus = [b if b == "auto" else int(b) for b in args.batch_gpu.split(",")]
    modes = args.modes.split(",")
    if args.quick:
        args.batch, args.steps, args.warmup, args.busy_steps = 8, 2, 1, 2
        batch_gpus, modes = [4, 8], ["eager"]
    device = resolve_device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    header = (f"{date.today()}, {device.type} ({name}), torch {torch.__version__}, "
              f"{resolve_precision('auto', device)}, optimizer batch {args.batch}")
    print(f"# {header}", flush=True)
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, device=device)
    columns = ["network", "mode", "batch_gpu", "rounds", "images_per_second",
               "gpu_busy_percent", "peak_memory_mib", "hours_600_epochs", "first_step_seconds"]
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns), flush=True)
    rows = []
    for net in args.nets.split(","):
        for mode in modes:
            for batch_gpu in batch_gpus:
                rows.append(measure(net, nets[net], mode, batch_gpu, args, device, images))
                print("| " + " | ".join(str(rows[-1].get(c, "n/a")) for c in columns) + " |",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
