"""Survey of the real-client cases in test_hf_clients.py: runs each case with counting wrappers around the registered
attention function and mask function, and prints per case the attention-interface calls (shapes, mask, tensor
kwargs), the mask-interface calls, the fused calls seen, the relative error against eager, or the exception.

    python tests/hf_clients_survey.py [--rev=REV] [case ...]

--rev=REV registers perceiver_fast/integrations/hf_attention.py as committed at git revision REV under the same name
instead of the working tree's, to compare before / after (its imports resolve against the working tree).
"""
from __future__ import annotations

import os
import sys
import traceback

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers import masking_utils, modeling_utils  # noqa: E402

import test_hf_clients as clients  # noqa: E402

NAME = clients.NAME
LOG = []


def _describe(value):
    if torch.is_tensor(value):
        return f"{tuple(value.shape)}:{str(value.dtype).replace('torch.', '')}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return type(value).__name__


def _register_rev(rev):
    import subprocess
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{rev}:perceiver_fast/integrations/hf_attention.py"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"hf_attention_{rev}")
    module.__file__ = f"{rev}:perceiver_fast/integrations/hf_attention.py"
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    modeling_utils.AttentionInterface.register(NAME, module.hf_attention_forward)
    masking_utils.AttentionMaskInterface.register(NAME, module.hf_attention_mask)


def _wrap():
    attention = modeling_utils.ALL_ATTENTION_FUNCTIONS[NAME]
    mask_fn = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[NAME]

    def counting_attention(module, query, key, value, attention_mask, *args, **kwargs):
        extra = {k: _describe(v) for k, v in kwargs.items() if v is not None and k not in ("scaling", "dropout")}
        LOG.append(f"  attn {type(module).__name__}: q{_describe(query)} k{_describe(key)} "
                   f"mask={_describe(attention_mask)} is_causal={kwargs.get('is_causal')} "
                   f"module.is_causal={getattr(module, 'is_causal', '-')} extra={extra}")
        return attention(module, query, key, value, attention_mask, *args, **kwargs)

    def counting_mask(*args, **kwargs):
        out = mask_fn(*args, **kwargs)
        fn = kwargs.get("mask_function")
        LOG.append(f"  mask q={kwargs.get('q_length')} kv={kwargs.get('kv_length')} q_off={kwargs.get('q_offset')} "
                   f"kv_off={kwargs.get('kv_offset')} fn={getattr(fn, '__name__', fn)} "
                   f"in={_describe(kwargs.get('attention_mask'))} -> {_describe(out)}")
        return out

    modeling_utils.ALL_ATTENTION_FUNCTIONS[NAME] = counting_attention
    masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[NAME] = counting_mask


def main(names):
    for arg in [n for n in names if n.startswith("--rev=")]:
        names = [n for n in names if n != arg]
        _register_rev(arg[len("--rev="):])
    _wrap()
    rows = []
    for name in names or list(clients.CASES):
        LOG.clear()
        print(f"== {name}", flush=True)
        try:
            case = clients.CASES[name]()
            errors, fused = clients._execute(case)
            worst = max(errors, key=errors.get)
            result = f"{errors[worst]:.2e} ({worst})"
            own = [f"{k}={v:.1e}" for k, v in errors.items() if "own path" in k]
            if own:
                result += "; eager/sdpa disagree, own path decides: " + ", ".join(own)
        except BaseException as exc:  # noqa: BLE001 - a survey reports every failure
            if isinstance(exc, KeyboardInterrupt):
                raise
            case, fused = None, "-"
            result = f"CRASH {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            traceback.print_exc(limit=-3)
        # only our model goes through NAME: the reference is eager
        attn = [line for line in LOG if line.startswith("  attn")]
        for line in LOG:
            print(line)
        rows.append((name, len(attn), case.expected_fused if case else "-", fused, result))
    print("\n| case | interface calls (ours) | expected fused | fused now | max rel err / crash |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
