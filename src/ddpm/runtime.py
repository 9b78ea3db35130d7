"""Where and how the math runs: device, precision, processes, memory.

Chosen once at start-up from params.yaml strings, so the training and sampling code below
never branches on hardware.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ddpm import cli
from ddpm.errors import ParamsError, Terminated

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """params `device` -> torch.device; auto = cuda if available, else cpu. A device this machine
    lacks is a ParamsError: the stages stop before any work, check_params before DVC deletes."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not name.startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        raise ParamsError(f"device = {name}, but PyTorch sees no CUDA GPU: set device: auto "
                          "or cpu in params.yaml (or -S device=cpu)")
    device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    count = torch.cuda.device_count()
    if device.index >= count:
        raise ParamsError(f"device = {name}, but this machine has {count} CUDA device(s): "
                          f"cuda:0 ... cuda:{count - 1}, or cuda (one per process)")
    return device


def check_hardware(device_name: str, precision: str, gpus: int) -> str:
    """What check_params can know about this machine before any stage runs: the device, its
    precision and the number of processes exist here (one per GPU; on a CPU, at most one per
    core this process may use, as torchrun would start them all on this node). Returns a line
    that says what it found."""
    device = resolve_device(device_name)
    resolved = resolve_precision(precision, device)
    if device.type == "cuda" and gpus > torch.cuda.device_count():
        raise ParamsError(f"train.gpus = {gpus}, but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cpu" and gpus > (cores := usable_cpus()):
        raise ParamsError(f"train.gpus = {gpus}, but the device is the CPU and this process may "
                          f"use {cores} core(s): at most {cores} processes (one per core)")
    return f"{device.type}, {resolved}"


def usable_cpus() -> int:
    """The cores this process may run on (its affinity, which a container or taskset narrows),
    else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles), as torch reports
    it: only then is bf16 autocast a speed-up there, not an emulation (docs/benchmarks.md)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on GPUs that have it, fp16 (with a gradient scaler) on older GPUs; on a CPU
    bf16 where it is native (cpu_has_native_bf16), else fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ParamsError("train.precision = bf16, but this GPU has no bf16 support: use fp16 "
                          "or auto")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The one mixed-precision context of a run: a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def compile_mode(setting: bool | str, device: torch.device) -> str | None:
    """train.compile / sample.compile -> the torch.compile mode, or None for eager: auto is
    "default" on CUDA GPUs that have Triton (where it pays: docs/benchmarks.md) and eager
    elsewhere; true is "default"; a mode name (reduce-overhead: CUDA graphs) is passed on."""
    if setting == "auto":
        if device.type != "cuda":
            return None
        from torch.utils._triton import has_triton
        return "default" if has_triton() else None
    if isinstance(setting, bool):
        return "default" if setting else None
    return setting


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_host_memory(device: torch.device) -> bool:
    """For runs on a CPU: let glibc's malloc keep freed memory for the next allocation instead of
    returning it to the kernel, which would fault in and zero-fill every step's activations
    again (PyTorch's CPU allocator has no cache of its own; docs/benchmarks.md measures it).
    Returns whether it took: not on other devices, nor where the C library is not glibc."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # M_TRIM_THRESHOLD = -1 disables trimming (mallopt(3)).
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def device_name(device: torch.device) -> str:
    """The GPU's name (NVIDIA H200, ...), or the CPU's as the platform knows it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, epoch, rank, purpose): independent streams, no state."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# How long the other processes wait at a barrier while the main one works alone: previews,
# the training FID (train.fid_images), checkpoints to a slow disk, the sample stage's check of
# kept images. A hung main process is not what it guards against (torchrun ends the others
# when one fails); a watchdog that kills a multi-day run because one FID was long is.
WAIT_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (torchrun's environment)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    waiting: object = field(default=None, compare=False, repr=False)  # barrier()'s gloo group

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process. On a gloo group of its own, whose timeout is WAIT_TIMEOUT:
        the process group's (NCCL: 10 minutes) is sized for the collectives of training steps,
        not for what the main process does alone while the others wait here."""
        if self.size > 1:
            dist.barrier(group=self.waiting)

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    """True inside torchrun (or any launcher that sets torch.distributed's variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


# torchrun, as `python -c LAUNCHER <torchrun's arguments>`: it ends when the stage's process
# does (PR_SET_PDEATHSIG, so a kill -9 of the stage still stops the workers), and a signal
# stops it quietly with 128 + the signal's number once its workers (which it passes the signal
# on to, and which say where they stopped) have ended, instead of a traceback.
LAUNCHER = """\
import ctypes, logging, runpy, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)
except (OSError, AttributeError, TypeError):
    pass
from torch.distributed.elastic.multiprocessing.api import SignalException
for name, said in [("torch.distributed.elastic.agent.server.api", "Received %s death signal"),
                   ("torch.distributed.elastic.multiprocessing.api", "Sending process %s closing")]:
    logging.getLogger(name).addFilter(lambda r, said=said: not str(r.msg).startswith(said))
try:
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
except SignalException as e:
    sys.exit(128 + e.sigval)
"""


def relaunch_under_torchrun(nproc: int) -> int:
    """Run this very script again as `nproc` processes on this node; returns their exit code.

    For several nodes, start torchrun yourself on each (see the README); then this is skipped.
    The launcher runs in a session of its own, so a signal to this stage's process group (Ctrl-C
    in a terminal, `timeout`) reaches it once, passed on from here, and never twice.
    """
    args = ["--standalone", f"--nproc-per-node={nproc}", sys.argv[0], *sys.argv[1:]]
    print(f"launching {nproc} processes: torchrun {' '.join(args)}", file=sys.stderr, flush=True)
    with subprocess.Popen([sys.executable, "-c", LAUNCHER, *args],
                          start_new_session=True) as launcher:
        try:
            code = launcher.wait()
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated): the workers stop
            cli.caught()
            launcher.send_signal(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # while they say where they stopped
            code = launcher.wait()
    return code if code >= 0 else 128 - code  # killed by a signal: as a shell reports it


def start_processes(device_name: str, gpus: int) -> tuple[World, torch.device]:
    """For the train and sample stages: with gpus > 1 and no launcher, rerun this script under
    torchrun and exit with its code; otherwise join the process group and pick the device."""
    if gpus > 1 and not launched():
        raise SystemExit(relaunch_under_torchrun(gpus))
    return init_world(device_name, gpus)


def init_world(device_name: str, gpus: int, timeout: timedelta | None = None
               ) -> tuple[World, torch.device]:
    """Join the process group if launched (NCCL on GPUs, gloo on the CPU); pick the device.

    timeout: of the process group's collectives (None: torch's default); World.barrier() has
    its own, WAIT_TIMEOUT."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return World(), resolve_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ParamsError(f"train.gpus = {gpus}, but only {torch.cuda.device_count()} CUDA "
                              "devices are visible on this node")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        options = {} if timeout is None else {"timeout": timeout}
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, **options)
        else:
            dist.init_process_group("gloo", **options)
    waiting = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, waiting), device


class MemoryMonitor:
    """Peak memory of this process's device in MiB: pynvml on GPUs, peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self._handle = device, 0.0, None
        if device.type == "cuda":
            try:
                import pynvml
                pynvml.nvmlInit()
                uuid = str(torch.cuda.get_device_properties(device).uuid)
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(
                    uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            except Exception as e:  # no driver library, MIG, containers: fall back to torch's view
                print(f"pynvml unavailable ({e}); reporting PyTorch's reserved memory",
                      file=sys.stderr)

    def sample(self) -> float:
        """Read the current figure, keep the peak, return the current one."""
        if self._handle is not None:
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
        elif self.device.type == "cuda":
            used = torch.cuda.max_memory_reserved(self.device) / 2**20
        else:
            used = _peak_rss_mb()
        self.peak_mb = max(self.peak_mb, used)
        return used


def _peak_rss_mb() -> float:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # Windows
        import psutil
        return psutil.Process().memory_info().peak_wset / 2**20
