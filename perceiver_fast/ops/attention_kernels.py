"""Triton kernels for :mod:`perceiver_fast.ops.attention` and their launchers.

Layout: every tensor is (batch, seq, heads, head_dim) with a unit last stride
and arbitrary other strides (views of packed projections are used in place).
The saved log-sum-exp ``lse`` is fp32 (B, H, N), in natural-log units, and is
``+inf`` for a query with no attended key, so that ``exp(s - lse)`` is 0 there
and the backward yields zeros instead of NaN.

One kernel family serves cross- and self-attention (self-attention is the case
N == M, Bq == B, no mask). The pieces they share:

* ``_qk_tile``: a (BLOCK_N, BLOCK_M) score tile, summed over head-dim chunks of
  BLOCK_D with masked loads, so odd head dims (1, 3, 261, 322, ...) need no
  padding to a power of two;
* ``_dropout_keep``: the dropout mask of a score tile, from Philox on the
  int64 element offset ((b * H + h) * N + n) * M + m, so that the backward
  regenerates exactly the forward's mask;
* ``_fwd_inner``: the online-softmax loop over a range of key blocks;
* ``_probs`` and ``_dp_tile``: the recomputation of P and dP in the backward.

A batch-shared query (Bq == 1) is addressed with a batch stride of 0.
All pointer offsets are int64.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from perceiver_fast.ops import attention as _api

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634

# SM count assumed when there is no CUDA device (interpreter runs).
_CPU_NOMINAL_SMS = 8


# ---------------------------------------------------------------------------
# Autotuning. On the GPU a few configs per kernel, keyed on head-dim buckets
# (triton caches the winner per key); under the interpreter one small config,
# so nothing is benchmarked.
# ---------------------------------------------------------------------------
def _fwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 64, "BLOCK_DV": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DV": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DV": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DV": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_D": 32, "BLOCK_DV": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 32, "BLOCK_D": 64, "BLOCK_DV": 128}, num_warps=8, num_stages=2),
        # Wide value tiles (perf-notes A1): one program covers half or all of a
        # Dv up to 512, so the score tile is computed once per 256/512 value
        # columns instead of once per 64/128. 8 warps keep the fp32 accumulator
        # (64 x 512 / 256 threads = 128 registers per thread) without spills on
        # sm_90; tests/test_attention_compile.py checks shared memory and spills.
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DV": 256}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_D": 64, "BLOCK_DV": 512}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_D": 32, "BLOCK_DV": 512}, num_warps=8, num_stages=2),
    ]


# Value tiles up to this width are tried for every Dv; wider ones only where
# the Dv bucket (next power of two of Dv) is at least as wide.
_NARROW_DV = 128


def _prune_fwd_configs(configs, named_args, **kwargs):
    """``early_config_prune`` of the forward: drop wide value tiles wider than the Dv bucket.

    A BLOCK_DV of 256 or 512 only pays when Dv needs it (D256 keras, D261, D322, D512);
    for D64/D128 it would be all masked columns and autotune time. The configs of
    BLOCK_DV <= 128 are always kept. Signature as triton's autotuner calls it:
    (configs, named_args, **kwargs), with the kernel's positional args in named_args.
    """
    dv_bucket = named_args.get("DV_BUCKET", kwargs.get("DV_BUCKET"))
    if dv_bucket is None:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_DV"] <= max(_NARROW_DV, int(dv_bucket))]
    return kept or configs


def _bwd_configs():
    # BLOCK_DT is the width of the column tile of dK/dV (dK/dV kernel) or dQ (dQ kernel)
    # that one program owns; BLOCK_D is the chunk width of the score and dP reductions
    # (_qk_tile). The narrow configs use the same width for both, as before.
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 64, "BLOCK_DT": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DT": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DT": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_D": 128, "BLOCK_DT": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_D": 64, "BLOCK_DT": 64}, num_warps=4, num_stages=3),
        # Wide column tiles (perf-notes B1): each program recomputes the whole score
        # tile S (over all of Dqk) and dP (over all of Dv), so fewer, wider column
        # tiles cut that repeated work; the reductions stay in 32/64-wide chunks (BLOCK_D).
        # tests/test_attention_compile.py checks shared memory and spills on sm_90:
        # these four are spill-free in both kernels for aligned (D512) and unaligned
        # (D261/D322) head dims; wider BLOCK_N/BLOCK_M at 256+ columns spill when unaligned.
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 32, "BLOCK_DT": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_D": 32, "BLOCK_DT": 256}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_D": 64, "BLOCK_DT": 256}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 16, "BLOCK_M": 32, "BLOCK_D": 32, "BLOCK_DT": 512}, num_warps=8, num_stages=2),
    ]


def _prune_bwd_configs(configs, named_args, dims=("DQK_BUCKET", "DV_BUCKET"), **kwargs):
    """``early_config_prune`` of the backward kernels: drop column tiles wider than the head dims need.

    A BLOCK_DT above 128 is kept only where the bucket of the widest tiled head
    dim is at least that wide: ``dims`` names the buckets, both for the dK/dV
    kernel (one tile width over dK and dV), only DQK_BUCKET for the dQ kernel.
    For D64/D128 such a tile would be all masked columns and autotune time.
    Configs of BLOCK_DT <= 128 are always kept.
    """
    buckets = [named_args.get(n, kwargs.get(n)) for n in dims]
    buckets = [int(b) for b in buckets if b is not None]
    if not buckets:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_DT"] <= max(_NARROW_DV, max(buckets))]
    return kept or configs


def _bucket(d: int) -> int:
    """Head-dim bucket used as an autotune key: next power of two, >= 16."""
    return max(16, triton.next_power_of_2(int(d)))


# ---------------------------------------------------------------------------
# Shared @triton.jit helpers
# ---------------------------------------------------------------------------
@triton.jit
def _qk_tile(q_base, k_base, offs_n, offs_m, stride_qn, stride_km, N, M, Dqk,
             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
             PRECISION: tl.constexpr):
    """Raw scores q[offs_n] . k[offs_m] (no scale), fp32 (BLOCK_N, BLOCK_M).

    The head dim is summed in chunks of BLOCK_D; out-of-range rows, keys and
    channels load as 0.
    """
    s = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    row_q = offs_n.to(tl.int64)[:, None] * stride_qn
    row_k = offs_m.to(tl.int64)[None, :] * stride_km
    n_ok = offs_n[:, None] < N
    m_ok = offs_m[None, :] < M
    for d0 in range(0, Dqk, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < Dqk
        q = tl.load(q_base + row_q + offs_d[None, :], mask=n_ok & d_ok[None, :], other=0.0)
        kt = tl.load(k_base + row_k + offs_d[:, None], mask=m_ok & d_ok[:, None], other=0.0)
        s += tl.dot(q, kt, input_precision=PRECISION)
    return s


@triton.jit
def _dp_tile(do_base, v_base, offs_n, offs_m, stride_don, stride_vm, N, M, Dv,
             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
             PRECISION: tl.constexpr):
    """dP = dO[offs_n] . v[offs_m] summed over Dv chunks (before dropout)."""
    return _qk_tile(do_base, v_base, offs_n, offs_m, stride_don, stride_vm, N, M, Dv,
                    BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)


@triton.jit
def _key_valid(mask_base, offs_m, M, HAS_MASK: tl.constexpr):
    """(BLOCK_M,) bool: key in range and (if a mask is given) attended."""
    ok = offs_m < M
    if HAS_MASK:
        keep = tl.load(mask_base + offs_m.to(tl.int64), mask=ok, other=0)
        ok = ok & (keep != 0)
    return ok


@triton.jit
def _dropout_keep(seed, bh, offs_n, offs_m, N, M, dropout_p):
    """(BLOCK_N, BLOCK_M) bool keep-mask of dropout for batch*head ``bh``."""
    offs = (bh * N + offs_n.to(tl.int64)[:, None]) * M + offs_m.to(tl.int64)[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _probs(s, lse_log2, key_ok, scale_log2):
    """P = exp(s * scale - lse) with invalid keys at 0 (lse given in log2 units)."""
    p = tl.math.exp2(s * scale_log2 - lse_log2[:, None])
    return tl.where(key_ok[None, :], p, 0.0)


@triton.jit
def _fwd_inner(acc, m_i, l_i, q_base, k_base, v_base, mask_base, seed, bh,
               offs_n, offs_dv, start, end,
               stride_qn, stride_km, stride_vm, N, M, Dqk, Dv, scale_log2, dropout_p,
               HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               PRECISION: tl.constexpr):
    """Online softmax over keys [start, end) in blocks of BLOCK_M.

    m_i is the running row max of the scaled scores (log2 units), l_i the
    running (undropped) denominator, acc the running numerator for the Dv
    columns ``offs_dv``. Dropout scales only the numerator.
    """
    dv_ok = offs_dv[None, :] < Dv
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        s = _qk_tile(q_base, k_base, offs_n, offs_m, stride_qn, stride_km, N, M, Dqk,
                     BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
        ok = _key_valid(mask_base, offs_m, end, HAS_MASK)
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_n, offs_m, N, M, dropout_p)
            p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        v = tl.load(v_base + offs_m.to(tl.int64)[:, None] * stride_vm + offs_dv[None, :],
                    mask=(offs_m[:, None] < end) & dv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
@triton.autotune(configs=_fwd_configs(), key=["DQK_BUCKET", "DV_BUCKET", "SPLIT"],
                 prune_configs_by={"early_config_prune": _prune_fwd_configs})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Mask, Out, Lse, seed,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_maskb,
    stride_os, stride_ob, stride_on, stride_oh,
    stride_ls,
    H, N, M, Dqk, Dv, num_splits, scale_log2, dropout_p,
    DQK_BUCKET, DV_BUCKET,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # FlashAttention-2 forward with split-KV (flash-decoding).
    # Grid: (cdiv(N, BLOCK_N), B * H, num_splits * cdiv(Dv, BLOCK_DV)).
    # One program computes, for one (batch, head), BLOCK_N queries and one
    # BLOCK_DV-wide tile of the value dim, over the keys of one split: an
    # online softmax over key blocks of BLOCK_M (scores summed over head-dim
    # chunks of BLOCK_D). Without SPLIT it writes the normalised output (input
    # dtype) and the lse (+inf for rows with no key). With SPLIT it writes an
    # fp32 partial output normalised by its own denominator and its raw lse
    # (-inf when empty) for _attn_merge_kernel to combine.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2)
    n_dv_tiles = tl.cdiv(Dv, BLOCK_DV)
    split = pid_z // n_dv_tiles
    dv_tile = pid_z % n_dv_tiles
    b = pid_bh // H
    h = pid_bh % H

    blocks_per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), num_splits)
    start = split * blocks_per_split * BLOCK_M
    end = tl.minimum(start + blocks_per_split * BLOCK_M, M)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = dv_tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_maskb

    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q_base, k_base, v_base, mask_base, seed, pid_bh,
                               offs_n, offs_dv, start, end,
                               stride_qn, stride_km, stride_vm, N, M, Dqk, Dv, scale_log2, dropout_p,
                               HAS_MASK, DROPOUT, BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634
    if SPLIT:
        lse = tl.where(empty, float("-inf"), lse)
    else:
        lse = tl.where(empty, float("inf"), lse)
    n_ok = offs_n < N
    o_ptrs = (Out + split.to(tl.int64) * stride_os + b * stride_ob + h * stride_oh
              + offs_n.to(tl.int64)[:, None] * stride_on + offs_dv[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < Dv))
    if dv_tile == 0:
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
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_n.to(tl.int64)[:, None] * stride_on + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask2)
    lse = tl.where(empty, float("inf"), m_safe + tl.log(l_safe))
    if pid_d == 0:
        tl.store(Lse + pid_bh * N + offs_n, lse, mask=n_ok)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
@triton.jit
def _head_bases(Q, K, V, DO, pid_bh, H, stride_qb, stride_qh, stride_kb, stride_kh,
                stride_vb, stride_vh, stride_dob, stride_doh):
    """(b, h) of program axis ``pid_bh`` (int64) and the base pointers of that head."""
    b = pid_bh // H
    h = pid_bh % H
    return (b, h, Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh,
            V + b * stride_vb + h * stride_vh, DO + b * stride_dob + h * stride_doh)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_on, stride_oh,
    stride_dob, stride_don, stride_doh,
    H, N, Dv,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # delta = rowsum(dO * O), fp32 (B, H, N).
    # Grid: (cdiv(N, BLOCK_N), B * H). One program sums BLOCK_N rows over Dv
    # in chunks of BLOCK_DV.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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


@triton.autotune(configs=_bwd_configs(), key=["DQK_BUCKET", "DV_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_bwd_configs})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV, seed,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_maskb,
    stride_dob, stride_don, stride_doh,
    stride_dkb, stride_dkm, stride_dkh,
    stride_dvb, stride_dvm, stride_dvh,
    H, N, M, Dqk, Dv, scale, scale_log2, dropout_p,
    DQK_BUCKET, DV_BUCKET,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    # FlashAttention-2 backward for dK and dV.
    # Grid: (cdiv(M, BLOCK_M), B * H, max(cdiv(Dqk, BLOCK_DT), cdiv(Dv, BLOCK_DT))).
    # One program owns BLOCK_M keys of one (batch, head) and column tile t
    # (BLOCK_DT wide) of dK and of dV (a tile past a dim's end is skipped). It
    # loops over query blocks, recomputing P = exp(s * scale - lse) and
    # dP = dO v^T over all head-dim chunks (BLOCK_D wide), and accumulates in fp32
    #   dV[:, t] += (P * Z)^T dO[:, t],  dK[:, t] += scale * dS^T Q[:, t],
    # with dS = P * (dP * Z - delta) and Z the dropout mask scaled by 1/(1-p).
    pid_bh = tl.program_id(1).to(tl.int64)
    t = tl.program_id(2)
    b, h, q_base, k_base, v_base, do_base = _head_bases(
        Q, K, V, DO, pid_bh, H, stride_qb, stride_qh, stride_kb, stride_kh,
        stride_vb, stride_vh, stride_dob, stride_doh)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = t * BLOCK_DT + tl.arange(0, BLOCK_DT)
    key_ok = _key_valid(Mask + b * stride_maskb, offs_m, M, HAS_MASK)
    do_k = t * BLOCK_DT < Dqk
    do_v = t * BLOCK_DT < Dv

    dk = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = offs_n.to(tl.int64)[:, None]
        lse = tl.load(Lse + pid_bh * N + offs_n, mask=n_ok, other=float("inf"))
        s = _qk_tile(q_base, k_base, offs_n, offs_m, stride_qn, stride_km, N, M, Dqk,
                     BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
        p = _probs(s, lse * 1.4426950408889634, key_ok, scale_log2)
        if DROPOUT:
            keep = _dropout_keep(seed, pid_bh, offs_n, offs_m, N, M, dropout_p)
            zscale = tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
        if do_v:
            do_t = tl.load(do_base + rows * stride_don + offs_t[None, :],
                           mask=n_ok[:, None] & (offs_t[None, :] < Dv), other=0.0)
            pz = p
            if DROPOUT:
                pz = p * zscale
            dv += tl.dot(tl.trans(pz.to(do_t.dtype)), do_t, input_precision=PRECISION)
        if do_k:
            dp = _dp_tile(do_base, v_base, offs_n, offs_m, stride_don, stride_vm, N, M, Dv,
                          BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
            if DROPOUT:
                dp = dp * zscale
            delta = tl.load(Delta + pid_bh * N + offs_n, mask=n_ok, other=0.0)
            ds = p * (dp - delta[:, None])
            q_t = tl.load(q_base + rows * stride_qn + offs_t[None, :],
                          mask=n_ok[:, None] & (offs_t[None, :] < Dqk), other=0.0)
            dk += tl.dot(tl.trans(ds.to(q_t.dtype)), q_t, input_precision=PRECISION)
    m_rows = offs_m.to(tl.int64)[:, None]
    m_ok = offs_m[:, None] < M
    tl.store(DK + b * stride_dkb + h * stride_dkh + m_rows * stride_dkm + offs_t[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=m_ok & (offs_t[None, :] < Dqk))
    tl.store(DV + b * stride_dvb + h * stride_dvh + m_rows * stride_dvm + offs_t[None, :],
             dv.to(DV.dtype.element_ty), mask=m_ok & (offs_t[None, :] < Dv))


@triton.autotune(configs=_bwd_configs(), key=["DQK_BUCKET", "DV_BUCKET"],
                 prune_configs_by={"early_config_prune": functools.partial(_prune_bwd_configs, dims=("DQK_BUCKET",))})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DQ, seed,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_km, stride_kh,
    stride_vb, stride_vm, stride_vh,
    stride_maskb,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    H, N, M, Dqk, Dv, scale, scale_log2, dropout_p,
    DQK_BUCKET, DV_BUCKET,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    # FlashAttention-2 backward for dQ.
    # Grid: (cdiv(N, BLOCK_N), B * H, cdiv(Dqk, BLOCK_DT)).
    # One program owns BLOCK_N queries of one (batch, head) and column tile t
    # (BLOCK_DT wide) of dQ; it loops over key blocks recomputing P and dP (as in the dK/dV
    # kernel) and accumulates dQ[:, t] += scale * dS K[:, t] in fp32. For a
    # batch-shared q the caller passes an fp32 (B, N, H, Dqk) buffer as DQ and
    # sums it over the batch.
    pid_bh = tl.program_id(1).to(tl.int64)
    t = tl.program_id(2)
    b, h, q_base, k_base, v_base, do_base = _head_bases(
        Q, K, V, DO, pid_bh, H, stride_qb, stride_qh, stride_kb, stride_kh,
        stride_vb, stride_vh, stride_dob, stride_doh)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = t * BLOCK_DT + tl.arange(0, BLOCK_DT)
    n_ok = offs_n < N
    mask_base = Mask + b * stride_maskb
    lse_log2 = tl.load(Lse + pid_bh * N + offs_n, mask=n_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh * N + offs_n, mask=n_ok, other=0.0)

    dq = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        key_ok = _key_valid(mask_base, offs_m, M, HAS_MASK)
        s = _qk_tile(q_base, k_base, offs_n, offs_m, stride_qn, stride_km, N, M, Dqk,
                     BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
        p = _probs(s, lse_log2, key_ok, scale_log2)
        dp = _dp_tile(do_base, v_base, offs_n, offs_m, stride_don, stride_vm, N, M, Dv,
                      BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, pid_bh, offs_n, offs_m, N, M, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        k_t = tl.load(k_base + offs_m.to(tl.int64)[:, None] * stride_km + offs_t[None, :],
                      mask=(offs_m[:, None] < M) & (offs_t[None, :] < Dqk), other=0.0)
        dq += tl.dot(ds.to(k_t.dtype), k_t, input_precision=PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_n.to(tl.int64)[:, None] * stride_dqn + offs_t[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=n_ok[:, None] & (offs_t[None, :] < Dqk))


@triton.jit
def _dropout_mask_kernel(Out, seed, H, N, M, dropout_p, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    # Debug/test helper: materialises the (B, H, N, M) dropout keep-mask that
    # the attention kernels use. Grid: (cdiv(N, BLOCK_N), B * H, cdiv(M, BLOCK_M)).
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    keep = _dropout_keep(seed, pid_bh, offs_n, offs_m, N, M, dropout_p)
    ptrs = Out + (pid_bh * N + offs_n.to(tl.int64)[:, None]) * M + offs_m[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


# ---------------------------------------------------------------------------
# Launchers (inputs already validated by perceiver_fast.ops.attention)
# ---------------------------------------------------------------------------
def _tf32_allowed() -> bool:
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
    if dtype == torch.float32 and not INTERPRET and _tf32_allowed():
        return "tf32"
    return "ieee"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_NOMINAL_SMS


def choose_num_splits(B: int, H: int, N: int, M: int, Dv: int, device: torch.device) -> int:
    """Split-KV count: enough programs for ~2 waves, each split >= 512 keys."""
    programs = triton.cdiv(N, 64) * B * H * triton.cdiv(Dv, 128)
    target = 2 * _sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), M // 512, 128))


def _check_grid(B: int, H: int) -> None:
    if B * H > 65535:  # B * H is grid axis 1, limited to 65535 on CUDA
        raise ValueError(f"attention kernels support batch * heads <= 65535, got B={B}, H={H}")


def _mask_args(mask: Optional[torch.Tensor], q: torch.Tensor):
    if mask is None:
        return q, 0, False  # dummy pointer, never read
    if mask.shape[1] > 1 and mask.stride(1) != 1:
        mask = mask.contiguous()  # (B, M) bools: a cheap copy, unlike q/k/v
    return mask.view(torch.uint8), mask.stride(0), True


def attention_fwd_triton(q, k, v, mask, seed, dropout_p: float, scale: float,
                         num_splits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    Bq, N, H, Dqk = q.shape
    B, M, _, Dv = v.shape
    out = _api._empty((B, N, H, Dv), device=q.device, dtype=q.dtype)
    lse = _api._empty((B, H, N), device=q.device, dtype=torch.float32)
    if N == 0 or B * H == 0:
        return out, lse
    if M == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    _check_grid(B, H)
    if num_splits <= 0:
        num_splits = choose_num_splits(B, H, N, M, Dv, q.device)
    num_splits = max(1, min(num_splits, M))
    mask_t, stride_maskb, has_mask = _mask_args(mask, q)
    dropout = dropout_p > 0.0
    split = num_splits > 1
    if split:
        target = _api._empty((num_splits, B, N, H, Dv), device=q.device, dtype=torch.float32)
        target_lse = _api._empty((num_splits, B, H, N), device=q.device, dtype=torch.float32)
        so = target.stride()
        sl = target_lse.stride(0)
    else:
        target, target_lse = out, lse
        so = (0,) + out.stride()
        sl = 0
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H, num_splits * triton.cdiv(Dv, meta["BLOCK_DV"]))
    _attn_fwd_kernel[grid](
        q, k, v, mask_t, target, target_lse, _api._seed_int(seed),
        q.stride(0) if Bq > 1 else 0, q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_maskb,
        so[0], so[1], so[2], so[3],
        sl,
        H, N, M, Dqk, Dv, num_splits, scale * LOG2E, dropout_p,
        _bucket(Dqk), _bucket(Dv),
        HAS_MASK=has_mask, DROPOUT=dropout, SPLIT=split, PRECISION=_precision(q.dtype),
    )
    if split:
        BLOCK_N = 16 if INTERPRET else 64
        BLOCK_DV = min(64, _bucket(Dv))
        mgrid = (triton.cdiv(N, BLOCK_N), B * H, triton.cdiv(Dv, BLOCK_DV))
        _attn_merge_kernel[mgrid](
            target, target_lse, out, lse,
            so[0], so[1], so[2], so[3],
            sl,
            out.stride(0), out.stride(1), out.stride(2),
            H, N, Dv, num_splits,
            BLOCK_N=BLOCK_N, BLOCK_DV=BLOCK_DV,
        )
    return out, lse


def attention_bwd_triton(do, q, k, v, out, lse, mask, seed, dropout_p: float, scale: float):
    Bq, N, H, Dqk = q.shape
    B, M, _, Dv = v.shape
    dk = _api._empty(k.shape, device=k.device, dtype=k.dtype)
    dv = _api._empty(v.shape, device=v.device, dtype=v.dtype)
    shared = Bq == 1 and B > 1
    if N == 0 or M == 0 or B * H == 0:
        return torch.zeros(q.shape, device=q.device, dtype=q.dtype), dk.zero_(), dv.zero_()
    _check_grid(B, H)
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = _api._empty((B, H, N), device=q.device, dtype=torch.float32)
    BLOCK_N = 16 if INTERPRET else 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(N, BLOCK_N), B * H)](
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        H, N, Dv, BLOCK_N=BLOCK_N, BLOCK_DV=min(64, _bucket(Dv)),
    )
    mask_t, stride_maskb, has_mask = _mask_args(mask, q)
    dropout = dropout_p > 0.0
    prec = _precision(q.dtype)
    seed_v = _api._seed_int(seed)
    sqb = q.stride(0) if Bq > 1 else 0
    common = (
        sqb, q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_maskb,
        do.stride(0), do.stride(1), do.stride(2),
    )
    grid_kv = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), B * H,
                            max(triton.cdiv(Dqk, meta["BLOCK_DT"]), triton.cdiv(Dv, meta["BLOCK_DT"])))
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, mask_t, do, lse, delta, dk, dv, seed_v,
        *common,
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        H, N, M, Dqk, Dv, scale, scale * LOG2E, dropout_p,
        _bucket(Dqk), _bucket(Dv),
        HAS_MASK=has_mask, DROPOUT=dropout, PRECISION=prec,
    )
    if shared:
        dq_buf = _api._empty((B, N, H, Dqk), device=q.device, dtype=torch.float32)
    else:
        dq_buf = _api._empty(q.shape, device=q.device, dtype=q.dtype)
    grid_q = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H, triton.cdiv(Dqk, meta["BLOCK_DT"]))
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, mask_t, do, lse, delta, dq_buf, seed_v,
        *common,
        dq_buf.stride(0), dq_buf.stride(1), dq_buf.stride(2),
        H, N, M, Dqk, Dv, scale, scale * LOG2E, dropout_p,
        _bucket(Dqk), _bucket(Dv),
        HAS_MASK=has_mask, DROPOUT=dropout, PRECISION=prec,
    )
    dq = dq_buf.sum(0, keepdim=True).to(q.dtype) if shared else dq_buf
    return dq, dk, dv


def dropout_keep_mask(seed: int, B: int, H: int, N: int, M: int, dropout_p: float,
                      device: torch.device) -> torch.Tensor:
    """The (B, H, N, M) bool keep-mask the kernels apply for ``seed`` (tests only)."""
    out = torch.empty((B, H, N, M), device=device, dtype=torch.int8)
    BN, BM = 16, 16
    _dropout_mask_kernel[(triton.cdiv(N, BN), B * H, triton.cdiv(M, BM))](
        out, int(seed), H, N, M, float(dropout_p), BLOCK_N=BN, BLOCK_M=BM)
    return out.bool()
