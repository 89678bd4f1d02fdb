"""perceiver_fast as a transformers 5 attention implementation.

``register_hf_attention(name="perceiver_fast")`` registers :func:`hf_attention_forward` with transformers'
``AttentionInterface`` and :func:`hf_attention_mask` with its ``AttentionMaskInterface``. Afterwards
``from_pretrained(..., attn_implementation=name)``, ``_from_config(config, attn_implementation=name)`` and
``model.set_attn_implementation(name)`` run :func:`perceiver_fast.cross_attention` in every model that routes
its attention through the interface. transformers' Perceiver does not use the interface: loaded with the name it
runs its own (exact) code and warns once; :func:`perceiver_fast.integrations.patch_hf_perceiver` fuses it.

The contract: **exact, always.** Every call either runs the fused op with identical semantics or the path the
model itself takes without us (sdpa where the model supports it, its own eager function where it does not), with
the arguments and the mask in the form that path expects.

* The mask function returns exactly the mask of the model's own path (sdpa's bool mask or eager's additive one),
  so code outside the attention function (pooling heads that reshape the mask, models that add it to scores)
  sees nothing new. Beside it, it records what the mask means when it is a pattern the op expresses
  (bidirectional or bottom-right causal, with or without a 2-D key padding mask) in a side table keyed by the
  mask tensor's identity (:class:`MaskPattern`); reading it costs no host sync.
* The attention function fuses a call when its mask is such a recorded tensor (or None), and nothing else in the
  call changes the maths: no position bias, sliding window, packed sequences, sinks, ``output_attentions``,
  head mask, and a dtype/head dim the op takes. Grouped-query heads, causal masks (also while decoding with a
  cache), key padding, soft-capping, dropout and batch-shared queries fuse.
* On the eager path a query row with no visible key is a uniform average over all keys (softmax of equal
  ``finfo.min`` scores); the op gives zeros, so those rows are replaced by the mean of V (no host sync).
  sdpa gives zeros, as the op does.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from perceiver_fast.layers import dispatch

DEFAULT_NAME = "perceiver_fast"
# Substrings that make transformers treat an implementation name as its own (hub kernels, sdpa, flash, flex)
_RESERVED = ("/", "sdpa", "flash_attention", "flex_attention", "paged|", "eager")
# Keyword arguments that change the maths when set (anything but None / False). Compared with `is`, never
# `in`, since some are tensors (position_bias).
MATH_KWARGS = ("s_aux", "sinks", "position_bias", "sliding_window", "cu_seq_lens_q", "cu_seq_lens_k",
               "max_length_q", "max_length_k", "output_attentions", "head_mask", "layer_head_mask", "attn_bias",
               "alibi", "attention_bias")
# The module attributes a standard eager attention function reads; one reading anything else (sinks, biases)
# does something the op may not, so its calls are not fused.
_STANDARD_EAGER_ATTRIBUTES = {"head_dim", "num_key_value_groups", "training", "scaling", "config", "is_causal",
                              "attention_dropout", "dropout"}


def _transformers():
    try:
        from transformers import masking_utils, modeling_utils
        from transformers.integrations import sdpa_attention
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("register_hf_attention needs transformers >= 5 installed") from exc
    return masking_utils, modeling_utils, sdpa_attention


# ---------------------------------------------------------------------------
# The model's own path: sdpa or eager
# ---------------------------------------------------------------------------
def _subclasses(cls) -> list:
    seen, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return seen


_CONFIG_PATHS: Dict[type, str] = {}


def _path_of_config_class(config_cls: type) -> str:
    if config_cls in _CONFIG_PATHS:
        return _CONFIG_PATHS[config_cls]
    _, modeling_utils, _ = _transformers()

    def models():
        return [c for c in _subclasses(modeling_utils.PreTrainedModel) if getattr(c, "config_class", None) is config_cls]

    found = models()
    if not found and ".configuration_" in config_cls.__module__:
        try:  # the model classes of a config live beside it (configuration_x -> modeling_x)
            importlib.import_module(config_cls.__module__.replace(".configuration_", ".modeling_"))
        except ImportError:
            pass
        found = models()
    path = "eager" if found and not all(c._supports_sdpa for c in found) else "sdpa"
    if found:  # a config whose models are not imported yet is asked again later
        _CONFIG_PATHS[config_cls] = path
    return path


@functools.lru_cache(maxsize=None)
def _path_of_module_class(module_cls: type) -> str:
    _, modeling_utils, _ = _transformers()
    home = sys.modules.get(module_cls.__module__)
    models = [c for c in vars(home).values() if isinstance(c, type) and issubclass(c, modeling_utils.PreTrainedModel)
              and c.__module__ == module_cls.__module__] if home is not None else []
    return "eager" if models and not all(c._supports_sdpa for c in models) else "sdpa"


def model_attention_path(config_or_module: Any) -> str:
    """"sdpa" or "eager": the attention transformers would run for this config or attention module without us
    (sdpa where every model class of the config supports it, as ``attn_implementation=None`` picks)."""
    _, modeling_utils, _ = _transformers()
    config = config_or_module
    if isinstance(config_or_module, torch.nn.Module):
        config = getattr(config_or_module, "config", None)
        if not isinstance(config, modeling_utils.PreTrainedConfig):
            return _path_of_module_class(type(config_or_module))
    return _path_of_config_class(type(config))


@functools.lru_cache(maxsize=None)
def _standard_eager(fn: Callable) -> bool:
    """Whether a model's eager attention function is the standard recipe (matmul, scale, optional softcap, mask,
    softmax, dropout, matmul) that the op reproduces, judged from the module attributes it reads."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    used = set(re.findall(r"\bmodule\.(\w+)", source))
    return used <= _STANDARD_EAGER_ATTRIBUTES and "softmax" in source


def _eager_function(module: torch.nn.Module) -> Optional[Callable]:
    home = sys.modules.get(type(module).__module__)
    return getattr(home, "eager_attention_forward", None) if home is not None else None


def _run_own_path(path: str, module, query, key, value, attention_mask, args, kwargs):
    if path == "eager":
        eager = _eager_function(module)
        if eager is not None:
            return eager(module, query, key, value, attention_mask, *args, **kwargs)
    _, _, sdpa_attention = _transformers()
    return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


# ---------------------------------------------------------------------------
# Mask function: the model's own mask, plus what it means
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskPattern:
    """What a mask built by :func:`hf_attention_mask` means, when the op can express it.

    ``key_padding``: bool (B, keys) True = attend, or None. ``causal``: query i sees key j <= i + keys - N.
    ``keys``: how many leading keys the pattern uses (a causal mask over a longer, static cache ignores the rest).
    ``q_length``/``kv_length``: the mask's shape.
    """
    key_padding: Optional[torch.Tensor]
    causal: bool
    keys: int
    q_length: int
    kv_length: int


# id(mask) -> (weak reference, the path it was built for, its pattern or None, the version counters of the mask
# and of its key padding), for every mask built here. Not used while torch.compile traces (ids of traced tensors
# are not the run's): masks then run the model's own path, which the compiler traces.
_MASKS: Dict[int, Tuple["weakref.ref", str, Optional[MaskPattern], Tuple[int, int]]] = {}


def _versions(mask: torch.Tensor, pattern: Optional[MaskPattern]) -> Tuple[int, int]:
    kp = pattern.key_padding if pattern is not None else None
    return mask._version, (kp._version if kp is not None else -1)


def _remember(mask: torch.Tensor, path: str, pattern: Optional[MaskPattern]) -> None:
    key = id(mask)
    _MASKS[key] = (weakref.ref(mask, lambda _, key=key: _MASKS.pop(key, None)), path, pattern,
                   _versions(mask, pattern))


def _entry(mask: Optional[torch.Tensor]):
    if mask is None or torch.compiler.is_compiling():
        return None
    entry = _MASKS.get(id(mask))
    if entry is None or entry[0]() is not mask:
        return None
    if entry[3] != _versions(mask, entry[2]):  # edited in place since it was built: its pattern may be stale
        return None
    return entry


def mask_pattern(mask: Optional[torch.Tensor]) -> Optional[MaskPattern]:
    """The :class:`MaskPattern` recorded for this exact mask tensor by :func:`hf_attention_mask`, else None."""
    entry = _entry(mask)
    return entry[2] if entry is not None else None


def mask_path(mask: Optional[torch.Tensor]) -> Optional[str]:
    """The path ("sdpa" or "eager") this exact mask tensor was built for by :func:`hf_attention_mask`, else None:
    a fallback must hand it to that path, whatever the attention module says (an in-place edit keeps its form)."""
    if mask is None or torch.compiler.is_compiling():
        return None
    entry = _MASKS.get(id(mask))
    return entry[1] if entry is not None and entry[0]() is mask else None


def _pattern(masking_utils, q_length: int, kv_length: int, q_offset, kv_offset, mask_function,
             attention_mask: Optional[torch.Tensor]) -> Optional[MaskPattern]:
    if mask_function is masking_utils.bidirectional_mask_function:
        causal = False
    elif mask_function is masking_utils.causal_mask_function:
        causal = True
    else:
        return None  # sliding window, chunked, packed sequences, or/and overlays: not the op's
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
        return None  # a static cache's tensor offset: reading it would sync
    keys = kv_length
    if causal:
        # kv_offset + j <= q_offset + i  <=>  j <= i + (keys - q_length) with keys = q_length + q_offset - kv_offset
        keys = q_length + q_offset - kv_offset
        if not 0 < keys <= kv_length:
            return None
    key_padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
            return None
        padded = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        key_padding = padded[:, kv_offset:kv_offset + keys]
    return MaskPattern(key_padding, causal, keys, q_length, kv_length)


def hf_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                      mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None,
                      **kwargs):
    """transformers mask function: exactly the mask the model's own path builds (sdpa's bool mask or None, or
    eager's additive mask), recording its :class:`MaskPattern` when the op can express it."""
    masking_utils, _, _ = _transformers()
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function  # sdpa_mask's own default
    config = kwargs.get("config")
    if getattr(config, "model_type", None) == "perceiver":
        _warn_perceiver()
    path = model_attention_path(config) if config is not None else "sdpa"
    build = masking_utils.eager_mask if path == "eager" else masking_utils.sdpa_mask
    mask = build(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                 kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    if isinstance(mask, torch.Tensor) and not torch.compiler.is_compiling():
        _remember(mask, path, _pattern(masking_utils, q_length, kv_length, q_offset, kv_offset, mask_function,
                                       attention_mask))
    return mask


@functools.lru_cache(maxsize=None)
def _warn_perceiver() -> None:
    warnings.warn(
        "transformers' Perceiver does not route its attention through AttentionInterface, so "
        "attn_implementation='perceiver_fast' leaves it on its own (exact) eager code. Fuse it with "
        "perceiver_fast.integrations.patch_hf_perceiver(model), or register_hf_perceiver_patch() before loading.",
        stacklevel=3)


# ---------------------------------------------------------------------------
# Attention function
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    key_padding: Optional[torch.Tensor]
    causal: bool
    keys: int
    dropout: float
    uniform_empty_rows: bool  # eager path: rows with no visible key average all keys


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


def _fusion_plan(path: str, module, query, key, value, attention_mask, kwargs) -> Optional[_Plan]:
    if any(_is_set(kwargs.get(name)) for name in MATH_KWARGS):
        return None
    softcap = kwargs.get("softcap")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        return None
    scaling = kwargs.get("scaling")
    if scaling is not None and not isinstance(scaling, (int, float)):
        return None
    dropout = kwargs.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)):
        return None
    if path == "eager":
        eager = _eager_function(module)
        if eager is None or not _standard_eager(eager):
            return None
        dropout = dropout if module.training else 0.0  # eager's nn.functional.dropout(training=module.training)
    # Shapes: q (Bq, H, N, D), k (B, Hkv, M, D), v (B, Hkv, M, Dv)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return None
    (Bq, H, N, D), (B, Hkv, M, Dk), (Bv, Hv, Mv, Dv) = query.shape, key.shape, value.shape
    if (Bv, Hv, Mv) != (B, Hkv, M) or Dk != D or Bq not in (1, B) or Hkv < 1 or H % Hkv or N < 1 or M < 1:
        return None
    if H != Hkv and getattr(module, "num_key_value_groups", None) != H // Hkv:
        return None  # sdpa / eager repeat k/v by the module's group count; anything else is not ours to guess
    if not (query.dtype == key.dtype == value.dtype and query.dtype in dispatch.FUSED_ATTENTION_DTYPES):
        return None
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        return None  # the op takes a contiguous head dim; sdpa / eager take anything
    if max(D, Dv) > dispatch.fused_ops().MAX_HEAD_DIM:
        return None
    if attention_mask is None:
        causal = False
        if path == "sdpa":  # sdpa's rule: is_causal (else the module's) for more than one query, top-left
            is_causal = kwargs.get("is_causal")
            causal = N > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
            if causal is not True and causal is not False:
                return None
        if causal:
            if M < N:
                return None
            return _Plan(None, True, N, float(dropout), False)  # top-left over M >= N keys = bottom-right over N
        return _Plan(None, False, M, float(dropout), False)
    pattern = mask_pattern(attention_mask)
    if pattern is None or pattern.q_length != N or pattern.kv_length != M:
        return None
    kp = pattern.key_padding
    if kp is not None and (kp.shape != (B, pattern.keys) or kp.device != key.device):
        return None
    uniform = path == "eager" and (kp is not None or (pattern.causal and pattern.keys < N))
    if uniform and dropout > 0.0:
        return None  # eager drops out the uniform rows too; not reproduced
    return _Plan(kp, pattern.causal, pattern.keys, float(dropout), uniform)


def _uniform_empty_rows(out: torch.Tensor, value: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Eager's answer for rows with no visible key: the mean of V over all keys (per kv head, over its group)."""
    B, N, H = out.shape[0], out.shape[1], out.shape[2]
    kp = plan.key_padding
    if plan.causal:
        last = torch.arange(N, device=out.device) + (plan.keys - N)  # last visible key of each row
        if kp is None:
            empty = (last < 0)[None].expand(B, N)
        else:
            first = torch.where(kp.any(-1), kp.to(torch.int8).argmax(-1), plan.keys)  # first attended key
            empty = last[None, :] < first[:, None]
    else:
        empty = (~kp.any(-1))[:, None].expand(B, N)
    mean = value.float().mean(dim=2).repeat_interleave(H // value.shape[1], dim=1)  # (B, H, Dv)
    return torch.where(empty[:, :, None, None], mean[:, None].to(out.dtype), out)


def hf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], *args: Any,
                         **kwargs: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers attention function: q (B|1, H, N, D), k (B, Hkv, M, D), v (B, Hkv, M, Dv) -> ((B, N, H, Dv), None).

    Fuses the call when the op computes exactly what the model's own path would (see the module docstring);
    otherwise runs that path (sdpa or the model's eager function) with the same arguments.
    """
    # A mask built here goes back to the path it was built for (its form is that path's)
    path = mask_path(attention_mask) or model_attention_path(module)
    plan = None if args else _fusion_plan(path, module, query, key, value, attention_mask, kwargs)
    if plan is None:
        return _run_own_path(path, module, query, key, value, attention_mask, args, kwargs)
    k, v = key.transpose(1, 2), value.transpose(1, 2)
    if plan.keys != k.shape[1]:
        k, v = k[:, :plan.keys], v[:, :plan.keys]
    softcap = kwargs.get("softcap")
    out = dispatch.cross_attention(query.transpose(1, 2), k, v, attention="fused", key_padding_mask=plan.key_padding,
                                   dropout_p=plan.dropout, softmax_scale=kwargs.get("scaling"), causal=plan.causal,
                                   softcap=float(softcap) if softcap else 0.0)
    if plan.uniform_empty_rows:
        out = _uniform_empty_rows(out, value, plan)
    return out, None


def register_hf_attention(name: str = DEFAULT_NAME) -> str:
    """Register perceiver_fast with transformers as ``attn_implementation=name``; idempotent. Returns ``name``.

    Registers :func:`hf_attention_forward` (``AttentionInterface``) and :func:`hf_attention_mask`
    (``AttentionMaskInterface``; without a mask function transformers would drop the padding mask).
    transformers' Perceiver does not use these interfaces: fuse it with
    :func:`perceiver_fast.integrations.patch_hf_perceiver`.
    """
    if not isinstance(name, str) or not name or any(word in name for word in _RESERVED):
        raise ValueError(f"register_hf_attention: name must be a plain non-empty string without any of "
                         f"{list(_RESERVED)} (transformers handles those itself), got {name!r}")
    masking_utils, modeling_utils, _ = _transformers()
    modeling_utils.AttentionInterface.register(name, hf_attention_forward)
    masking_utils.AttentionMaskInterface.register(name, hf_attention_mask)
    return name
