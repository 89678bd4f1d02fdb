"""What every bench section shares (after Liger-Kernel's benchmark/scripts/utils.py): the row
schema, :func:`make_row`, :class:`Job`, the failure reason, and the one timing loop
(:func:`time_rows`). The sections (:mod:`.ops`, :mod:`.layers`, :mod:`.models`) import this
module; it imports none of them, nor the runner."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .timing import bench_ms, is_oom, peak_extra_mib, release

ROW_FIELDS = [
    "section", "name", "label", "direction", "dtype", "backend", "status", "ms", "ms_p20", "ms_p80",
    "speedup_vs_eager", "speedup_vs_best_sdpa", "tflops", "gbs", "peak_mib", "images_per_s", "floor_ms", "flops",
    "bytes", "relerr", "grad_relerr", "B", "H", "N", "M", "Dqk", "Dv", "kv_row_stride", "package", "fused_calls",
    "reason",
]

# relative error (vs float64) above which a result is marked WRONG
TOLERANCE = {"bfloat16": 3e-2, "float16": 1e-2, "float32": 5e-3}


def make_row(**kw) -> Dict:
    """A row with every field of :data:`ROW_FIELDS` (None unless given); KeyError for a field not in it."""
    row = {k: None for k in ROW_FIELDS}
    unknown = set(kw) - set(ROW_FIELDS)
    if unknown:
        raise KeyError(f"not in the row schema: {sorted(unknown)}")
    row.update(kw)
    return row


@dataclass
class Job:
    """One unit of a bench run: ``run()`` returns its rows; ``weight`` is its rough relative cost."""

    section: str
    label: str
    run: Callable[[], List[Dict]]
    weight: float = 1.0


def failure_reason(e: BaseException) -> str:
    """The one-line reason recorded in a FAIL row."""
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(e).__name__}: {first}"[:160]


@dataclass
class Timed:
    """What :func:`time_rows` times for one case.

    ``forward`` runs under no_grad for the ``fwd`` rows, ``forward_backward`` for the
    ``fwd+bwd`` rows. ``prepare(direction)`` runs first (e.g. model.eval()/train());
    ``check(direction)`` returns fields to record (relerr, and status/reason WRONG);
    ``skip(direction)`` a reason to skip. ``images``: batch size, for images_per_s.
    """

    forward: Callable[[], object]
    forward_backward: Optional[Callable[[], object]] = None
    prepare: Optional[Callable[[str], None]] = None
    check: Optional[Callable[[str], Dict]] = None
    skip: Optional[Callable[[str], Optional[str]]] = None
    images: Optional[int] = None
    cleanup: List[Callable[[], None]] = field(default_factory=list)


def time_rows(rows: List[Dict], build: Callable[[], Timed], device, quick: bool) -> List[Dict]:
    """The one timing loop: builds the case, then for each row (one direction) checks, times and
    measures it. A failure to build fails every row; a failure in one direction fails that row."""
    try:
        case = build()
    except Exception as e:  # a missing library, a refused shape
        for r in rows:
            r.update(status="FAIL", reason=failure_reason(e))
        release(device)
        return rows
    fn = None
    try:
        for r in rows:
            d = r["direction"]
            reason = case.skip(d) if case.skip else None
            if reason:
                r.update(status="SKIP", reason=reason)
                continue
            try:
                if case.prepare:
                    case.prepare(d)
                fn = case.forward if d == "fwd" else case.forward_backward
                with torch.no_grad() if d == "fwd" else contextlib.nullcontext():
                    if case.check:
                        r.update(case.check(d))
                    t = bench_ms(fn, device, quick, backward=d != "fwd")
                    mib = peak_extra_mib(fn, device)
                r.update(ms=t.ms, ms_p20=t.p20, ms_p80=t.p80, peak_mib=mib)
                if r["flops"]:
                    r["tflops"] = r["flops"] / t.ms / 1e9
                if r["bytes"]:
                    r["gbs"] = r["bytes"] / t.ms / 1e6
                if case.images:
                    r["images_per_s"] = case.images / t.ms * 1e3
                if r["status"] is None:
                    r["status"] = "ok"
            except Exception as e:  # a refused shape, a missing kernel, an OOM
                r.update(status="FAIL", reason=failure_reason(e) + (" (out of memory)" if is_oom(e) else ""))
            release(device)
    finally:
        for cleanup in case.cleanup:
            cleanup()
        del case, fn  # fn holds the case's closures (inputs, models): free them before release
        release(device)
    return rows


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN for a zero reference)."""
    out = out.detach().double()
    denom = ref.norm().item()
    return float("nan") if denom == 0 else (out - ref).norm().item() / denom
