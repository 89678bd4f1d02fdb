"""Everything that knows about other libraries' models (transformers, timm).

* :func:`patch_hf_perceiver` / :func:`unpatch_hf_perceiver` - transformers Perceiver models, in place.
* :func:`perceiver_io_from_hf` / :func:`perceiver_io_from_hf_config` - transformers Perceiver -> our
  :class:`~perceiver_fast.models.PerceiverIO`; :func:`hf_state_dict`, :func:`hf_cross_layer_state_dict`.
* :func:`patch_timm_vit` / :func:`unpatch_timm_vit` - timm Vision Transformers, in place.
* :func:`vit_from_timm` - timm VisionTransformer -> our :class:`~perceiver_fast.models.ViT`.
"""
from perceiver_fast.integrations.hf import patch_hf_perceiver, unpatch_hf_perceiver  # noqa: F401
from perceiver_fast.integrations.hf_convert import (  # noqa: F401
    hf_cross_layer_state_dict,
    hf_state_dict,
    perceiver_io_from_hf,
    perceiver_io_from_hf_config,
)
from perceiver_fast.integrations.timm import patch_timm_vit, unpatch_timm_vit, vit_from_timm  # noqa: F401

__all__ = [
    "patch_hf_perceiver", "unpatch_hf_perceiver",
    "perceiver_io_from_hf", "perceiver_io_from_hf_config", "hf_state_dict", "hf_cross_layer_state_dict",
    "patch_timm_vit", "unpatch_timm_vit", "vit_from_timm",
]
