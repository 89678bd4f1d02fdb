"""One call to fuse the attention modules of models people already have.

* :func:`patch_model` walks a model and patches, in place, every attention module it recognises; it returns a
  :class:`PatchReport` (patched modules per kind, and every recognised module left alone with the reason).
  :func:`unpatch_model` undoes it.
* :func:`patch_classes` patches the same classes globally, for every instance present or future (Liger's
  ``apply_liger_kernel_to_*``); the returned :class:`ClassPatchHandle` undoes it and is a context manager.

Both only replace ``forward`` (on the instance, or on the class): parameters, their names and ``state_dict`` are
untouched, so checkpoints load either way. A patched forward sends each call the fused op expresses exactly to it
and every other call to the original forward with the original arguments.

Each supported class is described by an :class:`AttentionPatch` in :data:`ATTENTION_PATCHES`, the one mapping from
a class to its fused forward (Liger's model-type -> patch-function mapping). Packages that are not installed are
skipped; nothing here imports them until asked (:func:`patch_model` looks only at classes whose module is already
imported: a model cannot hold an instance of a class that was never imported).

The integrations that patch whole models with their own functions are :class:`ModelPatch` entries in
:data:`MODEL_PATCHES`, run by :func:`patch_model` after the class patches and undone by :func:`unpatch_model`:

* "transformers PerceiverSelfAttention": :func:`~perceiver_fast.integrations.hf.patch_hf_perceiver` (swaps the
  classes of HF's Perceiver attention, Fourier features and image preprocessors for subclasses);
* "timm Attention": :func:`~perceiver_fast.integrations.timm.patch_timm_vit`, module by module, on every module with
  timm's attention structure (:func:`~perceiver_fast.integrations.timm.is_timm_attention`);
* "torch.nn.MultiheadAttention": :func:`~perceiver_fast.integrations.mha.patch_multihead_attention`.

These three are per model only: :func:`patch_classes` covers the :class:`AttentionPatch` kinds.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from perceiver_fast.integrations.hf import patch_hf_perceiver, unpatch_hf_perceiver
from perceiver_fast.integrations.mha import (make_multihead_attention_forward, patch_multihead_attention,
                                             unpatch_multihead_attention)
from perceiver_fast.integrations.timm import is_timm_attention, patch_timm_vit, unpatch_timm_vit
from perceiver_fast.layers import dispatch

# Set on every fused forward: the forward it replaces (the fallback), so nothing wraps twice.
ORIGINAL = "__perceiver_fast_original__"


@dataclass(frozen=True)
class AttentionPatch:
    """How to fuse one attention class.

    ``kind``: the report's name for it ("perceiver-pytorch Attention"). ``module``/``qualname``: where the class
    lives (imported lazily; a missing package means the patch does not apply). ``make_forward(original)`` returns
    the fused forward ``forward(self, *args, **kwargs)``, which calls ``original(self, *args, **kwargs)`` for
    every call it does not fuse. ``why_not(module)`` returns a reason to leave one instance alone, or None.
    ``subclasses``: whether subclasses that keep the class's forward match too.
    """
    kind: str
    module: str
    qualname: str
    make_forward: Callable[[Callable], Callable]
    why_not: Optional[Callable[[nn.Module], Optional[str]]] = None
    subclasses: bool = True

    def resolve(self) -> Optional[type]:
        """The class (importing its module), or None where its package is not installed."""
        try:
            if importlib.util.find_spec(self.module.split(".")[0]) is None:
                return None
            obj = importlib.import_module(self.module)
        except ImportError:
            return None
        return self._lookup(obj)

    def loaded(self) -> Optional[type]:
        """The class if its module is already imported, else None (then no instance of it can exist); imports
        nothing."""
        obj = sys.modules.get(self.module)
        return None if obj is None else self._lookup(obj)

    def _lookup(self, obj) -> Optional[type]:
        for part in self.qualname.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj if isinstance(obj, type) else None


ATTENTION_PATCHES: List[AttentionPatch] = []


def register_attention_patch(patch: AttentionPatch) -> AttentionPatch:
    """Add (or replace, by kind) a class patch in :data:`ATTENTION_PATCHES`; returns it."""
    ATTENTION_PATCHES[:] = [p for p in ATTENTION_PATCHES if p.kind != patch.kind] + [patch]
    return patch


def fused_forward(patch: AttentionPatch, original: Callable) -> Callable:
    """``patch.make_forward(original)``, marked with the forward it replaces."""
    forward = patch.make_forward(original)
    setattr(forward, ORIGINAL, original)
    return forward


def is_fused_forward(fn: object) -> bool:
    """Whether ``fn`` (a function or bound method) is a forward made by :func:`fused_forward`."""
    fn = getattr(fn, "__func__", fn)
    return hasattr(fn, ORIGINAL)


@dataclass
class PatchReport:
    """What :func:`patch_model` did: ``patched[kind]`` modules per kind, and ``left_alone`` as (module name, class,
    reason) for every recognised module it did not patch."""
    patched: Dict[str, int] = field(default_factory=dict)
    left_alone: List[Tuple[str, str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """The number of modules patched, all kinds together."""
        return sum(self.patched.values())

    def add(self, kind: str, n: int = 1) -> None:
        """Count ``n`` more patched modules of ``kind``."""
        if n:
            self.patched[kind] = self.patched.get(kind, 0) + n

    def __str__(self) -> str:
        lines = [f"patched {self.total} module(s)"] + [f"  {n} x {kind}" for kind, n in self.patched.items()]
        lines += [f"  left alone: {name} ({cls}): {why}" for name, cls, why in self.left_alone]
        return "\n".join(lines)


# A patch with its class, resolved once per patch_model call.
_Resolved = Sequence[Tuple[AttentionPatch, type]]


def _matching(resolved: _Resolved, module: nn.Module) -> Optional[Tuple[AttentionPatch, type]]:
    for patch, cls in resolved:
        if type(module) is cls or (patch.subclasses and isinstance(module, cls)):
            return patch, cls
    return None


# A left-alone entry of the report: (module name, class name, reason).
LeftAlone = Tuple[str, str, str]


@dataclass(frozen=True)
class ModelPatch:
    """An integration that patches whole models with its own functions (HF Perceiver, timm, MultiheadAttention).

    ``apply(model)`` patches every module of its kind in ``model`` that it can and returns (the number patched,
    the modules left alone as (name, class, reason)); ``undo(model)`` undoes what ``apply`` did. Both must leave
    alone the modules that already carry a :class:`AttentionPatch` forward (:func:`is_fused_forward`).
    """
    kind: str
    apply: Callable[[nn.Module], Tuple[int, List[LeftAlone]]]
    undo: Callable[[nn.Module], object]


MODEL_PATCHES: List[ModelPatch] = []


def register_model_patch(patch: ModelPatch) -> ModelPatch:
    """Add (or replace, by kind) a whole-model patch in :data:`MODEL_PATCHES`; returns it."""
    MODEL_PATCHES[:] = [p for p in MODEL_PATCHES if p.kind != patch.kind] + [patch]
    return patch


def _ours(module: nn.Module) -> bool:
    """Whether an AttentionPatch forward already runs this module (instance or class)."""
    return is_fused_forward(module.__dict__.get("forward")) or is_fused_forward(type(module).forward)


def _label(name: str) -> str:
    return name or "(root)"


HF_PERCEIVER_MODULE = "transformers.models.perceiver.modeling_perceiver"


def _apply_hf(model: nn.Module) -> Tuple[int, List[LeftAlone]]:
    mp = sys.modules.get(HF_PERCEIVER_MODULE)  # not imported: the model holds no HF Perceiver
    if mp is None:
        return 0, []
    found = [(name, m, type(m)) for name, m in model.named_modules()
             if isinstance(m, mp.PerceiverSelfAttention) and not _ours(m)]
    if not found:
        return 0, []
    patch_hf_perceiver(model)
    swapped = [type(m) is not before for _, m, before in found]
    left = [(_label(name), before.__name__, "already patched (its class is perceiver_fast's)")
            for (name, _, before), ok in zip(found, swapped) if not ok]
    return sum(swapped), left


def _undo_hf(model: nn.Module) -> None:
    if sys.modules.get(HF_PERCEIVER_MODULE) is not None:
        unpatch_hf_perceiver(model)


def _apply_timm(model: nn.Module) -> Tuple[int, List[LeftAlone]]:
    n, left = 0, []
    for name, m in model.named_modules():
        if not is_timm_attention(m) or _ours(m):
            continue
        if "forward" in m.__dict__:
            left.append((_label(name), type(m).__name__,
                         "forward already replaced on the instance (patched before, or by someone else)"))
            continue
        patch_timm_vit(m)  # the module itself is its one timm attention
        n += 1
    return n, left


def _undo_timm(model: nn.Module) -> None:
    for m in model.modules():  # module by module: other integrations use the same instance attribute names
        if is_timm_attention(m):
            unpatch_timm_vit(m)


def _apply_mha(model: nn.Module) -> Tuple[int, List[LeftAlone]]:
    if not any(isinstance(m, nn.MultiheadAttention) and not _ours(m) for m in model.modules()):
        return 0, []
    report = patch_multihead_attention(model)
    modules = dict(model.named_modules())
    left = [(_label(name), type(modules[name]).__name__, why) for name, why in report.skipped.items()
            if not _ours(modules[name])]
    return report.num_patched, left


HF_PERCEIVER_PATCH: ModelPatch = register_model_patch(ModelPatch(
    kind="transformers PerceiverSelfAttention", apply=_apply_hf, undo=_undo_hf))
TIMM_ATTENTION_PATCH: ModelPatch = register_model_patch(ModelPatch(
    kind="timm Attention", apply=_apply_timm, undo=_undo_timm))
MULTIHEAD_ATTENTION_PATCH: ModelPatch = register_model_patch(ModelPatch(
    kind="torch.nn.MultiheadAttention", apply=_apply_mha, undo=unpatch_multihead_attention))


# Class patches for patch_classes only: patch_model covers their instances through MODEL_PATCHES.
CLASS_ONLY_PATCHES: List[AttentionPatch] = [
    AttentionPatch(kind="torch.nn.MultiheadAttention", module="torch.nn", qualname="MultiheadAttention",
                   make_forward=make_multihead_attention_forward, subclasses=False),
]


def patch_module(module: nn.Module, patch: AttentionPatch, cls: type) -> Optional[str]:
    """Patch one instance (its ``forward`` becomes an instance attribute); returns None, or why it was left alone."""
    if "forward" in module.__dict__:
        return "already patched" if is_fused_forward(module.__dict__["forward"]) else \
            "its forward was already replaced by someone else"
    if is_fused_forward(type(module).forward):
        return "its class is patched globally (patch_classes)"
    if type(module).forward is not cls.forward:
        return f"{type(module).__name__} overrides forward"
    reason = patch.why_not(module) if patch.why_not is not None else None
    if reason is not None:
        return reason
    module.forward = types.MethodType(fused_forward(patch, type(module).forward), module)
    return None


def _select(kinds: Optional[Iterable[str]], known: Sequence[str], what: str) -> Optional[set]:
    if kinds is None:
        return None
    wanted = {kinds} if isinstance(kinds, str) else set(kinds)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ValueError(f"{what}: unknown kinds {unknown}; known: {sorted(known)}")
    return wanted


def patch_model(model: nn.Module, *, kinds: Optional[Iterable[str]] = None,
                patches: Optional[Iterable[AttentionPatch]] = None) -> PatchReport:
    """Patch, in place, every attention module of ``model`` that a registered patch recognises.

    The class patches (:data:`ATTENTION_PATCHES`: perceiver-pytorch, perceiver-ar-pytorch, krasserm's perceiver-io,
    ...) run first, then the whole-model integrations (:data:`MODEL_PATCHES`: transformers Perceiver, timm
    attention, ``nn.MultiheadAttention``). ``kinds`` restricts both to those kinds; ``patches`` replaces the class
    patches by the given ones (and then runs no whole-model integration). Returns the :class:`PatchReport`;
    :func:`unpatch_model` undoes it. Parameters and ``state_dict`` are unchanged; patching twice wraps nothing
    twice (the second report lists the modules as already patched).
    """
    model_patches = list(MODEL_PATCHES) if patches is None else []
    patches = list(ATTENTION_PATCHES if patches is None else patches)
    wanted = _select(kinds, [p.kind for p in patches] + [p.kind for p in model_patches], "patch_model")
    if wanted is not None:
        patches = [p for p in patches if p.kind in wanted]
        model_patches = [p for p in model_patches if p.kind in wanted]
    resolved = [(p, cls) for p in patches for cls in [p.loaded()] if cls is not None]
    dispatch.fused_ops()  # ImportError now, saying why, rather than at the first call
    report = PatchReport()
    for name, module in (model.named_modules() if resolved else ()):
        hit = _matching(resolved, module)
        if hit is None:
            continue
        patch, cls = hit
        reason = patch_module(module, patch, cls)
        if reason is None:
            report.add(patch.kind)
        else:
            report.left_alone.append((_label(name), type(module).__name__, reason))
    for mpatch in model_patches:
        n, left = mpatch.apply(model)
        report.add(mpatch.kind, n)
        report.left_alone.extend(left)
    return report


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: every class patch on an instance and every whole-model integration
    (:data:`MODEL_PATCHES`); a global :func:`patch_classes` stays (undo its handle). Returns ``model``."""
    for module in model.modules():
        if "forward" in module.__dict__ and is_fused_forward(module.__dict__["forward"]):
            del module.forward
    for mpatch in reversed(MODEL_PATCHES):
        mpatch.undo(model)
    return model


class ClassPatchHandle:
    """Undoes a :func:`patch_classes`; also a context manager (``with patch_classes(): ...``)."""

    def __init__(self, saved: List[Tuple[type, Callable]], kinds: List[str]) -> None:
        self._saved = saved
        self.kinds = kinds

    def undo(self) -> None:
        """Restore every patched class's original forward (idempotent)."""
        while self._saved:
            cls, original = self._saved.pop()
            if original is None:  # the class inherited its forward
                del cls.forward
            else:
                cls.forward = original

    def __enter__(self) -> "ClassPatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_classes(kinds: Optional[Iterable[str]] = None, *,
                  patches: Optional[Iterable[AttentionPatch]] = None) -> ClassPatchHandle:
    """Patch the supported classes globally: every instance, present or future, runs the fused forward.

    ``kinds`` selects patches by their ``kind`` (default: every registered :class:`AttentionPatch` whose package
    is installed; installed packages are imported). The whole-model integrations (:data:`MODEL_PATCHES`: HF
    Perceiver, timm, ``nn.MultiheadAttention``) are per model only (:func:`patch_model`). Returns a
    :class:`ClassPatchHandle` whose ``undo()`` (or leaving its ``with`` block) restores the originals. Classes
    already patched globally are left as they are. Instances patched by :func:`patch_model` keep their own patch.
    """
    patches = list(ATTENTION_PATCHES + CLASS_ONLY_PATCHES if patches is None else patches)
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        per_model = sorted(({p.kind for p in MODEL_PATCHES} - {p.kind for p in patches}) & set(kinds))
        if per_model:
            raise ValueError(f"patch_classes: {per_model} are patched per model only; use patch_model")
        wanted = _select(kinds, [p.kind for p in patches], "patch_classes")
        patches = [p for p in patches if p.kind in wanted]
    dispatch.fused_ops()  # ImportError now, saying why, rather than at the first call
    saved, applied = [], []
    for patch in patches:
        cls = patch.resolve()
        if cls is None or is_fused_forward(cls.forward):
            continue
        own = cls.__dict__.get("forward")
        cls.forward = fused_forward(patch, cls.forward)
        saved.append((cls, own))
        applied.append(patch.kind)
    return ClassPatchHandle(saved, applied)
