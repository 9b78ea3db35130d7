"""What classifier-free guidance costs: guided against unguided sampling of the same images.

    python benchmarks/guidance.py [--params params.yaml] [--preset quick]
        [--arch seed] [--channels 32 64 64] [--res-blocks 1] [--heads 4]
        [--attention-resolutions 16]
        [--images 100] [--batch-size 250] [--steps 50] [--guidance 1.0] [--repeats 3]
        [--precision auto] [--device auto] [--threads N] [--compile MODE]
        [--out benchmarks/results/guidance.json]

Three cases draw images 0..N-1 with DDIM (eta 0) in batches of --batch-size, image i from the
sample stage's generator of (seed, i) and, for a conditional network, of class i mod 10
(sample.labels balanced), through ddpm.diffusion.sample as the sample stage calls it:

  unconditional          the network of model.* with model.conditional false
  conditional, w = 0     the same network with model.conditional true: one forward pass of B
                         images with their labels per step
  conditional, w > 0     classifier-free guidance w = --guidance: one forward pass of 2B images
                         (the labels and the null label) per step

The weights are random (initialised as training starts them, from the seed): the cost of a
forward pass does not depend on them. The network is that of --params' model section, with
--preset's model values (presets/NAME.yaml) and then the flags applied. Each case is drawn
--repeats times, the cases in turn (round-robin) so that drift in the machine's speed hits all
alike, after one warm-up step of each; the table gives the median and the fastest. The aim:
guided sampling at most 2.0x the unguided conditional one (it evaluates twice the images).

Correctness check, printed and recorded: the conditional network starts as the unconditional one
(same seed -> the same weights, plus a label table of zeros), so case 2 must give exactly the
images of case 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import record  # noqa: E402

from ddpm import networks  # noqa: E402
from ddpm.data import CLASS_NAMES  # noqa: E402
from ddpm.diffusion import Schedule, sample  # noqa: E402
from ddpm.generate import batches, for_sampling  # noqa: E402
from ddpm.labels import image_labels  # noqa: E402
from ddpm.params import Params, load_params, parse_params  # noqa: E402
from ddpm.runtime import (autocast, derive_seed, keep_freed_host_memory,  # noqa: E402
                          resolve_device, resolve_precision)

SHAPE = (3, 32, 32)  # CIFAR-10
CLASSES = list(CLASS_NAMES)  # the null label is their count, 10
AIM = 2.0  # guided seconds / unguided conditional seconds, at most
CASES = ("unconditional", "conditional, w = 0", "conditional, w > 0")


def configured(args: argparse.Namespace) -> Params:
    """--params with --preset's model and sample values and then the flags' model values."""
    raw = load_params(args.params).to_dict()
    if args.preset:
        preset = yaml.safe_load((ROOT / "presets" / f"{args.preset}.yaml").read_text()) or {}
        for section in ("model", "sample", "train"):
            raw[section].update(preset.get(section) or {})
    flags = {"arch": args.arch, "channels": args.channels, "res_blocks": args.res_blocks,
             "heads": args.heads, "attention_resolutions": args.attention_resolutions}
    raw["model"].update({k: v for k, v in flags.items() if v is not None})
    raw["model"]["conditional"] = False
    return parse_params(raw)


def network(params: Params, conditional: bool, device: torch.device,
            compile_mode: str | None) -> torch.nn.Module:
    """The network as training initialises it (seeded by derive_seed(seed, "init")) and the
    sample stage runs it (ddpm.generate.for_sampling)."""
    model = dataclasses.replace(params.model, conditional=conditional)
    torch.manual_seed(derive_seed(params.seed, "init"))
    net = networks.build(model, SHAPE, len(CLASSES) if conditional else 0)
    return for_sampling(net.to(device), compile_mode)


def same_weights(plain: torch.nn.Module, conditional: torch.nn.Module) -> bool:
    """Every weight of `plain` equal in `conditional`, whose only other one is a zero label
    table."""
    a, b = plain.state_dict(), conditional.state_dict()
    extra = set(b) - set(a)
    return (set(a) <= set(b) and all(torch.equal(a[k], b[k]) for k in a)
            and all(not b[k].any() for k in extra) and bool(extra))


def drawer(model: torch.nn.Module, params: Params, sched: Schedule, precision: str,
           conditional: bool, guidance: float, images: int, batch_size: int,
           steps: int) -> Callable[[], torch.Tensor]:
    """A function that draws images 0..images-1 as the sample stage would: (N, C, H, W)."""
    device, sp = sched.device, params.sample

    def draw() -> torch.Tensor:
        out = []
        for ids in batches(range(images), batch_size):
            gens = [torch.Generator(device).manual_seed(derive_seed(params.seed, i, "sample"))
                    for i in ids]
            labels = image_labels("balanced", CLASSES, ids) if conditional else None
            with autocast(precision, device):
                out.append(sample(model, sched, (len(ids), *SHAPE), "ddim", steps, gens,
                                  eta=0.0, clip_denoised=sp.clip_denoised, labels=labels,
                                  guidance=guidance, null_label=len(CLASSES)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return torch.cat(out).cpu()
    return draw


def measure(draws: dict[str, Callable[[], torch.Tensor]], warmups: dict[str, Callable],
            repeats: int) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Seconds of each draw, `repeats` times in round-robin order after one warm-up each; and
    each case's images of its first repeat."""
    for warm in warmups.values():
        warm()
    seconds: dict[str, list[float]] = {name: [] for name in draws}
    images: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name, draw in draws.items():
            start = time.perf_counter()
            x = draw()
            seconds[name].append(time.perf_counter() - start)
            images.setdefault(name, x)
    return seconds, images


def rows_of(seconds: dict[str, list[float]], images: int) -> list[dict]:
    base = statistics.median(seconds[CASES[0]])
    unguided = statistics.median(seconds[CASES[1]])
    rows = []
    for name in CASES:
        median = statistics.median(seconds[name])
        rows.append({"case": name, "seconds_median": round(median, 6),
                     "seconds_min": round(min(seconds[name]), 6),
                     "seconds": [round(s, 6) for s in seconds[name]],
                     "images_per_second": round(images / median, 3),
                     "vs_unconditional": round(median / base, 3),
                     "vs_conditional_unguided": (round(median / unguided, 3)
                                                 if name == CASES[2] else None)})
    return rows


def table(rows: list[dict], caption: str) -> str:
    lines = [caption, "",
             "| case | seconds (median) | seconds (min) | images/s | vs unconditional "
             "| guided / unguided |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = r["vs_conditional_unguided"]
        lines.append(f"| {r['case']} | {r['seconds_median']:.3f} | {r['seconds_min']:.3f} | "
                     f"{r['images_per_second']:.2f} | {r['vs_unconditional']:.3f}x | "
                     + (f"{ratio:.3f}x |" if ratio is not None else "|"))
    return "\n".join(lines)


def train_rows(params: Params, device: torch.device, precision: str, steps: int) -> dict:
    """Seconds of one optimizer step (ddpm.step.train_step, as benchmarks/timing.py runs it on
    random in-memory images), unconditional against conditional with labels dropped at
    train.label_dropout, in `steps` round-robin rounds after a warm-up step each: what
    conditioning costs training."""
    import timing
    raw = params.to_dict()
    raw["train"].update(precision=precision, batch_gpu="auto", compile=False)
    images = torch.randint(0, 256, (256, *SHAPE), dtype=torch.uint8, device=device)
    cases = {}
    for name, conditional in (("unconditional", False), ("conditional", True)):
        run = dict(raw, model=dict(raw["model"], conditional=conditional))
        cases[name] = timing.training_step(parse_params(run), images, device,
                                           len(CLASSES) if conditional else 0).run
    seconds = timing.interleaved(cases, device, rounds=steps, steps=1)
    batch = params.train.batch_size
    result = {"batch_size": batch, "steps": steps, "precision": precision,
              "label_dropout": params.train.label_dropout,
              "seconds_per_step": {k: round(v, 6) for k, v in seconds.items()},
              "images_per_second": {k: round(batch / v, 3) for k, v in seconds.items()},
              "conditional_vs_unconditional": round(seconds["conditional"]
                                                    / seconds["unconditional"], 3)}
    print(f"\ntraining, one optimizer step of {batch} images ({precision}, median of {steps} "
          f"round-robin rounds): unconditional {seconds['unconditional']:.4f} s, conditional "
          f"{seconds['conditional']:.4f} s ({result['conditional_vs_unconditional']:.3f}x)",
          flush=True)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--preset", help="apply presets/NAME.yaml's model and sample values (quick)")
    p.add_argument("--arch", choices=sorted(networks.NETWORKS))
    p.add_argument("--channels", type=int, nargs="+")
    p.add_argument("--res-blocks", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--attention-resolutions", type=int, nargs="*")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--batch-size", type=int, help="default: sample.batch_size")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=1.0, help="w of the guided case (> 0)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compile", dest="compile_mode",
                   help="torch.compile mode of the sample stage (default: eager)")
    p.add_argument("--train-steps", type=int, default=0, help="also time this many optimizer "
                   "steps of training (train.batch_size images each), unconditional against "
                   "conditional, in round-robin rounds of one step (default 0: not timed)")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.guidance <= 0 or args.images < 1 or args.repeats < 1 or args.steps < 1:
        raise SystemExit("--guidance must be > 0 and --images, --repeats, --steps >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    params = configured(args)
    device = resolve_device(args.device)
    # as the sample stage runs: on a CPU without it, the 2B images' activations are faulted in
    # afresh every step, and the guided case measured 2.42x instead of about 2x (docs)
    keep_freed_host_memory(device)
    precision = resolve_precision(args.precision, device)
    batch_size = args.batch_size or params.sample.batch_size
    sched = Schedule(**dataclasses.asdict(params.diffusion)).to(device)
    plain = network(params, False, device, args.compile_mode)
    conditional = network(params, True, device, args.compile_mode)
    weights_equal = same_weights(plain, conditional)

    def draws(images: int, steps: int) -> dict[str, Callable[[], torch.Tensor]]:
        common = dict(params=params, sched=sched, precision=precision, images=images,
                      batch_size=batch_size, steps=steps)
        return {CASES[0]: drawer(plain, conditional=False, guidance=0.0, **common),
                CASES[1]: drawer(conditional, conditional=True, guidance=0.0, **common),
                CASES[2]: drawer(conditional, conditional=True, guidance=args.guidance,
                                 **common)}

    seconds, images = measure(draws(args.images, args.steps),
                              draws(min(batch_size, args.images), 1), args.repeats)
    rows = rows_of(seconds, args.images)
    a, b, c = (images[name] for name in CASES)
    check = {"weights_equal": weights_equal,
             "conditional_w0_equals_unconditional": bool(torch.equal(a, b)),
             "max_abs_difference_w0": float((a - b).abs().max()),
             # with a zero label table the guided eps is the null one too; a batch of 2B may
             # round differently, so this is information, not a check
             "max_abs_difference_guided": float((a - c).abs().max()),
             "images_vary": bool(a.std() > 0)}
    guided_ratio = rows[2]["vs_conditional_unguided"]
    caption = (f"Guided vs unguided sampling, {args.images} images, DDIM-{args.steps}, batch "
               f"{batch_size}, w = {args.guidance:g}, {precision}, {device.type}, "
               f"{'eager' if not args.compile_mode else 'compiled ' + args.compile_mode}; "
               f"{params.model.arch} network, channels {list(params.model.channels)}, res_blocks "
               f"{params.model.res_blocks}, random-initialised weights (timing only); median of "
               f"{args.repeats} round-robin repeats. Aim: guided <= {AIM:.1f}x unguided.")
    print(table(rows, caption))
    print(f"\naim guided <= {AIM:.1f}x unguided (conditional, w = 0): {guided_ratio:.3f}x, "
          f"{'met' if guided_ratio <= AIM else 'NOT met'}")
    ok = check["conditional_w0_equals_unconditional"] and weights_equal
    print(f"check: conditional network (zero label table) at w = 0 gives the unconditional "
          f"network's images exactly: {'yes' if ok else 'NO'} (weights equal: {weights_equal}, "
          f"largest difference {check['max_abs_difference_w0']:.3g}; guided vs unconditional "
          f"{check['max_abs_difference_guided']:.3g})", flush=True)
    training = train_rows(params, device, precision, args.train_steps) if args.train_steps else None
    result = {**record.machine(device), "argv": list(sys.argv[1:] if argv is None else argv),
              "weights": "random initialisation (derive_seed(seed, 'init')): timing only",
              "model": params.to_dict()["model"], "preset": args.preset, "seed": params.seed,
              "images": args.images, "batch_size": batch_size, "sampler": "ddim",
              "steps": args.steps, "eta": 0.0, "clip_denoised": params.sample.clip_denoised,
              "guidance": args.guidance, "precision": precision,
              "compile": args.compile_mode, "repeats": args.repeats, "rows": rows,
              "aim": f"guided <= {AIM:.1f}x unguided", "guided_vs_unguided": guided_ratio,
              "aim_met": guided_ratio <= AIM, "check": check, "training": training}
    if args.out:
        record.write(args.out, result)
    if not ok:
        raise SystemExit("guidance: the conditional network at w = 0 did not reproduce the "
                         "unconditional network's images")
    return result


if __name__ == "__main__":
    main()
