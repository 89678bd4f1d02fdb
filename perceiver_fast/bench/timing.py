"""Timing and memory measurement, following the methodology of the H200 anchors
(shared/tools/anchors.py): ``triton.testing.do_bench`` quantiles 20/50/80 on a
GPU, peak extra memory as the rise of ``torch.cuda.max_memory_allocated`` over
what was allocated before the call. On a CPU: ``torch.utils.benchmark.Timer``
(blocked_autorange), whose per-block times give the same quantiles; no memory figure."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds: the median and the 20th/80th percentiles (the spread)."""

    ms: float
    p20: float
    p80: float


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def quantile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bench_ms(fn: Callable[[], object], device, quick: bool = False, backward: bool = False) -> Timing:
    """Median and 20/80 percentiles of ``fn()`` in milliseconds."""
    if is_cuda(device):
        from triton.testing import do_bench

        warmup, rep = (10, 40) if quick else (25, 100)
        if backward:
            warmup, rep = warmup // 2 or 1, rep // 2 or 1
        p20, p50, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8])
        return Timing(float(p50), float(p20), float(p80))
    from torch.utils.benchmark import Timer

    fn()  # warm-up (first-call allocations, lazy imports)
    # Timer defaults to one thread; time with the threads the rest of the run (and a user) has.
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.05 if quick else 0.25)
    times = sorted(1e3 * t for t in m.times)
    return Timing(quantile(times, 0.5), quantile(times, 0.2), quantile(times, 0.8))


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


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
