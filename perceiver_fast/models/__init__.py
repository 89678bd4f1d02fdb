"""Models on the fused ops: :class:`PerceiverIO`, :class:`Perceiver` (keras example), :class:`ViT`.

All constructors are keyword-only with defaults (see each module's docstring)
and take ``attention="fused" | "eager"``.
"""
from perceiver_fast.models.perceiver import Perceiver  # noqa: F401
from perceiver_fast.models.perceiver_io import PerceiverIO  # noqa: F401
from perceiver_fast.models.vit import ViT  # noqa: F401

__all__ = ["Perceiver", "PerceiverIO", "ViT"]
