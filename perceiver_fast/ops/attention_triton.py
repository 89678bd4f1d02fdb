"""Triton kernels and launchers of the attention ops, designed for Hopper (sm_90).

Layout: (batch, seq, heads, head_dim) with a unit last stride; other strides are
free, so views of packed projections are used in place. The saved log-sum-exp
``lse`` is fp32 (B, H, N) in natural-log units, ``+inf`` for a query with no
attended key, so that ``exp(s - lse)`` is 0 there and the backward gives zeros.

Design (perf-notes "H1"):

* **Q stays resident.** A forward program loads its BLOCK_N x Dqk query tile
  once, as one power-of-two chunk plus an optional power-of-two tail
  (512 = 512, 261 = 256 + 16, 322 = 256 + 128), and keeps it on chip for all
  its key blocks. Only head dims wider than that budget (over 512 in 16-bit,
  256 in fp32) fall back to a chunk loop that re-reads Q.
* **K/V stream by TMA.** When every row stride and base is 16-byte aligned,
  K/V (and, in the backward, Q/dO) tiles are read through
  ``tl.make_tensor_descriptor``; triton pipelines them over key blocks
  (``num_stages``) and zero-fills rows and columns past the end, so odd head
  dims need no masks. Unaligned tensors are repacked into aligned buffers by
  the launcher on the GPU (one pass; see :func:`plan_alignment`), and only
  the interpreter tests exercise the masked pointer path on them.
* **Every dot has >= 64 rows**, so it lowers to wgmma: the forward's tiles are
  64 queries; the dK/dV kernel computes S^T = K Q^T and dP^T = V dO^T with its
  64 keys as rows; the dQ kernel has 64 queries as rows.
* **Split-KV** in the forward and in dQ, sized by :func:`num_splits_heuristic`
  (FlashAttention's) from the real tile counts, with a log-sum-exp merge
  kernel (forward) and an fp32 sum (dQ).

Features, each compiled in only where used (the plain kernels are unchanged):

* **Grouped-query / multi-query heads** (k, v with Hkv heads dividing H; a
  runtime ``group`` = H // Hkv, specialised away when 1): forward and dQ
  programs of query head h read key/value head h // group; a dK/dV program
  owns one key/value head and loops over its group's query heads into the
  same accumulators (constexpr GQA), so K/V are never repeated, no atomics.
  Dropout offsets use the query head (b * H + h) in every kernel.
* **Causal, bottom-right aligned** (constexpr CAUSAL; key j visible from query
  i iff j <= i + M - N): key blocks above the diagonal are skipped, not masked
  (the forward / dQ key loop ends after the tile's last visible key, a split
  past it does nothing; the dK/dV query loop starts at the first query block
  that sees the key block); only blocks crossing the diagonal apply the
  element mask. Rows with no visible key give zeros and lse = +inf.
* **Logit soft-capping** (constexpr SOFTCAP, runtime cap): in log2 units
  S = cap_log2 * tanh(cap_in * q.k), cap_in = scale / softcap,
  cap_log2 = softcap * log2(e); the backward recomputes tanh from S and
  multiplies dS by 1 - tanh^2. tanh is :func:`tanh_f32` (exp2-based, finite
  for every input, no libdevice: identical on triton 3.6-3.9 and the interpreter).

All pointer offsets are int64. A batch-shared query (Bq == 1) has batch stride 0.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from perceiver_fast.ops.backend import empty, interpreter_enabled, seed_to_int

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)  # the same constant, as kernels must see module globals
SMEM_BUDGET = 232_448  # bytes of shared memory per block on sm_90 (227 KB)
# Query rows per forward / dQ program. Fixed (not autotuned) so that the split
# count can be sized from the real tile count before launch.
BLOCK_Q = 64
INTERPRET_BLOCK = 16
# SM count assumed when there is no CUDA device (interpreter runs).
CPU_NOMINAL_SMS = 8


# ---------------------------------------------------------------------------
# Head-dim planning
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DimPlan:
    """How one head dim is covered on chip: a power-of-two ``main`` chunk plus a power-of-two ``tail`` (or 0).

    ``resident`` is False when main + tail would exceed the budget; the head dim
    is then walked in chunks of ``main`` (Q re-read per key block, V tiled
    across programs).
    """
    main: int
    tail: int
    resident: bool

    @property
    def width(self) -> int:
        return self.main + self.tail


def _prev_pow2(x: int) -> int:
    return 1 << (int(x).bit_length() - 1)


def plan_dim(d: int, budget: int) -> DimPlan:
    """Cover head dim ``d`` by main + tail power-of-two chunks within ``budget`` columns."""
    main = max(16, min(_prev_pow2(d), budget))
    rest = d - main
    tail = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    if main + tail <= budget:
        return DimPlan(main, tail, True)
    return DimPlan(min(budget, 128), 0, False)


def dim_budget(dtype: torch.dtype) -> int:
    """Widest head dim kept on chip: 512 columns in 16-bit, 256 in fp32 (same bytes)."""
    return 256 if dtype == torch.float32 else 512


def bucket(x: int) -> int:
    """Autotune-key bucket of a size: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(x)))


# ---------------------------------------------------------------------------
# Autotuning: a few configs per kernel, pruned by an estimate of shared memory
# and accumulator registers so that none the autotuner tries can fail to fit.
# The key holds the head-dim plan (constexprs), alignment (USE_TMA) and buckets
# of N and M, so the learned, fourier and conv shapes get their own winners.
# ---------------------------------------------------------------------------
def small_autotune() -> bool:
    """``PERCEIVER_FAST_AUTOTUNE=small`` (read at import): one config per kernel, for a time-boxed GPU run whose
    budget autotuning's compiles would otherwise eat (benchmarks/gpu_first_contact.sh)."""
    return os.environ.get("PERCEIVER_FAST_AUTOTUNE", "") == "small"


def fwd_configs():
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": INTERPRET_BLOCK}, num_warps=4, num_stages=1)]
    if small_autotune():
        return [triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=1),
    ]


def _elem_bytes(named_args) -> int:
    q = named_args.get("Q")
    return q.element_size() if hasattr(q, "element_size") else 2


def fwd_smem_estimate(cfg, kw, elem: int) -> int:
    """Bytes of shared memory a forward config needs: resident Q + num_stages K/V tiles + the P tile."""
    bm, stages = cfg.kwargs["BLOCK_M"], max(1, cfg.num_stages)
    qk = kw["DQK0"] + kw["DQK1"]
    dv = kw["DV0"] + kw["DV1"]
    q_tile = BLOCK_Q * qk * elem if kw["QK_RESIDENT"] else 0
    kv_stage = bm * (qk + dv) * elem
    return q_tile + stages * kv_stage + BLOCK_Q * bm * elem


def _acc_regs(rows: int, cols: int, num_warps: int) -> int:
    return rows * cols // (32 * num_warps)


def prune_fwd_configs(configs, named_args, **kwargs):
    kw = {**named_args, **kwargs}
    if interpreter_enabled():
        return configs
    elem = _elem_bytes(named_args)
    dv = kw["DV0"] + kw["DV1"]
    kept = [c for c in configs
            if fwd_smem_estimate(c, kw, elem) <= SMEM_BUDGET and _acc_regs(BLOCK_Q, dv, c.num_warps) <= 128]
    return kept or configs[-1:]


def bwd_configs():
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": INTERPRET_BLOCK, "BLOCK_M": INTERPRET_BLOCK, "BLOCK_D": 64,
                               "BLOCK_DT": 64}, num_warps=4, num_stages=1)]
    if small_autotune():
        return [triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DT": 64}, num_warps=4,
                              num_stages=2)]
    return [
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DT": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DT": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DT": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DT": 256}, num_warps=8, num_stages=2),
    ]


def prune_bwd_configs(configs, named_args, **kwargs):
    kw = {**named_args, **kwargs}
    if interpreter_enabled():
        return configs
    widest = bucket(max(kw["DQK_BUCKET"], kw.get("DV_BUCKET", 0)))
    kept = [c for c in configs if c.kwargs["BLOCK_DT"] <= max(64, widest)]
    return kept or configs[:1]


# ---------------------------------------------------------------------------
# Shared @triton.jit helpers
# ---------------------------------------------------------------------------
@triton.jit
def _matrix(base, n_rows, n_cols, stride_row,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, USE_TMA: tl.constexpr):
    """A TMA descriptor of the row-major (n_rows, n_cols) matrix at ``base``, or ``base`` itself without TMA."""
    m = base
    if USE_TMA:
        m = tl.make_tensor_descriptor(base, shape=[n_rows, n_cols], strides=[stride_row, 1],
                                      block_shape=[BLOCK_R, BLOCK_C])
    return m


@triton.jit
def _tile(base, desc, row0, col0, n_rows, n_cols, stride_row,
          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, USE_TMA: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) tile at (row0, col0); rows and columns past the end read as 0."""
    if USE_TMA:
        t = desc.load([row0, col0])
    else:
        rows = row0 + tl.arange(0, BLOCK_R)
        cols = col0 + tl.arange(0, BLOCK_C)
        t = tl.load(base + rows.to(tl.int64)[:, None] * stride_row + cols[None, :],
                    mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    return t


@triton.jit
def _dot_rows(a_base, a_desc, a_row0, a_rows, stride_a, b_base, b_desc, b_row0, b_rows, stride_b, D,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
              USE_TMA: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 (BLOCK_A, BLOCK_B) = A[a_row0:, :D] @ B[b_row0:, :D]^T, summed over D in BLOCK_D chunks."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        a = _tile(a_base, a_desc, a_row0, d0, a_rows, D, stride_a, BLOCK_A, BLOCK_D, USE_TMA)
        b = _tile(b_base, b_desc, b_row0, d0, b_rows, D, stride_b, BLOCK_B, BLOCK_D, USE_TMA)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _key_valid(mask_base, offs_m, end, HAS_MASK: tl.constexpr):
    """(BLOCK_M,) bool: key before ``end`` and (with a mask) attended."""
    ok = offs_m < end
    if HAS_MASK:
        keep = tl.load(mask_base + offs_m.to(tl.int64), mask=ok, other=0)
        ok = ok & (keep != 0)
    return ok


@triton.jit
def tanh_f32(x):
    """tanh in fp32 from exp2, finite everywhere: 1 - 2 / (2^(2 log2(e) |x|) + 1) with |x| clamped at 15.

    (tanh(15) rounds to 1 in fp32, so the clamp changes nothing and keeps exp2 finite.) Absolute error
    about 1e-7, which is what the capped scores and the factor 1 - tanh^2 need; no libdevice, so it is
    the same code under the interpreter and on every triton from 3.6 on.
    """
    a = tl.minimum(tl.abs(x), 15.0)
    t = 1.0 - 2.0 / (tl.math.exp2(a * (2.0 * LOG2E_C)) + 1.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def causal_visible(offs_n, offs_m, shift):
    """(len(offs_n), len(offs_m)) bool: key j visible from query i, i.e. j <= i + shift with shift = M - N."""
    return offs_m[None, :] <= offs_n[:, None] + shift


@triton.jit
def dropout_keep(seed, bh, offs_n, offs_m, N, M, dropout_p):
    """(len(offs_n), len(offs_m)) keep-mask from Philox on the int64 offset ((b*H + h)*N + n)*M + m.

    m is the GLOBAL key index and M the global key count: the kernels pass
    ``offs_m + key_offset`` and ``total_keys`` (a call over a shard of the keys
    then draws the unsharded call's mask; unsharded, key_offset = 0 and
    total_keys = M). The forward and both backward kernels draw the same
    offsets, so the backward regenerates exactly the forward's mask (the dK/dV
    kernel transposes the result).
    """
    offs = (bh * N + offs_n.to(tl.int64)[:, None]) * M + offs_m.to(tl.int64)[None, :]
    return tl.rand(seed, offs) >= dropout_p


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
@triton.autotune(configs=fwd_configs(),
                 key=["N_BUCKET", "M_BUCKET", "DQK0", "DQK1", "QK_RESIDENT", "DV0", "DV1", "USE_TMA", "SPLIT",
                      "HAS_MASK", "DROPOUT", "CAUSAL", "SOFTCAP"],
                 prune_configs_by={"early_config_prune": prune_fwd_configs})
@triton.jit
def attn_fwd_kernel(
    Q, K, V, Mask, Out, Lse, seed,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_maskb,
    stride_os, stride_ob, stride_on, stride_oh,
    stride_ls,
    H, N, M, Dqk, Dv, group, keys_per_split, scale_log2, cap_in, cap_log2, dropout_p,
    N_BUCKET, M_BUCKET,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, QK_RESIDENT: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    DQK0: tl.constexpr, DQK1: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    key_offset=0, total_keys=0,
):
    # FlashAttention forward with a resident Q tile and split-KV.
    # Grid: (cdiv(N, BLOCK_N), B * H, num_splits * n_value_tiles).
    # One program owns BLOCK_N queries of one (batch, head), one value tile of
    # DV0 + DV1 columns and the keys [split * keys_per_split, +keys_per_split).
    # It loads its Q tile once (chunks DQK0 + DQK1), then streams key blocks of
    # BLOCK_M: S = Q K^T (one or two wgmma chains), online softmax in log2
    # units, acc += P V (one accumulator per value chunk). Without SPLIT it
    # writes the normalised output and lse (+inf for a row with no key); with
    # SPLIT an fp32 partial normalised by its own denominator and its raw lse
    # (-inf when empty), for _attn_merge_kernel.
    # Grouped heads: query head h reads key/value head h // group (no copies).
    # SOFTCAP: S_log2 = cap_log2 * tanh(cap_in * QK^T) (cap_in = scale / softcap,
    # cap_log2 = softcap * log2 e). CAUSAL (bottom-right, key j <= query i + M - N):
    # the key loop stops after the tile's last visible key, so blocks above the
    # diagonal are never loaded (a split past it only writes an empty partial);
    # only blocks crossing the diagonal apply the element mask.
    # key_offset / total_keys: the global range of this call's keys (a shard of
    # them), for the dropout offsets only; the launchers always pass them.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2)
    n_dv_tiles = tl.cdiv(Dv, DV0 + DV1)
    split = pid_z // n_dv_tiles
    dv_start = (pid_z % n_dv_tiles) * (DV0 + DV1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // group
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, M)
    if CAUSAL:  # the last key the tile's last row sees, and the first key its first row does not
        end = tl.minimum(end, tl.minimum(pid_n * BLOCK_N + BLOCK_N, N) + (M - N))
        diag_lo = pid_n * BLOCK_N + (M - N) + 1

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_maskb

    q_rows = offs_n.to(tl.int64)[:, None] * stride_qn
    if QK_RESIDENT:
        cols = tl.arange(0, DQK0)
        q0 = tl.load(q_base + q_rows + cols[None, :], mask=n_ok[:, None] & (cols[None, :] < Dqk), other=0.0)
        k0_desc = _matrix(k_base, M, Dqk, stride_km, BLOCK_M, DQK0, USE_TMA)
        if DQK1 > 0:
            cols1 = DQK0 + tl.arange(0, DQK1)
            q1 = tl.load(q_base + q_rows + cols1[None, :], mask=n_ok[:, None] & (cols1[None, :] < Dqk), other=0.0)
            k1_desc = _matrix(k_base, M, Dqk, stride_km, BLOCK_M, DQK1, USE_TMA)
    else:
        q_desc = _matrix(q_base, N, Dqk, stride_qn, BLOCK_N, DQK0, USE_TMA)
        k0_desc = _matrix(k_base, M, Dqk, stride_km, BLOCK_M, DQK0, USE_TMA)
    v0_desc = _matrix(v_base, M, Dv, stride_vm, BLOCK_M, DV0, USE_TMA)
    acc0 = tl.zeros([BLOCK_N, DV0], dtype=tl.float32)
    if DV1 > 0:
        v1_desc = _matrix(v_base, M, Dv, stride_vm, BLOCK_M, DV1, USE_TMA)
        acc1 = tl.zeros([BLOCK_N, DV1], dtype=tl.float32)
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)

    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if QK_RESIDENT:
            k0 = _tile(k_base, k0_desc, m0, 0, M, Dqk, stride_km, BLOCK_M, DQK0, USE_TMA)
            s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
            if DQK1 > 0:
                k1 = _tile(k_base, k1_desc, m0, DQK0, M, Dqk, stride_km, BLOCK_M, DQK1, USE_TMA)
                s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
        else:
            s = _dot_rows(q_base, q_desc, pid_n * BLOCK_N, N, stride_qn, k_base, k0_desc, m0, M, stride_km, Dqk,
                          BLOCK_N, BLOCK_M, DQK0, USE_TMA, PRECISION)
        ok = _key_valid(mask_base, offs_m, end, HAS_MASK)
        if SOFTCAP:
            s = tanh_f32(s * cap_in) * cap_log2
        else:
            s = s * scale_log2
        s = tl.where(ok[None, :], s, float("-inf"))
        if CAUSAL:
            if m0 + BLOCK_M > diag_lo:  # a block crossing the diagonal
                s = tl.where(causal_visible(offs_n, offs_m, M - N), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = dropout_keep(seed, pid_bh, offs_n, offs_m.to(tl.int64) + key_offset, N, total_keys, dropout_p)
            p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        v0 = _tile(v_base, v0_desc, m0, dv_start, M, Dv, stride_vm, BLOCK_M, DV0, USE_TMA)
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if DV1 > 0:
            v1 = _tile(v_base, v1_desc, m0, dv_start + DV0, M, Dv, stride_vm, BLOCK_M, DV1, USE_TMA)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    lse = (m_i + tl.math.log2(l_safe)) / LOG2E_C
    if SPLIT:
        lse = tl.where(empty_row, float("-inf"), lse)
    else:
        lse = tl.where(empty_row, float("inf"), lse)
    o_base = Out + split.to(tl.int64) * stride_os + b * stride_ob + h * stride_oh
    o_rows = offs_n.to(tl.int64)[:, None] * stride_on
    cols = dv_start + tl.arange(0, DV0)
    tl.store(o_base + o_rows + cols[None, :], (acc0 / l_safe[:, None]).to(Out.dtype.element_ty),
             mask=n_ok[:, None] & (cols[None, :] < Dv))
    if DV1 > 0:
        cols1 = dv_start + DV0 + tl.arange(0, DV1)
        tl.store(o_base + o_rows + cols1[None, :], (acc1 / l_safe[:, None]).to(Out.dtype.element_ty),
                 mask=n_ok[:, None] & (cols1[None, :] < Dv))
    if dv_start == 0:
        tl.store(Lse + split.to(tl.int64) * stride_ls + pid_bh * N + offs_n, lse, mask=n_ok)


@triton.jit
def _attn_merge_kernel(
    Part, PartLse, Out, Lse,
    stride_ps, stride_pb, stride_pn, stride_ph,
    stride_ls,
    stride_ob, stride_on, stride_oh,
    H, N, Dv, num_splits,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # Log-sum-exp merge of split-KV partials.
    # Grid: (cdiv(N, BLOCK_N), B * H, cdiv(Dv, BLOCK_DV)). One program combines
    # num_splits partial outputs of BLOCK_N rows x BLOCK_DV columns:
    # out = sum_s exp(lse_s - lse) * out_s with lse = log sum_s exp(lse_s).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    n_ok = offs_n < N
    mask2 = n_ok[:, None] & (offs_dv[None, :] < Dv)
    lse_base = PartLse + pid_bh * N + offs_n
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    lse_ptrs = lse_base
    for _ in range(0, num_splits):  # pointers advance in 64-bit, no int32 products
        m = tl.maximum(m, tl.load(lse_ptrs, mask=n_ok, other=float("-inf")))
        lse_ptrs += stride_ls
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    p_base = Part + b * stride_pb + h * stride_ph + offs_n.to(tl.int64)[:, None] * stride_pn + offs_dv[None, :]
    lse_ptrs = lse_base
    for _ in range(0, num_splits):
        w = tl.exp(tl.load(lse_ptrs, mask=n_ok, other=float("-inf")) - m_safe)
        part = tl.load(p_base, mask=mask2, other=0.0)
        lse_ptrs += stride_ls
        p_base += stride_ps
        acc += w[:, None] * part
        l += w
    empty_row = l == 0.0
    l_safe = tl.where(empty_row, 1.0, l)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_n.to(tl.int64)[:, None] * stride_on + offs_dv[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=mask2)
    if pid_d == 0:
        tl.store(Lse + pid_bh * N + offs_n, tl.where(empty_row, float("inf"), m_safe + tl.log(l_safe)), mask=n_ok)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_on, stride_oh,
    stride_dob, stride_don, stride_doh,
    H, N, Dv,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # delta = rowsum(dO * O), fp32 (B, H, N).
    # Grid: (cdiv(N, BLOCK_N), B * H). One program sums BLOCK_N rows over Dv in chunks of BLOCK_DV.
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    delta = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, Dv, BLOCK_DV):
        offs_d = d0 + tl.arange(0, BLOCK_DV)
        msk = n_ok[:, None] & (offs_d[None, :] < Dv)
        o = tl.load(Out + b * stride_ob + h * stride_oh + rows * stride_on + offs_d[None, :], mask=msk, other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_don + offs_d[None, :], mask=msk, other=0.0)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * N + offs_n, delta, mask=n_ok)


@triton.jit
def _head_bases(Q, K, V, DO, pid_bh, H, group, stride_qb, stride_qh, stride_kb, stride_kh,
                stride_vb, stride_vh, stride_dob, stride_doh):
    """(b, h) of program axis ``pid_bh`` = b * H + h (int64) and the base pointers of query head h in Q and
    dO and of its key/value head h // group in K and V."""
    b = pid_bh // H
    h = pid_bh % H
    hk = h // group
    return (b, h, Q + b * stride_qb + h * stride_qh, K + b * stride_kb + hk * stride_kh,
            V + b * stride_vb + hk * stride_vh, DO + b * stride_dob + h * stride_doh)


@triton.jit
def _dkdv_head(dk, dv, q_base, do_base, k_base, v_base, k_desc, v_desc, lse_row, delta_row, seed, bh,
               offs_m, m_start, key_ok, col0, do_k, do_v, n_begin,
               N, M, Dqk, Dv, stride_qn, stride_don, stride_km, stride_vm,
               scale_log2, cap_in, cap_log2, dropout_p, key_offset, total_keys,
               DROPOUT: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr, CAUSAL: tl.constexpr,
               SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DT: tl.constexpr):
    """dK/dV accumulators after the query blocks [n_begin, N) of one query head (``bh`` = b * H + h).

    ``lse_row`` / ``delta_row`` point at that head's (N,) rows; Q and dO are read through
    descriptors made here (one head at a time), K and V through the caller's.
    """
    q_desc = _matrix(q_base, N, Dqk, stride_qn, BLOCK_N, BLOCK_D, USE_TMA)
    do_desc = _matrix(do_base, N, Dv, stride_don, BLOCK_N, BLOCK_D, USE_TMA)
    qt_desc = _matrix(q_base, N, Dqk, stride_qn, BLOCK_N, BLOCK_DT, USE_TMA)
    dot_desc = _matrix(do_base, N, Dv, stride_don, BLOCK_N, BLOCK_DT, USE_TMA)
    for n0 in range(n_begin, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        lse = tl.load(lse_row + offs_n, mask=n_ok, other=float("inf"))
        st = _dot_rows(k_base, k_desc, m_start, M, stride_km, q_base, q_desc, n0, N, stride_qn, Dqk,
                       BLOCK_M, BLOCK_N, BLOCK_D, USE_TMA, PRECISION)
        if SOFTCAP:
            tt = tanh_f32(st * cap_in)
            st = tt * cap_log2
        else:
            st = st * scale_log2
        pt = tl.math.exp2(st - (lse * LOG2E_C)[None, :])
        pt = tl.where(key_ok[:, None], pt, 0.0)
        if CAUSAL:
            if n0 + (M - N) < m_start + BLOCK_M - 1:  # a block crossing the diagonal
                pt = tl.where(tl.trans(causal_visible(offs_n, offs_m, M - N)), pt, 0.0)
        if DROPOUT:
            keep_t = tl.trans(dropout_keep(seed, bh, offs_n, offs_m.to(tl.int64) + key_offset, N, total_keys,
                                           dropout_p))
            zt = tl.where(keep_t, 1.0 / (1.0 - dropout_p), 0.0)
        if do_v:
            do_t = _tile(do_base, dot_desc, n0, col0, N, Dv, stride_don, BLOCK_N, BLOCK_DT, USE_TMA)
            pz = pt
            if DROPOUT:
                pz = pt * zt
            dv = tl.dot(pz.to(do_t.dtype), do_t, dv, input_precision=PRECISION)
        if do_k:
            dpt = _dot_rows(v_base, v_desc, m_start, M, stride_vm, do_base, do_desc, n0, N, stride_don, Dv,
                            BLOCK_M, BLOCK_N, BLOCK_D, USE_TMA, PRECISION)
            if DROPOUT:
                dpt = dpt * zt
            delta = tl.load(delta_row + offs_n, mask=n_ok, other=0.0)
            dst = pt * (dpt - delta[None, :])
            if SOFTCAP:  # through the cap: d tanh = 1 - tanh^2
                dst = dst * (1.0 - tt * tt)
            q_t = _tile(q_base, qt_desc, n0, col0, N, Dqk, stride_qn, BLOCK_N, BLOCK_DT, USE_TMA)
            dk = tl.dot(dst.to(q_t.dtype), q_t, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=bwd_configs(),
                 key=["N_BUCKET", "M_BUCKET", "DQK_BUCKET", "DV_BUCKET", "USE_TMA", "CAUSAL", "SOFTCAP", "GQA"],
                 prune_configs_by={"early_config_prune": prune_bwd_configs})
@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV, seed,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_maskb,
    stride_dob, stride_don, stride_doh,
    stride_dkb, stride_dkm, stride_dkh,
    stride_dvb, stride_dvm, stride_dvh,
    H, N, M, Dqk, Dv, group, scale, scale_log2, cap_in, cap_log2, dropout_p,
    N_BUCKET, M_BUCKET, DQK_BUCKET, DV_BUCKET,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, GQA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    key_offset=0, total_keys=0,
):
    # FlashAttention-2 backward for dK and dV, keys as the rows of every dot.
    # Grid: (cdiv(M, BLOCK_M), B * Hkv, max(cdiv(Dqk, BLOCK_DT), cdiv(Dv, BLOCK_DT))).
    # One program owns BLOCK_M keys of one (batch, key/value head) and column
    # tile t (BLOCK_DT wide) of dK and of dV (a tile past a dim's end is
    # skipped). For each query head of the head's group (GQA: the `group`
    # heads hk * group + g, in this program, into the same registers: no
    # atomics, no repeated K/V) it streams query blocks of BLOCK_N,
    # recomputing S^T = K Q^T and dP^T = V dO^T (head dims in BLOCK_D chunks),
    # and accumulates in fp32
    #   dV[:, t] += (P * Z)^T dO[:, t],  dK[:, t] += scale * dS^T Q[:, t],
    # with dS = P * (dP * Z - delta) (times 1 - tanh^2 under SOFTCAP) and Z the
    # dropout mask scaled by 1/(1-p). CAUSAL: the query loop starts at the
    # first block that sees the key block (n >= m - (M - N)); only blocks
    # crossing the diagonal apply the element mask. key_offset / total_keys:
    # the dropout offsets' global key range, as in the forward.
    pid_kv = tl.program_id(1).to(tl.int64)
    t = tl.program_id(2)
    Hkv = H // group
    b = pid_kv // Hkv
    hk = pid_kv % Hkv
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_start = tl.program_id(0) * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    col0 = t * BLOCK_DT
    key_ok = _key_valid(Mask + b * stride_maskb, offs_m, M, HAS_MASK)
    do_k = col0 < Dqk
    do_v = col0 < Dv
    n_begin = 0
    if CAUSAL:
        n_begin = (tl.maximum(m_start - (M - N), 0) // BLOCK_N) * BLOCK_N

    k_desc = _matrix(k_base, M, Dqk, stride_km, BLOCK_M, BLOCK_D, USE_TMA)
    v_desc = _matrix(v_base, M, Dv, stride_vm, BLOCK_M, BLOCK_D, USE_TMA)
    dk = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    if GQA:
        for g in range(0, group):
            h = hk * group + g
            bh = b * H + h
            dk, dv = _dkdv_head(dk, dv, Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                                k_base, v_base, k_desc, v_desc, Lse + bh * N, Delta + bh * N, seed, bh,
                                offs_m, m_start, key_ok, col0, do_k, do_v, n_begin,
                                N, M, Dqk, Dv, stride_qn, stride_don, stride_km, stride_vm,
                                scale_log2, cap_in, cap_log2, dropout_p, key_offset, total_keys,
                                DROPOUT, PRECISION, USE_TMA, CAUSAL, SOFTCAP, BLOCK_N, BLOCK_M, BLOCK_D, BLOCK_DT)
    else:
        bh = b * H + hk
        dk, dv = _dkdv_head(dk, dv, Q + b * stride_qb + hk * stride_qh, DO + b * stride_dob + hk * stride_doh,
                            k_base, v_base, k_desc, v_desc, Lse + bh * N, Delta + bh * N, seed, bh,
                            offs_m, m_start, key_ok, col0, do_k, do_v, n_begin,
                            N, M, Dqk, Dv, stride_qn, stride_don, stride_km, stride_vm,
                            scale_log2, cap_in, cap_log2, dropout_p, key_offset, total_keys,
                            DROPOUT, PRECISION, USE_TMA, CAUSAL, SOFTCAP, BLOCK_N, BLOCK_M, BLOCK_D, BLOCK_DT)
    m_rows = offs_m.to(tl.int64)[:, None]
    m_ok = offs_m[:, None] < M
    cols = col0 + tl.arange(0, BLOCK_DT)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + m_rows * stride_dkm + cols[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=m_ok & (cols[None, :] < Dqk))
    tl.store(DV + b * stride_dvb + hk * stride_dvh + m_rows * stride_dvm + cols[None, :],
             dv.to(DV.dtype.element_ty), mask=m_ok & (cols[None, :] < Dv))


@triton.autotune(configs=bwd_configs(),
                 key=["N_BUCKET", "M_BUCKET", "DQK_BUCKET", "DV_BUCKET", "USE_TMA", "CAUSAL", "SOFTCAP"],
                 prune_configs_by={"early_config_prune": prune_bwd_configs})
@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DQ, seed,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_maskb,
    stride_dob, stride_don, stride_doh,
    stride_dqs, stride_dqb, stride_dqn, stride_dqh,
    H, N, M, Dqk, Dv, group, keys_per_split, scale, scale_log2, cap_in, cap_log2, dropout_p,
    N_BUCKET, M_BUCKET, DQK_BUCKET, DV_BUCKET,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    key_offset=0, total_keys=0,
):
    # FlashAttention-2 backward for dQ, split over keys.
    # Grid: (cdiv(N, BLOCK_N), B * H, num_splits * cdiv(Dqk, BLOCK_DT)).
    # One program owns BLOCK_N queries of one (batch, head), column tile t
    # (BLOCK_DT wide) of dQ and the keys of one split; it streams key blocks
    # of the head's key/value head (h // group) recomputing S and dP as the
    # dK/dV kernel does (queries as rows here) and writes scale * sum dS K[:, t]
    # in fp32 to its split's slice of DQ, which the launcher sums over splits
    # (and over the batch for a shared q). SOFTCAP and CAUSAL as in the
    # forward: the key loop ends at the tile's last visible key (a split past
    # it writes zeros), only diagonal blocks apply the element mask.
    # key_offset / total_keys: the dropout offsets' global key range.
    pid_bh = tl.program_id(1).to(tl.int64)
    n_dt = tl.cdiv(Dqk, BLOCK_DT)
    split = tl.program_id(2) // n_dt
    col0 = (tl.program_id(2) % n_dt) * BLOCK_DT
    b, h, q_base, k_base, v_base, do_base = _head_bases(Q, K, V, DO, pid_bh, H, group, stride_qb, stride_qh,
                                                        stride_kb, stride_kh, stride_vb, stride_vh, stride_dob,
                                                        stride_doh)
    n_start = tl.program_id(0) * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask_base = Mask + b * stride_maskb
    lse_log2 = tl.load(Lse + pid_bh * N + offs_n, mask=n_ok, other=float("inf")) * LOG2E_C
    delta = tl.load(Delta + pid_bh * N + offs_n, mask=n_ok, other=0.0)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, M)
    if CAUSAL:
        end = tl.minimum(end, tl.minimum(n_start + BLOCK_N, N) + (M - N))
        diag_lo = n_start + (M - N) + 1

    q_desc = _matrix(q_base, N, Dqk, stride_qn, BLOCK_N, BLOCK_D, USE_TMA)
    k_desc = _matrix(k_base, M, Dqk, stride_km, BLOCK_M, BLOCK_D, USE_TMA)
    v_desc = _matrix(v_base, M, Dv, stride_vm, BLOCK_M, BLOCK_D, USE_TMA)
    do_desc = _matrix(do_base, N, Dv, stride_don, BLOCK_N, BLOCK_D, USE_TMA)
    kt_desc = _matrix(k_base, M, Dqk, stride_km, BLOCK_M, BLOCK_DT, USE_TMA)

    dq = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        key_ok = _key_valid(mask_base, offs_m, end, HAS_MASK)
        s = _dot_rows(q_base, q_desc, n_start, N, stride_qn, k_base, k_desc, m0, M, stride_km, Dqk,
                      BLOCK_N, BLOCK_M, BLOCK_D, USE_TMA, PRECISION)
        if SOFTCAP:
            tc = tanh_f32(s * cap_in)
            s = tc * cap_log2
        else:
            s = s * scale_log2
        p = tl.math.exp2(s - lse_log2[:, None])
        p = tl.where(key_ok[None, :], p, 0.0)
        if CAUSAL:
            if m0 + BLOCK_M > diag_lo:  # a block crossing the diagonal
                p = tl.where(causal_visible(offs_n, offs_m, M - N), p, 0.0)
        dp = _dot_rows(do_base, do_desc, n_start, N, stride_don, v_base, v_desc, m0, M, stride_vm, Dv,
                       BLOCK_N, BLOCK_M, BLOCK_D, USE_TMA, PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, pid_bh, offs_n, offs_m.to(tl.int64) + key_offset, N, total_keys, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tc * tc)
        k_t = _tile(k_base, kt_desc, m0, col0, M, Dqk, stride_km, BLOCK_M, BLOCK_DT, USE_TMA)
        dq = tl.dot(ds.to(k_t.dtype), k_t, dq, input_precision=PRECISION)
    cols = col0 + tl.arange(0, BLOCK_DT)
    tl.store(DQ + split.to(tl.int64) * stride_dqs + b * stride_dqb + h * stride_dqh
             + offs_n.to(tl.int64)[:, None] * stride_dqn + cols[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=n_ok[:, None] & (cols[None, :] < Dqk))


# ---------------------------------------------------------------------------
# Launch planning
# ---------------------------------------------------------------------------
def tf32_allowed() -> bool:
    """Whether fp32 matmuls may use TF32, per torch's cuBLAS matmul setting.

    torch >= 2.9 reports it as ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" | "ieee" | "none"),
    which also reflects the legacy ``allow_tf32`` and ``torch.set_float32_matmul_precision``; reading
    ``allow_tf32`` after a user set the new API raises, so it is only the fallback for older torch.
    """
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec is None:
        return bool(matmul.allow_tf32)
    return prec == "tf32"


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not interpreter_enabled() and tf32_allowed():
        return "tf32"
    return "ieee"


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_NOMINAL_SMS


def num_splits_heuristic(tiles: int, num_sms: int, key_blocks: int, max_splits: int = 128) -> int:
    """FlashAttention's split-KV count: the fewest splits within 85% of the best wave efficiency.

    ``tiles`` is the number of programs without splitting (query tiles x batch x
    heads x value tiles), ``key_blocks`` the key blocks a program would walk.
    No split once the tiles alone fill 80% of the SMs.
    """
    if tiles >= 0.8 * num_sms:
        return 1
    max_splits = min(max_splits, num_sms, key_blocks)

    def eligible(s: int) -> bool:  # a split count that changes the blocks per split
        return s == 1 or math.ceil(key_blocks / s) != math.ceil(key_blocks / (s - 1))

    efficiency = []
    for s in range(1, max_splits + 1):
        waves = tiles * s / num_sms
        efficiency.append(waves / math.ceil(waves) if eligible(s) else 0.0)
    best = max(efficiency, default=1.0)
    for s in range(1, max_splits + 1):
        if eligible(s) and efficiency[s - 1] >= 0.85 * best:
            return s
    return 1


# Keys per split are a multiple of this (the widest BLOCK_M), so splits never cut a key block.
SPLIT_GRANULE = 128


def split_keys(M: int, num_splits: int) -> Tuple[int, int]:
    """(keys_per_split, effective number of splits) for ``num_splits`` requested over M keys."""
    granules = triton.cdiv(M, SPLIT_GRANULE)
    per = triton.cdiv(granules, max(1, min(num_splits, granules))) * SPLIT_GRANULE
    return per, triton.cdiv(M, per)


def _tma_aligned(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and 16-byte multiples for every stride but the last."""
    e = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * e) % 16 == 0 for s in t.stride()[:-1])


def aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into a buffer whose last dim is padded to 16 bytes (a view of the first D columns)."""
    d = t.shape[-1]
    per = 16 // t.element_size()
    buf = torch.empty((*t.shape[:-1], triton.cdiv(d, per) * per), device=t.device, dtype=t.dtype)
    view = buf[..., :d]
    view.copy_(t)
    return view


def plan_alignment(tensors, *, repack: Optional[bool] = None):
    """Decide the load path: (tensors, use_tma).

    TMA when all tensors are 16-byte aligned. Otherwise, with ``repack`` (default:
    on CUDA), the unaligned ones are copied into padded buffers: one read and one
    write of each, which pays whenever the kernel reads a tile more than once, as
    every program that is not alone on its key range does (an unaligned row
    gets neither TMA nor cp.async: scalar 2-byte loads). Without repack the
    masked pointer path runs.
    """
    tensors = list(tensors)
    if all(_tma_aligned(t) for t in tensors):
        return tensors, True
    if repack is None:
        repack = tensors[0].is_cuda
    if not repack:
        return tensors, False
    copies = {}  # k is v under projection folding: copy the shared tensor once
    out = []
    for t in tensors:
        if _tma_aligned(t):
            out.append(t)
            continue
        key = (t.data_ptr(), tuple(t.shape), t.stride())
        if key not in copies:
            copies[key] = aligned_copy(t)
        out.append(copies[key])
    return out, True


_allocator_set = False


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a scratch allocator (triton >= 3.4)."""
    global _allocator_set
    if _allocator_set or interpreter_enabled():
        return
    set_allocator = getattr(triton, "set_allocator", None)
    if set_allocator is not None:
        set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    _allocator_set = True


def check_grid(B: int, H: int) -> None:
    if B * H > 65535:  # B * H is grid axis 1, limited to 65535 on CUDA
        raise ValueError(f"attention kernels support batch * heads <= 65535, got B={B}, H={H}")


def softcap_args(scale: float, softcap: float) -> Tuple[float, float]:
    """(cap_in, cap_log2) of the kernels: capped log2 score = cap_log2 * tanh(cap_in * q.k); (0, 0) without a cap."""
    if softcap > 0.0:
        return scale / softcap, softcap * LOG2E
    return 0.0, 0.0


def _mask_args(mask: Optional[torch.Tensor], q: torch.Tensor):
    if mask is None:
        return q, 0, False  # dummy pointer, never read
    if mask.shape[1] > 1 and mask.stride(1) != 1:
        mask = mask.contiguous()  # (B, M) bools: a cheap copy, unlike q/k/v
    return mask.view(torch.uint8), mask.stride(0), True


def forward_plan(N: int, M: int, Dqk: int, Dv: int, dtype: torch.dtype, B: int, H: int,
                 num_splits: int, device: torch.device) -> dict:
    """Head-dim chunks, value tiles and split count of one forward call (no tensors needed)."""
    budget = dim_budget(dtype)
    qk, v = plan_dim(Dqk, budget), plan_dim(Dv, budget)
    block_n = INTERPRET_BLOCK if interpreter_enabled() else BLOCK_Q
    dv_tiles = triton.cdiv(Dv, v.width)
    if num_splits <= 0:
        tiles = triton.cdiv(N, block_n) * B * H * dv_tiles
        num_splits = num_splits_heuristic(tiles, sm_count(device), triton.cdiv(M, SPLIT_GRANULE))
    keys_per_split, num_splits = split_keys(M, num_splits)
    return dict(qk=qk, v=v, block_n=block_n, dv_tiles=dv_tiles, num_splits=num_splits,
                keys_per_split=keys_per_split)


# ---------------------------------------------------------------------------
# Launchers (inputs validated by perceiver_fast.ops.attention)
# ---------------------------------------------------------------------------
def attention_fwd_triton(q, k, v, mask, seed, dropout_p: float, scale: float, num_splits: int,
                         *, causal: bool = False, softcap: float = 0.0,
                         repack: Optional[bool] = None, key_offset: int = 0,
                         total_keys: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward on the Triton kernels: (out (B, N, H, Dv) in q's dtype, lse fp32 (B, H, N)).

    k, v may have Hkv heads dividing H (grouped-query heads); ``causal`` is bottom-right aligned;
    ``softcap`` > 0 caps the scaled scores (see :func:`perceiver_fast.ops.attention.cross_attention`).
    ``key_offset`` / ``total_keys`` (0 = M): the keys' global range, for the dropout offsets only.
    """
    Bq, N, H, Dqk = q.shape
    B, M, Hkv, Dv = v.shape
    group = H // max(Hkv, 1)
    out = empty((B, N, H, Dv), device=q.device, dtype=q.dtype)
    lse = empty((B, H, N), device=q.device, dtype=torch.float32)
    if N == 0 or B * H == 0:
        return out, lse
    if M == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    check_grid(B, H)
    plan = forward_plan(N, M, Dqk, Dv, q.dtype, B, H, num_splits, q.device)
    (q, k, v), use_tma = plan_alignment((q, k, v), repack=repack)
    if use_tma:
        _ensure_tma_allocator()
    mask_t, stride_maskb, has_mask = _mask_args(mask, q)
    splits = plan["num_splits"]
    split = splits > 1
    # The kernel stores rows of 16-element multiples: unaligned output rows would cost
    # per-element addresses and, at 322 columns, register spills (sm90 report).
    dv_pad = triton.cdiv(Dv, 16) * 16
    if split:
        target = empty((splits, B, N, H, dv_pad), device=q.device, dtype=torch.float32)[..., :Dv]
        target_lse = empty((splits, B, H, N), device=q.device, dtype=torch.float32)
        so, sl = target.stride(), target_lse.stride(0)
    else:
        target = out if dv_pad == Dv else empty((B, N, H, dv_pad), device=q.device, dtype=q.dtype)[..., :Dv]
        target_lse = lse
        so, sl = (0,) + target.stride(), 0
    qk, vp, block_n = plan["qk"], plan["v"], plan["block_n"]
    grid = (triton.cdiv(N, block_n), B * H, splits * plan["dv_tiles"])
    attn_fwd_kernel[grid](
        q, k, v, mask_t, target, target_lse, seed_to_int(seed),
        q.stride(0) if Bq > 1 else 0, q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_maskb,
        so[0], so[1], so[2], so[3],
        sl,
        H, N, M, Dqk, Dv, group, plan["keys_per_split"], scale * LOG2E, *softcap_args(scale, softcap), dropout_p,
        bucket(N), bucket(M),
        HAS_MASK=has_mask, DROPOUT=dropout_p > 0.0, SPLIT=split, PRECISION=_precision(q.dtype),
        USE_TMA=use_tma, QK_RESIDENT=qk.resident, CAUSAL=bool(causal), SOFTCAP=softcap > 0.0,
        DQK0=qk.main, DQK1=qk.tail, DV0=vp.main, DV1=vp.tail, BLOCK_N=block_n,
        key_offset=key_offset, total_keys=total_keys or M,  # the global key range of the dropout draws
    )
    if split:
        block_dv = min(64, bucket(Dv))
        mgrid = (triton.cdiv(N, block_n), B * H, triton.cdiv(Dv, block_dv))
        _attn_merge_kernel[mgrid](
            target, target_lse, out, lse,
            so[0], so[1], so[2], so[3],
            sl,
            out.stride(0), out.stride(1), out.stride(2),
            H, N, Dv, splits,
            BLOCK_N=block_n, BLOCK_DV=block_dv,
        )
    elif target is not out:
        out.copy_(target)
    return out, lse


def attention_bwd_triton(do, q, k, v, out, lse, mask, seed, dropout_p: float, scale: float,
                         *, causal: bool = False, softcap: float = 0.0, repack: Optional[bool] = None,
                         num_splits: int = 0, key_offset: int = 0, total_keys: int = 0):
    """Backward on the Triton kernels: (dq, dk, dv) with the shapes and dtypes of q, k, v.

    Grouped-query heads: one dK/dV program per key/value head sums its group's query heads.
    ``key_offset`` / ``total_keys`` as given to :func:`attention_fwd_triton` (the same dropout mask).
    """
    Bq, N, H, Dqk = q.shape
    B, M, Hkv, Dv = v.shape
    group = H // max(Hkv, 1)
    lse = lse.contiguous()  # the kernels index it as (B * H, N) rows: a strided lse would read the wrong rows
    if out.stride(-1) != 1:
        out = out.contiguous()  # the preprocess kernel reads rows with a unit last stride
    dk = empty(k.shape, device=k.device, dtype=k.dtype)
    dv = empty(v.shape, device=v.device, dtype=v.dtype)
    if N == 0 or M == 0 or B * H == 0:
        return torch.zeros(q.shape, device=q.device, dtype=q.dtype), dk.zero_(), dv.zero_()
    check_grid(B, H)
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = empty((B, H, N), device=q.device, dtype=torch.float32)
    block_n = INTERPRET_BLOCK if interpreter_enabled() else BLOCK_Q
    _attn_bwd_preprocess_kernel[(triton.cdiv(N, block_n), B * H)](
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        H, N, Dv, BLOCK_N=block_n, BLOCK_DV=min(64, bucket(Dv)),
    )
    (q, k, v, do), use_tma = plan_alignment((q, k, v, do), repack=repack)
    if use_tma:
        _ensure_tma_allocator()
    mask_t, stride_maskb, has_mask = _mask_args(mask, q)
    consts = dict(HAS_MASK=has_mask, DROPOUT=dropout_p > 0.0, PRECISION=_precision(q.dtype), USE_TMA=use_tma,
                  CAUSAL=bool(causal), SOFTCAP=softcap > 0.0)
    cap = softcap_args(scale, softcap)
    keys = (bucket(N), bucket(M), bucket(Dqk), bucket(Dv))
    seed_v = seed_to_int(seed)
    dropout_keys = dict(key_offset=key_offset, total_keys=total_keys or M)  # the global key range of the draws
    common = (
        q.stride(0) if Bq > 1 else 0, q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_maskb,
        do.stride(0), do.stride(1), do.stride(2),
    )
    grid_kv = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), B * Hkv,
                            max(triton.cdiv(Dqk, meta["BLOCK_DT"]), triton.cdiv(Dv, meta["BLOCK_DT"])))
    attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, mask_t, do, lse, delta, dk, dv, seed_v,
        *common,
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        H, N, M, Dqk, Dv, group, scale, scale * LOG2E, *cap, dropout_p,
        *keys, **consts, GQA=group > 1, **dropout_keys,
    )
    if num_splits <= 0:
        tiles = triton.cdiv(N, block_n) * B * H * triton.cdiv(Dqk, 128)
        num_splits = num_splits_heuristic(tiles, sm_count(q.device), triton.cdiv(M, SPLIT_GRANULE))
    keys_per_split, splits = split_keys(M, num_splits)
    shared = Bq == 1 and B > 1
    if splits > 1 or shared:
        dq_buf = empty((splits, B, N, H, Dqk), device=q.device, dtype=torch.float32)
        sdq = dq_buf.stride()
    else:
        dq_buf = empty(q.shape, device=q.device, dtype=q.dtype)
        sdq = (0,) + dq_buf.stride()
    grid_q = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H, splits * triton.cdiv(Dqk, meta["BLOCK_DT"]))
    attn_bwd_dq_kernel[grid_q](
        q, k, v, mask_t, do, lse, delta, dq_buf, seed_v,
        *common,
        sdq[0], sdq[1], sdq[2], sdq[3],
        H, N, M, Dqk, Dv, group, keys_per_split, scale, scale * LOG2E, *cap, dropout_p,
        *keys, **consts, **dropout_keys,
    )
    if dq_buf.dim() == 5:
        dq = dq_buf.sum(0)
        dq = (dq.sum(0, keepdim=True) if shared else dq).to(q.dtype)
    else:
        dq = dq_buf
    return dq, dk, dv
