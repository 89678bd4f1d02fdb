"""End-to-end model benchmarks: images/s of our models against random-init HF
transformers Perceivers (the deepmind vision configs) and timm's ViT-B/16.

Backends of a model row are named ``<implementation>:<attention>``:

* ``hf:eager``: transformers' PerceiverForImageClassification{Learned,Fourier,
  ConvProcessing}, random init (HF's attention is eager matmul/softmax/matmul);
* ``hf-patched:fused``: the same model after :func:`perceiver_fast.integrations.patch_hf_perceiver`;
* ``timm:eager`` / ``timm:sdpa``: timm ``vit_base_patch16_224`` with
  ``fused_attn`` False / True (True calls SDPA);
* ``timm-patched:fused``: after :func:`perceiver_fast.integrations.patch_timm_vit`;
* ``ours:fused``: :class:`perceiver_fast.models.PerceiverIO` / :class:`~perceiver_fast.models.ViT`.

A library that is not importable gives a FAIL row with the reason, not an error.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from . import shapes as S
from .backends import torch_dtype
from .schema import Job, Timed, make_row, time_rows

PIO_IMPLS = ["hf:eager", "hf-patched:fused", "ours:fused"]
VIT_IMPLS = ["timm:eager", "timm:sdpa", "timm-patched:fused", "ours:fused"]

_HF_CLASSES = {
    "learned": "PerceiverForImageClassificationLearned",
    "fourier": "PerceiverForImageClassificationFourier",
    "conv": "PerceiverForImageClassificationConvProcessing",
}


def _pio_config(case: S.ModelCase) -> Dict:
    cfg = dict(S.PIO_CONFIG, image_size=case.image_size, num_labels=case.num_classes)
    if case.kwargs.get("tiny"):
        cfg.update(num_latents=16, d_latents=64, num_blocks=1, num_self_attends_per_block=1,
                   num_self_attention_heads=2)
    return cfg


def _hf_perceiver(case: S.ModelCase):
    import transformers

    prep = case.kwargs["preprocessor"]
    cfg = transformers.PerceiverConfig(d_model=S.PIO_D_MODEL[prep], **_pio_config(case))
    model = getattr(transformers, _HF_CLASSES[prep])(cfg)
    return model, (lambda m, x: m(inputs=x).logits)


def _hf_patched(case: S.ModelCase):
    from perceiver_fast.integrations import patch_hf_perceiver

    model, fwd = _hf_perceiver(case)
    return patch_hf_perceiver(model) or model, fwd


def _ours_pio(case: S.ModelCase):
    from perceiver_fast.models import PerceiverIO

    overrides = dict(image_size=case.image_size, in_channels=case.channels, num_classes=case.num_classes,
                     attention="fused")
    if case.kwargs.get("tiny"):
        cfg = _pio_config(case)
        overrides.update(num_latents=cfg["num_latents"], latent_dim=cfg["d_latents"], num_blocks=cfg["num_blocks"],
                         num_self_attends_per_block=cfg["num_self_attends_per_block"],
                         self_heads=cfg["num_self_attention_heads"])
    # from_config: the deepmind vision-perceiver-{learned,fourier,conv} preset, the same as HF's config
    model = PerceiverIO.from_config(case.kwargs["preprocessor"], **overrides)
    return model, (lambda m, x: m(x))


def _timm_vit(case: S.ModelCase, fused_attn: bool):
    import timm

    kw = dict(img_size=case.image_size, num_classes=case.num_classes)
    if case.kwargs.get("tiny"):
        kw.update(patch_size=8, embed_dim=64, depth=2, num_heads=2)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **kw)
    for blk in model.blocks:
        blk.attn.fused_attn = fused_attn
    return model, (lambda m, x: m(x))


def _timm_patched(case: S.ModelCase):
    from perceiver_fast.integrations import patch_timm_vit

    model, fwd = _timm_vit(case, True)
    return patch_timm_vit(model) or model, fwd


def _ours_vit(case: S.ModelCase):
    from perceiver_fast.models import ViT

    kw = dict(image_size=case.image_size, in_channels=case.channels, num_classes=case.num_classes,
              attention="fused")
    if case.kwargs.get("tiny"):
        kw.update(patch_size=8, dim=64, depth=2, heads=2)
    else:
        kw.update(patch_size=16, dim=768, depth=12, heads=12)
    return ViT(**kw), (lambda m, x: m(x))


def builder(case: S.ModelCase, impl: str) -> Callable[[], Tuple[torch.nn.Module, Callable]]:
    if case.family == "perceiver-io":
        table = {"hf:eager": lambda: _hf_perceiver(case), "hf-patched:fused": lambda: _hf_patched(case),
                 "ours:fused": lambda: _ours_pio(case)}
    elif case.family == "vit":
        table = {"timm:eager": lambda: _timm_vit(case, False), "timm:sdpa": lambda: _timm_vit(case, True),
                 "timm-patched:fused": lambda: _timm_patched(case), "ours:fused": lambda: _ours_vit(case)}
    else:
        raise KeyError(f"unknown model family {case.family!r}")
    return table[impl]


def impls_for(case: S.ModelCase) -> List[str]:
    return PIO_IMPLS if case.family == "perceiver-io" else VIT_IMPLS


def model_case_rows(case: S.ModelCase, impl: str, opts) -> List[Dict]:
    dev, dt = opts.device, opts.dtype
    directions = ["fwd", "fwd+bwd"] if opts.backward else ["fwd"]
    base = dict(section="model", name=case.name, label=f"{case.note} B{case.batch} {case.image_size}px",
                dtype=dt, backend=impl, B=case.batch)
    rows = [make_row(direction=d, **base) for d in directions]

    def build() -> Timed:
        with torch.device(dev):
            model, fwd = builder(case, impl)()
        model = model.to(device=dev, dtype=torch_dtype(dt))
        x = torch.randn(case.batch, case.channels, case.image_size, case.image_size, device=dev,
                        dtype=torch_dtype(dt))
        nparam = sum(p.numel() for p in model.parameters())
        for r in rows:
            r["label"] += f" ({nparam / 1e6:.1f}M params)"

        def fb():
            model.zero_grad(set_to_none=True)
            fwd(model, x).float().sum().backward()

        return Timed(forward=lambda: fwd(model, x), forward_backward=fb, prepare=lambda d: model.train(d != "fwd"),
                     images=case.batch, cleanup=[lambda: model.zero_grad(set_to_none=True)])

    return time_rows(rows, build, dev, opts.quick)


def model_jobs(opts) -> List:
    cases = [c for c in S.MODEL_CASES if opts.models is None or c.name in opts.models]
    if opts.quick and opts.models is None:
        cases = [c for c in cases if c.name in S.QUICK_MODELS]
    jobs = []
    for case in cases:
        c = case.small() if opts.small else case
        for impl in impls_for(c):
            if opts.backends is not None and impl not in opts.backends and impl.split(":")[0] not in opts.backends:
                continue
            jobs.append(Job("model", f"{c.name} {impl}", lambda c=c, impl=impl: model_case_rows(c, impl, opts),
                            weight=3.0))
    return jobs
