"""Everything that knows about other libraries' models (transformers, timm, community Perceiver packages).

* :func:`patch_model` / :func:`unpatch_model` - one call for any model: patches, in place, every attention module
  it recognises (transformers Perceiver, timm attention, ``nn.MultiheadAttention``, lucidrains' perceiver-pytorch
  and perceiver-ar-pytorch, krasserm's perceiver-io, ...) and returns a :class:`PatchReport`;
  :func:`patch_classes` - the same classes globally (a handle that undoes it, also a context manager).

* :func:`patch_hf_perceiver` / :func:`unpatch_hf_perceiver` - transformers Perceiver models, in place;
  :func:`register_hf_perceiver_patch` / :func:`unregister_hf_perceiver_patch` - the same at load time.
* :func:`perceiver_io_from_hf` / :func:`perceiver_io_from_hf_config` - transformers Perceiver -> our
  :class:`~perceiver_fast.models.PerceiverIO`; :func:`hf_state_dict`, :func:`hf_cross_layer_state_dict`.
* :func:`register_hf_attention` - ``attn_implementation="perceiver_fast"`` for transformers models that route
  their attention through ``AttentionInterface`` (ViT, BERT, ...).
* :func:`patch_timm_vit` / :func:`unpatch_timm_vit` - timm Vision Transformers, in place.
* :func:`vit_from_timm` - timm VisionTransformer -> our :class:`~perceiver_fast.models.ViT`.
* :func:`patch_multihead_attention` / :func:`unpatch_multihead_attention` - every ``torch.nn.MultiheadAttention``
  of a model (SigLIP pooling heads, attentional poolers, nn.Transformer layers), in place.
"""
from perceiver_fast.integrations.hf import (  # noqa: F401
    patch_hf_perceiver,
    register_hf_perceiver_patch,
    unpatch_hf_perceiver,
    unregister_hf_perceiver_patch,
)
from perceiver_fast.integrations.hf_attention import register_hf_attention  # noqa: F401
from perceiver_fast.integrations.hf_convert import (  # noqa: F401
    hf_cross_layer_state_dict,
    hf_state_dict,
    perceiver_io_from_hf,
    perceiver_io_from_hf_config,
)
from perceiver_fast.integrations import krasserm  # noqa: F401  (registers its patches)
from perceiver_fast.integrations.lucidrains import PERCEIVER_PYTORCH_ATTENTION  # noqa: F401  (registers its patches)
from perceiver_fast.integrations.mha import patch_multihead_attention, unpatch_multihead_attention  # noqa: F401
from perceiver_fast.integrations.patching import PatchReport, patch_classes, patch_model, unpatch_model  # noqa: F401
from perceiver_fast.integrations.timm import patch_timm_vit, unpatch_timm_vit, vit_from_timm  # noqa: F401

__all__ = [
    "patch_hf_perceiver", "unpatch_hf_perceiver", "register_hf_perceiver_patch", "unregister_hf_perceiver_patch",
    "perceiver_io_from_hf", "perceiver_io_from_hf_config", "hf_state_dict", "hf_cross_layer_state_dict",
    "register_hf_attention",
    "patch_timm_vit", "unpatch_timm_vit", "vit_from_timm",
    "patch_multihead_attention", "unpatch_multihead_attention",
    "patch_model", "unpatch_model", "patch_classes", "PatchReport",
]
