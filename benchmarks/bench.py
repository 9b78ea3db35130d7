"""Throughput of the pipeline against what a user would otherwise run, on this machine.

    python benchmarks/bench.py                 # the full table (CPU: ~40 min; GPU: minutes)
    python benchmarks/bench.py --quick         # a smoke run of every section (CI)
    python benchmarks/bench.py --precisions bf16,fp32 --steps 10 --sample-batch 250 \
        --sampler-steps 20 --compile sampling,train   # what the README's GPU table ran

Every figure is the median of per-step times over interleaved A/B rounds after warm-up, so
both sides see the same machine state. Needs requirements-bench.txt for the diffusers column.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import yaml

from timing import (ROOT, TINY, TINY_SEED, Table, base_params, flops_per_image, gpu_busy,
                    have_diffusers, interleaved, native_bf16, network, peak_flops, seconds_of,
                    training_step)
import references  # noqa: E402  (after timing, which puts src/ and tests/ on the path)
from ddpm import networks  # noqa: E402
from ddpm.diffusion import Schedule, sample  # noqa: E402
from ddpm.generate import for_sampling  # noqa: E402
from ddpm.runtime import autocast, keep_freed_host_memory, resolve_device  # noqa: E402


def ours_step(model: dict, images, batch: int, precision: str, device: torch.device,
              accum: int = 1, compile_mode: str | None = None):
    """The pipeline's own optimizer step (ddpm.step.train_step), eager or compiled in
    compile_mode as train.compile runs it: (the network, a function taking one step)."""
    params = base_params(model, precision, device, batch, accum, compile=compile_mode or False)
    step = training_step(params, images, device)
    return step.state.model, step.run


def bench_precision(table, args, device, images):
    """train.precision auto on this device: the seed network's training step in bf16 autocast
    against fp32 (on CPUs, bf16 is only fast where it is native: AVX512-BF16 or AMX)."""
    cfg = TINY_SEED if args.quick else references.SEED
    fns = {p: ours_step(cfg, images, args.batch, p, device)[1] for p in ("fp32", "bf16")}
    med = interleaved(fns, device, args.rounds, args.steps)
    native = "native" if native_bf16(device) else "emulated"
    table.add(f"train step, seed network, batch {args.batch}: bf16 ({native}) vs fp32", "bf16",
              args.batch / med["bf16"], args.batch / med["fp32"], "fp32", "img/s")


def bench_train(table, args, device, precision, images, compile_modes):
    ddpm = TINY if args.quick else references.DDPM_CIFAR10
    ours_model, ours = ours_step(ddpm, images, args.batch, precision, device)
    fns = {"ours": ours}
    if have_diffusers() and not args.quick:
        ref_model, fns["diffusers"] = references.diffusers_step(images, args.batch, precision,
                                                                device)
    first = {}
    for mode in compile_modes:
        _, fns[mode] = ours_step(ddpm, images, args.batch, precision, device, compile_mode=mode)
        first[mode] = seconds_of(fns[mode], device)
    med = interleaved(fns, device, args.rounds, args.steps)
    ips = {k: args.batch / v for k, v in med.items()}
    table.add(f"train step, DDPM config, batch {args.batch}", precision, ips["ours"],
              ips.get("diffusers"), "diffusers UNet2DModel", "img/s")
    for mode in compile_modes:
        what = "train.compile" if mode == "default" else f"torch.compile mode={mode}"
        table.add(f"  with {what} (first call {first[mode]:.0f} s)", precision, ips[mode],
                  ips.get("diffusers"), "diffusers UNet2DModel", "img/s")
    # Each model's own FLOPs: ours computes the upsampling layers with fewer (unet.Upsample).
    gflop = flops_per_image(ours_model, device, train=True) / 1e9
    ref_gflop = flops_per_image(ref_model, device, train=True) / 1e9 if "diffusers" in fns else 0
    table.add(f"  achieved FLOP/s ({gflop:.1f} / {ref_gflop:.1f} GFLOP/img fwd+bwd)", precision,
              gflop * ips["ours"], ref_gflop * ips.get("diffusers", 0), "diffusers", "GFLOP/s")
    if device.type == "cuda":
        busy = {name: 100 * gpu_busy(fn, device, args.steps) for name, fn in fns.items()}
        for name in ["ours", *compile_modes]:
            label = "eager" if name == "ours" else name
            table.add(f"  GPU busy during the step ({label})", precision, busy[name],
                      busy.get("diffusers"), "diffusers", "%")
    del fns, ours


def bench_seed(table, args, device, precisions, images):
    """Ours at its best precision here vs the seed notebook's loop (fp32 on a CPU)."""
    seed_cfg = TINY_SEED if args.quick else references.SEED
    best = "bf16" if "bf16" in precisions else precisions[0]
    _, ours = ours_step(seed_cfg, images, args.batch, best, device)
    torch.manual_seed(0)
    seed_style = references.seed_style_step(network(seed_cfg), images, args.batch, device,
                                             workers=0 if args.quick else 2)
    med = interleaved({"ours": ours, "seed": seed_style}, device, args.rounds, args.steps)
    seed_name = "seed-style loop, " + ("fp16" if device.type == "cuda" else "fp32")
    table.add(f"train step, seed config, batch {args.batch}", best, args.batch / med["ours"],
              args.batch / med["seed"], seed_name, "img/s")
    if device.type == "cuda":  # the seed's own step: batch 32 x 4 micro-batches per Adam step
        _, ours_accum = ours_step(seed_cfg, images, args.batch, best, device, accum=4)
        table.add(f"  GPU busy, ours batch {args.batch} x 4 accumulation", best,
                  100 * gpu_busy(ours_accum, device, args.steps),
                  100 * gpu_busy(seed_style, device, 4 * args.steps), seed_name, "%")


def bench_networks(table, args, device, precision, images):
    """The seed's network (the default) against Ho et al.'s (model.arch=ddpm): parameters,
    FLOPs, a training step and a sampling forward, both as the stages run them."""
    cfgs = {"seed": TINY_SEED, "ddpm": TINY} if args.quick else {
        "seed": references.SEED, "ddpm": references.DDPM_CIFAR10}
    models, steps, forwards = {}, {}, {}
    x = torch.randn(args.sample_batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (args.sample_batch,), device=device)
    for arch, cfg in cfgs.items():
        models[arch], steps[arch] = ours_step(cfg, images, args.batch, precision, device)
        net = for_sampling(copy.deepcopy(models[arch]), None)
        forwards[arch] = lambda net=net: net(x, t)
    med = interleaved(steps, device, args.rounds, args.steps)
    table.add(f"train step, seed network vs DDPM network, batch {args.batch}", precision,
              args.batch / med["seed"], args.batch / med["ddpm"], "DDPM network", "img/s")
    with torch.inference_mode(), autocast(precision, device):
        med = interleaved(forwards, device, args.rounds, args.steps)
    table.add(f"  sampling forwards/s per image, batch {args.sample_batch}", precision,
              args.sample_batch / med["seed"], args.sample_batch / med["ddpm"], "DDPM network",
              "img/s")
    for what, train in (("forward", False), ("fwd+bwd", True)):
        gflop = {arch: flops_per_image(m, device, train) / 1e9 for arch, m in models.items()}
        table.add(f"  GFLOP per image, {what} (lower is cheaper)", precision, gflop["seed"],
                  gflop["ddpm"], "DDPM network", "GFLOP", lower_is_better=True)
    params = {arch: networks.parameter_count(m) / 1e6 for arch, m in models.items()}
    table.add("  parameters (millions)", precision, params["seed"], params["ddpm"],
              "DDPM network", "M", lower_is_better=True)


def bench_sampling(table, args, device, precision, compile_sampling: bool):
    """The UNet as the sample stage runs it (generate.for_sampling) vs diffusers as its pipeline
    runs it; then with sample.compile, and against diffusers given channels_last too."""
    cfg = TINY if args.quick else references.DDPM_CIFAR10
    torch.manual_seed(0)
    model = network(cfg).to(device)
    with torch.no_grad():  # no zero-initialised layers, as after training (nothing to fold)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ours = for_sampling(model, None)
    x = torch.randn(args.sample_batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (args.sample_batch,), device=device)
    fns = {"ours": lambda: ours(x, t)}
    if have_diffusers() and not args.quick:
        ref = references.diffusers_unet().to(device).eval()
        ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
        fns["diffusers"] = lambda: ref(x, t).sample
        fns["diffusers_cl"] = lambda: ref_cl(x, t).sample
    with torch.inference_mode(), autocast(precision, device):
        if compile_sampling:
            compiled = for_sampling(copy.deepcopy(model), "default")
            compile_seconds = seconds_of(lambda: compiled(x, t), device)
            fns["compiled"] = lambda: compiled(x, t)
        med = interleaved(fns, device, args.rounds, args.steps)
    fps = {k: args.sample_batch / v for k, v in med.items()}
    table.add(f"sampling forwards/s per image, batch {args.sample_batch}", precision, fps["ours"],
              fps.get("diffusers"), "diffusers UNet2DModel", "img/s")
    if compile_sampling:
        table.add(f"  with sample.compile (first call {compile_seconds:.0f} s)", precision,
                  fps["compiled"], fps.get("diffusers"), "diffusers UNet2DModel", "img/s")
    table.add("  diffusers also in channels_last", precision, fps["ours"],
              fps.get("diffusers_cl"), "diffusers, channels_last", "img/s")
    # Whole sampler steps (noise per image from its own generator, the update): k steps timed.
    sched, k = Schedule(1000, 1e-4, 0.02, "linear").to(device), args.sampler_steps
    gens = [torch.Generator(device).manual_seed(i) for i in range(args.sample_batch)]
    per_step = {}
    for sampler in ("ddpm", "ddim"):  # a k-step chain costs k of the full chain's steps
        with autocast(precision, device):
            per_step[sampler] = seconds_of(
                lambda sampler=sampler: sample(ours, sched, x.shape, sampler, k, gens), device) / k
    table.add("sampling images/s, DDIM-100 vs DDPM-1000 (k-step timing)", precision,
              args.sample_batch / (100 * per_step["ddim"]),
              args.sample_batch / (1000 * per_step["ddpm"]), "DDPM-1000", "img/s")
    table.add("  one DDPM step (forward, per-image noise, update) vs the forward alone",
              precision, args.sample_batch / per_step["ddpm"], fps["ours"], "forward alone",
              "img/s")


def host_memory_child(args, device) -> None:
    """One side of bench_host_memory, in a fresh process: print the seconds of each timed call."""
    mode, what = args.host_memory_child.split(":")
    if mode == "kept":
        assert keep_freed_host_memory(device), "glibc's mallopt is not available here"
    cfg = TINY if args.quick else references.DDPM_CIFAR10
    if what == "train":
        images = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8, device=device)
        _, fn = ours_step(cfg, images, args.batch, "fp32", device)
    else:
        torch.manual_seed(0)
        net = for_sampling(network(cfg).to(device), None)
        x = torch.randn(args.sample_batch, 3, 32, 32, device=device)
        t = torch.randint(0, 1000, (args.sample_batch,), device=device)

        def fn():
            with torch.inference_mode():
                net(x, t)
    fn()
    print(*(seconds_of(fn, device) for _ in range(args.steps)))


def bench_host_memory(table, args, device):
    """The train and sample stages on a CPU keep freed memory in the process
    (runtime.keep_freed_host_memory); a process-wide setting, so each side runs in its own
    fresh process, alternating, args.rounds processes per side."""
    for what in ("train", "sampling"):
        times = {"kept": [], "default": []}
        for _ in range(args.rounds):
            for mode in times:
                cmd = [sys.executable, __file__, "--host-memory-child", f"{mode}:{what}",
                       "--batch", str(args.batch), "--sample-batch", str(args.sample_batch),
                       "--steps", str(args.steps), "--device", device.type]
                done = subprocess.run(cmd + (["--quick"] if args.quick else []),
                                      capture_output=True, text=True, check=True)
                times[mode] += [float(s) for s in done.stdout.split()]
        batch = args.batch if what == "train" else args.sample_batch
        ips = {mode: batch / statistics.median(t) for mode, t in times.items()}
        label = (f"train step, DDPM config, batch {args.batch}" if what == "train"
                 else f"sampling forwards/s per image, batch {args.sample_batch}")
        table.add(f"{label}: freed host memory kept vs glibc defaults", "fp32", ips["kept"],
                  ips["default"], "glibc defaults, separate processes", "img/s")


def bench_fid(table, args, device):
    """fid stage (cached real statistics) vs `python -m pytorch_fid real generated`."""
    from fakes import cifar_images, make_inception_weights
    from ddpm.fid import frechet_distance
    from ddpm.images import write_pngs
    import pytorch_fid_compat  # noqa: F401  (pytorch-fid on SciPy releases without sqrtm(disp=))
    from pytorch_fid.fid_score import calculate_frechet_distance

    n, dims = (12, 64) if args.quick else (args.fid_images, 2048)
    tmp = Path(tempfile.mkdtemp())
    weights = make_inception_weights(tmp / "hub" / "checkpoints"
                                     / "pt_inception-2015-12-05-6726825d.pth")
    for name, seed in (("real", 0), ("gen", 1)):
        (tmp / name).mkdir()
        write_pngs(cifar_images("train", -(-n // 5), seed)[:n].transpose(0, 2, 3, 1), tmp / name)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["device"] = device.type
    raw["fid"].update(dims=dims, weights=str(weights))
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    env = dict(os.environ, TORCH_HOME=str(tmp))  # pytorch-fid's CLI finds the weights there

    def run(*cmd):
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    py = sys.executable
    run(py, str(ROOT / "stages/real_stats.py"), "--images", "real", "--out", "real.npz")
    start = time.perf_counter()
    run(py, str(ROOT / "stages/fid.py"), "--images", "gen", "--real-stats", "real.npz",
        "--metrics", "fid.json", "--report", "fid_report.json")
    ours = time.perf_counter() - start
    start = time.perf_counter()
    run(py, str(ROOT / "tests" / "pytorch_fid_compat.py"), "real", "gen", "--dims", str(dims),
        "--device", device.type)  # = python -m pytorch_fid, on any SciPy
    theirs = time.perf_counter() - start
    table.add(f"fid stage, {n} generated images, {dims} dims", "fp32", ours, theirs,
              "pytorch-fid CLI, both folders", "s", lower_is_better=True)
    rng = np.random.default_rng(0)
    fdims = 256 if args.quick else 2048
    feats = [rng.normal(size=(2 * fdims, fdims)) for _ in range(2)]
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in feats]
    start = time.perf_counter()
    ours_value = frechet_distance(*stats[0], *stats[1])
    eig = time.perf_counter() - start
    start = time.perf_counter()
    ref_value = calculate_frechet_distance(*stats[0], *stats[1])
    sqrtm = time.perf_counter() - start
    table.add(f"Frechet distance, {fdims} dims (values {ours_value:.6g} / {ref_value:.6g})", "fp64",
              eig, sqrtm, "pytorch-fid's scipy sqrtm", "s", lower_is_better=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", default="auto",
                        help="comma list, or auto (what runs natively)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--fid-images", type=int, default=500)
    parser.add_argument("--sampler-steps", type=int, default=4, help="steps per k-step timing")
    parser.add_argument("--sections",
                        default="networks,precision,train,seed,sampling,memory,fid,peak",
                        help="memory: the CPU stages' host allocator setting (CPU only)")
    parser.add_argument("--compile", default="sampling",
                        help="comma list of sampling, train: compiled rows, for the first "
                             "precision only (each costs a compilation)")
    parser.add_argument("--compile-modes", default="default",
                        help="torch.compile modes for the compiled train rows (default is what "
                             "train.compile does; reduce-overhead adds CUDA graphs)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of every section")
    parser.add_argument("--json", type=Path, help="also write the table and the machine here")
    parser.add_argument("--host-memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.sample_batch, args.rounds, args.steps = 2, 2, 1, 1
    device = resolve_device(args.device)
    if args.host_memory_child:
        return host_memory_child(args, device)
    if args.precisions == "auto":
        precisions = ["fp32"] + (["bf16"] if native_bf16(device) else [])
        precisions += ["fp16"] if device.type == "cuda" else []
    else:
        precisions = args.precisions.split(",")
    sections = args.sections.split(",")
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    print(f"# {date.today()}, {device.type} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, precisions {precisions}"
          f"{'' if native_bf16(device) else ' (bf16 not native here: skipped)'}", flush=True)
    images = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8, device=device)
    table = Table()
    compiles = args.compile.split(",") if args.compile else []
    for precision in precisions:
        first = precision == precisions[0]
        if "networks" in sections:
            bench_networks(table, args, device, precision, images)
        if "train" in sections:
            modes = args.compile_modes.split(",") if first and "train" in compiles else []
            bench_train(table, args, device, precision, images, modes)
        if "sampling" in sections:
            bench_sampling(table, args, device, precision, first and "sampling" in compiles)
        if "peak" in sections:
            mm, conv, n = peak_flops(device, precision, args.rounds)
            table.add(f"peak measured: matmul {n}^2 (ours col.) / 3x3 conv 256 ch 16x16 "
                      "(ref. col.)",
                      precision, mm / 1e9, conv / 1e9, "conv", "GFLOP/s")
    if "precision" in sections:
        bench_precision(table, args, device, images)
    if "seed" in sections:
        bench_seed(table, args, device, precisions, images)
    if "memory" in sections and device.type == "cpu":
        bench_host_memory(table, args, device)
    if "fid" in sections:
        bench_fid(table, args, device)
    print()
    print(table.markdown())
    if args.json:
        import record
        columns = ["measurement", "precision", "ours", "reference", "ours_vs_reference"]
        record.write(args.json, {**record.machine(device), "argv": sys.argv[1:],
                                 "rows": [dict(zip(columns, row)) for row in table.rows]})


if __name__ == "__main__":
    main()
