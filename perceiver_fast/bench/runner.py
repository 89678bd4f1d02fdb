"""``perceiver-fast bench``: collects the jobs of every section, runs them and returns
rows of one schema (:data:`.schema.ROW_FIELDS`), which :mod:`.report` prints and writes.

Sections (:mod:`.ops`, :mod:`.layers`, :mod:`.models`, :mod:`.peer`; each imports :mod:`.schema`, none imports this module):

* ``ceiling``: a 1 GiB device-to-device copy and an 8192^3 matmul (GPU only);
* ``op``: every attention shape of :data:`.shapes.ATTN_SHAPES` (forward and
  forward+backward, both checked against float64) and the Fourier encoder, for every backend;
* ``sweep``: cross-attention forward time and memory against input length M;
* ``headdim``: the same against head dim D;
* ``fit``: the largest M whose forward runs, per backend (not with --quick);
* ``layer``: our cross-attention layer against HF's PerceiverLayer (same weights);
* ``model``: images/s of our models against HF transformers / timm;
* ``peer`` (:mod:`.peer`): the community packages' main models (perceiver-pytorch, perceiver-ar-pytorch,
  krasserm's perceiver-io, pio-arch) patched by ``patch_model`` against unpatched, same weights, with the
  relative error between them and the fused calls per forward; flash-perceiver where it imports.

On a machine without CUDA everything runs on the CPU at small sizes
(``shape.small()``), and the ``fused`` rows time the ops' PyTorch fallback:
the Triton kernels need a GPU.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from perceiver_fast.ops.backend import attention_backend

from . import shapes as S
from .backends import ATTN_BACKENDS, FOURIER_BACKENDS
from .ops import op_jobs, sweep_jobs, wanted
from .schema import Job, failure_reason, make_row
from .timing import is_cuda

# --ops names that select a group of cases rather than one attention shape
OP_GROUPS = ("fourier", "sweep", "headdim", "fit", "layers")


@dataclass
class BenchOptions:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: Optional[str] = None  # default: bfloat16 on a GPU, float32 on a CPU
    quick: bool = False
    ops: Optional[List[str]] = None  # None = all; names of attention shapes, "fourier", "sweep"
    models: Optional[List[str]] = None  # None = all; [] = none
    # peer cases (names of .peer.PEER_CASES). None (default): all of them in a full run (ops and models both None),
    # none where ops or models name a subset; [] = none
    peer: Optional[List[str]] = None
    backends: Optional[List[str]] = None  # None = all
    backward: bool = True
    # torch.compile baselines. None (default): for the Fourier encoder on a GPU (its target is stated against
    # torch.compile), not for attention (the anchors show compile of eager attention never clearly beating the best
    # SDPA backend, and compiling 16 graphs would take minutes of the run). True: both. False: none.
    compile: Optional[bool] = None
    budget_s: Optional[float] = None  # skip what is left after this many seconds
    progress: bool = True
    small: Optional[bool] = None  # default: small sizes on CPU
    compile_fourier: bool = field(default=False, init=False)
    compile_attention: bool = field(default=False, init=False)

    def resolved(self) -> "BenchOptions":
        o = dataclasses.replace(self)
        cuda = is_cuda(o.device)
        if o.dtype is None:
            o.dtype = "bfloat16" if cuda else "float32"
        o.compile_fourier = o.compile if o.compile is not None else cuda
        o.compile_attention = bool(o.compile)
        if o.small is None:
            o.small = not cuda
        if o.peer is None:
            from .peer import peer_names

            o.peer = peer_names() if o.ops is None and o.models is None else []
        return o


# ----------------------------------------------------------------------------
# environment


def git_commit() -> Optional[str]:
    """HEAD of the checkout (with -dirty), or $PERCEIVER_FAST_COMMIT where there is no .git (a copied tree)."""
    if os.environ.get("PERCEIVER_FAST_COMMIT"):
        return os.environ["PERCEIVER_FAST_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def fused_path(device) -> str:
    """The attention backend the 'fused' rows time on ``device`` (see :mod:`perceiver_fast.ops.backend`)."""
    return attention_backend(device)


def environment(opts: BenchOptions) -> Dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is a dependency
        triton_version = None
    cuda = is_cuda(opts.device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                             f"{os.cpu_count()} cores)",
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "fused_path": fused_path(opts.device),
        "dtype": opts.dtype,
        "quick": opts.quick,
        "small_sizes": opts.small,
        "argv": sys.argv,
        "ceilings_assumed": S.H200_CEILINGS,
    }


def known_backends() -> List[str]:
    """Every name --backends accepts: the op backends, and the model/layer implementations in full
    (``hf:eager``) or by their prefix (``hf``)."""
    from .layers import LAYER_IMPLS
    from .models import PIO_IMPLS, VIT_IMPLS

    names = list(ATTN_BACKENDS) + [b for b in FOURIER_BACKENDS if b not in ATTN_BACKENDS]
    for impl in PIO_IMPLS + VIT_IMPLS + LAYER_IMPLS:
        for n in (impl, impl.split(":")[0]):
            if n not in names:
                names.append(n)
    return names


def build_jobs(opts: BenchOptions) -> List[Job]:
    """Jobs in priority order (a --budget-s cut drops the tail): ceilings, ops, Fourier encoder, layers,
    models, peer models, then the sweeps (whose largest sizes are the slowest cases)."""
    jobs: List[Job] = op_jobs(opts)
    if wanted("layers", opts.ops):
        from .layers import layer_jobs

        jobs += layer_jobs(opts)
    if opts.models is None or opts.models:
        from .models import model_jobs

        jobs += model_jobs(opts)
    if opts.peer:
        from .peer import peer_jobs

        jobs += peer_jobs(opts)
    return jobs + sweep_jobs(opts)


# ----------------------------------------------------------------------------
# speedups


def add_speedups(rows: List[Dict]) -> None:
    """speedup_vs_eager and speedup_vs_best_sdpa, within each (section, name, direction, dtype).

    For model rows the "eager" baseline is the backend named ``*:eager`` in that
    group (HF transformers / timm without fused attention) and the "SDPA" one is
    any backend containing ``sdpa`` (timm with fused_attn, i.e. SDPA). For peer rows the baseline is
    ``unpatched:eager``: the package's model before ``patch_model``."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        if r["section"] in ("op", "sweep", "headdim", "layer", "model", "peer"):
            groups.setdefault((r["section"], r["name"], r["direction"], r["dtype"]), []).append(r)
    for grp in groups.values():
        ok = [r for r in grp if r["status"] in ("ok", "WRONG") and r["ms"]]
        eager = [r["ms"] for r in ok if r["backend"] == "eager" or r["backend"].endswith(":eager")]
        sdpa = [r["ms"] for r in ok if "sdpa" in r["backend"]]
        for r in ok:
            if eager:
                r["speedup_vs_eager"] = eager[0] / r["ms"]
            if sdpa:
                r["speedup_vs_best_sdpa"] = min(sdpa) / r["ms"]


# ----------------------------------------------------------------------------


def run(opts: BenchOptions, log: Callable[[str], None] = print) -> Dict:
    """Run the benchmark; returns {"env": ..., "rows": [...]} (rows in ROW_FIELDS schema)."""
    opts = opts.resolved()
    env = environment(opts)
    if not is_cuda(opts.device):
        log("No CUDA GPU here: running the CPU paths on small sizes. The Triton kernels need a GPU; on this machine "
            f"the 'fused' rows time the ops' {env['fused_path']} path, not the GPU kernels.")
    jobs = build_jobs(opts)
    rows: List[Dict] = []
    t0 = time.time()
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="bench", unit="case", disable=not opts.progress, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None
    for job in jobs:
        if bar is not None:
            bar.set_postfix_str(job.label[:40])
        if opts.budget_s is not None and time.time() - t0 > opts.budget_s:
            rows.append(make_row(section=job.section, name=job.label, status="SKIP",
                                 reason=f"time budget of {opts.budget_s:.0f} s used up"))
        else:
            try:
                rows += job.run()
            except Exception as e:  # never lose the run to one case
                traceback.print_exc()
                rows.append(make_row(section=job.section, name=job.label, status="FAIL", reason=failure_reason(e)))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    add_speedups(rows)
    env["elapsed_s"] = round(time.time() - t0, 1)
    return {"env": env, "rows": rows}
