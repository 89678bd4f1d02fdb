"""In-place patches of models from other libraries.

* :func:`patch_hf_perceiver` / :func:`unpatch_hf_perceiver` - transformers Perceiver models.
* :func:`patch_timm_vit` / :func:`unpatch_timm_vit` - timm Vision Transformers.
"""
from perceiver_fast.integrations.hf import patch_hf_perceiver, unpatch_hf_perceiver  # noqa: F401
from perceiver_fast.integrations.timm import patch_timm_vit, unpatch_timm_vit  # noqa: F401

__all__ = ["patch_hf_perceiver", "unpatch_hf_perceiver", "patch_timm_vit", "unpatch_timm_vit"]
