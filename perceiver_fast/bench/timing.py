"""Timing and memory measurement, following the methodology of the H200 anchors
(shared/tools/anchors.py): median of ``triton.testing.do_bench`` on a GPU, peak
extra memory as the rise of ``torch.cuda.max_memory_allocated`` over what was
allocated before the call. On a CPU: median of ``time.perf_counter`` repeats;
no memory figure."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], object], device, quick: bool = False, backward: bool = False) -> float:
    """Median milliseconds of ``fn()``."""
    if is_cuda(device):
        from triton.testing import do_bench

        warmup, rep = (10, 40) if quick else (25, 100)
        if backward:
            warmup, rep = warmup // 2 or 1, rep // 2 or 1
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    # CPU: one warm-up call, then repeat until ~budget seconds or max_n calls.
    budget = 0.05 if quick else 0.25
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def peak_extra_mib(fn: Callable[[], object], device) -> Optional[float]:
    """Peak memory allocated by ``fn()`` beyond what was allocated before (MiB); None on CPU."""
    if not is_cuda(device):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def free_bytes(device) -> Optional[int]:
    if not is_cuda(device):
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def release(device) -> None:
    if is_cuda(device):
        torch.cuda.empty_cache()
