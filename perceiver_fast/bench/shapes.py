"""The one source of benchmark shapes and of their FLOP and byte counts.

Every front end takes its shapes from here: ``perceiver-fast bench``
(:mod:`perceiver_fast.bench.runner`), the pytest-benchmark files under
``benchmarks/`` and the notes in ``docs/perf-notes.md``.

Attention shapes use the package's layout: q (B, N, H, Dqk), k (B, M, Hkv, Dqk),
v (B, M, Hkv, Dv) (Hkv = H unless a shape has grouped-query heads). Counting conventions (the same as the measured H200 anchors in
``shared/baselines/h200-2026-11-20.md``):

* forward FLOPs = 2 * B * H * N * M * (Dqk + Dv) (the two matrix products;
  softmax and scaling are not counted); for a causal shape N * M becomes the
  number of visible (query, key) pairs (bottom-right aligned), the work the
  kernels' block skipping leaves;
* forward + backward FLOPs = 3.5 x forward (the backward recomputes the scores
  and does four more products of the same size: 2.5 x forward);
* minimum bytes = each input read once and each output written once
  (q, k, v, o forward; plus dO read and dQ, dK, dV written for the backward).
  K/V rows stored with a padded row stride count only their used elements.

The floor of a shape is max(FLOPs / peak FLOP/s, bytes / peak bandwidth) with
the ceilings measured on the project's H200 (``H200_CEILINGS``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from perceiver_fast.ops.fourier import fourier_channels

# Measured on the project's H200, 2026-11-20 (shared/baselines/h200-2026-11-20.md):
# 1 GiB device-to-device copy (read + written bytes) and an 8192^3 matmul.
H200_CEILINGS = {
    "bandwidth_gbs": 4250.0,
    "tflops": {"bfloat16": 700.0, "float16": 700.0, "float32": 51.0, "tf32": 387.0},
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}

FWD_BWD_FLOP_FACTOR = 3.5


@dataclass(frozen=True)
class AttnShape:
    """One attention problem.

    ``kv_row_stride``: elements between consecutive rows (keys) of K and V when
    they are views into a wider buffer (None = contiguous, stride H*D).
    ``q_batch``: 1 for latents shared over the batch, else B.
    ``Hkv``: key/value heads (grouped-query heads; None = H). ``causal``: bottom-right
    causal mask. ``softcap``: logit soft-capping (0 = none). The eager baseline runs
    :func:`perceiver_fast.ops.reference.attention_reference` with the same flags.
    """

    name: str
    op: str  # "cross" | "self"
    B: int
    H: int
    N: int
    M: int
    Dqk: int
    Dv: int
    kv_row_stride: Optional[int] = None
    q_batch: Optional[int] = None
    note: str = ""
    Hkv: Optional[int] = None
    causal: bool = False
    softcap: float = 0.0

    @property
    def Bq(self) -> int:
        return self.B if self.q_batch is None else self.q_batch

    @property
    def kv_heads(self) -> int:
        return self.H if self.Hkv is None else self.Hkv

    @property
    def has_features(self) -> bool:
        """Grouped-query heads, causal masking or soft-capping: what the plain (B, N, H, D) recipes lack."""
        return self.kv_heads != self.H or self.causal or self.softcap > 0.0

    def visible_pairs(self) -> int:
        """(query, key) pairs attended per (batch, head): N * M, or under the bottom-right causal mask
        sum over queries i of min(M, max(0, i + M - N + 1))."""
        n, m = self.N, self.M
        if not self.causal:
            return n * m
        first = max(0, n - m)  # rows 0 .. first-1 see no key
        # rows first .. n-1 see i + m - n + 1 keys (from 1 or m - n + 1 up to m)
        lo, hi = first + m - n + 1, m
        return (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0

    def flops(self, backward: bool = False) -> int:
        fwd = 2 * self.B * self.H * self.visible_pairs() * (self.Dqk + self.Dv)
        return int(fwd * FWD_BWD_FLOP_FACTOR) if backward else fwd

    def bytes(self, dtype: str = "bfloat16", backward: bool = False) -> int:
        e = DTYPE_BYTES[dtype]
        q = self.Bq * self.N * self.H * self.Dqk
        k = self.B * self.M * self.kv_heads * self.Dqk
        v = self.B * self.M * self.kv_heads * self.Dv
        o = self.B * self.N * self.H * self.Dv
        n = q + k + v + o
        if backward:
            n += o + q + k + v  # dO read; dQ, dK, dV written
        return n * e

    def score_elems(self) -> int:
        """Elements of the full B x H x N x M score matrix (what eager materialises)."""
        return self.B * self.H * self.N * self.M

    def eager_extra_bytes(self, dtype: str = "bfloat16", backward: bool = False) -> int:
        """Rough peak extra memory of the eager recipe (attention_reference).

        Per score element: the scores and their softmax, both in ``dtype``,
        i.e. 4 bytes in bf16; the backward keeps about twice that alive. Used
        to skip shapes that would not fit, before trying them.
        """
        return self.score_elems() * 2 * DTYPE_BYTES[dtype] * (2 if backward else 1)

    def floor_ms(self, dtype: str = "bfloat16", backward: bool = False, ceilings=H200_CEILINGS) -> float:
        return floor_ms(self.flops(backward), self.bytes(dtype, backward), dtype, ceilings)

    def label(self) -> str:
        s = f"{self.op} {self.name} B{self.B} H{self.H} N{self.N} M{self.M} D{self.Dqk}"
        if self.Dv != self.Dqk:
            s += f"/{self.Dv}"
        if self.kv_row_stride is not None:
            s += f" stride{self.kv_row_stride}"
        if self.kv_heads != self.H:
            s += f" Hkv{self.kv_heads}"
        if self.causal:
            s += " causal"
        if self.softcap > 0.0:
            s += f" softcap{self.softcap:g}"
        return s

    def replace(self, **kw) -> "AttnShape":
        return dataclasses.replace(self, **kw)

    def small(self) -> "AttnShape":
        """A CPU-sized version: same heads, head dims and row stride, fewer rows."""
        return self.replace(B=min(self.B, 2), N=min(self.N, 64), M=min(self.M, 1024) if self.op == "cross" else min(self.M, 64))


@dataclass(frozen=True)
class FourierShape:
    """Fourier-feature position encoding of channels-last inputs (B, *index_dims, Cin).

    Output: (B, prod(index_dims), Cin + C) in float32, C from
    :func:`perceiver_fast.ops.fourier.fourier_channels` (HF's default: positions
    concatenated, sine and cosine: D + 2 * D * num_bands).
    """

    name: str
    B: int
    index_dims: Tuple[int, ...]
    num_bands: int
    cin: int = 3
    note: str = ""
    concat_pos: bool = True
    sine_only: bool = False

    @property
    def points(self) -> int:
        return math.prod(self.index_dims)

    @property
    def out_channels(self) -> int:
        return self.cin + fourier_channels(len(self.index_dims), self.num_bands, self.concat_pos, self.sine_only)

    def flops(self, backward: bool = False) -> int:
        return 0  # memory bound; sin/cos are not counted as FLOPs

    def bytes(self, dtype: str = "float32", backward: bool = False) -> int:
        e = DTYPE_BYTES[dtype]
        return self.B * self.points * (self.cin + self.out_channels) * e

    def floor_ms(self, dtype: str = "float32", backward: bool = False, ceilings=H200_CEILINGS) -> float:
        return floor_ms(0, self.bytes(dtype), dtype, ceilings)

    def label(self) -> str:
        dims = "x".join(str(n) for n in self.index_dims)
        return f"fourier {self.name} B{self.B} {dims} bands{self.num_bands} Cin{self.cin} -> C{self.out_channels}"

    def replace(self, **kw) -> "FourierShape":
        return dataclasses.replace(self, **kw)

    def small(self) -> "FourierShape":
        return self.replace(B=min(self.B, 2), index_dims=tuple(min(n, 32) for n in self.index_dims))


@dataclass(frozen=True)
class ModelCase:
    """An end-to-end model benchmark: ``family`` names a builder in
    :mod:`perceiver_fast.bench.models`; ``kwargs`` go to it."""

    name: str
    family: str
    batch: int
    image_size: int = 224
    channels: int = 3
    num_classes: int = 1000
    kwargs: Dict = field(default_factory=dict)
    note: str = ""
    small_note: str = ""  # the note of the tiny config small() builds (it is not the full model)

    def small(self) -> "ModelCase":
        return dataclasses.replace(self, batch=min(self.batch, 2), image_size=min(self.image_size, 32), num_classes=10,
                                   kwargs={**self.kwargs, "tiny": True}, note=self.small_note or self.note)


@dataclass(frozen=True)
class LayerCase:
    """A Perceiver IO encoder cross-attention layer (HF PerceiverLayer, is_cross_attention=True):
    N latents of q_dim attend to M inputs of kv_dim, one head, widening factor 1."""

    name: str
    B: int
    N: int
    M: int
    q_dim: int
    kv_dim: int
    note: str = ""

    def label(self) -> str:
        return f"layer {self.name} B{self.B} N{self.N} M{self.M} q{self.q_dim} kv{self.kv_dim}"

    def small(self) -> "LayerCase":
        return dataclasses.replace(self, B=min(self.B, 2), N=min(self.N, 64), M=min(self.M, 1024),
                                   q_dim=min(self.q_dim, 256))


def floor_ms(flops: float, nbytes: float, dtype: str = "bfloat16", ceilings=H200_CEILINGS) -> float:
    """max(compute time, memory time) in ms at the given ceilings."""
    t_flop = flops / (ceilings["tflops"].get(dtype, ceilings["tflops"]["float32"]) * 1e12) if flops else 0.0
    t_mem = nbytes / (ceilings["bandwidth_gbs"] * 1e9) if nbytes else 0.0
    return 1e3 * max(t_flop, t_mem)


# ---------------------------------------------------------------------------
# The target shapes (HF deepmind vision Perceiver IO configs, Keras example,
# ViT-B/16). Names are stable: they key the CSV/JSON rows and the notes.
# ---------------------------------------------------------------------------
ATTN_SHAPES: List[AttnShape] = [
    AttnShape("pio-learned", "cross", 8, 1, 512, 50176, 512, 512,
              note="HF PerceiverIO learned positions: 224x224 pixels, kv_dim 512, one head"),
    AttnShape("pio-fourier", "cross", 8, 1, 512, 50176, 261, 261,
              note="HF PerceiverIO fourier: 3 + 2 + 256 channels, K/V as given (row stride 261 elements)"),
    AttnShape("pio-fourier-s272", "cross", 8, 1, 512, 50176, 261, 261, kv_row_stride=272,
              note="the same, K/V rows padded to 272 elements (544 B, a multiple of 16 B) as our layers can write them"),
    AttnShape("pio-conv", "cross", 8, 1, 512, 3136, 322, 322,
              note="HF PerceiverIO conv processing: 56x56 after the conv stem, kv_dim 322"),
    AttnShape("h8-d128", "cross", 8, 8, 512, 50176, 128, 128,
              note="8-head cross-attention over 50176 inputs, head dim 128"),
    AttnShape("keras", "cross", 64, 1, 256, 1024, 256, 256,
              note="Keras Perceiver example: 256 latents over 1024 patches"),
    AttnShape("pio-latent", "self", 8, 8, 512, 512, 128, 128,
              note="PerceiverIO latent self-attention: 512 latents, d_latents 1024, 8 heads"),
    AttnShape("vit-b16", "self", 64, 12, 197, 197, 64, 64,
              note="ViT-B/16 at 224: 196 patches + class token, 12 heads"),
]

QUICK_ATTN = ["pio-learned", "pio-fourier", "pio-latent"]

# Shapes with the kernels' features (grouped-query heads, causal masking), timed in the op section
# beside ATTN_SHAPES with feature-aware inputs and baselines (perceiver_fast.bench.ops); kept apart
# from ATTN_SHAPES because the plain recipes (backends.attn_inputs, benchmarks/bench_attention.py)
# build H key/value heads and no mask.
FEATURE_SHAPES: List[AttnShape] = [
    AttnShape("gqa-decoder", "self", 4, 32, 2048, 2048, 128, 128, Hkv=8, causal=True,
              note="decoder-like causal self-attention, 32 query heads over 8 key/value heads (GQA), head dim 128"),
    AttnShape("par-causal", "cross", 4, 16, 1024, 8192, 64, 64, causal=True,
              note="Perceiver AR-like: 1024 latents over 8192 inputs, causal aligned bottom-right"),
]

FOURIER_SHAPES: List[FourierShape] = [
    FourierShape("pio-224", 32, (224, 224), 64, 3,
                 note="PerceiverIO fourier preprocessing: 224x224, 64 bands, fp32 output (B, 50176, 261)"),
]

# Cross-attention against input length M (pio-learned geometry: B8, N512, H1, D512).
SWEEP_BASE = ATTN_SHAPES[0]
SWEEP_M = [1024, 4096, 16384, 50176, 100352, 200704]
SWEEP_M_QUICK = [1024, 16384, 50176, 200704]
SWEEP_M_CPU = [256, 512, 1024, 2048, 4096]


def sweep_shapes(ms: List[int], base: AttnShape = SWEEP_BASE) -> List[AttnShape]:
    return [base.replace(name=f"sweep-M{m}", M=m) for m in ms]


# Cross-attention against head dim D (8 heads, M 16384; the kernels' head-dim buckets up to 512).
HEADDIM_BASE = AttnShape("headdim", "cross", 8, 8, 512, 16384, 64, 64, note="8-head cross-attention, M 16384")
HEADDIM_D = [32, 64, 128, 256, 261, 512]
HEADDIM_D_QUICK = [64, 128, 256]


def headdim_shapes(ds: List[int], base: AttnShape = HEADDIM_BASE) -> List[AttnShape]:
    return [base.replace(name=f"headdim-D{d}", Dqk=d, Dv=d) for d in ds]


# Layer targets: HF PerceiverLayer vs ours, same weights, B8.
LAYER_CASES: List[LayerCase] = [
    LayerCase("learned", 8, 512, 50176, 1024, 512, note="learned positions, kv_dim 512"),
    LayerCase("fourier", 8, 512, 50176, 1024, 261, note="Fourier features, kv_dim 261"),
    LayerCase("conv", 8, 512, 3025, 1024, 322, note="conv processing, 55x55, kv_dim 322"),
]
QUICK_LAYERS = ["learned"]

MODEL_CASES: List[ModelCase] = [
    ModelCase("pio-learned", "perceiver-io", 8, kwargs={"preprocessor": "learned"},
              note="Perceiver IO, learned positions (deepmind vision config)",
              small_note="Perceiver IO, learned positions, tiny config (16 latents, 1 block)"),
    ModelCase("pio-fourier", "perceiver-io", 8, kwargs={"preprocessor": "fourier"},
              note="Perceiver IO, Fourier positions",
              small_note="Perceiver IO, Fourier positions, tiny config (16 latents, 1 block)"),
    ModelCase("pio-conv", "perceiver-io", 8, kwargs={"preprocessor": "conv"},
              note="Perceiver IO, conv preprocessing",
              small_note="Perceiver IO, conv preprocessing, tiny config (16 latents, 1 block)"),
    ModelCase("vit-b16", "vit", 64, note="ViT-B/16", small_note="ViT, tiny config (patch 8, dim 64, depth 2)"),
]
QUICK_MODELS = ["pio-learned", "vit-b16"]

# The deepmind vision Perceiver IO config (HF PerceiverConfig keywords) shared by
# the HF baselines and, translated, by our models.
PIO_CONFIG = dict(num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
                  num_self_attention_heads=8, num_cross_attention_heads=1, image_size=224, num_labels=1000)
PIO_D_MODEL = {"learned": 512, "fourier": 261, "conv": 322}


def attn_shape(name: str) -> AttnShape:
    for s in ATTN_SHAPES + FEATURE_SHAPES:
        if s.name == name:
            return s
    known = ", ".join(s.name for s in ATTN_SHAPES + FEATURE_SHAPES)
    raise KeyError(f"unknown attention shape {name!r}; known: {known}")


def model_case(name: str) -> ModelCase:
    for c in MODEL_CASES:
        if c.name == name:
            return c
    raise KeyError(f"unknown model case {name!r}; known: {', '.join(c.name for c in MODEL_CASES)}")
