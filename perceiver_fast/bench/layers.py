"""Layer benchmarks (the layer targets): our cross-attention layer against
transformers' PerceiverLayer (is_cross_attention=True) with the same weights.

Backends: ``hf:eager`` (PerceiverLayer), ``hf-patched:fused`` (the same layer
after :func:`perceiver_fast.integrations.patch_hf_perceiver`), ``ours:fused``
(:class:`perceiver_fast.layers.CrossAttentionLayer` with HF's weights copied,
fed batch-shared latents (1, N, q_dim) as our models do; HF gets them expanded
to (B, N, q_dim) as its PerceiverModel does). Inputs (B, M, kv_dim) are given
(for the fourier case the features are not rebuilt inside the timed region).
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch

from . import shapes as S
from .backends import torch_dtype
from .schema import Job, Timed, make_row, time_rows

LAYER_IMPLS = ["hf:eager", "hf-patched:fused", "ours:fused"]


def _hf_layer(case: S.LayerCase):
    import transformers
    from transformers.models.perceiver.modeling_perceiver import PerceiverLayer

    cfg = transformers.PerceiverConfig(d_model=case.kv_dim, **dict(S.PIO_CONFIG, d_latents=case.q_dim))
    return PerceiverLayer(cfg, is_cross_attention=True, qk_channels=None, v_channels=None, num_heads=1,
                          q_dim=case.q_dim, kv_dim=case.kv_dim, widening_factor=cfg.cross_attention_widening_factor,
                          use_query_residual=True)


def _ours_from_hf(hf_layer, case: S.LayerCase):
    from perceiver_fast.integrations import hf_cross_layer_state_dict
    from perceiver_fast.layers import CrossAttentionLayer

    ours = CrossAttentionLayer(case.q_dim, case.kv_dim, heads=1, widening_factor=1, attention="fused")
    ours.load_state_dict(hf_cross_layer_state_dict(hf_layer))
    return ours


def layer_case_rows(case: S.LayerCase, impl: str, opts) -> List[Dict]:
    dev, dt = opts.device, opts.dtype
    tdt = torch_dtype(dt)
    directions = ["fwd", "fwd+bwd"] if opts.backward else ["fwd"]
    base = dict(section="layer", name=case.name, label=case.label(), dtype=dt, backend=impl, B=case.B, N=case.N,
                M=case.M, Dqk=case.kv_dim, Dv=case.kv_dim, H=1)
    rows = [make_row(direction=d, **base) for d in directions]

    def build() -> Timed:
        torch.manual_seed(0)
        with torch.device(dev):
            hf = _hf_layer(case)
            if impl == "hf:eager":
                layer = hf
            elif impl == "hf-patched:fused":
                from perceiver_fast.integrations import patch_hf_perceiver

                layer = patch_hf_perceiver(copy.deepcopy(hf))
            else:
                layer = _ours_from_hf(hf, case)
        layer = layer.to(device=dev, dtype=tdt)
        gen = torch.Generator(device=dev).manual_seed(0)
        latents = torch.randn(1, case.N, case.q_dim, generator=gen, device=dev, dtype=tdt)
        inputs = torch.randn(case.B, case.M, case.kv_dim, generator=gen, device=dev, dtype=tdt)
        if impl.startswith("hf"):
            hidden = latents.expand(case.B, -1, -1)
            fwd = lambda: layer(hidden, inputs=inputs)[0]  # noqa: E731
        else:
            fwd = lambda: layer(latents, inputs)  # noqa: E731
        params = [p for p in layer.parameters() if p.requires_grad]
        grad_out = torch.randn(case.B, case.N, case.q_dim, device=dev, dtype=tdt)
        return Timed(forward=fwd, forward_backward=lambda: torch.autograd.grad(fwd(), params, grad_out),
                     prepare=lambda d: layer.train(d != "fwd"))

    return time_rows(rows, build, dev, opts.quick)


def layer_jobs(opts) -> List:
    cases = S.LAYER_CASES
    if opts.quick:
        cases = [c for c in cases if c.name in S.QUICK_LAYERS]
    jobs = []
    for case in cases:
        c = case.small() if opts.small else case
        for impl in LAYER_IMPLS:
            if opts.backends is not None and impl not in opts.backends and impl.split(":")[0] not in opts.backends:
                continue
            jobs.append(Job("layer", f"layer {c.name} {impl}", lambda c=c, impl=impl: layer_case_rows(c, impl, opts),
                            weight=2.0))
    return jobs
