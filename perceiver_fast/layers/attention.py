"""Attention layers on the fused ops.

* :class:`CrossAttention` - HF ``PerceiverAttention`` semantics (LayerNorm on q
  and kv, q/k/v linears with bias, heads, output projection, query residual),
  with **projection folding** (see below).
* :class:`CrossAttentionLayer` - :class:`CrossAttention` + LayerNorm + MLP
  (HF ``PerceiverLayer`` with ``is_cross_attention=True``).
* :class:`SelfAttentionBlock` - pre-LN transformer block with a packed qkv
  projection (HF ``PerceiverLayer`` self-attention, ViT block).
* :class:`MLP` - Linear, exact GELU, Linear.

Projection folding
------------------
For a head h with query projection Q_h (N, dh), key weights W_k,h (dh, Din),
bias b_k,h, value weights W_v,h (dv, Din) and bias b_v,h, over the normalised
inputs X = LN(x) (M, Din)::

    S_h = Q_h (X W_k,h^T + 1 b_k,h^T)^T = (Q_h W_k,h) X^T + (Q_h b_k,h) 1^T
    O_h = P_h (X W_v,h^T + 1 b_v,h^T)   = (P_h X) W_v,h^T + b_v,h

The bias term of S_h is constant along each row, so softmax drops it exactly;
the rows of P_h sum to 1, so b_v,h passes through (a query whose keys are all
masked gets zeros from the attention, so there b_v,h is dropped too). The folded path therefore
runs ONE attention call over keys = values = X with queries q' = Q_h W_k,h
(head dim Din, softmax scale still 1/sqrt(dh)). All heads share the same keys,
so the H folded queries are stacked along the query axis: q'' (Bq, H*N, 1, Din).
It never projects the M inputs to K and V, which for HF's learned Perceiver IO
costs as much as the attention itself.

``fold="auto"`` (default) picks the path with fewer FLOPs
(:func:`folding_flops`, and Din within the kernel's head-dim limit);
``fold=True``/``False`` forces it. With attention dropout the dropped rows of
P no longer sum to 1, so the folded path then appends an all-ones channel to
the keys/values (a zero one to the queries): the attention returns each row's
sum alongside, and b_v is scaled by it - still exact.

Inputs sharded across ranks
---------------------------
``CrossAttention(..., input_group=group)`` takes ``kv`` (and the key padding
mask) as this rank's contiguous slice of the M inputs and attends with
:func:`perceiver_fast.distributed.sharded_cross_attention`: the LayerNorm of the
inputs, the K/V projection (or the folded attention over LN(x)) run on the local
shard only; the queries, the output projection and the MLP are replicated. The
parameters applied to the local shard (norm_kv, and to_k / to_v unfolded) get
their gradient summed over the group (:func:`perceiver_fast.distributed.all_reduce_grad`),
so every rank ends the backward with the same, complete gradients. With
``fold="auto"`` the choice is made from the per-key cost (independent of M), so
that every rank takes the same path whatever the size of its shard.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from perceiver_fast import distributed
from perceiver_fast.layers import dispatch
from perceiver_fast.layers.checks import check_float, check_int

FoldMode = Union[str, bool]


def check_fold(fold: FoldMode) -> FoldMode:
    if fold not in ("auto", True, False):
        raise ValueError(f"fold must be 'auto', True or False, got {fold!r}")
    return fold


def folding_flops(n: int, m: int, din: int, qk_channels: int, v_channels: int, heads: int) -> tuple:
    """(unfolded, folded) forward FLOPs of the K/V-side of a cross-attention, per batch element.

    unfolded: project M inputs to K and V, then attend with Dqk / Dv channels;
    folded: fold the queries through W_k, attend over Din channels per head,
    then apply W_v per head. The query projection and the output projection are
    common to both and left out.
    """
    unfolded = 2 * m * din * (qk_channels + v_channels) + 2 * n * m * (qk_channels + v_channels)
    folded = 2 * n * qk_channels * din + 4 * n * m * heads * din + 2 * n * din * v_channels
    return unfolded, folded


# The fused cross-attention takes head dims up to 4096; the folded path attends over Din (+1 with dropout).
MAX_FOLDED_DIN = 4095


def choose_folding(fold: FoldMode, n: int, m: Optional[int], din: int, qk_channels: int, v_channels: int,
                   heads: int) -> bool:
    """Resolve ``fold`` ("auto" | True | False) to the path taken: folded when it needs fewer FLOPs.

    ``m=None`` (inputs sharded across ranks, whose shard sizes differ) compares the per-key cost only,
    the limit for large M, so that every rank decides alike.
    """
    if fold is True or fold is False:
        return fold
    if din > MAX_FOLDED_DIN:
        return False
    if m is None:
        unfolded, folded = folding_flops(n, 1, din, qk_channels, v_channels, heads)
        fixed_unfolded, fixed_folded = folding_flops(n, 0, din, qk_channels, v_channels, heads)
        return folded - fixed_folded < unfolded - fixed_unfolded
    unfolded, folded = folding_flops(n, m, din, qk_channels, v_channels, heads)
    return folded < unfolded


def _with_ones_column(x: torch.Tensor) -> torch.Tensor:
    """[x | 1] (..., D+1), as a view with 16-byte aligned rows on CUDA (the padding is ones too).

    The copy is made anyway, so its rows are padded for free: the attention op then needs no repack.
    """
    d = x.shape[-1]
    width = d + 1
    if x.is_cuda and 16 % x.element_size() == 0:
        per = 16 // x.element_size()
        width = -(-width // per) * per
    return F.pad(x, (0, width - d), value=1.0)[..., :d + 1]


def _attend_keys(q, k, v, *, attention, key_padding_mask, dropout_p, scale, input_group):
    """(out, global lse or None): the dispatched op on one device, the sharded one with an input group."""
    if input_group is None:
        return dispatch.cross_attention(q, k, v, attention=attention, key_padding_mask=key_padding_mask,
                                        dropout_p=dropout_p, softmax_scale=scale), None
    return distributed.sharded_cross_attention(q, k, v, group=input_group, key_padding_mask=key_padding_mask,
                                               dropout_p=dropout_p, softmax_scale=scale, return_lse=True)


def cross_attend(qh: torch.Tensor, x: torch.Tensor, to_k: nn.Linear, to_v: nn.Linear, *, attention: str,
                 key_padding_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                 fold: bool = False, input_group=None) -> torch.Tensor:
    """Multi-head cross-attention from projected queries over normalised inputs.

    qh: (Bq, N, H, dh) projected queries, Bq in {1, B}; x: (B, M, Din) the
    normalised inputs; to_k / to_v: the key and value Linears (Din -> H*dh,
    Din -> H*dv). Returns (B, N, H*dv). ``fold=True`` takes the folded path
    (keys = values = x, see the module docstring), else the usual one.
    ``input_group``: x and the mask are this rank's shard of the inputs, the
    attention is :func:`perceiver_fast.distributed.sharded_cross_attention` over
    the group (``attention`` must then be "fused").
    """
    bq, n, h, dh = qh.shape
    b, m, din = x.shape
    dv = to_v.out_features // h
    scale = 1.0 / math.sqrt(dh)
    if not fold:
        if input_group is None:
            k, v = to_k(x), to_v(x)
        else:  # replicated weights on the local shard: their gradients are summed over the group
            g = lambda t: None if t is None else distributed.all_reduce_grad(t, input_group)  # noqa: E731
            k = F.linear(x, g(to_k.weight), g(to_k.bias))
            v = F.linear(x, g(to_v.weight), g(to_v.bias))
        o, _ = _attend_keys(qh, k.view(b, m, h, dh), v.view(b, m, h, dv), attention=attention,
                            key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale,
                            input_group=input_group)
        return o.reshape(b, n, h * dv)
    # q' = Q_h W_k,h : (Bq, H, N, Din); heads stacked along the query axis, one shared kv "head".
    qf = torch.einsum("bnhd,hde->bhne", qh, to_k.weight.view(h, dh, din)).reshape(bq, h * n, 1, din)
    x = x.to(qf.dtype)  # LN runs in fp32 under autocast
    row_sums = dropout_p > 0 and to_v.bias is not None
    if row_sums:
        # Dropped rows of P no longer sum to 1, so b_v must be scaled by each row's sum: carry it in an
        # extra all-ones key/value channel (zero in the queries, so the scores are unchanged).
        qf = F.pad(qf, (0, 1))
        xk = _with_ones_column(x)
    else:
        xk = x  # unaligned rows (Din 261) are repacked once by the op, for k and v together
    xk = xk.unsqueeze(2)  # (B, M, 1, Din[+1]): keys = values = LN(x)
    o, lse = _attend_keys(qf, xk, xk, attention=attention, key_padding_mask=key_padding_mask,
                          dropout_p=dropout_p, scale=scale, input_group=input_group)
    o = o.view(b, h, n, xk.shape[-1])
    out = torch.einsum("bhne,hve->bnhv", o[..., :din], to_v.weight.view(h, dv, din))  # (B, N, H, dv)
    if row_sums:
        out = out + o[..., din].transpose(1, 2).unsqueeze(-1) * to_v.bias.view(h, dv)
    elif to_v.bias is not None:
        b_v = to_v.bias.view(h, dv)
        if lse is not None:
            # Sharded: whether a query has a key anywhere is what the global lse says (+inf: none).
            has_key = torch.isfinite(lse).view(b, h, n).transpose(1, 2).unsqueeze(-1)  # (B, N, H, 1)
            b_v = b_v * has_key.to(b_v.dtype)
        elif key_padding_mask is not None:
            # A query whose keys are all masked gets zeros from the attention (its row of P sums to 0,
            # not 1), so b_v must not pass through there either.
            b_v = b_v * key_padding_mask.any(1).to(b_v.dtype)[:, None, None, None]
        out = out + b_v
    out = out.reshape(b, n, h * dv)
    if to_k.bias is not None:
        # b_k cancels in the softmax, so its gradient is exactly 0. Keep it in the graph anyway, so it
        # gets a (zero) gradient: DDP without find_unused_parameters needs every parameter used.
        out = out + to_k.bias.sum() * 0.0
    return out


def mlp_width(name: str, ratio: float, dim: int) -> int:
    """int(ratio * dim), the MLP's hidden width; ValueError naming ``name`` unless it is >= 1."""
    width = int(check_float(name, ratio, 0.0) * dim)
    if width < 1:
        raise ValueError(f"{name} {ratio} gives an MLP of width int({ratio} * {dim}) = {width}; it must be >= 1")
    return width


class MLP(nn.Module):
    """Linear(dim, hidden) -> exact GELU -> dropout -> Linear(hidden, out_dim) -> dropout."""

    def __init__(self, dim: int, hidden_dim: Optional[int] = None, out_dim: Optional[int] = None,
                 dropout: float = 0.0):
        super().__init__()
        hidden_dim = dim if hidden_dim is None else int(hidden_dim)
        out_dim = dim if out_dim is None else int(out_dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class CrossAttention(nn.Module):
    """Multi-head cross-attention with HF ``PerceiverAttention`` semantics.

    Args:
        q_dim: channels of the queries (the latents).
        kv_dim: channels of the inputs.
        heads: number of heads (must divide qk_channels and v_channels).
        qk_channels: q/k projection width; default ``kv_dim`` (HF's ``'kv'``
            shape; pass ``q_dim`` for HF's ``'q'`` shape).
        v_channels: value width; default ``qk_channels``.
        out_dim: output projection width; default ``q_dim``.
        use_query_residual: add the (un-normalised) queries to the output.
        dropout: attention-probability dropout.
        layer_norm_eps: eps of both LayerNorms (HF uses torch's 1e-5).
        attention: ``"fused"`` or ``"eager"``.
        fold: ``"auto"``, True or False (see the module docstring).
        input_group: a torch.distributed process group the inputs are sharded
            over (see "Inputs sharded across ranks" in the module docstring);
            None (default): all inputs on this rank. Needs ``attention="fused"``.

    ``forward(q, kv, key_padding_mask=None)``: q (Bq, N, q_dim) with Bq in {1, B}
    (batch-shared latents are NOT expanded), kv (B, M, kv_dim),
    key_padding_mask bool (B, M), True = attend. Returns (B, N, out_dim).
    With ``input_group``, kv and the mask are this rank's slice (B, M_r, ...)
    and the output is the full one, the same on every rank.
    """

    def __init__(self, q_dim: int, kv_dim: int, *, heads: int = 1, qk_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, out_dim: Optional[int] = None, use_query_residual: bool = True,
                 dropout: float = 0.0, layer_norm_eps: float = 1e-5, attention: str = "fused",
                 fold: FoldMode = "auto", input_group=None):
        super().__init__()
        check_int("q_dim", q_dim)
        check_int("kv_dim", kv_dim)
        heads = check_int("heads", heads)
        qk_channels = kv_dim if qk_channels is None else check_int("qk_channels", qk_channels)
        v_channels = qk_channels if v_channels is None else check_int("v_channels", v_channels)
        out_dim = q_dim if out_dim is None else check_int("out_dim", out_dim)
        check_float("dropout", dropout, 0.0, 1.0, include_maximum=False)
        if qk_channels % heads != 0:
            raise ValueError(f"qk_channels ({qk_channels}) must be divisible by heads ({heads})")
        if v_channels % heads != 0:
            raise ValueError(f"v_channels ({v_channels}) must be divisible by heads ({heads})")
        if use_query_residual and out_dim != q_dim:
            raise ValueError(f"use_query_residual needs out_dim ({out_dim}) == q_dim ({q_dim})")
        self.q_dim, self.kv_dim, self.heads = int(q_dim), int(kv_dim), int(heads)
        self.qk_channels, self.v_channels, self.out_dim = qk_channels, v_channels, out_dim
        self.use_query_residual = use_query_residual
        self.dropout = float(dropout)
        self.attention = dispatch.check_attention(attention)
        self.fold = check_fold(fold)
        if input_group is not None and self.attention != "fused":
            raise ValueError(f"input_group (inputs sharded across ranks) needs attention='fused', got "
                             f"{self.attention!r}")
        self.input_group = input_group
        self.norm_q = nn.LayerNorm(q_dim, eps=layer_norm_eps)
        self.norm_kv = nn.LayerNorm(kv_dim, eps=layer_norm_eps)
        self.to_q = nn.Linear(q_dim, qk_channels)
        self.to_k = nn.Linear(kv_dim, qk_channels)
        self.to_v = nn.Linear(kv_dim, v_channels)
        self.to_out = nn.Linear(v_channels, out_dim)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, attention={self.attention!r}, fold={self.fold!r}"

    def use_folding(self, n: int, m: int) -> bool:
        """Whether forward takes the folded path for N queries over M inputs."""
        return choose_folding(self.fold, n, None if self.input_group is not None else m, self.kv_dim,
                              self.qk_channels, self.v_channels, self.heads)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None):
        if q.dim() != 3 or kv.dim() != 3:
            raise ValueError(f"expected q (B, N, C) and kv (B, M, C), got {tuple(q.shape)} and {tuple(kv.shape)}")
        if q.shape[-1] != self.q_dim or kv.shape[-1] != self.kv_dim:
            raise ValueError(f"expected q channels {self.q_dim} and kv channels {self.kv_dim}, "
                             f"got {q.shape[-1]} and {kv.shape[-1]}")
        if q.shape[0] not in (1, kv.shape[0]):
            raise ValueError(f"q batch {q.shape[0]} must be 1 or the kv batch {kv.shape[0]}")
        out = self._attend(q, kv, key_padding_mask)
        out = self.to_out(out)
        if self.use_query_residual:
            out = out + q
        return out

    def _attend(self, q, kv, key_padding_mask):
        """(B, N, v_channels) attention output before the output projection."""
        bq, n, _ = q.shape
        qh = self.to_q(self.norm_q(q)).view(bq, n, self.heads, self.qk_channels // self.heads)
        group = self.input_group
        if group is None:
            x = self.norm_kv(kv)
        else:  # the LayerNorm runs on the local shard: its gradient is summed over the group
            norm = self.norm_kv
            g = lambda t: None if t is None else distributed.all_reduce_grad(t, group)  # noqa: E731
            x = F.layer_norm(kv, norm.normalized_shape, g(norm.weight), g(norm.bias), norm.eps)
        return cross_attend(qh, x, self.to_k, self.to_v, attention=self.attention,
                            key_padding_mask=key_padding_mask, dropout_p=self.dropout if self.training else 0.0,
                            fold=self.use_folding(n, kv.shape[1]), input_group=group)


class CrossAttentionLayer(nn.Module):
    """HF ``PerceiverLayer(is_cross_attention=True)``: cross-attention, then x + MLP(LN(x)).

    Takes the :class:`CrossAttention` arguments (``input_group`` included: kv
    is then this rank's input shard) plus ``widening_factor`` (MLP hidden =
    widening_factor * out_dim) and ``mlp_dropout``.
    """

    def __init__(self, q_dim: int, kv_dim: int, *, heads: int = 1, qk_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, widening_factor: int = 1, use_query_residual: bool = True,
                 dropout: float = 0.0, mlp_dropout: float = 0.0, layer_norm_eps: float = 1e-5,
                 attention: str = "fused", fold: FoldMode = "auto", input_group=None):
        super().__init__()
        self.attn = CrossAttention(q_dim, kv_dim, heads=heads, qk_channels=qk_channels, v_channels=v_channels,
                                   use_query_residual=use_query_residual, dropout=dropout,
                                   layer_norm_eps=layer_norm_eps, attention=attention, fold=fold,
                                   input_group=input_group)
        self.norm_mlp = nn.LayerNorm(q_dim, eps=layer_norm_eps)
        self.mlp = MLP(q_dim, mlp_width("widening_factor", widening_factor, q_dim), dropout=mlp_dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None):
        x = self.attn(q, kv, key_padding_mask)
        return x + self.mlp(self.norm_mlp(x))


class SelfAttentionBlock(nn.Module):
    """Pre-LN transformer block with a packed qkv projection.

    x = x + proj(attn(LN(x))); x = x + MLP(LN(x)). The qkv projection output
    (B, N, 3, H, D) is passed to ``self_attention`` as three strided views
    (no copies).

    Args:
        dim: channels.
        heads: number of heads (must divide ``heads * dim_head``).
        dim_head: per-head width; default ``dim // heads`` (must divide then).
        mlp_ratio: MLP hidden = int(mlp_ratio * dim) (HF's widening_factor).
        qkv_bias: bias on the qkv projection.
        dropout: attention-probability dropout; mlp_dropout: MLP/proj dropout.
        layer_norm_eps, attention: as :class:`CrossAttention`.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: Optional[int] = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, dropout: float = 0.0, mlp_dropout: float = 0.0,
                 layer_norm_eps: float = 1e-5, attention: str = "fused"):
        super().__init__()
        check_int("dim", dim)
        heads = check_int("heads", heads)
        if dim_head is not None:
            check_int("dim_head", dim_head)
        check_float("dropout", dropout, 0.0, 1.0, include_maximum=False)
        check_float("mlp_dropout", mlp_dropout, 0.0, 1.0, include_maximum=False)
        if dim_head is None:
            if dim % heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or pass dim_head")
            dim_head = dim // heads
        self.dim, self.heads, self.dim_head = int(dim), int(heads), int(dim_head)
        self.dropout = float(dropout)
        self.attention = dispatch.check_attention(attention)
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(mlp_dropout) if mlp_dropout > 0 else nn.Identity()
        self.norm_mlp = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = MLP(dim, mlp_width("mlp_ratio", mlp_ratio, dim), dropout=mlp_dropout)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}, attention={self.attention!r}"

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """proj(attention(LN(x))) without the residual."""
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, 3, self.heads, self.dim_head)
        q, k, v = qkv.unbind(2)  # strided views, no copy
        p = self.dropout if self.training else 0.0
        o = dispatch.self_attention(q, k, v, attention=self.attention, dropout_p=p,
                                     softmax_scale=1.0 / math.sqrt(self.dim_head))
        return self.proj_drop(self.proj(o.reshape(b, n, self.heads * self.dim_head)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected (B, N, {self.dim}), got {tuple(x.shape)}")
        x = x + self.attend(x)
        return x + self.mlp(self.norm_mlp(x))
