"""The speed targets, checked against the rows of one bench run.

Each target compares a candidate row with a baseline row of the same run and
section/name/direction/dtype. ``min_speedup``: baseline_ms / candidate_ms must
be at least that. ``max_ratio``: candidate_ms / baseline_ms at most that.
``max_mem_ratio``: candidate peak MiB / baseline peak MiB at most that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass(frozen=True)
class Target:
    section: str
    name: str
    direction: str
    candidate: str
    baseline: str  # a backend name, or "best-sdpa"
    min_speedup: Optional[float] = None
    max_ratio: Optional[float] = None
    max_mem_ratio: Optional[float] = None
    measured_baseline: str = ""  # what the 2026-11-20 anchors measured for the baseline

    def describe(self) -> str:
        parts = []
        if self.min_speedup is not None:
            parts.append(f">= {self.min_speedup:g}x {self.baseline}")
        if self.max_ratio is not None:
            parts.append(f"within {self.max_ratio:g}x of {self.baseline}")
        if self.max_mem_ratio is not None:
            parts.append(f"memory <= {self.max_mem_ratio:g} x {self.baseline}'s")
        return ", ".join(parts)


TARGETS: List[Target] = [
    Target("op", "pio-learned", "fwd", "fused", "eager", min_speedup=1.0, max_mem_ratio=0.05,
           measured_baseline="eager 1.226 ms, 788 MiB"),
    Target("op", "pio-fourier", "fwd", "fused", "eager", min_speedup=3.0, measured_baseline="eager 3.665 ms"),
    Target("op", "pio-conv", "fwd", "fused", "eager", min_speedup=2.0, measured_baseline="eager 0.225 ms"),
    Target("op", "h8-d128", "fwd", "fused", "sdpa-cudnn", max_ratio=1.1, measured_baseline="cuDNN 1.451 ms"),
    Target("op", "keras", "fwd", "fused", "sdpa-cudnn", max_ratio=1.1, measured_baseline="cuDNN 0.039 ms"),
    Target("op", "pio-latent", "fwd", "fused", "sdpa-cudnn", max_ratio=1.1, measured_baseline="cuDNN 0.049 ms"),
    Target("op", "vit-b16", "fwd", "fused", "sdpa-cudnn", max_ratio=1.1, measured_baseline="cuDNN 0.049 ms"),
    Target("op", "fourier-pio-224", "fwd", "fused", "eager", min_speedup=2.5, measured_baseline="eager 2.239 ms"),
    Target("op", "fourier-pio-224", "fwd", "fused", "compile", max_ratio=1.0,
           measured_baseline="torch.compile 0.877 ms"),
    Target("op", "pio-learned", "fwd+bwd", "fused", "eager", min_speedup=1.5, measured_baseline="eager 5.047 ms"),
    Target("op", "pio-latent", "fwd+bwd", "fused", "sdpa-cudnn", max_ratio=1.2, measured_baseline="cuDNN 0.323 ms"),
    Target("layer", "learned", "fwd", "ours:fused", "hf:eager", min_speedup=2.5, max_mem_ratio=0.25,
           measured_baseline="HF 3.20 ms, peak 1976 MiB"),
    Target("layer", "learned", "fwd+bwd", "ours:fused", "hf:eager", min_speedup=2.0, max_mem_ratio=0.25,
           measured_baseline="HF 9.73 ms, peak 2767 MiB"),
    Target("layer", "fourier", "fwd", "ours:fused", "hf:eager", min_speedup=5.0, measured_baseline="HF 8.33 ms"),
    Target("layer", "conv", "fwd", "ours:fused", "hf:eager", min_speedup=2.5, measured_baseline="HF 0.714 ms"),
    Target("model", "pio-learned", "fwd", "ours:fused", "hf:eager", min_speedup=3.0,
           measured_baseline="HF 24.6 ms"),
    Target("model", "pio-fourier", "fwd", "ours:fused", "hf:eager", min_speedup=15.0,
           measured_baseline="HF 172 ms"),
    Target("model", "pio-learned", "fwd+bwd", "ours:fused", "hf:eager", min_speedup=3.0, max_mem_ratio=0.5,
           measured_baseline="HF 104 ms, 10.7 GB"),
    Target("model", "vit-b16", "fwd", "ours:fused", "timm:sdpa", max_ratio=1.0,
           measured_baseline="timm fused_attn 6.17 ms"),
]


def _find(rows, section, name, direction, backend) -> Optional[Dict]:
    for r in rows:
        if (r["section"], r["name"], r["direction"], r["backend"]) == (section, name, direction, backend) \
                and r["status"] == "ok" and r["ms"]:
            return r
    return None


def evaluate(rows: List[Dict]) -> List[Dict]:
    """One dict per target whose rows are in this run: target, measured, verdict."""
    out = []
    for t in TARGETS:
        if not any((r["section"], r["name"], r["direction"]) == (t.section, t.name, t.direction) for r in rows):
            continue
        cand = _find(rows, t.section, t.name, t.direction, t.candidate)
        if t.baseline == "best-sdpa":
            base_rows = [r for r in rows if (r["section"], r["name"], r["direction"]) == (t.section, t.name, t.direction)
                         and "sdpa" in (r["backend"] or "") and r["status"] == "ok" and r["ms"]]
            base = min(base_rows, key=lambda r: r["ms"]) if base_rows else None
        else:
            base = _find(rows, t.section, t.name, t.direction, t.baseline)
        res = {"target": f"{t.section} {t.name} {t.direction}: {t.candidate} {t.describe()}",
               "anchor": t.measured_baseline, "measured": "", "verdict": "n/a"}
        if cand is None or base is None:
            res["measured"] = f"missing row ({'candidate' if cand is None else 'baseline'} failed or skipped)"
            out.append(res)
            continue
        speed = base["ms"] / cand["ms"]
        ok = True
        txt = [f"{cand['ms']:.3f} ms vs {base['ms']:.3f} ms = {speed:.2f}x"]
        if t.min_speedup is not None:
            ok &= speed >= t.min_speedup
        if t.max_ratio is not None:
            ok &= cand["ms"] / base["ms"] <= t.max_ratio
        if t.max_mem_ratio is not None:
            if cand["peak_mib"] is not None and base["peak_mib"]:
                mr = cand["peak_mib"] / base["peak_mib"]
                txt.append(f"memory {cand['peak_mib']:.0f}/{base['peak_mib']:.0f} MiB = {mr:.3f}")
                ok &= mr <= t.max_mem_ratio
            else:
                txt.append("memory not measured")
                ok = False
        res.update(measured="; ".join(txt), verdict="MET" if ok else "MISSED")
        out.append(res)
    return out
