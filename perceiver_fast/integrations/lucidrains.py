"""Fused forwards for lucidrains' perceiver-pytorch and perceiver-ar-pytorch attention modules.

Registered in :data:`perceiver_fast.integrations.patching.ATTENTION_PATCHES` at import (the packages themselves
are imported only when a model is patched); use them through :func:`~perceiver_fast.integrations.patch_model` or
:func:`~perceiver_fast.integrations.patch_classes`. Each forward reproduces the package's own maths, and sends
every call it cannot express exactly to the package's forward, with the same arguments.

``perceiver_pytorch.perceiver_pytorch.Attention`` and ``perceiver_pytorch.perceiver_io.Attention``
(Perceiver's and PerceiverIO's cross- and latent self-attention, PerceiverIO's decoder):

* ``softmax(q k^T * scale)`` with the module's ``scale``; k and v are strided views of the packed ``to_kv``
  output (no copies); a bool ``mask`` (True = attend, any trailing shape flattened to the keys, as
  ``rearrange(mask, 'b ... -> b (...)')``) becomes the key padding mask;
* a sample whose keys are all masked gets the package's answer: it fills masked logits with ``-finfo.max``, so the
  softmax is uniform and the output is the mean of v over all keys (the op's zeros are replaced by that mean with a
  ``torch.where``, no host sync; with attention dropout the sample's queries are zeroed and its mask opened, which
  gives the same uniform weights with the same dropout inside the kernel);
* ``queries_contribute_kv``: keys and values are ``[x, context]`` and the mask is prefixed with ones, as the
  package does;
* queries expanded over the batch (stride 0, e.g. latents passed straight from ``repeat``) are projected once and
  passed with batch 1;
* attention dropout (``module.dropout``, an ``nn.Dropout``) while it is in training mode only.

``perceiver_ar_pytorch.CausalAttention`` (PerceiverAR's self-attention layers): causal self-attention; the queries
are pre-scaled by the package (``q * scale``), here the scale goes to the kernel (the same maths); rotary embeddings
are applied to q and k by the package's own ``apply_rotary_pos_emb`` before the call.

``perceiver_ar_pytorch.CausalPrefixAttention`` (PerceiverAR's perceiver layer): the queries are the last N
positions, the keys ``[prefix, sequence]``; the package masks key j for query i when ``j > i + (M - N)``
(``triu(j - i + 1)``), i.e. full attention to the prefix and causal over the sequence: exactly the op's
bottom-right causal mask, combined with ``context_mask`` (padded with True to all keys, as the package does) as key
padding. Its heads loop (``max_heads_process``) runs as one fused call. The training-time prefix dropout
(``cross_attn_dropout``) runs the package's own code (same random draws), then the fused call. A query can only
lose all its keys when ``context_mask`` reaches into the sequence; those rows get the package's uniform average.

Falls back (the package's forward for that call): ``inverted_attention=True`` (a softmax over the queries);
dtypes outside ``dispatch.FUSED_ATTENTION_DTYPES`` (float64) or mixed dtypes/devices (including a rotary table of
another dtype, which the package promotes), autocast, nested or empty inputs; non-bool masks or masks whose shape
the package would broadcast differently; an attention dropout that is not an ``nn.Dropout``; with attention dropout
in training, a ``context_mask`` that reaches into the sequence (query rows could lose all keys); and any call whose
arguments the package would reject (it raises its own error).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from perceiver_fast.integrations.patching import AttentionPatch, register_attention_patch
from perceiver_fast.integrations.calls import bind_call
from perceiver_fast.layers import dispatch

PERCEIVER_PYTORCH = "perceiver_pytorch.perceiver_pytorch"
PERCEIVER_PYTORCH_IO = "perceiver_pytorch.perceiver_io"
PERCEIVER_AR = "perceiver_ar_pytorch.perceiver_ar_pytorch"

# Each forward's parameters in positional order, with their defaults.
_ATTENTION_PARAMS = (("x", None), ("context", None), ("mask", None), ("inverted_attention", False))
_CAUSAL_PARAMS = (("x", None), ("rotary_pos_emb", None))
_PREFIX_PARAMS = (("x", None), ("context", None), ("context_mask", None), ("rotary_pos_emb", None))


def _dropout_p(drop) -> Optional[float]:
    """The attention dropout probability this call applies (0 outside training), or None if it is not a plain
    ``nn.Dropout`` (or identity) that the kernel can reproduce."""
    if drop is None or isinstance(drop, nn.Identity):
        return 0.0
    if type(drop) is not nn.Dropout:
        return None
    return float(drop.p) if drop.training and drop.p > 0 else 0.0


def _takes(module: nn.Module, x: Tensor, *others) -> bool:
    """Whether the fused op takes this call's tensors: a fused dtype, one dtype and device for the inputs and the
    module's parameters, no autocast, no nested or empty tensors."""
    if not isinstance(x, Tensor) or x.dtype not in dispatch.FUSED_ATTENTION_DTYPES or x.is_nested or x.numel() == 0:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    for t in others:
        if t is not None and (not isinstance(t, Tensor) or t.dtype != x.dtype or t.device != x.device or t.is_nested
                              or t.numel() == 0):
            return False
    return all(p.dtype == x.dtype and p.device == x.device for p in module.parameters())


def _head_dim(linear: nn.Module, heads: int, parts: int) -> Optional[int]:
    out = getattr(linear, "out_features", None)
    if not isinstance(heads, int) or heads < 1 or not isinstance(out, int) or out % (parts * heads):
        return None
    d = out // (parts * heads)
    return d if 1 <= d <= dispatch.fused_ops().MAX_HEAD_DIM else None


def _attend(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor], p: float, scale: float,
            causal: bool = False) -> Tensor:
    """One fused call, (B, N, H, D) layout: self-attention where it is one (SDPA's fused kernels may take it on a
    GPU), else the cross-attention op (batch-shared queries, key padding, N != M)."""
    ops = dispatch.fused_ops()
    if mask is None and q.shape[:2] == k.shape[:2] and k.shape == v.shape:
        return ops.self_attention(q, k, v, dropout_p=p, softmax_scale=scale, causal=causal)
    return ops.cross_attention(q, k, v, key_padding_mask=mask, dropout_p=p, softmax_scale=scale, causal=causal)


def _bool_mask(mask, x: Tensor) -> bool:
    return isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.device == x.device and mask.dim() >= 1


# ---------------------------------------------------------------------------------------------------------------
# perceiver-pytorch: Attention (perceiver_pytorch.py and perceiver_io.py)
# ---------------------------------------------------------------------------------------------------------------
def _perceiver_attention(mod: nn.Module, call: Dict, with_dropout: bool) -> Optional[Tensor]:
    """The fused forward of perceiver-pytorch's ``Attention``, or None to run the package's own."""
    x, context, mask = call["x"], call["context"], call["mask"]
    if call["inverted_attention"] is not False:  # softmax over the queries (slot / inverted attention)
        return None
    has_context = context is not None
    ctx = context if has_context else x
    p = _dropout_p(getattr(mod, "dropout", None)) if with_dropout else 0.0
    if p is None or not _takes(mod, x, ctx) or x.dim() != 3 or ctx.dim() != 3 or ctx.shape[0] != x.shape[0]:
        return None
    h = mod.heads
    d = _head_dim(mod.to_q, h, 1)
    if d is None or _head_dim(mod.to_kv, h, 2) != d:
        return None
    contribute = bool(getattr(mod, "queries_contribute_kv", False)) and has_context
    b, n = x.shape[0], x.shape[1]
    if mask is not None:
        if not _bool_mask(mask, x) or mask.shape[0] != b or (contribute and mask.dim() != 2):
            return None
        if mask[0].numel() != ctx.shape[1]:
            return None
    q_in = x[:1] if (b > 1 and x.stride(0) == 0) else x  # batch-shared queries: project once, Bq = 1
    q = mod.to_q(q_in).unflatten(-1, (h, d))
    kv_in = torch.cat((x, context), dim=1) if contribute else ctx
    k, v = mod.to_kv(kv_in).unflatten(-1, (2, h, d)).unbind(2)  # strided (B, M, H, D) views
    attend, dead = None, None
    if mask is not None:
        attend = mask.reshape(b, -1)
        if contribute:  # the queries are always attended keys: no row can be empty
            attend = torch.cat((attend.new_ones(b, n), attend), dim=1)
        else:
            dead = ~attend.any(-1)  # (B,) samples whose keys are all masked
            if p > 0:  # uniform weights with the kernel's dropout: zero logits over all keys
                q = torch.where(dead[:, None, None, None], q.new_zeros(()), q)
                attend = attend | dead[:, None]
                dead = None
    out = _attend(q, k, v, mask=attend, p=p, scale=mod.scale)
    if dead is not None:  # the package's -finfo.max fill: a uniform softmax, the mean of v
        out = torch.where(dead[:, None, None, None], v.mean(1, keepdim=True), out)
    return mod.to_out(out.reshape(b, n, h * d))


def _make_perceiver_attention_forward(with_dropout: bool) -> Callable[[Callable], Callable]:
    def make_forward(original: Callable) -> Callable:
        def forward(self, *args, **kwargs):
            call = bind_call(_ATTENTION_PARAMS, args, kwargs, required=1)
            out = None if call is None else _perceiver_attention(self, call, with_dropout)
            return original(self, *args, **kwargs) if out is None else out

        return forward

    return make_forward


# ---------------------------------------------------------------------------------------------------------------
# perceiver-ar-pytorch: CausalAttention and CausalPrefixAttention
# ---------------------------------------------------------------------------------------------------------------
def _rotate(rotary: Callable, pos: Tensor, t: Tensor) -> Tensor:
    """The package's ``apply_rotary_pos_emb`` on a (B, N, H, D) view: it works on (B, H, N, D)."""
    return rotary(pos, t.transpose(1, 2)).transpose(1, 2)


def _rotary_ok(pos, x: Tensor) -> bool:
    return pos is None or (isinstance(pos, Tensor) and pos.dtype == x.dtype and pos.device == x.device)


def _causal_attention(mod: nn.Module, call: Dict, rotary: Callable) -> Optional[Tensor]:
    """The fused forward of perceiver-ar-pytorch's ``CausalAttention``, or None to run the package's own."""
    x, pos = call["x"], call["rotary_pos_emb"]
    p = _dropout_p(mod.dropout)
    if p is None or not _takes(mod, x) or x.dim() != 3 or not _rotary_ok(pos, x):
        return None
    h = mod.heads
    d = _head_dim(mod.to_qkv, h, 3)
    if d is None:
        return None
    b, n = x.shape[0], x.shape[1]
    q, k, v = mod.to_qkv(mod.norm(x)).unflatten(-1, (3, h, d)).unbind(2)  # strided (B, N, H, D) views
    if pos is not None:
        q, k = _rotate(rotary, pos, q), _rotate(rotary, pos, k)
    out = _attend(q, k, v, mask=None, p=p, scale=mod.scale, causal=True)  # the package pre-scales q: same maths
    return mod.to_out(out.reshape(b, n, h * d))


def _causal_prefix_attention(mod: nn.Module, call: Dict, rotary: Callable) -> Optional[Tensor]:
    """The fused forward of perceiver-ar-pytorch's ``CausalPrefixAttention``, or None to run the package's own."""
    x, context, context_mask, pos = call["x"], call["context"], call["context_mask"], call["rotary_pos_emb"]
    p = _dropout_p(mod.dropout)
    if (p is None or not _takes(mod, x, context) or x.dim() != 3 or context.dim() != 3
            or context.shape[0] != x.shape[0] or not _rotary_ok(pos, x)):
        return None
    h = mod.heads
    d = _head_dim(mod.to_q, h, 1)
    if d is None or _head_dim(mod.to_kv, h, 2) != d:
        return None
    b, n, context_len = x.shape[0], x.shape[1], context.shape[-2]
    drop_prefix = mod.training and mod.cross_attn_dropout > 0.0
    if drop_prefix and (pos is None or pos.dim() != 2):
        return None  # the package's own code path (it needs a (seq, dim) rotary table there)
    prefix_len = context_len - int(context_len * mod.cross_attn_dropout) if drop_prefix else context_len
    m = prefix_len + n
    if context_mask is not None:
        if (not _bool_mask(context_mask, x) or context_mask.dim() != 2 or context_mask.shape[0] not in (1, b)
                or context_mask.shape[-1] > m or (drop_prefix and tuple(context_mask.shape) != (b, context_len))):
            return None
        if p > 0 and context_mask.shape[-1] > prefix_len:
            return None  # the mask reaches into the sequence: a query may lose every key, under dropout
    k_pos = pos
    if drop_prefix:  # the package's prefix dropout, same operations in the same order (same random draws)
        rand = torch.zeros((b, context_len), device=x.device).uniform_()
        keep_indices = rand.topk(prefix_len, dim=-1).indices
        keep_mask = torch.zeros_like(rand).scatter_(1, keep_indices, 1).bool()
        context = context[keep_mask].reshape(b, prefix_len, context.shape[-1])
        if context_mask is not None:
            context_mask = context_mask[keep_mask].reshape(b, prefix_len)
        k_pos = pos.expand(b, *pos.shape)
        k_pos_context = k_pos[:, :context_len][keep_mask].reshape(b, prefix_len, pos.shape[-1])
        k_pos = torch.cat((k_pos_context, k_pos[:, context_len:]), dim=1)[:, None]  # (B, 1, M, rot)
    xn, cn = mod.norm(x), mod.context_norm(context)
    q = mod.to_q(xn).unflatten(-1, (h, d))
    # to_kv of [prefix, sequence] at once: the package's two to_kv calls and two cats, row for row
    k, v = mod.to_kv(torch.cat((cn, xn), dim=1)).unflatten(-1, (2, h, d)).unbind(2)  # (B, M, H, D) views
    if pos is not None:
        q, k = _rotate(rotary, pos, q), _rotate(rotary, k_pos, k)
    attend, dead = None, None
    if context_mask is not None:
        mask_len = context_mask.shape[-1]
        attend = context_mask.expand(b, mask_len).contiguous()  # (1, L) broadcasts over the batch
        if mask_len < m:  # the package pads the mask with True up to every key
            attend = torch.cat((attend, attend.new_ones(b, m - mask_len)), dim=1)
        if mask_len > prefix_len:  # query i sees keys j <= i + prefix_len: it may have none left
            dead = attend.cumsum(-1)[:, prefix_len:] == 0  # (B, N)
    out = _attend(q, k, v, mask=attend, p=p, scale=mod.scale, causal=True)
    if dead is not None:  # every logit -finfo.max in the package: the uniform average of all values
        out = torch.where(dead[:, :, None, None], v.mean(1, keepdim=True), out)
    return mod.to_out(out.reshape(b, n, h * d))


def _make_ar_forward(fused: Callable, params: Tuple[Tuple[str, object], ...],
                     required: int) -> Callable[[Callable], Callable]:
    def make_forward(original: Callable) -> Callable:
        rotary = importlib.import_module(PERCEIVER_AR).apply_rotary_pos_emb  # the package is installed by now

        def forward(self, *args, **kwargs):
            call = bind_call(params, args, kwargs, required=required)
            out = None if call is None else fused(self, call, rotary)
            return original(self, *args, **kwargs) if out is None else out

        return forward

    return make_forward


def _missing(*attrs: str) -> Callable[[nn.Module], Optional[str]]:
    def why_not(module: nn.Module) -> Optional[str]:
        absent = [a for a in attrs if not hasattr(module, a)]
        return f"lacks the package's attributes {absent}" if absent else None

    return why_not


PERCEIVER_PYTORCH_ATTENTION: AttentionPatch = register_attention_patch(AttentionPatch(
    kind="perceiver-pytorch Attention", module=PERCEIVER_PYTORCH, qualname="Attention",
    make_forward=_make_perceiver_attention_forward(with_dropout=True),
    why_not=_missing("heads", "scale", "to_q", "to_kv", "to_out", "dropout")))
"""perceiver_pytorch's Attention (Perceiver, and PerceiverIO's encoder and latent blocks)."""

PERCEIVER_IO_ATTENTION: AttentionPatch = register_attention_patch(AttentionPatch(
    kind="perceiver-pytorch perceiver_io Attention", module=PERCEIVER_PYTORCH_IO, qualname="Attention",
    make_forward=_make_perceiver_attention_forward(with_dropout=False),
    why_not=_missing("heads", "scale", "to_q", "to_kv", "to_out")))
"""perceiver_pytorch.perceiver_io's Attention (PerceiverIO's decoder cross-attention)."""

PERCEIVER_AR_CAUSAL_ATTENTION: AttentionPatch = register_attention_patch(AttentionPatch(
    kind="perceiver-ar-pytorch CausalAttention", module=PERCEIVER_AR, qualname="CausalAttention",
    make_forward=_make_ar_forward(_causal_attention, _CAUSAL_PARAMS, required=1),
    why_not=_missing("heads", "scale", "norm", "to_qkv", "to_out", "dropout")))
"""perceiver_ar_pytorch's CausalAttention (PerceiverAR's self-attention layers)."""

PERCEIVER_AR_PREFIX_ATTENTION: AttentionPatch = register_attention_patch(AttentionPatch(
    kind="perceiver-ar-pytorch CausalPrefixAttention", module=PERCEIVER_AR, qualname="CausalPrefixAttention",
    make_forward=_make_ar_forward(_causal_prefix_attention, _PREFIX_PARAMS, required=2),
    why_not=_missing("heads", "scale", "norm", "context_norm", "to_q", "to_kv", "to_out", "dropout",
                     "cross_attn_dropout")))
"""perceiver_ar_pytorch's CausalPrefixAttention (PerceiverAR's perceiver layer)."""

__all__ = ["PERCEIVER_PYTORCH_ATTENTION", "PERCEIVER_IO_ATTENTION", "PERCEIVER_AR_CAUSAL_ATTENTION",
           "PERCEIVER_AR_PREFIX_ATTENTION"]
