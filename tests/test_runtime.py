"""Process-level settings of the CPU stages (ddpm.runtime), each checked in a fresh process."""
from __future__ import annotations

import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parent.parent / "src"

FAULTS_OF_REUSE = """
import resource, sys
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
    (seen once in a clean CI run: exactly one tensor's 16,384 pages), never for every tensor."""
    pages = 5 * (64 * 2**20) // 4096

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
