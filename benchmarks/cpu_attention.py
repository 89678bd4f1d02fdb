"""CPU attention, before/after the fused-kernel route of the "torch" backend, in one run (issue 11, section 5).

    PYTHONPATH=. python benchmarks/cpu_attention.py            # the attention shapes
    PYTHONPATH=. python benchmarks/cpu_attention.py --models   # and HF Perceivers, patched vs not
    PYTHONPATH=. python benchmarks/cpu_attention.py --backward # and forward + backward

Attention rows: the issue's shapes (perceiver_fast.bench.shapes) at B1, fp32,
forward under no_grad, median ms of ``--reps`` rounds after one warm-up round
(rounds interleave the contenders, so load from other users of a shared CPU
hits them alike) of

* eager: matmul / softmax / matmul (:func:`attention_reference`);
* SDPA: ``F.scaled_dot_product_attention`` on (B, H, S, D) tensors;
* chunked: our op with the fused CPU kernel route switched off, i.e. the
  chunked loop every CPU call ran before;
* ours: our op as shipped (``backend="torch"``).

err: max |out - float64 eager| over batch element 0. ``--backward`` adds
forward + backward rows (``torch.autograd.grad`` of q, k, v; no SDPA column,
its inputs are other leaves). Model rows: transformers'
PerceiverForImageClassification{Learned,Fourier} (random init, deepmind
config, one 224x224 image) unpatched, patched with the route off, patched.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from typing import Callable, Dict, Iterator

import torch
import torch.nn.functional as F

from perceiver_fast.bench import shapes as S
from perceiver_fast.bench.backends import attn_inputs, attn_reference64
from perceiver_fast.bench.models import builder
from perceiver_fast.ops import attention as ops
from perceiver_fast.ops import attention_cpu
from perceiver_fast.ops.reference import attention_reference

ATTN_ROWS = ["pio-learned", "pio-fourier", "pio-latent", "vit-b16"]
MODEL_ROWS = ["pio-learned", "pio-fourier"]


@contextlib.contextmanager
def chunked_only() -> Iterator[None]:
    """Route every "torch"-backend call to the chunked loop, as before the fused CPU kernel route."""
    saved = attention_cpu.sdpa_cpu_accepts
    attention_cpu.sdpa_cpu_accepts = lambda *args: False
    try:
        yield
    finally:
        attention_cpu.sdpa_cpu_accepts = saved


def interleaved_ms(fns: Dict[str, Callable[[], object]], reps: int) -> Dict[str, float]:
    """Median ms of each callable over ``reps`` rounds, each round calling every one once, after a warm-up round."""
    times: Dict[str, list] = {key: [] for key in fns}
    for rnd in range(reps + 1):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rnd:
                times[key].append(1e3 * (time.perf_counter() - t0))
    return {key: statistics.median(t) for key, t in times.items()}


def chunked(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the fused CPU kernel route off."""
    def run():
        with chunked_only():
            return fn()
    return run


def attention_rows(reps: int) -> None:
    print("| shape | eager ms | SDPA ms | chunked (before) ms | ours (after) ms | after/before | after/SDPA "
          "| err eager | err ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ATTN_ROWS:
        shape = S.attn_shape(name)
        shape = shape.replace(B=1, q_batch=1 if shape.Bq == 1 else None)
        inp = attn_inputs(shape, "float32", "cpu")
        q, k, v = inp["q"], inp["k"], inp["v"]
        sq, sk, sv = inp["sdpa"]
        op = ops.cross_attention if shape.op == "cross" else ops.self_attention
        fns: Dict[str, Callable[[], torch.Tensor]] = {
            "eager": lambda: attention_reference(q, k, v),
            "sdpa": lambda: F.scaled_dot_product_attention(sq, sk, sv).transpose(1, 2),
            "ours": lambda: op(q, k, v, backend="torch"),
        }
        fns["chunked"] = chunked(fns["ours"])
        ref = attn_reference64(inp, shape)
        with torch.no_grad():
            ms = interleaved_ms(fns, reps)
            err = {key: (fns[key]()[:1].double() - ref).abs().max().item() for key in ("eager", "ours")}
        print(f"| {shape.label()} | {ms['eager']:.1f} | {ms['sdpa']:.1f} | {ms['chunked']:.1f} | {ms['ours']:.1f} "
              f"| {ms['ours'] / ms['chunked']:.2f} | {ms['ours'] / ms['sdpa']:.2f} | {err['eager']:.1e} "
              f"| {err['ours']:.1e} |", flush=True)


def backward_rows(reps: int) -> None:
    print("\n| shape, forward + backward | eager ms | chunked (before) ms | ours (after) ms | after/before "
          "| after/eager |")
    print("|---|---|---|---|---|---|")
    for name in ATTN_ROWS:
        shape = S.attn_shape(name)
        shape = shape.replace(B=1, q_batch=1 if shape.Bq == 1 else None)
        inp = attn_inputs(shape, "float32", "cpu", requires_grad=True)
        q, k, v, grad = inp["q"], inp["k"], inp["v"], inp["d_out"]
        op = ops.cross_attention if shape.op == "cross" else ops.self_attention

        def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
            return lambda: torch.autograd.grad(fn(), [q, k, v], grad)

        fns = {"eager": fwd_bwd(lambda: attention_reference(q, k, v)),
               "ours": fwd_bwd(lambda: op(q, k, v, backend="torch"))}
        fns["chunked"] = chunked(fns["ours"])
        ms = interleaved_ms(fns, reps)
        print(f"| {shape.label()} | {ms['eager']:.1f} | {ms['chunked']:.1f} | {ms['ours']:.1f} "
              f"| {ms['ours'] / ms['chunked']:.2f} | {ms['ours'] / ms['eager']:.2f} |", flush=True)


def model_rows(reps: int) -> None:
    from perceiver_fast.integrations import patch_hf_perceiver

    print("\n| HF model, B1 224x224 fp32 | HF ms | patched, chunked (before) ms | patched (after) ms "
          "| after/HF | before/HF |")
    print("|---|---|---|---|---|---|")
    for name in MODEL_ROWS:
        case = dataclasses.replace(S.model_case(name), batch=1)
        model, fwd = builder(case, "hf:eager")()
        model.eval()
        x = torch.randn(1, case.channels, case.image_size, case.image_size)
        patched, _ = builder(case, "hf:eager")()
        patched.load_state_dict(model.state_dict())
        patch_hf_perceiver(patched.eval())
        with torch.no_grad():
            ms = interleaved_ms({"hf": lambda: fwd(model, x), "before": chunked(lambda: fwd(patched, x)),
                                 "after": lambda: fwd(patched, x)}, reps)
        hf, before, after = ms["hf"], ms["before"], ms["after"]
        print(f"| {name} | {hf:.0f} | {before:.0f} | {after:.0f} | {after / hf:.2f} | {before / hf:.2f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", action="store_true", help="also time HF Perceivers, patched vs not")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds per row (median)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps} interleaved rounds")
    attention_rows(args.reps)
    if args.backward:
        backward_rows(args.reps)
    if args.models:
        model_rows(args.reps)


if __name__ == "__main__":
    main()
