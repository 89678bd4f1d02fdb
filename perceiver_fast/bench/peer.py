"""The ``peer`` section: the community Perceiver packages' main models, patched by
:func:`perceiver_fast.integrations.patch_model` against unpatched, with the same weights.

For each case of :data:`PEER_CASES` (each package's main model at the size of its README example) one
model is built and deep-copied; the copy is patched. Both are timed forward (eval, no_grad) and
forward + backward (train mode, as the README configures dropout). Rows are named by the case, with
backends

* ``unpatched:eager``: the package's own attention (the baseline of ``speedup_vs_eager``);
* ``patched:fused``: after ``patch_model`` (our fused op);
* ``flash-perceiver:flash``: flash-perceiver's ``Perceiver`` at the same sizes (perceiver-pytorch's
  ``Perceiver`` case only), where it imports and runs (CUDA, fp16/bf16); a FAIL row with the reason
  where it does not import, a SKIP row where it imports but cannot run here.

Each patched row records the correctness of the patch in ``relerr`` (forward output) and
``grad_relerr`` (the largest over every parameter gradient), ||patched - unpatched|| / ||unpatched||,
both computed in eval mode (dropout off) from the same inputs; above :data:`PEER_TOLERANCE` for the
dtype the row is WRONG. The count of fused calls in one forward (:func:`count_fused_calls`) is in the
row's ``fused_calls`` field and in its note. A package that is not
installed gives FAIL rows with the reason and the install command.

On a machine without CUDA the cases run at small sizes (depth 1-2, small dims and sequences) and the
fused op runs its PyTorch path (the Triton interpreter under ``TRITON_INTERPRET=1``); the rows say so.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from perceiver_fast.ops.backend import attention_backend

from .schema import Job, Timed, failure_reason, make_row, time_rows
from .timing import is_cuda

UNPATCHED = "unpatched:eager"
PATCHED = "patched:fused"
FLASH = "flash-perceiver:flash"
PEER_BACKENDS = (UNPATCHED, PATCHED, FLASH)

# Largest ||patched - unpatched|| / ||unpatched|| (outputs and parameter gradients) that is not WRONG.
PEER_TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 1e-2}

FUSED_OP = "perceiver_fast::attention_fwd"

# (model, inputs) -> output tensor
Forward = Callable[[nn.Module, Dict], torch.Tensor]


@dataclass(frozen=True)
class PeerModel:
    """A built case: the unpatched model, ``inputs(device, dtype)`` -> the inputs (a dict), and
    ``forward(model, inputs)`` -> one output tensor (the loss of fwd+bwd is taken from it). ``image``: the
    inputs are a batch of images (the rows then give images/s)."""

    model: nn.Module
    inputs: Callable[[str, torch.dtype], Dict]
    forward: Forward
    batch: int
    image: bool = False


@dataclass(frozen=True)
class PeerCase:
    """One community model. ``module``: imported first (a missing package fails the case with
    ``install`` in the reason). ``size``/``small_size``: what runs at README sizes / small sizes.
    ``build(small)`` returns the :class:`PeerModel`. ``flash``: also time flash-perceiver."""

    name: str
    package: str
    model: str
    module: str
    install: str
    size: str
    small_size: str
    build: Callable[[bool], PeerModel]
    flash: bool = False

    def label(self, small: bool) -> str:
        return f"{self.package} {self.model}, {self.small_size if small else self.size}"


# ----------------------------------------------------------------------------
# the models (their README configurations; small: the CPU/--quick sizes)


def _lucidrains_perceiver_kwargs(small: bool) -> Dict:
    """perceiver-pytorch's README ``Perceiver`` (small: depth 1, 16 latents of 64)."""
    kw = dict(input_channels=3, input_axis=2, num_freq_bands=6, max_freq=10.0, depth=6, num_latents=256,
              latent_dim=512, cross_heads=1, latent_heads=8, cross_dim_head=64, latent_dim_head=64, num_classes=1000,
              attn_dropout=0.0, ff_dropout=0.0, weight_tie_layers=False, fourier_encode_data=True,
              self_per_cross_attn=2)
    if small:
        kw.update(depth=1, num_latents=16, latent_dim=64, latent_heads=2, cross_dim_head=16, latent_dim_head=16,
                  num_classes=10)
    return kw


def _image_side(small: bool) -> int:
    return 12 if small else 224


def _perceiver(small: bool) -> PeerModel:
    from perceiver_pytorch import Perceiver

    side = _image_side(small)
    model = Perceiver(**_lucidrains_perceiver_kwargs(small))
    return PeerModel(model, lambda dev, dt: {"data": torch.randn(1, side, side, 3, device=dev, dtype=dt)},
                     lambda m, x: m(x["data"]), batch=1, image=True)


def _perceiver_io(small: bool) -> PeerModel:
    from perceiver_pytorch import PerceiverIO

    kw = dict(dim=32, queries_dim=32, logits_dim=100, depth=6, num_latents=256, latent_dim=512, cross_heads=1,
              latent_heads=8, cross_dim_head=64, latent_dim_head=64, weight_tie_layers=False, seq_dropout_prob=0.2)
    seq, queries = 512, 128
    if small:
        kw.update(dim=16, queries_dim=16, logits_dim=10, depth=1, num_latents=16, latent_dim=64, latent_heads=2,
                  cross_dim_head=16, latent_dim_head=16)
        seq, queries = 48, 8
    model = PerceiverIO(**kw)

    def inputs(dev, dt):
        return {"seq": torch.randn(1, seq, kw["dim"], device=dev, dtype=dt),
                "queries": torch.randn(queries, kw["queries_dim"], device=dev, dtype=dt)}

    return PeerModel(model, inputs, lambda m, x: m(x["seq"], queries=x["queries"]), batch=1)


def _perceiver_ar(small: bool) -> PeerModel:
    from perceiver_ar_pytorch import PerceiverAR

    kw = dict(num_tokens=20000, dim=512, depth=8, heads=8, dim_head=64, cross_attn_dropout=0.5, max_seq_len=4096,
              cross_attn_seq_len=3072)
    if small:
        kw.update(num_tokens=256, dim=64, depth=1, heads=2, dim_head=32, max_seq_len=64, cross_attn_seq_len=48)
    model = PerceiverAR(**kw)
    n, vocab = kw["max_seq_len"], kw["num_tokens"]
    return PeerModel(model, lambda dev, dt: {"x": torch.randint(0, vocab, (1, n), device=dev)},
                     lambda m, x: m(x["x"]), batch=1)


def _krasserm_causal(small: bool) -> PeerModel:
    from perceiver.model.core import CausalSequenceModel, CausalSequenceModelConfig

    # CausalSequenceModelConfig's defaults are the docs' Perceiver AR: 4096 tokens, 512 latents, 512 channels,
    # 8 heads, 8 self-attention layers, cross-attention dropout 0.5
    kw: Dict = {}
    if small:
        kw = dict(max_seq_len=64, max_latents=16, num_channels=64, num_heads=2, num_self_attention_layers=1,
                  self_attention_widening_factor=1, cross_attention_widening_factor=1)
    cfg = CausalSequenceModelConfig(**kw)
    model = CausalSequenceModel(cfg)
    n, prefix = cfg.max_seq_len, cfg.max_seq_len - cfg.max_latents
    return PeerModel(model, lambda dev, dt: {"x": torch.randint(0, cfg.vocab_size, (1, n), device=dev)},
                     lambda m, x: m(x["x"], prefix_len=prefix).logits, batch=1)


def _pio_arch(small: bool) -> PeerModel:
    from pio_arch.models.pio_attention import PIOAttentionModel
    from pio_arch.models.sentence_encoder import TaskSpec

    # the README's quick start (small: batch 2, 2 heads, half the widths)
    tasks = [TaskSpec("fraud", "binary"), TaskSpec("amount", "regression", weight=0.5),
             TaskSpec("time_to_fraud", "survival_discrete", output_dim=10)]
    kw = dict(input_dim=384, model_dim=64, latent_dim=64, task_dim=32, num_latents=8, num_heads=4)
    batch, rows = 4, 12
    if small:
        kw.update(model_dim=32, latent_dim=32, task_dim=16, num_latents=4, num_heads=2)
        batch = 2
    model = PIOAttentionModel(tasks=tasks, num_context_self_attn_blocks=1, num_latent_self_attn_blocks=1, **kw)

    def inputs(dev, dt):
        pad = torch.zeros(batch, rows, dtype=torch.bool, device=dev)
        pad[1, 8:] = True  # True = padded row, as pio-arch has it
        return {"context": torch.randn(batch, rows, kw["input_dim"], device=dev, dtype=dt), "pad": pad}

    def forward(m, x):
        out = m(x["context"], x["pad"])
        return torch.cat([v.flatten(1) for v in out.values()], dim=1)

    return PeerModel(model, inputs, forward, batch=batch)


_LUCIDRAINS = "pip install perceiver-pytorch"
PEER_CASES: List[PeerCase] = [
    PeerCase("perceiver", "perceiver-pytorch", "Perceiver", "perceiver_pytorch", _LUCIDRAINS,
             "README size (224x224x3 image, depth 6, 256x512 latents, 2 self per cross)",
             "small (12x12x3 image, depth 1, 16x64 latents)", _perceiver, flash=True),
    PeerCase("perceiver-io", "perceiver-pytorch", "PerceiverIO", "perceiver_pytorch", _LUCIDRAINS,
             "README size (512x32 seq, 128 queries, depth 6, 256x512 latents)",
             "small (48x16 seq, 8 queries, depth 1, 16x64 latents)", _perceiver_io),
    PeerCase("perceiver-ar", "perceiver-ar-pytorch", "PerceiverAR", "perceiver_ar_pytorch",
             "pip install perceiver-ar-pytorch",
             "README size (4096 tokens, prefix 3072, dim 512, depth 8, 8x64 heads)",
             "small (64 tokens, prefix 48, dim 64, depth 1, 2x32 heads)", _perceiver_ar),
    PeerCase("krasserm-ar", "perceiver-io", "CausalSequenceModel", "perceiver.model.core",
             "pip install --no-deps --ignore-requires-python perceiver-io==0.11.0 einops fairscale",
             "docs' Perceiver AR (4096 tokens, 512 latents, 512 channels, 8 layers)",
             "small (64 tokens, 16 latents, 64 channels, 1 layer)", _krasserm_causal),
    PeerCase("pio-arch", "pio-arch", "PIOAttentionModel", "pio_arch.models.pio_attention",
             "pip install --no-deps --ignore-requires-python pio-arch==0.2.6 numpy",
             "README quick start (B4, 12 rows of 384, dim 64, 8 latents, 4 heads)",
             "small (B2, 12 rows of 384, dim 32, 4 latents, 2 heads)", _pio_arch),
]


def peer_case(name: str) -> PeerCase:
    """The case of :data:`PEER_CASES` named ``name``; KeyError for an unknown name."""
    for c in PEER_CASES:
        if c.name == name:
            return c
    raise KeyError(f"unknown peer case {name!r}; known: {', '.join(c.name for c in PEER_CASES)}")


def list_peer_cases() -> str:
    """The peer cases, one a line, for ``perceiver-fast bench --list``."""
    out = [f"{'peer case':<14} {'package / model':<40} sizes (README on a GPU; small on a CPU)"]
    for c in PEER_CASES:
        out.append(f"{c.name:<14} {c.package + ' ' + c.model:<40} {c.size}; {c.small_size}"
                   + ("; also flash-perceiver" if c.flash else ""))
    return "\n".join(out)


# ----------------------------------------------------------------------------
# building, counting, checking


def import_package(case: PeerCase) -> None:
    """Import the case's package; ImportError with the install command where it is missing."""
    try:
        importlib.import_module(case.module)
    except ImportError as e:
        raise ImportError(f"{case.package} is not installed ({failure_reason(e)}); {case.install}") from None


def build_pair(case: PeerCase, small: bool, device: str, dtype: torch.dtype) -> Tuple[PeerModel, nn.Module, int]:
    """The case's unpatched model and a patched deep copy (same weights) on ``device`` in ``dtype``, and the
    number of modules :func:`~perceiver_fast.integrations.patch_model` patched."""
    from perceiver_fast.integrations import patch_model

    import_package(case)
    torch.manual_seed(0)
    built = case.build(small)
    ref = built.model.to(device=device, dtype=dtype)
    patched = copy.deepcopy(ref)
    report = patch_model(patched)
    return dataclasses.replace(built, model=ref), patched, report.total


class _CountOps(TorchDispatchMode):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.count = name, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() == self.name or func.name().startswith(self.name + "."):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_fused_calls(fn: Callable[[], object], op: str = FUSED_OP) -> int:
    """How many times ``fn()`` calls the fused attention op (``perceiver_fast::attention_fwd``), counted at the
    dispatcher (the same op events the torch profiler records), under no_grad."""
    with torch.no_grad(), _CountOps(op) as mode:
        fn()
    return mode.count


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    denom = ref.double().norm().item()
    diff = (out.double() - ref.double()).norm().item()
    if denom == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / denom


def parity(ref: nn.Module, patched: nn.Module, forward: Forward, inputs: Dict,
           backward: bool) -> Tuple[float, Optional[float]]:
    """(output relerr, largest parameter-gradient relerr or None) of ``patched`` against ``ref``, both in eval
    mode (dropout off) on the same inputs; the loss is ``(out * g).sum()`` for a fixed random ``g``."""
    modes = ref.training, patched.training
    ref.eval(), patched.eval()
    try:
        with torch.enable_grad() if backward else torch.no_grad():
            a, b = forward(ref, inputs), forward(patched, inputs)
            out_err = _rel(b.detach(), a.detach())
            if not backward:
                return out_err, None
            g = torch.randn(a.shape, generator=torch.Generator().manual_seed(0)).to(a)
            ref.zero_grad(set_to_none=True), patched.zero_grad(set_to_none=True)
            (a.float() * g.float()).sum().backward()
            (b.float() * g.float()).sum().backward()
        grad_err = 0.0
        for (name, p), (_, q) in zip(ref.named_parameters(), patched.named_parameters()):
            if p.grad is None and q.grad is None:
                continue
            if p.grad is None or q.grad is None:
                return out_err, float("inf")
            grad_err = max(grad_err, _rel(q.grad, p.grad))
        return out_err, grad_err
    finally:
        ref.train(modes[0]), patched.train(modes[1])
        ref.zero_grad(set_to_none=True), patched.zero_grad(set_to_none=True)


def path_note(device: str) -> str:
    """What the fused rows ran on ``device``, for the rows' notes."""
    backend = attention_backend(device)
    if backend == "torch":
        return "CPU: fused op runs its PyTorch path"
    if backend == "triton-interpreter":
        return "CPU: fused op runs the Triton interpreter"
    return "fused op runs the Triton kernels"


# ----------------------------------------------------------------------------
# rows


def _timed(model: nn.Module, built: PeerModel, inputs: Dict, check=None) -> Timed:
    forward = built.forward

    def fb():
        model.zero_grad(set_to_none=True)
        forward(model, inputs).float().sum().backward()

    return Timed(forward=lambda: forward(model, inputs), forward_backward=fb, prepare=lambda d: model.train(d != "fwd"),
                 check=check, images=built.batch if built.image else None,
                 cleanup=[lambda: model.zero_grad(set_to_none=True)])


def _fail_build(e: BaseException) -> Callable[[], Timed]:
    def build() -> Timed:
        raise e

    return build


def peer_case_rows(case: PeerCase, opts) -> List[Dict]:
    """The rows of one case: unpatched and patched, for each direction; flash-perceiver where the case has it."""
    from .backends import torch_dtype

    dev, dt = opts.device, opts.dtype
    directions = ["fwd", "fwd+bwd"] if opts.backward else ["fwd"]
    label = case.label(opts.small)
    base = dict(section="peer", name=case.name, label=label, dtype=dt, package=case.package)
    extra = dict(model=case.model)  # in memory only: the label names the model in the CSV/JSON
    rows = {b: [dict(make_row(direction=d, backend=b, **base), **extra, patched=b == PATCHED)
                 for d in directions] for b in (UNPATCHED, PATCHED)}
    out: List[Dict] = []
    try:
        pair = build_pair(case, opts.small, dev, torch_dtype(dt))
    except Exception as e:  # a missing package, a refused configuration
        for b in (UNPATCHED, PATCHED):
            out += time_rows(rows[b], _fail_build(e), dev, opts.quick)
    else:
        built, patched, n_modules = pair
        ref = built.model
        inputs = built.inputs(dev, torch_dtype(dt))
        note = path_note(dev)
        for r in rows[UNPATCHED] + rows[PATCHED]:
            r["B"] = built.batch
        nparam = sum(p.numel() for p in ref.parameters())
        calls = {}
        for b, model in ((UNPATCHED, ref), (PATCHED, patched)):
            model.eval()
            try:
                calls[b] = count_fused_calls(lambda m=model: built.forward(m, inputs))
            except Exception as e:  # noqa: BLE001 - the timing below records the failure
                calls[b] = None
                for r in rows[b]:
                    r["reason"] = failure_reason(e)
        tol = PEER_TOLERANCE.get(dt, 1e-5)
        cache: Dict[str, Tuple[float, Optional[float]]] = {}

        def check(direction: str) -> Dict:
            if "errs" not in cache:
                cache["errs"] = parity(ref, patched, built.forward, inputs, opts.backward)
            out_err, grad_err = cache["errs"]
            fields: Dict = {"relerr": out_err}
            if direction != "fwd":
                fields["grad_relerr"] = grad_err
            worst = max(out_err, grad_err if direction != "fwd" and grad_err is not None else 0.0)
            if not worst <= tol:
                fields.update(status="WRONG", reason=f"patched vs unpatched relerr {worst:.2e} > {tol:g}")
            return fields

        for b, model, chk in ((UNPATCHED, ref, None), (PATCHED, patched, check)):
            n = calls.get(b)
            for r in rows[b]:
                r["fused_calls"] = n
                r["label"] = f"{label} ({nparam / 1e6:.1f}M params)"
            rows_b = time_rows(rows[b], lambda model=model, chk=chk: _timed(model, built, inputs, chk), dev, opts.quick)
            for r in rows_b:
                if b == PATCHED:
                    what = f"{n} fused calls/forward ({n_modules} modules patched); {note}"
                else:
                    what = "the package's own attention" + (f" ({n} fused calls!)" if n else "")
                r["reason"] = f"{r['reason']}; {what}" if r["reason"] else what
            out += rows_b
    if case.flash:
        out += flash_rows(case, opts, base, directions)
    return out


# ----------------------------------------------------------------------------
# flash-perceiver


def _flash_perceiver(small: bool) -> PeerModel:
    """flash-perceiver's ``Perceiver`` with perceiver-pytorch's README sizes: the input is the same image with
    lucidrains' Fourier channels (3 + 2 * (2 * 6 + 1) = 29), flattened."""
    from flash_perceiver import Perceiver as FlashPerceiver

    kw = _lucidrains_perceiver_kwargs(small)
    channels = kw["input_channels"] + kw["input_axis"] * (2 * kw["num_freq_bands"] + 1)
    model = FlashPerceiver(input_dim=channels, depth=kw["depth"], output_dim=kw["num_classes"],
                           num_latents=kw["num_latents"], latent_dim=kw["latent_dim"], cross_heads=kw["cross_heads"],
                           cross_head_dim=kw["cross_dim_head"], self_per_cross_attn=kw["self_per_cross_attn"],
                           self_heads=kw["latent_heads"], self_head_dim=kw["latent_dim_head"])
    side = _image_side(small)
    return PeerModel(model, lambda dev, dt: {"x": torch.randn(1, side * side, channels, device=dev, dtype=dt)},
                     lambda m, x: m(x["x"]), batch=1, image=True)


def flash_rows(case: PeerCase, opts, base: Dict, directions: Sequence[str]) -> List[Dict]:
    """flash-perceiver rows: FAIL with the reason where it does not import, SKIP where it cannot run here
    (it needs CUDA and fp16/bf16), else timed."""
    from .backends import torch_dtype

    dev, dt = opts.device, opts.dtype
    rows = [dict(make_row(direction=d, backend=FLASH, **dict(base, label=f"flash-perceiver Perceiver, "
                                                                         f"{case.label(opts.small).split(', ', 1)[1]}")),
                 package="flash-perceiver", model="Perceiver", patched=False, fused_calls=None) for d in directions]
    try:
        importlib.import_module("flash_perceiver")
    except ImportError as e:
        reason = (f"flash-perceiver does not import ({failure_reason(e)}); pip install flash-perceiver "
                  f"(needs flash-attn, CUDA)")
        for r in rows:
            r.update(status="FAIL", reason=reason)
        return rows
    why = None
    if not is_cuda(dev):
        why = "n/a on this device: flash-perceiver runs on CUDA only (flash-attn)"
    elif dt not in ("bfloat16", "float16"):
        why = f"n/a in {dt}: flash-perceiver runs in fp16/bf16 only (flash-attn)"
    if why:
        for r in rows:
            r.update(status="SKIP", reason=why)
        return rows

    def build() -> Timed:
        torch.manual_seed(0)
        built = _flash_perceiver(opts.small)
        model = built.model.to(device=dev, dtype=torch_dtype(dt))
        return _timed(model, built, built.inputs(dev, torch_dtype(dt)))

    return time_rows(rows, build, dev, opts.quick)


# ----------------------------------------------------------------------------
# jobs and the table


def peer_names() -> List[str]:
    """Every peer case name (``--peer all``)."""
    return [c.name for c in PEER_CASES]


def peer_jobs(opts) -> List[Job]:
    """One job per selected case (``opts.peer``: a list of names; None or [] selects none here, the runner
    resolves the default)."""
    return [Job("peer", f"peer {c.name}", lambda c=c: peer_case_rows(c, opts), weight=3.0)
            for c in PEER_CASES if opts.peer and c.name in opts.peer]


def _f(x, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and x != x) else fmt.format(x)


def format_peer_table(rows: List[Dict]) -> str:
    """The peer rows as a text table ('' when there are none): package, model, patched or not, direction, ms,
    speedup of patched over unpatched, fused calls in one forward, max relative error, status and note."""
    rows = [r for r in rows if r.get("section") == "peer"]
    if not rows:
        return ""
    lines = ["## peer (community models: patch_model vs unpatched, same weights)",
             f"{'package':<21} {'model':<20} {'impl':<22} {'dir':<7} {'ms':>9} {'x unpat':>7} {'fused':>5} "
             f"{'relerr':>8} {'grad rel':>8}  note"]
    for r in rows:
        note = r.get("reason") or ""
        if r.get("status") not in ("ok",):
            note = f"{r.get('status')} {note}".strip()
        lines.append(f"{str(r.get('package') or r['name'])[:21]:<21} {str(r.get('model') or '')[:20]:<20} "
                     f"{str(r.get('backend') or '')[:22]:<22} {str(r.get('direction') or ''):<7} "
                     f"{_f(r.get('ms'), '{:.3f}'):>9} {_f(r.get('speedup_vs_eager'), '{:.2f}'):>7} "
                     f"{_f(r.get('fused_calls'), '{:d}'):>5} {_f(r.get('relerr'), '{:.1e}'):>8} "
                     f"{_f(r.get('grad_relerr'), '{:.1e}'):>8}  {note[:110]}")
    sizes = sorted({r["label"] for r in rows if r.get("label")})
    if sizes:
        lines.append("sizes: " + " | ".join(sizes))
    return "\n".join(lines)
