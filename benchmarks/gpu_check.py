"""Checks the default run on one CUDA GPU (docs/gpu.md), held to --minutes (8) once the data is
ready; no GPU has run it yet, so how long it takes there is not measured.

    python benchmarks/gpu_check.py OUT_DIR     # CIFAR-10 downloaded as the pipeline does
    python benchmarks/gpu_check.py OUT_DIR --data cifar-10-python.tar.gz [--md5 MD5]  # a copy
    python benchmarks/gpu_check.py OUT_DIR --dry-run    # the same code on the CPU, tiny, offline
    python benchmarks/gpu_check_fid.py OUT_DIR --weights FID_WEIGHTS   # later, where they are

1. the CUDA tests (CUDA_TESTS) through pytest in a subprocess: passed, skipped, failed (in the
   dry run on the CPU, where their CPU-meaningful cases run);
2. one optimizer step of the seed and the DDPM network through the Trainer, eager / compiled /
   CUDA graphs, at train.batch_size 128 and batch_gpu auto (benchmarks/gpu.py's measure);
3. params.yaml's network trained on --data (default: params.yaml's data.url and data.md5, the
   official archive, fetched and checked by the data stage's code; in the dry run a tiny
   synthetic archive, tests/fakes.py's) by the train stage's Trainer in the fastest mode of 2
   for about --train-seconds, then SAMPLES images drawn from its EMA weights by ddpm.generate
   with SAMPLER, and a grid of the first 64;
4. OUT_DIR/gpu_check.json (written after each part), grid.png, samples.npz (uint8 images,
   (N, 32, 32, 3)) and tests.log; a summary table at the end; exit 1 if anything failed.

gpu_check_fid.py (on any machine with pytorch-fid and the FID weights) adds the FID of the
samples, by the fid stage's code, to gpu_check.json. This command imports neither pytorch-fid
nor dvc nor torchvision, so it runs on a bare GPU node.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import gpu  # noqa: E402  (puts src/ on the path)
from timing import ROOT, synchronize  # noqa: E402
from gpu_check_report import (failed, junit_counts, one_line, row_line, setup,  # noqa: E402
                              summary, timing_rows)
from ddpm.errors import PipelineError  # noqa: E402
from ddpm import dataset  # noqa: E402
from ddpm.files import atomic_dir  # noqa: E402
from ddpm.diffusion import Schedule  # noqa: E402
from ddpm.files import file_digest, write_json  # noqa: E402
from ddpm.generate import generate, load_ema_model  # noqa: E402
from ddpm.images import grid, list_pngs, read_png, save_png  # noqa: E402
from ddpm.params import Params, load_params, parse_params  # noqa: E402
from ddpm.sources import is_url, listing, prepare  # noqa: E402
from ddpm.runtime import World, resolve_precision  # noqa: E402
from ddpm.train import Trainer, TrainPaths  # noqa: E402

SUBSET_MD5 = "7ce1f99f2b1658965d4df61be0d12ed7"  # the real 5,085-image CIFAR-10 subset's
SYNTHETIC = "synthetic (tests/fakes.py)"  # the dry run's data when --data is not given
CUDA_TESTS = ["tests/test_accelerator.py"]  # every test that skips without CUDA
OPTIONAL = ["pytorch_fid", "torchvision", "scipy", "dvc", "pynvml"]  # some tests need them
SAMPLER, SAMPLER_STEPS = "ddim", 50  # deterministic (eta 0); any sample.sampler of params.py
SAMPLES, GRID = 1000, 64
REPORT = "gpu_check.json"
FULL = SimpleNamespace(batch=gpu.BATCH, steps=20, warmup=3, busy_steps=5, nets=gpu.NETS,
                       modes=list(gpu.MODES), limit=0, samples=SAMPLES, sampler_steps=SAMPLER_STEPS)
DRY = SimpleNamespace(batch=8, steps=1, warmup=0, busy_steps=1, nets=gpu.QUICK_NETS,
                      modes=["eager"], limit=32, samples=16, sampler_steps=4,
                      model=gpu.timing.TINY_SEED)  # data.limit 32: 4 steps per epoch
DRY_PER_BATCH = 8  # the synthetic archive: 5 x 8 training images, of which data.limit takes 32


def run_tests(out: Path, work: Path, timeout: float, device: torch.device) -> dict:
    """CUDA_TESTS through pytest in a subprocess on `device` (DDPM_TEST_DEVICE: cuda skips them
    all without a GPU; cpu runs their CPU-meaningful cases): counts from its JUnit report, log in
    out."""
    env = dict(os.environ, DDPM_TEST_DEVICE=device.type)
    xml, start, code = work / "tests.xml", time.perf_counter(), None
    with open(out / "tests.log", "w") as log:
        try:
            code = subprocess.run([sys.executable, "-m", "pytest", *CUDA_TESTS, "-q", "-rs", "-p",
                                   "no:cacheprovider", f"--junitxml={xml}"], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            pass
    counts = junit_counts(xml) if xml.exists() else {
        "error": f"pytest stopped after {timeout:.0f} s (--test-timeout)" if code is None else
        f"pytest exited {code} without a report"}
    return {**counts, "exit_code": code, "seconds": round(time.perf_counter() - start, 1),
            "files": CUDA_TESTS, "missing_modules": [  # None in sys.modules: import fails
                m for m in OPTIONAL if sys.modules.get(m, m) is None or not find_spec(m)]}


def time_modes(plan, device: torch.device, stop_at: float) -> list[dict]:
    """gpu.measure of every network in every mode at train.batch_gpu auto, the seed's first; a
    mode that fails is a row with its error, one not started by `stop_at` a row that says so."""
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, device=device)
    rows = []
    for net, model in plan.nets.items():
        for mode in plan.modes:
            row = {"network": net, "mode": mode, "skipped": "no time left (--minutes)"}
            try:
                if time.perf_counter() < stop_at:
                    row = gpu.measure(net, model, mode, "auto", plan, device, images)
            except Exception as e:  # the rest still runs; the error is in the report
                traceback.print_exc()
                row = {"network": net, "mode": mode, "error": one_line(e)}
                torch._dynamo.reset()
            rows.append(row)
            print(f"gpu_check: {row_line(row)}", file=sys.stderr, flush=True)
    return rows


def fastest(rows: list[dict], network: str = "seed") -> dict:
    """The row of `network` with the most images/s (eager with no rate if none ran)."""
    ran = [r for r in rows if r["network"] == network and "images_per_second" in r]
    return max(ran, key=lambda r: r["images_per_second"], default={"mode": "eager"})


def train_params(args, plan, device: torch.device, mode: str, epochs: int) -> Params:
    """params.yaml for the check's run: its network, batch and precision; `epochs` in `mode`, one
    checkpoint at the end, no previews; SAMPLER for the samples. The EMA warms up (decay
    min(0.9999, (1 + step) / (10 + step))): at 0.9999 from the first step, a few thousand steps
    would leave the EMA mostly at its random initialisation, and the samples would show nothing."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["device"] = device.type
    raw["data"].update(url=args.data, md5=args.md5, limit=plan.limit)
    raw["model"].update(getattr(plan, "model", {}))
    raw["train"].update(batch_size=plan.batch, batch_gpu="auto", epochs=epochs, fid_every=0,
                        compile=gpu.MODES[mode], checkpoint_every=epochs, sample_every=0,
                        ema_warmup=True)
    # compiling the sampling forward costs more than it saves on so few images
    raw["sample"].update(num_images=plan.samples, sampler=SAMPLER, steps=plan.sampler_steps,
                         eta=0.0, compile=False)
    return parse_params(raw)


def prepare_data(args, out: Path) -> None:
    """The data stage's work on args.data (a cifar-10-python.tar.gz, local or a URL, fetched as
    the download stage fetches it): the dataset train reads."""
    raw = load_params(ROOT / "params.yaml").to_dict()
    raw["data"].update(source="cifar10", url=args.data, md5=args.md5)
    data = parse_params(raw).data
    with atomic_dir(out) as staging:
        prepare(data, staging, listing(data))


def train(params: Params, data: Path, work: Path, device: torch.device
          ) -> tuple[dict, list, Path]:
    """The train stage's run of `params` (Trainer.run) on the dataset folder `data`: its
    metrics/train.json, its loss rows (step, loss, images/s) and its EMA weights file."""
    paths = TrainPaths(data=data, checkpoints=work / "checkpoints", runs=work / "runs",
                       ema=work / "ema.pt", metrics=work / "train.json",
                       report=work / "report.json", loss=work / "loss.tsv",
                       samples=work / "previews", real_stats=work / "real_stats.npz",
                       fid=work / "fid.tsv", curves=work / "curves")
    progress = Trainer(params, paths, World(), device).run()
    facts = json.loads(paths.report.read_text())
    return {**json.loads(paths.metrics.read_text()), **facts}, progress.rows, paths.ema


def draw(params: Params, ema: Path, work: Path, device: torch.device) -> tuple[np.ndarray, float]:
    """sample.num_images images of the EMA weights as the sample stage draws them:
    (N, 32, 32, 3) uint8 and the seconds it took."""
    model, shape = load_ema_model(ema, params, device)
    sched = Schedule(**dataclasses.asdict(params.diffusion)).to(device)
    folder = work / "samples"
    folder.mkdir()
    start = time.perf_counter()
    generate(model, sched, shape, params, resolve_precision(params.train.precision, device),
             range(params.sample.num_images), folder)
    synchronize(device)
    seconds = time.perf_counter() - start
    return np.stack([read_png(path, shape[1]) for path in list_pngs(folder)]), seconds


def train_and_sample(args, plan, rows: list[dict], device: torch.device,
                     work: Path) -> tuple[dict, dict]:
    """Part 3: trains on work/dataset for about args.train_seconds in the fastest seed row's
    mode (epochs from its rate), samples, and writes samples.npz and grid.png into args.out."""
    data = work / "dataset"
    count = len(dataset.load(data, "train", plan.limit))
    best = fastest(rows)
    per_epoch = count // plan.batch * plan.batch
    epochs = max(1, round(args.train_seconds * best.get("images_per_second", 0) / per_epoch))
    params = train_params(args, plan, device, best["mode"], epochs)
    start = time.perf_counter()
    metrics, loss_rows, ema = train(params, data, work, device)
    wall = time.perf_counter() - start
    images, seconds = draw(params, ema, work, device)
    np.savez_compressed(args.out / "samples.npz", images=images)
    save_png(grid(images[:GRID]), args.out / "grid.png")
    rates = [row[2] for row in loss_rows[1:]] or [metrics["images_per_second"]]
    training = dict(metrics, mode=best["mode"], images=count, budget_seconds=args.train_seconds,
                    wall_seconds=round(wall, 1), loss_first=loss_rows[0][1],
                    steady_images_per_second=round(statistics.median(rates), 1),
                    ema_warmup=True, data=args.data_label, md5=args.md5)
    sampling = {"num_images": len(images), "sampler": SAMPLER, "steps": plan.sampler_steps,
                "seconds": round(seconds, 2), "images_per_second": round(len(images) / seconds, 1),
                "precision": metrics["precision"], "compile": False}
    return training, sampling


def part(report: dict, out: Path, names: tuple[str, ...], fn, *args) -> None:
    """report[names] = fn(*args) (a tuple if several), or the error it raised, in one line (the
    traceback on stderr); then the report is written, so a later failure or a kill keeps it."""
    try:
        values = fn(*args)
        values = values if len(names) > 1 else (values,)
    except Exception as e:  # the parts after it still run
        traceback.print_exc()
        values = [{"error": one_line(e)}] * len(names)
    report.update(zip(names, values))
    write_json(out / REPORT, report)


def check(args) -> int:
    """Parts 1 to 4; 1 if anything failed or broke, else 0."""
    plan = DRY if args.dry_run else FULL
    if not (args.dry_run or torch.cuda.is_available()):
        sys.exit("gpu_check: PyTorch sees no CUDA GPU here; --dry-run runs the check on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"setup": setup(device, args)}
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        work = Path(tmp)
        if args.data is None:  # the dry run without --data: a tiny archive, offline
            from fakes import make_cifar_archive  # tests/ (timing.py put it on the path)
            args.data = str(work / "cifar-10-python.tar.gz")
            args.md5 = make_cifar_archive(Path(args.data), per_batch=DRY_PER_BATCH)
            args.data_label = SYNTHETIC
        prepare_data(args, work / "dataset")  # a failed download or a bad archive stops here
        # the parts after the download fit themselves into --minutes
        deadline = time.perf_counter() + 60 * args.minutes
        if not args.no_tests:
            part(report, args.out, ("tests",), run_tests, args.out, work, args.test_timeout,
                 device)
        # a compiled row takes one to two minutes; part 3 needs about three at least
        stop_at = float("inf") if args.dry_run else deadline - 270
        part(report, args.out, ("timing",), time_modes, plan, device, stop_at)
        rows = timing_rows(report)
        args.train_seconds = budget(args, rows, deadline)
        part(report, args.out, ("training", "sampling"), train_and_sample, args, plan, rows,
             device, work)
    print(summary(report, args.out))
    return int(failed(report))


def budget(args, rows: list[dict], deadline: float) -> float:
    """--train-seconds, or less if the time left before --minutes would not hold it with the
    fastest mode's compilation and a minute for checkpointing and sampling (at least 30 s)."""
    left = deadline - time.perf_counter() - fastest(rows).get("first_step_seconds", 0) - 60
    return args.train_seconds if args.dry_run else max(30.0, min(args.train_seconds, left))


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    """OUT_DIR, --data and --md5: what the check and its FID companion share."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="where the results go")
    p.add_argument("--data", help="a cifar-10-python.tar.gz, a path or an http(s) URL (default: "
                                  "params.yaml's data.url, the official archive, downloaded as "
                                  "the pipeline does; with --dry-run a tiny synthetic archive)")
    p.add_argument("--md5", help="that --data must have (default: params.yaml's data.md5 for "
                                 "its data.url; a local file's is recognised if it is the "
                                 "official archive's or the real 5,085-image subset's)")
    return p


def resolve_md5(args) -> None:
    """--data and --md5 by default: params.yaml's data.url and data.md5, as the download stage
    fetches them (the dry run's default, a synthetic archive, is made in check()); a local
    --data's md5 is recognised if it is the official archive's or the real subset's."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
    args.data_label = args.data
    if args.data is None:
        if not getattr(args, "dry_run", False):
            args.data = args.data_label = data["url"]
            args.md5 = args.md5 or data["md5"]
        return
    if args.md5 is not None:
        return
    if is_url(args.data):
        if args.data != data["url"]:
            raise PipelineError(f"--data {args.data}: pass --md5 with the md5 of that archive")
        args.md5 = data["md5"]
        return
    if not Path(args.data).is_file():
        raise PipelineError(f"--data {args.data}: no such file. Pass the path of a "
                            "cifar-10-python.tar.gz, or leave --data out to download the "
                            f"official archive ({data['url']})")
    args.md5 = file_digest(Path(args.data), "md5")
    if args.md5 not in (SUBSET_MD5, data["md5"]):
        raise PipelineError(f"--data {args.data}: md5 {args.md5} is neither the official "
                            "archive's nor the real subset's; pass --md5 with the md5 of the "
                            "archive you trust")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    p.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes (tests, CI)")
    p.add_argument("--train-seconds", type=float, help="training budget (default 150; dry: 2)")
    p.add_argument("--minutes", type=float, default=8,
                   help="the check's once the data is ready: late timing rows are skipped and "
                        "training gets less than --train-seconds if needed")
    p.add_argument("--no-tests", action="store_true", help="skip part 1 (e.g. in a rerun)")
    p.add_argument("--test-timeout", type=float, default=180, help="seconds for part 1")
    args = p.parse_args(argv)
    resolve_md5(args)
    if args.train_seconds is None:
        args.train_seconds = 2.0 if args.dry_run else 150.0
    return check(args)


if __name__ == "__main__":
    from ddpm.cli import run
    run(lambda: sys.exit(main()))
