"""The PyTorch path of the attention ops (CPU tensors without the Triton interpreter).

Same contract as the Triton launchers: out (B, N, H, Dv) in q's dtype and lse
fp32 (B, H, N), +inf for a query with no attended key (whose output is zeros).
Two routes, chosen by pure functions of the inputs (:func:`sdpa_cpu_accepts`,
:func:`sdpa_cpu_bwd_accepts`), so forward and backward route the same way for
the same call:

* PyTorch's fused CPU flash kernel
  (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward),
  which returns the logsumexp our backward needs, on (B, H, S, D) views of our
  (B, S, H, D) tensors: no copies, a batch-shared q is an ``expand``;
* a chunked online-softmax loop (fp32 math, memory O(N * chunk), never N x M)
  for what that kernel cannot do: Dqk != Dv, empty tensors, soft-capping, and dropout, whose
  masks come from a CPU generator seeded by (seed, chunk start) so that they are
  reproducible from torch's seed and the backward regenerates the forward's
  mask (SDPA's CPU dropout is another stream, not replayable in the backward).
  The chunks of the dropout draw are those of the GLOBAL keys (``key_offset``,
  ``total_keys``: a call over a shard of the keys): global chunk c covers keys
  [c * chunk, min((c + 1) * chunk, total_keys)); a shard's loop steps on that
  grid, draws each global chunk it overlaps whole and keeps its own columns, so
  shards reproduce the unsharded call's mask (:func:`dropout_keep_keys`).
  It also runs the backward of head dims over 256, where the fused backward is
  slower; it needs only the lse, the same quantity from either forward.

Grouped-query heads (k/v with Hkv < H heads) never repeat K/V: the fused
kernel gets the query heads of one group packed into its query rows (a copy
of q, the small side), the loop broadcasts each key/value head over its group.
Causal masks are bottom-right aligned (query i sees keys j <= i + M - N).

:func:`attention_fwd_cpu` and :func:`attention_bwd_cpu` are the entry points.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from perceiver_fast.ops.backend import empty
from perceiver_fast.ops.reference import attention_keep_mask

# PyTorch's fused CPU flash attention and its backward; the forward returns the
# logsumexp our backward contract needs (F.scaled_dot_product_attention does not).
FLASH_CPU_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
FLASH_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

# Above this head dim the fused CPU backward loses to the chunked one (2-core CPU,
# fp32, N512 M8192 H1, fused vs chunked: D261 73 vs 75 ms, D322 89 vs 80, D512 141 vs 94).
MAX_SDPA_CPU_BWD_HEAD_DIM = 256

# Keys per chunk: large enough for matmul efficiency, small enough that the
# (B, H, N, chunk) score block stays a few MB.
DEFAULT_CHUNK = 1024


def sdpa_cpu_accepts(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, causal: bool = False,
                     softcap: float = 0.0) -> bool:
    """Whether the fused CPU flash kernel computes this call with our semantics.

    It runs on CPU tensors only (backend="torch" may be asked for on a GPU, where
    the chunked loop runs), refuses Dqk != Dv, crashes the process on an empty
    query or key sequence, has no soft-capping, and its dropout stream is not
    ours. Grouped-query heads pack the group into the query rows, which a
    causal mask (indexed by query row) does not survive.
    """
    grouped = k.shape[2] != q.shape[2]
    return (q.device.type == "cpu" and dropout_p == 0.0 and q.shape[-1] == v.shape[-1] and q.numel() > 0
            and k.numel() > 0 and v.numel() > 0 and softcap == 0.0 and not (grouped and causal))


def sdpa_cpu_bwd_accepts(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, causal: bool = False,
                         softcap: float = 0.0) -> bool:
    """Whether the backward runs the fused CPU kernel (else the chunked loop, from the same lse)."""
    return sdpa_cpu_accepts(q, k, v, dropout_p, causal, softcap) and q.shape[-1] <= MAX_SDPA_CPU_BWD_HEAD_DIM


def _flash_mask(mask: Optional[Tensor], causal: bool, n: int, m: int, dtype: torch.dtype,
                device) -> Tuple[Optional[Tensor], bool, Optional[Tensor]]:
    """(additive attn_mask or None, is_causal, bool (B|1, 1, N) rows with no key or None) for the fused kernel."""
    if causal and mask is None and n == m:
        return None, True, None  # the kernel's top-left causal is ours when N == M
    keep = attention_keep_mask(mask, causal, n, m, device)
    if keep is None:
        return None, False, None
    additive = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
    return additive, False, ~keep.any(-1)


def _pack_groups(t: Tensor, hkv: int) -> Tensor:
    """(B, N, H, D) -> (B, Hkv, G * N, D): the G query heads of each key/value head stacked along the rows."""
    B, N, H, D = t.shape
    return t.reshape(B, N, hkv, H // hkv, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, (H // hkv) * N, D)


def _unpack_groups(t: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_pack_groups`: (B, Hkv, G * N, D) -> (B, N, H, D)."""
    B, hkv, rows, D = t.shape
    return t.reshape(B, hkv, rows // n, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, -1, D)


def additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """The (B, 1, 1, M) additive mask the fused kernel takes for a bool key padding mask (True = attend)."""
    if mask is None:
        return None
    # It must have the query's dtype; the kernel refuses bool masks.
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None, None]


def attention_fwd_sdpa_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                           scale: float = 1.0, causal: bool = False) -> Tuple[Tensor, Tensor]:
    """Forward through the fused CPU flash kernel; same contract as :func:`attention_fwd_chunked`."""
    B, M, Hkv, _ = k.shape
    N, H = q.shape[1], q.shape[2]
    if Hkv != H:  # grouped heads: causal never reaches here (sdpa_cpu_accepts)
        qp = _pack_groups(q.expand(B, -1, -1, -1), Hkv)
        out, lse = FLASH_CPU_FWD(qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=additive_mask(mask, q.dtype),
                                 scale=scale)
        out, lse = _unpack_groups(out, N), lse.reshape(B, H, N)
        if mask is not None:
            lse = lse.masked_fill(~mask.any(-1)[:, None, None], float("inf"))
        return out.contiguous(), lse.contiguous()
    attn_mask, is_causal, empty_rows = _flash_mask(mask, causal, N, M, q.dtype, q.device)
    out, lse = FLASH_CPU_FWD(
        q.transpose(1, 2).expand(B, -1, -1, -1), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=is_causal, attn_mask=attn_mask, scale=scale)
    if empty_rows is not None:
        # The kernel gives a query with no attended key zeros and lse 0; our rule is lse = +inf.
        lse = lse.masked_fill(empty_rows, float("inf"))
    return out.transpose(1, 2).contiguous(), lse.contiguous()


def attention_bwd_sdpa_cpu(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           mask: Optional[Tensor] = None, scale: float = 1.0,
                           causal: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`attention_fwd_sdpa_cpu`: (dq, dk, dv), contiguous, in the inputs' shapes."""
    B, M, Hkv, _ = k.shape
    N, H = q.shape[1], q.shape[2]
    # The fused kernel's backward reads rows with a unit last stride.
    out = out if out.stride(-1) == 1 else out.contiguous()
    do = do if do.stride(-1) == 1 else do.contiguous()
    # Our lse = +inf on fully masked queries makes their probabilities, hence their gradients, zero.
    if Hkv != H:
        dq, dk, dv = FLASH_CPU_BWD(
            _pack_groups(do, Hkv), _pack_groups(q.expand(B, -1, -1, -1), Hkv), k.transpose(1, 2),
            v.transpose(1, 2), _pack_groups(out, Hkv), lse.reshape(B, Hkv, -1), 0.0, False,
            attn_mask=additive_mask(mask, q.dtype), scale=scale)
        dq = _unpack_groups(dq, N)
    else:
        attn_mask, is_causal, _ = _flash_mask(mask, causal, N, M, q.dtype, q.device)
        dq, dk, dv = FLASH_CPU_BWD(
            do.transpose(1, 2), q.transpose(1, 2).expand(B, -1, -1, -1), k.transpose(1, 2), v.transpose(1, 2),
            out.transpose(1, 2), lse, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
        dq = dq.transpose(1, 2)
    if q.shape[0] != B:  # batch-shared q: its gradient sums over the batch
        dq = dq.sum(0, keepdim=True)
    return dq.contiguous(), dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous()


def attention_fwd_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, seed: int = 0,
                      dropout_p: float = 0.0, scale: float = 1.0, causal: bool = False,
                      softcap: float = 0.0, key_offset: int = 0, total_keys: int = 0) -> Tuple[Tensor, Tensor]:
    """The forward custom op's "torch" backend: the fused CPU kernel where it applies, else the chunked loop."""
    if sdpa_cpu_accepts(q, k, v, dropout_p, causal, softcap):
        return attention_fwd_sdpa_cpu(q, k, v, mask, scale, causal)
    return attention_fwd_chunked(q, k, v, mask, seed, dropout_p, scale, causal=causal, softcap=softcap,
                                 key_offset=key_offset, total_keys=total_keys)


def attention_bwd_cpu(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      mask: Optional[Tensor] = None, seed: int = 0, dropout_p: float = 0.0,
                      scale: float = 1.0, causal: bool = False,
                      softcap: float = 0.0, key_offset: int = 0,
                      total_keys: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward custom op's "torch" backend: the fused CPU kernel where it is the faster, else the chunked loop."""
    if sdpa_cpu_bwd_accepts(q, k, v, dropout_p, causal, softcap):
        return attention_bwd_sdpa_cpu(do, q, k, v, out, lse, mask, scale, causal)
    return attention_bwd_chunked(do, q, k, v, out, lse, mask, seed, dropout_p, scale, causal=causal,
                                 softcap=softcap, key_offset=key_offset, total_keys=total_keys)


def dropout_keep_chunk(seed: int, start: int, shape, dropout_p: float, device) -> Tensor:
    """Dropout keep-mask of one key chunk, reproducible from (seed, start)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + start) % (2**63 - 1))
    return (torch.rand(shape, generator=g) >= dropout_p).to(device)


def key_chunks(m: int, chunk: int, key_offset: int = 0) -> List[Tuple[int, int]]:
    """Local [m0, m1) chunks of a call's ``m`` keys, cut on the global grid of ``chunk`` keys.

    The call's keys are the global keys [key_offset, key_offset + m); each local
    chunk lies inside one global chunk. With key_offset = 0 these are
    ``range(0, m, chunk)``'s chunks.
    """
    bounds = []
    m0 = 0
    while m0 < m:
        g = key_offset + m0
        m1 = min(m, (g // chunk + 1) * chunk - key_offset)
        bounds.append((m0, m1))
        m0 = m1
    return bounds


def dropout_keep_keys(seed: int, g0: int, g1: int, total_keys: int, chunk: int, shape: Tuple[int, ...],
                      dropout_p: float, device: torch.device) -> Tensor:
    """Dropout keep-mask (*shape, g1 - g0) of the global keys [g0, g1), which lie inside one global chunk.

    The whole global chunk [c0, min(c0 + chunk, total_keys)) is drawn with
    :func:`dropout_keep_chunk` (the unsharded call's draw: same seed, start and
    shape) and the columns [g0, g1) kept.
    """
    c0 = g0 // chunk * chunk
    c1 = min(c0 + chunk, total_keys)
    if not (c0 <= g0 <= g1 <= c1):
        raise ValueError(f"dropout_keep_keys: keys [{g0}, {g1}) are not inside one global chunk of {chunk} keys "
                         f"of total_keys={total_keys}")
    keep = dropout_keep_chunk(seed, c0, (*shape, c1 - c0), dropout_p, device)
    return keep if (g0, g1) == (c0, c1) else keep[..., g0 - c0:g1 - c0]


def _chunk_keep(mask: Optional[Tensor], causal: bool, n: int, m: int, m0: int, m1: int,
                device) -> Optional[Tensor]:
    """Bool keep-mask of keys [m0, m1) broadcastable to (B, Hkv, G, N, C), or None when all are attended."""
    keep = None
    if mask is not None:
        keep = mask[:, None, None, None, m0:m1]
    if causal:
        rows = torch.arange(n, device=device)[:, None] + (m - n)
        tri = torch.arange(m0, m1, device=device)[None, :] <= rows
        keep = tri if keep is None else keep & tri
    return keep


def _scores(qf: Tensor, kc: Tensor, scale: float, softcap: float) -> Tuple[Tensor, Optional[Tensor]]:
    """(scores, tanh of the capped scores or None): s = q k^T * scale, capped as softcap * tanh(s / softcap)."""
    s = torch.matmul(qf, kc.transpose(-1, -2)) * scale
    if softcap > 0.0:
        t = torch.tanh(s / softcap)
        return softcap * t, t
    return s, None


def _grouped(t: Tensor, hkv: int) -> Tensor:
    """(B, S, H, D) -> fp32 (B, Hkv, G, S, D): query heads grouped under their key/value head (a view)."""
    B, S, H, D = t.shape
    return t.float().reshape(B, S, hkv, H // hkv, D).permute(0, 2, 3, 1, 4)


def _kv_chunk(t: Tensor, m0: int, m1: int) -> Tensor:
    """Keys/values [m0, m1) of (B, M, Hkv, D) as fp32 (B, Hkv, 1, C, D), broadcast over the group."""
    return t[:, m0:m1].float().transpose(1, 2)[:, :, None]


def attention_fwd_chunked(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                          seed: Optional[int] = None, dropout_p: float = 0.0,
                          scale: float = 1.0, chunk: Optional[int] = None, causal: bool = False,
                          softcap: float = 0.0, key_offset: int = 0, total_keys: int = 0) -> Tuple[Tensor, Tensor]:
    """Online-softmax attention over key chunks in PyTorch (fp32 math).

    Same contract as the forward custom op: returns out (B, N, H, Dv) in q's
    dtype and lse fp32 (B, H, N), +inf for rows with no attended key.
    The keys are the global keys [key_offset, key_offset + M) of ``total_keys``
    (0 = M); the chunks, and so the dropout draws, follow the global grid of
    ``chunk`` (default :data:`DEFAULT_CHUNK`) keys: pass the backward the same.
    """
    chunk = chunk or DEFAULT_CHUNK
    Bq, N, H, _ = q.shape
    B, M, Hkv, Dv = v.shape
    G = H // Hkv
    qf = _grouped(q, Hkv)  # (Bq, Hkv, G, N, D)
    m_i = torch.full((B, Hkv, G, N), float("-inf"), device=q.device)
    l_i = torch.zeros((B, Hkv, G, N), device=q.device)
    acc = torch.zeros((B, Hkv, G, N, Dv), device=q.device)
    total = total_keys or M
    for m0, m1 in key_chunks(M, chunk, key_offset):
        s, _ = _scores(qf, _kv_chunk(k, m0, m1), scale, softcap)  # (B, Hkv, G, N, C)
        keep = _chunk_keep(mask, causal, N, M, m0, m1, q.device)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        m_new = torch.maximum(m_i, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m_i - m_safe)
        p = torch.exp(s - m_safe[..., None])
        l_i = l_i * alpha + p.sum(-1)
        if dropout_p > 0.0:
            keep_d = dropout_keep_keys(seed, key_offset + m0, key_offset + m1, total, chunk, (B, H, N), dropout_p,
                                       p.device)
            p = p * keep_d.reshape(p.shape) / (1.0 - dropout_p)
        acc = acc * alpha[..., None] + torch.matmul(p, _kv_chunk(v, m0, m1))
        m_i = m_new
    empty_rows = l_i == 0
    l_safe = torch.where(empty_rows, torch.ones_like(l_i), l_i)
    out = (acc / l_safe[..., None]).reshape(B, H, N, Dv).transpose(1, 2).to(q.dtype).contiguous()
    lse = torch.where(empty_rows, torch.full_like(l_i, float("inf")), m_i + torch.log(l_safe))
    return out, lse.reshape(B, H, N).contiguous()


def attention_bwd_chunked(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          mask: Optional[Tensor] = None, seed: Optional[int] = None,
                          dropout_p: float = 0.0, scale: float = 1.0,
                          chunk: Optional[int] = None, causal: bool = False,
                          softcap: float = 0.0, key_offset: int = 0,
                          total_keys: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward over key chunks in PyTorch, from the saved lse.

    With soft-capping the score gradient is dS_raw = dS * (1 - tanh^2), tanh recomputed from q k^T.
    ``chunk``, ``key_offset`` and ``total_keys`` as given to :func:`attention_fwd_chunked` (the same dropout mask).
    """
    chunk = chunk or DEFAULT_CHUNK
    Bq, N, H, Dqk = q.shape
    B, M, Hkv, Dv = v.shape
    G = H // Hkv
    qf = _grouped(q, Hkv)  # (Bq, Hkv, G, N, D)
    dof = _grouped(do, Hkv)  # (B, Hkv, G, N, Dv)
    delta = (dof * _grouped(out, Hkv)).sum(-1)  # (B, Hkv, G, N)
    lse_g = lse.reshape(B, Hkv, G, N)
    dq = torch.zeros((B, Hkv, G, N, Dqk), device=q.device)
    dk = empty(k.shape, device=k.device, dtype=k.dtype)
    dv = empty(v.shape, device=v.device, dtype=v.dtype)
    q_all = qf.expand(B, -1, -1, -1, -1)
    total = total_keys or M
    for m0, m1 in key_chunks(M, chunk, key_offset):
        kc, vc = _kv_chunk(k, m0, m1), _kv_chunk(v, m0, m1)
        s, t = _scores(qf, kc, scale, softcap)
        p = torch.exp(s - lse_g[..., None])
        keep = _chunk_keep(mask, causal, N, M, m0, m1, q.device)
        if keep is not None:
            p = p.masked_fill(~keep, 0.0)
        dp = torch.matmul(dof, vc.transpose(-1, -2))
        pz = p
        if dropout_p > 0.0:
            z = dropout_keep_keys(seed, key_offset + m0, key_offset + m1, total, chunk, (B, H, N), dropout_p,
                                  p.device).reshape(p.shape) / (1.0 - dropout_p)
            pz = p * z
            dp = dp * z
        ds = p * (dp - delta[..., None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        # Sum over the group: each key/value head serves G query heads.
        dv[:, m0:m1] = torch.matmul(pz.transpose(-1, -2), dof).sum(2).transpose(1, 2).to(v.dtype)
        dk[:, m0:m1] = (torch.matmul(ds.transpose(-1, -2), q_all).sum(2) * scale).transpose(1, 2).to(k.dtype)
        dq += torch.matmul(ds, kc) * scale
    dq = dq.reshape(B, H, N, Dqk)
    if Bq == 1:
        dq = dq.sum(0, keepdim=True)
    return dq.transpose(1, 2).to(q.dtype).contiguous(), dk, dv
