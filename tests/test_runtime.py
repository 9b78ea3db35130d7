"""ddpm.runtime: process-level settings of the CPU stages (each checked in a fresh process), and the
device params.yaml asks for against what the machine has (torch.cuda faked)."""
from __future__ import annotations

import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parent.parent / "src"

FAULTS_OF_REUSE = """
import ctypes, resource, sys
# PR_SET_THP_DISABLE: base pages, whatever the machine's transparent huge pages (enabled=always,
# as on RHEL, or glibc.malloc.hugetlb=1) would make of them: 2 MiB pages fault 512x less often
assert ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0) == 0
import torch
sys.path.insert(0, sys.argv[2])
from ddpm.runtime import keep_freed_host_memory
if sys.argv[1] == "kept":
    assert keep_freed_host_memory(torch.device("cpu"))
for _ in range(10):  # glibc's bins and tcache settle (posix_memalign leaves small remainders)
    torch.ones(16 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc.so" not in
                    str(ctypes.util.find_library("c")), reason="glibc's mallopt only")
def test_kept_host_memory_is_reused_without_page_faults():
    """keep_freed_host_memory: a freed 64 MiB tensor's pages serve the next one. Under glibc's
    defaults each such tensor is a fresh mapping whose 16,384 pages all fault in again, so five
    of them fault 81,920 pages. Kept, the heap can still grow once while its free blocks settle
    (seen once in a clean CI run: exactly one tensor's 16,384 pages), never for every tensor.
    (Pages of the machine's size, 4 KiB here; huge pages off in the child: issue 29.)"""
    import resource
    pages = 5 * (64 * 2**20) // resource.getpagesize()

    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS_OF_REUSE, mode, str(SRC)],
                              capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])
    assert faults("default") > 0.9 * pages
    assert faults("kept") <= pages // 5 + 256


def test_host_memory_is_left_alone_off_the_cpu():
    """GPU runs keep glibc's defaults: their tensors live in the device's caching allocator."""
    from ddpm.runtime import keep_freed_host_memory
    assert keep_freed_host_memory(torch.device("meta")) is False


# -- the device: what params.yaml asks for against what this machine has ------------------------

def fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    """torch.cuda as on a machine with `count` GPUs (0: none), whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


@pytest.mark.parametrize("count, name, local_rank, expected", [
    (0, "auto", 0, "cpu"), (2, "auto", 0, "cuda:0"), (2, "auto", 1, "cuda:1"),
    (2, "cuda", 1, "cuda:1"), (2, "cuda:1", 0, "cuda:1"), (0, "cpu", 0, "cpu"),
    (4, "cpu", 3, "cpu")])
def test_the_device_is_what_params_ask_for_on_this_machine(monkeypatch, count, name, local_rank,
                                                           expected):
    """auto = cuda if there is one; cuda = one GPU per process (its local rank); cuda:N that one."""
    from ddpm.runtime import resolve_device
    fake_gpus(monkeypatch, count)
    assert resolve_device(name, local_rank) == torch.device(expected)


@pytest.mark.parametrize("count, name, local_rank, message", [
    (0, "cuda", 0, "device = cuda, but PyTorch sees no CUDA GPU: set device: auto or cpu in "
                   "params.yaml (or -S device=cpu)"),
    (0, "cuda:0", 0, "device = cuda:0, but PyTorch sees no CUDA GPU"),
    (2, "cuda:2", 0, "device = cuda:2, but this machine has 2 CUDA device(s): cuda:0 ... cuda:1, "
                     "or cuda (one per process)"),
    (2, "cuda", 2, "device = cuda, but this machine has 2 CUDA device(s)")])
def test_a_device_this_machine_lacks_is_one_line_naming_the_key(monkeypatch, count, name,
                                                                 local_rank, message):
    from ddpm.runtime import ParamsError, resolve_device
    fake_gpus(monkeypatch, count)
    with pytest.raises(ParamsError) as info:
        resolve_device(name, local_rank)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_check_params_refuses_more_gpus_or_a_precision_than_the_machine_has(monkeypatch):
    """check_hardware: train.gpus beyond the GPUs here, and bf16 on a GPU without it."""
    from ddpm.runtime import ParamsError, check_hardware
    fake_gpus(monkeypatch, 2, bf16=False)
    assert check_hardware("cuda", "fp16", 2) == "cuda, fp16"
    assert check_hardware("cuda", "auto", 1) == "cuda, fp16"  # auto: fp16 where bf16 is missing
    with pytest.raises(ParamsError, match=r"^train.gpus = 3, but this machine has 2 CUDA "
                                          r"device\(s\)$"):
        check_hardware("cuda", "fp16", 3)
    with pytest.raises(ParamsError, match="^train.precision = bf16, but this GPU has no bf16 "
                                          "support: use fp16 or auto$"):
        check_hardware("cuda", "bf16", 1)
    # CPU processes: one a usable core at most (tests/test_paths_and_secrets.py: the refusal)
    import ddpm.runtime
    monkeypatch.setattr(ddpm.runtime, "usable_cpus", lambda: 8)
    assert check_hardware("cpu", "fp32", 8) == "cpu, fp32"


def test_a_process_beyond_this_nodes_gpus_is_named_before_joining(monkeypatch):
    """Under a launcher, local rank 3 of 4 on a node with 2 GPUs and device cuda:0: the params
    error, before any process group is joined (which would wait for the others)."""
    from ddpm import runtime
    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(runtime.dist, "init_process_group", None)  # reaching it is the failure
    with pytest.raises(runtime.ParamsError, match=r"^train.gpus = 4, but only 2 CUDA devices are "
                                                  r"visible on this node$"):
        runtime.init_world("cuda:0", 4)
    with pytest.raises(runtime.ParamsError, match=r"^device = cuda, but this machine has 2 CUDA"):
        runtime.init_world("cuda", 4)
