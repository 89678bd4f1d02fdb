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
  for what that kernel cannot do: Dqk != Dv, empty tensors, and dropout, whose
  masks come from a CPU generator seeded by (seed, chunk start) so that they are
  reproducible from torch's seed and the backward regenerates the forward's
  mask (SDPA's CPU dropout is another stream, not replayable in the backward).
  It also runs the backward of head dims over 256, where the fused backward is
  slower; it needs only the lse, the same quantity from either forward.

:func:`attention_fwd_cpu` and :func:`attention_bwd_cpu` are the entry points.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from perceiver_fast.ops.backend import empty

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


def sdpa_cpu_accepts(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """Whether the fused CPU flash kernel computes this call with our semantics.

    It runs on CPU tensors only (backend="torch" may be asked for on a GPU, where
    the chunked loop runs), refuses Dqk != Dv, crashes the process on an empty
    query or key sequence, and its dropout stream is not ours.
    """
    return q.device.type == "cpu" and dropout_p == 0.0 and q.shape[-1] == v.shape[-1] and q.numel() > 0 and k.numel() > 0 and v.numel() > 0


def sdpa_cpu_bwd_accepts(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """Whether the backward runs the fused CPU kernel (else the chunked loop, from the same lse)."""
    return sdpa_cpu_accepts(q, k, v, dropout_p) and q.shape[-1] <= MAX_SDPA_CPU_BWD_HEAD_DIM


def additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """The (B, 1, 1, M) additive mask the fused kernel takes for a bool key padding mask (True = attend)."""
    if mask is None:
        return None
    # It must have the query's dtype; the kernel refuses bool masks.
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None, None]


def attention_fwd_sdpa_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                           scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Forward through the fused CPU flash kernel; same contract as :func:`attention_fwd_chunked`."""
    B = k.shape[0]
    out, lse = FLASH_CPU_FWD(
        q.transpose(1, 2).expand(B, -1, -1, -1), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=additive_mask(mask, q.dtype), scale=scale)
    if mask is not None:
        # The kernel gives a query with no attended key zeros and lse 0; our rule is lse = +inf.
        lse = lse.masked_fill(~mask.any(-1)[:, None, None], float("inf"))
    return out.transpose(1, 2).contiguous(), lse.contiguous()


def attention_bwd_sdpa_cpu(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           mask: Optional[Tensor] = None, scale: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`attention_fwd_sdpa_cpu`: (dq, dk, dv), contiguous, in the inputs' shapes."""
    B = k.shape[0]
    # Our lse = +inf on fully masked queries makes their probabilities, hence their gradients, zero.
    dq, dk, dv = FLASH_CPU_BWD(
        do.transpose(1, 2), q.transpose(1, 2).expand(B, -1, -1, -1), k.transpose(1, 2), v.transpose(1, 2),
        out.transpose(1, 2), lse, 0.0, False, attn_mask=additive_mask(mask, q.dtype), scale=scale)
    if q.shape[0] != B:  # batch-shared q: its gradient sums over the batch
        dq = dq.sum(0, keepdim=True)
    return tuple(g.transpose(1, 2).contiguous() for g in (dq, dk, dv))


def attention_fwd_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, seed: int = 0,
                      dropout_p: float = 0.0, scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    """The forward custom op's "torch" backend: the fused CPU kernel where it applies, else the chunked loop."""
    if sdpa_cpu_accepts(q, k, v, dropout_p):
        return attention_fwd_sdpa_cpu(q, k, v, mask, scale)
    return attention_fwd_chunked(q, k, v, mask, seed, dropout_p, scale)


def attention_bwd_cpu(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      mask: Optional[Tensor] = None, seed: int = 0, dropout_p: float = 0.0,
                      scale: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward custom op's "torch" backend: the fused CPU kernel where it is the faster, else the chunked loop."""
    if sdpa_cpu_bwd_accepts(q, k, v, dropout_p):
        return attention_bwd_sdpa_cpu(do, q, k, v, out, lse, mask, scale)
    return attention_bwd_chunked(do, q, k, v, out, lse, mask, seed, dropout_p, scale)


def dropout_keep_chunk(seed: int, start: int, shape, dropout_p: float, device) -> Tensor:
    """Dropout keep-mask of one key chunk, reproducible from (seed, start)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + start) % (2**63 - 1))
    return (torch.rand(shape, generator=g) >= dropout_p).to(device)


def attention_fwd_chunked(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                          seed: Optional[int] = None, dropout_p: float = 0.0,
                          scale: float = 1.0, chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Online-softmax attention over key chunks in PyTorch (fp32 math).

    Same contract as the forward custom op: returns out (B, N, H, Dv) in q's
    dtype and lse fp32 (B, H, N), +inf for rows with no attended key.
    """
    chunk = chunk or DEFAULT_CHUNK
    Bq, N, H, _ = q.shape
    B, M, _, Dv = v.shape
    qf = q.float().transpose(1, 2)  # (Bq, H, N, D)
    m_i = torch.full((B, H, N), float("-inf"), device=q.device)
    l_i = torch.zeros((B, H, N), device=q.device)
    acc = torch.zeros((B, H, N, Dv), device=q.device)
    for m0 in range(0, M, chunk):
        m1 = min(m0 + chunk, M)
        kc = k[:, m0:m1].float().transpose(1, 2)
        vc = v[:, m0:m1].float().transpose(1, 2)
        s = torch.matmul(qf, kc.transpose(-1, -2)) * scale  # (B, H, N, C)
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, m0:m1], float("-inf"))
        m_new = torch.maximum(m_i, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m_i - m_safe)
        p = torch.exp(s - m_safe[..., None])
        l_i = l_i * alpha + p.sum(-1)
        if dropout_p > 0.0:
            keep = dropout_keep_chunk(seed, m0, p.shape, dropout_p, p.device)
            p = p * keep / (1.0 - dropout_p)
        acc = acc * alpha[..., None] + torch.matmul(p, vc)
        m_i = m_new
    empty = l_i == 0
    l_safe = torch.where(empty, torch.ones_like(l_i), l_i)
    out = (acc / l_safe[..., None]).transpose(1, 2).to(q.dtype).contiguous()
    lse = torch.where(empty, torch.full_like(l_i, float("inf")), m_i + torch.log(l_safe))
    return out, lse.contiguous()


def attention_bwd_chunked(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          mask: Optional[Tensor] = None, seed: Optional[int] = None,
                          dropout_p: float = 0.0, scale: float = 1.0,
                          chunk: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward over key chunks in PyTorch, from the saved lse."""
    chunk = chunk or DEFAULT_CHUNK
    Bq, N, H, Dqk = q.shape
    B, M, _, Dv = v.shape
    qf = q.float().transpose(1, 2)
    dof = do.float().transpose(1, 2)  # (B, H, N, Dv)
    delta = (dof * out.float().transpose(1, 2)).sum(-1)  # (B, H, N)
    dq = torch.zeros((B, H, N, Dqk), device=q.device)
    dk = empty(k.shape, device=k.device, dtype=k.dtype)
    dv = empty(v.shape, device=v.device, dtype=v.dtype)
    for m0 in range(0, M, chunk):
        m1 = min(m0 + chunk, M)
        kc = k[:, m0:m1].float().transpose(1, 2)
        vc = v[:, m0:m1].float().transpose(1, 2)
        s = torch.matmul(qf, kc.transpose(-1, -2)) * scale
        p = torch.exp(s - lse[..., None])
        if mask is not None:
            p = p.masked_fill(~mask[:, None, None, m0:m1], 0.0)
        dp = torch.matmul(dof, vc.transpose(-1, -2))
        pz = p
        if dropout_p > 0.0:
            z = dropout_keep_chunk(seed, m0, p.shape, dropout_p, p.device) / (1.0 - dropout_p)
            pz = p * z
            dp = dp * z
        ds = p * (dp - delta[..., None])
        dv[:, m0:m1] = torch.matmul(pz.transpose(-1, -2), dof).transpose(1, 2).to(v.dtype)
        dk[:, m0:m1] = (torch.matmul(ds.transpose(-1, -2), qf.expand(B, -1, -1, -1)) * scale).transpose(1, 2).to(k.dtype)
        dq += torch.matmul(ds, kc) * scale
    if Bq == 1:
        dq = dq.sum(0, keepdim=True)
    return dq.transpose(1, 2).to(q.dtype).contiguous(), dk, dv
