"""What the benchmarks share: the pipeline's own training step on in-memory images, timing that
interleaves the sides it compares, GPU busy time, FLOP counts and the result table."""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(Path(__file__).parent)]

from ddpm import batches, losses, networks  # noqa: E402
from ddpm.diffusion import Schedule  # noqa: E402
from ddpm.params import Params, parse_params  # noqa: E402
from ddpm.runtime import World, autocast, cpu_has_native_bf16, resolve_precision  # noqa: E402
from ddpm.step import TrainState, new_state, train_step  # noqa: E402

TINY = dict(arch="ddpm", channels=[16, 32], res_blocks=1, attention_resolutions=[16], heads=2,
            dropout=0.1)
TINY_SEED = dict(TINY, arch="seed", channels=[16, 32, 32])


def have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
        return True
    except ImportError:
        return False


def native_bf16(device: torch.device) -> bool:
    """bf16 with hardware support (CPUs without AVX512-BF16/AMX emulate it ~20x slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, device, rounds: int, steps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternating rounds."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        synchronize(device)
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(steps):
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def seconds_of(fn, device) -> float:
    """Wall time of one call, device work included."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def gpu_busy(fn, device: torch.device, calls: int) -> float:
    """Fraction of the time from the first kernel of `calls` calls to the end of the last one
    that the GPU was running something (the union of its kernel and copy intervals, from the
    profiler's CUDA activity alone, so the CPU side is not slowed by tracing)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    synchronize(device)
    for activities in ([ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            synchronize(device)
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
        if spans:  # some PyTorch versions list GPU activity only beside the CPU's
            break
    else:
        raise RuntimeError("the profiler recorded no GPU activity")
    busy, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy, cur_start = busy + cur_end - cur_start, start
        cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return busy / (cur_end - spans[0][0])


def flops_per_image(model: torch.nn.Module, device: torch.device, train: bool,
                    image_size: int = 32) -> float:
    """FLOP of one image's forward (train: forward and backward) at image_size x image_size."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, 3, image_size, image_size, device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    # attention through the math kernel, whose matmuls and softmax the counter sees on any device
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(x, t)
        out = out.sample if hasattr(out, "sample") else out
        if train:
            out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def peak_flops(device, precision: str, rounds: int) -> tuple[float, float, int]:
    """Measured matmul (n x n) and 3x3-convolution FLOP/s of this device at this precision; n."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device)
    x = torch.randn(32, 256, 16, 16, device=device)
    with torch.inference_mode(), autocast(precision, device):
        med = interleaved({"mm": lambda: a @ b, "conv": lambda: conv(x)}, device, rounds, 3)
    return 2 * n**3 / med["mm"], 2 * 32 * 256 * 256 * 9 * 16 * 16 / med["conv"], n


def base_params(model: dict, precision: str, device: torch.device, batch: int, accum: int = 1,
                compile: bool | str = False):
    """params.yaml with `model` overrides; an optimizer batch of batch x accum in micro-batches
    of `batch` (train.batch_gpu)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["device"] = device.type
    raw["model"].update(model)
    raw["train"].update(precision=precision, batch_size=batch * accum, batch_gpu=batch,
                        compile=compile)
    return parse_params(raw)


def network(model: dict) -> torch.nn.Module:
    """The network that params.yaml's model section with `model` overrides builds."""
    params = base_params(model, "fp32", torch.device("cpu"), 1)
    return networks.build(params.model, (3, params.data.resolution, params.data.resolution))


class Step(NamedTuple):
    """The train stage's optimizer step on in-memory images, ready to time."""
    state: TrainState
    micro: int        # images per forward pass (train.batch_gpu, auto resolved)
    rounds: int       # micro-batches per optimizer step
    precision: str
    run: Callable[[], None]


def training_step(params: Params, images: torch.Tensor, device: torch.device,
                  classes: int = 0) -> Step:
    """params' network, optimizer and EMA (ddpm.step.new_state) and one ddpm.step.train_step of
    random data indices and the batch's draws per call, as the trainer takes it; with `classes`
    (model.conditional), random labels dropped at train.label_dropout as the trainer drops them."""
    precision = resolve_precision(params.train.precision, device)
    sched = Schedule(**dataclasses.asdict(params.diffusion)).to(device)
    loss = losses.build(sched, params.train.snr_gamma)
    shape = tuple(images.shape[1:])
    state = new_state(params, shape, precision, device, World(), classes=classes)
    micro, rounds = batches.split(params.train, World(), device, batches.probe(
        state.model, sched.timesteps, shape, precision, device))
    generator, batch = torch.Generator(device).manual_seed(0), params.train.batch_size

    def run() -> None:
        idx = torch.randint(0, len(images), (batch,), device=device, generator=generator)
        draws = batches.Draws(idx, *batches.draw(generator, batch, sched.timesteps, shape))
        if classes:
            labels = torch.randint(0, classes, (batch,), device=device, generator=generator)
            draws = draws._replace(labels=batches.drop_labels(
                generator, labels, params.train.label_dropout, classes))
        train_step(state, loss, images, draws, micro, precision, params.train.lr,
                   params.train.grad_clip)
    return Step(state, micro, rounds, precision, run)


class Table:
    def __init__(self):
        self.rows = []

    def add(self, what, precision, ours, reference, ref_name, unit, lower_is_better=False):
        """A row; the last column is how many times better ours is (faster or higher)."""
        if not reference:
            ratio = "n/a"
        else:
            ratio = f"{(reference / ours if lower_is_better else ours / reference):.2f}x"
        ref = f"{reference:.3g} ({ref_name})" if reference else f"n/a ({ref_name})"
        self.rows.append((what, precision, f"{ours:.3g} {unit}", ref, ratio))
        print(" | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        lines = ["| measurement | precision | ours | reference | ours vs reference |",
                 "| --- | --- | --- | --- | --- |"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows])
