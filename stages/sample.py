"""sample: sample.num_images PNGs from the EMA weights; image i depends on seed and i only."""
import argparse
import dataclasses
import time
from pathlib import Path

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm import cli
from ddpm.diffusion import Schedule
from ddpm.files import sweep_temporaries, write_json
from ddpm.generate import generate_folder, load_sampling_model, sample_manifest, where
from ddpm.images import grid, list_pngs, read_png, save_png
from ddpm.labels import class_grid, counts
from ddpm.params import load_params_or_exit
from ddpm.runtime import (compile_mode, keep_freed_host_memory, resolve_precision,
                          start_processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ema", required=True, type=Path, help="EMA weights file (train's)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics JSON to write")
    parser.add_argument("--report", required=True, type=Path, help="JSON of the run's facts")
    parser.add_argument("--grid", required=True, type=Path, help="PNG grid of the first 64 (a "
                        "conditional model's: 8 of each class drawn, one labelled row each)")
    args = parser.parse_args()
    params = load_params_or_exit()
    world, device = start_processes(params.device, params.train.gpus)
    if world.main:  # what a killed run's writes left behind (the staging folder sorts its own)
        sweep_temporaries(args.out.parent, args.metrics.parent, args.grid.parent)
    keep_freed_host_memory(device)  # on CPUs: no page faults on every step's activations
    precision = resolve_precision(params.train.precision, device)
    model, shape, classes = load_sampling_model(args.ema, params, device)
    sched = Schedule(**dataclasses.asdict(params.diffusion)).to(device)
    wanted = sample_manifest(args.ema, params, precision, device, world,  # what kept images share
                             classes=classes)
    cli.on_interrupt(lambda: where(args.out) if world.main else None)
    start = time.perf_counter()
    kept = generate_folder(model, sched, shape, params, precision, args.out, world, wanted,
                           classes)
    seconds = time.perf_counter() - start
    if world.main:
        cli.done(f"the {params.sample.num_images} images are in {args.out}")
        sp = params.sample
        save_png(class_grid(args.out, shape[1], sp.labels, classes, sp.num_images) if classes
                 else grid([read_png(path, shape[1]) for path in list_pngs(args.out)[:64]]),
                 args.grid)
        drawn = sp.num_images - kept  # this run's work: its seconds and images/s exclude the kept
        write_json(args.metrics, {"seconds": round(seconds, 3),
                                  "images_per_second": round(drawn / seconds, 3)})
        write_json(args.report, {
            "num_images": sp.num_images, "kept_images": kept, "sampler": sp.sampler,
            "steps": sp.steps, "precision": precision,
            "compile": compile_mode(sp.compile, device) or "eager", "processes": world.size,
            **({"guidance": sp.guidance, "labels": counts(sp.labels, classes, sp.num_images)}
               if classes else {})})
        resumed = f", {kept} kept from an interrupted run" if kept else ""
        print(f"sample: {sp.num_images} images ({sp.sampler}, {sp.steps} steps{resumed}) in "
              f"{seconds:.1f} s -> {args.out}")
    world.close()


if __name__ == "__main__":
    cli.run(main)
