"""Cross-attention over inputs sharded across ranks, on torch.distributed (gloo on CPU, NCCL on GPUs).

The Perceiver's inputs are what outgrow one device, not its few latents. So the
M keys/values are split across the ranks of a process group, each rank holding a
contiguous (possibly uneven, possibly empty) slice, while the N queries are
replicated. :func:`sharded_cross_attention` is then exact with two small
all-reduces forward and one backward, all O(B * N * H * Dv), independent of M:

* forward: every rank runs the fused op on its shard and keeps (out_r, lse_r);
  an all-reduce MAX of the lse gives m, and one all-reduce SUM of
  ``[exp(lse_r - m) * out_r | exp(lse_r - m)]`` gives the numerator and the
  denominator of the merge (the split-KV merge of the op, across ranks). A rank
  whose keys are all masked or empty has lse = +inf in the op's convention,
  taken as -inf here, so its weight is exactly 0; a query with no key anywhere
  gets zeros, as on one device.
* backward: the op's FlashAttention-2 backward needs only (q, k, v, out, lse,
  dout). Run on the local shard with the GLOBAL out and lse, it gives the exact
  dk and dv of the local keys (they stay local) and this shard's part of dq,
  which one all-reduce SUM completes.

The collectives are :func:`torch.distributed._functional_collectives.all_reduce`
(functional collectives, which torch.compile traces into the graph without a
graph break) inside a :class:`torch.autograd.Function`; :func:`all_reduce` is
the one place that calls them (tests wrap it to count the calls). Outside a
process group, or in a group of one rank, they are skipped and the result is
the single-device op's, bit for bit.

Dropout: the op draws its mask by the GLOBAL key index (its ``key_offset`` and
``total_keys`` arguments: Philox offsets of the Triton kernels, global key
chunks of the PyTorch path), so the sharded result equals the single-device
op's with the same seed, forward and backward, whatever the sharding. With
``dropout_p > 0`` each call first exchanges, in one tiny all-reduce SUM of
world + 1 int64 (the same functional collective), every rank's key count (the
prefix sums give this rank's ``key_offset``, the total gives ``total_keys``)
and rank 0's seed (the others contribute 0: a broadcast), so the ranks always
share one seed. That seed is drawn as the op draws it
(:func:`perceiver_fast.ops.attention.draw_dropout_seed`, from torch's default
generator) on every rank, so every rank's generator advances alike, and
``torch.manual_seed(s)`` on rank 0 reproduces the single-device call. The
exchanged counts are read on the host (a sync, and a torch.compile graph
break, with dropout only); without dropout nothing is exchanged.

Helpers for input-sharded layers: :func:`shard_bounds` (the even contiguous
split the models use) and :func:`all_reduce_grad` (identity forward, gradient
summed over the group backward, for replicated parameters applied to the
local shard only).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from perceiver_fast.ops.attention import cross_attention, draw_dropout_seed

__all__ = ["all_reduce", "all_reduce_grad", "group_rank", "group_size", "shard_bounds", "shard_key_range",
           "sharded_cross_attention"]


def group_size(group=None) -> int:
    """Ranks in ``group`` (default: the world); 1 when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    """This process's rank in ``group`` (default: the world); 0 when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def shard_bounds(total: int, world: int, rank: int) -> Tuple[int, int]:
    """[start, end) of rank ``rank``'s contiguous slice of ``total`` items split over ``world`` ranks.

    The first ``total % world`` ranks get one item more (as ``numpy.array_split``);
    with total < world the last ranks get empty slices.
    """
    if world < 1 or not 0 <= rank < world or total < 0:
        raise ValueError(f"shard_bounds: need total >= 0, world >= 1 and 0 <= rank < world; got total={total}, "
                         f"world={world}, rank={rank}")
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce(t: Tensor, op: str, group=None) -> Tensor:
    """All-reduce ``t`` over ``group`` with ``op`` ("sum" or "max"), out of place, via functional collectives.

    Returns ``t`` itself when the group has one rank (or none is initialised).
    """
    if group_size(group) == 1:
        return t
    from torch.distributed import _functional_collectives as funcol

    out = funcol.all_reduce(t.contiguous(), op, group if group is not None else dist.group.WORLD)
    return funcol.wait_tensor(out)


class _SumGradOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, "sum", ctx.group), None


def all_reduce_grad(t: Tensor, group=None) -> Tensor:
    """Identity in the forward; the gradient is summed over ``group`` in the backward.

    For a replicated parameter applied to the local input shard only (a
    LayerNorm or a K/V projection of the inputs): each rank's gradient is its
    shard's part, and the sum is the gradient of the whole input, the same on
    every rank, so replicas stay in sync without further communication.
    """
    if group_size(group) == 1 or not t.requires_grad:
        return t
    return _SumGradOverGroup.apply(t, group)


def shard_key_range(num_keys: int, seed: Optional[Tensor], group=None,
                    device: Union[torch.device, str, None] = None) -> Tuple[int, int, Optional[Tensor]]:
    """(key_offset, total_keys, seed) of this rank's ``num_keys`` keys, with rank 0's ``seed`` on every rank.

    One all-reduce SUM (via :func:`all_reduce`) of world + 1 int64 on ``device``
    (default: the seed's, else CPU; NCCL needs the GPU): rank 0's seed (the
    others add 0) and every rank's key count at its rank's slot. key_offset is
    the sum of the counts of the ranks before this one (the ranks hold
    contiguous slices in rank order), total_keys the sum of all. ``seed`` is an
    int64 (1,) tensor or None (no dropout: returned as None).
    """
    world, rank = group_size(group), group_rank(group)
    if device is None:
        device = seed.device if seed is not None else "cpu"
    packed = torch.zeros(world + 1, dtype=torch.int64, device=device)
    if seed is not None and rank == 0:
        packed[0] = seed.reshape(()).to(device)
    packed[1 + rank] = int(num_keys)
    packed = all_reduce(packed, "sum", group)
    counts = packed[1:].tolist()
    shared_seed = None if seed is None else packed[:1].clone()
    return int(sum(counts[:rank])), int(sum(counts)), shared_seed


def _merge(out: Tensor, lse: Tensor, group) -> Tuple[Tensor, Tensor]:
    """Global (out (B, N, H, Dv) fp32, lse fp32 (B, H, N), +inf where no key) from every rank's partials."""
    lse = torch.where(torch.isposinf(lse), torch.full_like(lse, -math.inf), lse)  # op: +inf = no key
    m = all_reduce(lse, "max", group)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m_safe).transpose(1, 2).unsqueeze(-1)  # (B, N, H, 1), 0 where this rank has no key
    packed = all_reduce(torch.cat([out.float() * w, w], dim=-1), "sum", group)
    num, den = packed[..., :-1], packed[..., -1:]
    has_key = den > 0
    merged = torch.where(has_key, num / torch.where(has_key, den, torch.ones_like(den)), torch.zeros_like(num))
    den_t = den.squeeze(-1).transpose(1, 2)  # (B, H, N)
    lse_g = torch.where(den_t > 0, m_safe + torch.log(torch.where(den_t > 0, den_t, torch.ones_like(den_t))),
                        torch.full_like(den_t, math.inf))
    # Contiguous: the Triton backward reads out and lse with their contiguous strides.
    return merged.contiguous(), lse_g.contiguous()


class _ShardedCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, seed, dropout_p, scale, backend, group, key_offset, total_keys):
        out_l, lse_l = torch.ops.perceiver_fast.attention_fwd(q, k, v, mask, seed, dropout_p, scale, 0, backend,
                                                              False, 0.0, key_offset, total_keys)
        merged, lse = _merge(out_l, lse_l, group)
        out = merged.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask, seed)
        ctx.dropout_p, ctx.scale, ctx.backend, ctx.group = dropout_p, scale, backend, group
        ctx.key_offset, ctx.total_keys = key_offset, total_keys
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask, seed = ctx.saved_tensors
        dq, dk, dv = torch.ops.perceiver_fast.attention_bwd(dout.contiguous(), q, k, v, out, lse, mask, seed,
                                                            ctx.dropout_p, ctx.scale, 0, ctx.backend, False, 0.0,
                                                            ctx.key_offset, ctx.total_keys)
        if ctx.needs_input_grad[0]:
            dq = all_reduce(dq, "sum", ctx.group)  # each rank holds its keys' part of dq
        else:
            dq = None
        return dq, dk, dv, None, None, None, None, None, None, None, None


def sharded_cross_attention(q: Tensor, k_shard: Tensor, v_shard: Tensor, *, group=None,
                            key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                            softmax_scale: Optional[float] = None, return_lse: bool = False,
                            backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Exact cross-attention of replicated queries over keys/values sharded across ``group``.

    Args:
        q: (Bq, N, H, Dqk), Bq in {1, B}, the same on every rank (replicated).
            Whether q requires grad must agree across ranks (its gradient is all-reduced).
        k_shard: (B, M_r, Hkv, Dqk), this rank's contiguous slice of the M keys;
            M_r may differ between ranks and may be 0.
        v_shard: (B, M_r, Hkv, Dv), the matching values.
        group: the process group the keys are sharded over (default: the world).
            Without an initialised process group this is the single-device op.
        key_padding_mask: optional bool (B, M_r), True = attend, this rank's slice.
        dropout_p: attention dropout in [0, 1). The mask is the single-device
            op's for the same seed (drawn from torch's default generator and
            taken from rank 0; see the module docstring).
        softmax_scale: defaults to Dqk ** -0.5.
        return_lse: also return the global fp32 (B, H, N) log-sum-exp (+inf for
            a query with no attended key anywhere), without gradient.
        backend: the op's backend, "auto", "triton" or "torch".

    Returns:
        The full (B, N, H, Dv) attention output in q's dtype on every rank
        (merged in fp32), or ``(out, lse)`` with ``return_lse=True``. The
        gradient of q is complete on every rank; those of k_shard and v_shard
        are exact for the local keys.

    Communication: forward, an all-reduce MAX of (B, H, N) fp32 and an
    all-reduce SUM of (B, N, H, Dv + 1) fp32; backward, an all-reduce SUM of
    dq (Bq, N, H, Dqk); with dropout, first an all-reduce SUM of world + 1
    int64 (the key counts and rank 0's seed, :func:`shard_key_range`). All are functional collectives
    (``torch.distributed._functional_collectives.all_reduce`` +
    ``wait_tensor``), the collectives torch.compile traces without graph breaks.
    """
    # The op's own checks (shapes, dtypes, mask, dropout range) on the local shard, before any collective.
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not isinstance(dropout_p, (float, int)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"sharded_cross_attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"sharded_cross_attention: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if key_padding_mask is not None and not (isinstance(key_padding_mask, Tensor) and key_padding_mask.dim() == 2):
        got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
        raise TypeError(f"sharded_cross_attention: key_padding_mask must be a bool tensor (B, M_r) = "
                        f"{tuple(k_shard.shape[:2])} (this rank's keys, True = attend), got {got}")
    with torch.no_grad():  # validation only (an empty-key call: no work)
        cross_attention(q[:, :0], k_shard[:, :0], v_shard[:, :0],
                        key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, :0],
                        softmax_scale=scale, backend=backend)
    if key_padding_mask is not None and key_padding_mask.shape != k_shard.shape[:2]:
        raise ValueError(f"sharded_cross_attention: key_padding_mask has shape {tuple(key_padding_mask.shape)}, "
                         f"expected this rank's (B, M_r) = {tuple(k_shard.shape[:2])}")
    seed, key_offset, total_keys = None, 0, 0
    if dropout_p > 0.0:  # only the dropout mask depends on the keys' global range
        key_offset, total_keys, seed = shard_key_range(k_shard.shape[1], draw_dropout_seed(float(dropout_p)), group,
                                                       q.device)
    out, lse = _ShardedCrossAttention.apply(q, k_shard, v_shard, key_padding_mask, seed, float(dropout_p), scale,
                                            backend, group, key_offset, total_keys)
    return (out, lse) if return_lse else out
