#!/usr/bin/env python3
"""GPU first contact (issue 21): build, correctness, bench and collect in ONE device call of at most 9 minutes.

On the device machine (the device tool sets $OUT; give the run call timeout_s 560)::

    bash benchmarks/gpu_first_contact.sh

Dry run here, on the CPU (no build; tests under the Triton interpreter; bench --quick on the CPU at small sizes)::

    OUT=$(mktemp -d) bash benchmarks/gpu_first_contact.sh --cpu-dry-run

Steps, in this order, each with its own time limit (a `timeout -k 10` around every command plus a watchdog
here), so that a hang in one step cannot eat the next; the whole script stops by DEADLINE_S (530 s):

0. env (15 s): nvidia-smi, python / torch / triton versions, whether pytest-timeout is there.
1. build (120 s): ``MAX_JOBS=16 PERCEIVER_FAST_CUDA_ARCHS=90 python3 -m pip install --no-build-isolation
   --no-deps -e .``, then a check that the CUDA Fourier kernels are in the extension. A failed build does
   not stop the script (the Triton kernels need no build; the CUDA encoder tests then fail and say so).
2. correctness (240 s in all, first and most important), each pytest run with ``-x`` and a per-test
   ``--timeout`` (pytest-timeout is in the H200 image; without it only the outer ``timeout`` applies):
   a. tests/test_attention.py -m gpu: bf16 and fp16 against float64 on head dims 512 / 261 / 322 (and 64,
      128), forward and backward; fp32 with and without tf32; split-KV; int64 offsets (K > 2**31 elements);
   b. tests/test_fourier.py tests/test_models_cuda.py -m gpu: the CUDA encoder against the C++ one (every
      dtype), its gradients and >2**31-element output; bf16 autocast models; CUDA-graph capture and
      replay; one HF Perceiver patched against unpatched;
   c. tests/test_attention_features.py -k triton: GQA / causal / softcap on the GPU kernels against float64;
   d. tests/test_attention.py -m "not gpu" -k triton: the rest of the attention tests, which run on the
      GPU where there is one; best effort in what is left of the 240 s.
   Compile count (benchmarks/sm90_report.py, triton 3.6): 2-6 forward configs and 1-4 configs for each
   backward kernel per autotune key, 0.4-1.2 s each to compile; a-c come to roughly 100-150 compiles,
   which fits; d gets the rest of the step. Set TRITON_PRINT_AUTOTUNING=1 (done here) to log the picks.
3. bench (at most 180 s, ``--budget-s`` 45 s less): ``perceiver-fast bench --quick`` on the headline
   rows only: pio-learned, pio-fourier, pio-conv (forward and forward + backward), h8-d128, the Fourier
   encoder (with its torch.compile baseline), the learned layer, the learned Perceiver IO end to end.
4. collect (at most 8 files under $OUT): first_contact.log (everything printed; written by the .sh
   wrapper's tee), summary.json (per step: command, seconds, exit code, pytest counts), results.json,
   results.csv, table.txt and targets.md of the bench, plots.tar (its PNGs), autotune_picks.txt (every
   "best config selected" Triton printed during steps 2-3). A short table is printed last.

--cpu-dry-run proves selection and plumbing, not GPU correctness: the build is skipped (its command is
printed), every GPU-only test is SKIPPED on the CPU (the summary lists them with the reason), the
interpreter runs the CPU-runnable selections (step 2d only collects: under the interpreter it takes
minutes), and the bench runs --quick on the CPU at small sizes with the same --ops/--models/--backends.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 530  # the whole script; the device call gets timeout_s 560
STEP_S = {"env": 15, "build": 120, "correctness": 240, "bench": 180}
COLLECT_RESERVE_S = 15
BENCH_MARGIN_S = 45  # --budget-s = the bench's limit minus this: a case started just before the cut still ends
BENCH_OPS = "pio-learned,pio-fourier,pio-conv,h8-d128,fourier,layers"
BENCH_MODELS = "pio-learned"
BENCH_BACKENDS = "eager,compile,sdpa-cudnn,sdpa-efficient,sdpa-flash,fused,hf,hf-patched,ours"
BUILD_CMD = ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
BUILD_ENV = {"MAX_JOBS": "16", "PERCEIVER_FAST_CUDA_ARCHS": "90"}
# (name, pytest arguments, limit in s, per-test limit in s); run in this order inside the correctness step.
TEST_RUNS = [
    ("attention-gpu", ["tests/test_attention.py", "-m", "gpu"], 110, 90),
    ("fourier-models-gpu", ["tests/test_fourier.py", "tests/test_models_cuda.py", "-m", "gpu"], 70, 60),
    ("features-triton", ["tests/test_attention_features.py", "-k", "triton"], 60, 45),
    ("attention-triton", ["tests/test_attention.py", "-m", "not gpu", "-k", "triton"], 240, 45),
]
MIN_RUN_S = 15  # a test run with less time than this left in its step is recorded as SKIP
BENCH_FILES = ("results.json", "results.csv", "table.txt", "targets.md")

T0 = time.time()
LOG_LINES: list = []  # every child line, for the autotune picks


def now() -> float:
    return time.time() - T0


def say(msg: str) -> None:
    print(f"[{now():6.1f}s] {msg}", flush=True)


def run_cmd(name: str, argv: list, limit_s: float, env: dict) -> dict:
    """Run argv under `timeout -k 10 limit_s` (plus a watchdog), streaming its output; returns the step record."""
    limit_s = max(1, int(limit_s))
    full = (["timeout", "-k", "10", str(limit_s)] if shutil.which("timeout") else []) + argv
    say(f"== {name} (limit {limit_s} s): {' '.join(argv)}")
    t0 = time.time()
    lines: list = []
    proc = subprocess.Popen(full, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    watchdog = False
    try:
        proc.wait(timeout=limit_s + 20)
    except subprocess.TimeoutExpired:
        watchdog = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    LOG_LINES.extend(f"{name}\t{line}" for line in lines)
    rc = proc.returncode
    rec = dict(name=name, argv=argv, limit_s=limit_s, seconds=round(time.time() - t0, 1), rc=rc,
               timed_out=watchdog or rc in (124, 137))
    rec.update(pytest_counts("".join(lines[-30:])))
    say(f"== {name}: rc={rc}{' TIMED OUT' if rec['timed_out'] else ''} in {rec['seconds']} s"
        + (f" ({rec['summary']})" if rec.get("summary") else ""))
    return rec


def pytest_counts(tail: str) -> dict:
    """passed / failed / skipped / error / deselected counts from pytest's last summary line."""
    m = None
    for m in re.finditer(r"^=*\s*((?:\d+ \w+(?:, )?)+)(?: in [\d.]+s.*)?=*\s*$", tail, flags=re.M):
        pass
    if not m or not re.search(r"passed|failed|skipped|error|deselected|selected", m.group(1)):
        c = re.findall(r"^(\d+)(?:/(\d+))? tests? collected.*$", tail, flags=re.M)
        if c:
            return {"summary": f"{c[-1][0]} collected (--collect-only)", "counts": {"collected": int(c[-1][0])}}
        return {}
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (\w+)", m.group(1))}
    return {"summary": m.group(1).strip(", "), "counts": counts}


def skip_record(name: str, why: str) -> dict:
    say(f"== {name}: SKIP ({why})")
    return dict(name=name, rc=None, seconds=0.0, skipped=why)


def child_env(dry: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["TRITON_PRINT_AUTOTUNING"] = "1"  # Triton prints each autotune pick: collected into autotune_picks.txt
    if not dry:
        env.pop("TRITON_INTERPRET", None)
    return env


def step_env(py: str, env: dict, dry: bool) -> list:
    probe = ("import sys, platform, torch, triton, importlib.util as u; "
             "print('python', platform.python_version(), sys.executable); "
             "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); "
             "print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None); "
             "print('triton', triton.__version__); "
             "print('pytest-timeout', bool(u.find_spec('pytest_timeout'))); "
             "print('transformers', bool(u.find_spec('transformers')), 'timm', bool(u.find_spec('timm')))")
    recs = []
    if shutil.which("nvidia-smi"):
        recs.append(run_cmd("env-nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                               "clocks.sm,clocks.mem,temperature.gpu,power.draw",
                                               "--format=csv"], 10, env))
    else:
        say("env: no nvidia-smi here" + (" (dry run)" if dry else ""))
    recs.append(run_cmd("env-python", [py, "-c", probe], STEP_S["env"], env))
    return recs


def step_build(py: str, env: dict, dry: bool, limit_s: float) -> list:
    cmd = [py] + BUILD_CMD
    if dry:
        return [skip_record("build", "--cpu-dry-run: would run "
                            + " ".join(f"{k}={v}" for k, v in BUILD_ENV.items()) + " " + " ".join(cmd))]
    benv = dict(env, **BUILD_ENV)
    recs = [run_cmd("build", cmd, limit_s - 10, benv)]
    check = ("import torch, perceiver_fast._extension as E; E.load(); "
             "print('CUDA Fourier kernels in the extension:', E.cuda_available())")
    recs.append(run_cmd("build-check", [py, "-c", check], 10, env))
    return recs


def step_correctness(py: str, env: dict, dry: bool, limit_s: float, has_timeout_plugin: bool) -> list:
    end = time.time() + limit_s
    recs = []
    for name, args, cap, per_test in TEST_RUNS:
        left = end - time.time()
        if left < MIN_RUN_S:
            recs.append(skip_record(name, f"{left:.0f} s left in the correctness step"))
            continue
        argv = [py, "-m", "pytest", *args, "-x", "-q", "-s", "-rfEs", "-p", "no:cacheprovider"]
        if has_timeout_plugin:
            argv.append(f"--timeout={per_test}")
        if dry and name == "attention-triton":
            argv.append("--collect-only")  # under the interpreter this run takes minutes: prove the selection
        recs.append(run_cmd(name, argv, min(cap, left), env))
    return recs


def step_bench(py: str, env: dict, dry: bool, limit_s: float, bench_dir: str) -> list:
    budget = max(10, int(limit_s - BENCH_MARGIN_S))
    argv = [py, "-m", "perceiver_fast", "bench", "--quick", "--ops", BENCH_OPS, "--models", BENCH_MODELS,
            "--backends", BENCH_BACKENDS, "--budget-s", str(budget), "--out", bench_dir, "--no-progress"]
    if dry:
        argv += ["--device", "cpu"]
    return [run_cmd("bench", argv, limit_s, env)]


def autotune_picks() -> list:
    """'step  function  key  time  config' for every pick Triton printed (TRITON_PRINT_AUTOTUNING=1)."""
    picks, cur = [], None
    for entry in LOG_LINES:
        step, line = entry.split("\t", 1)
        m = re.search(r"Triton autotuning for function (\S+?),?\s*$", line)
        if m:
            cur = {"step": step, "function": m.group(1)}
            continue
        if cur is None:
            continue
        m = re.search(r"with key as (.*?),?\s*$", line)
        if m:
            cur["key"] = m.group(1)
        m = re.search(r"finished after ([\d.]+)s", line)
        if m:
            cur["seconds"] = m.group(1)
        m = re.search(r"best config selected: (.*?);?\s*$", line)
        if m:
            cur["config"] = m.group(1)
            picks.append(cur)
            cur = None
    return picks


def collect(out: str, bench_dir: str, recs: list, args) -> None:
    files = []
    for f in BENCH_FILES:
        p = os.path.join(bench_dir, f)
        if os.path.isfile(p):
            shutil.copy(p, os.path.join(out, f))
            files.append(f)
    pngs = sorted(f for f in os.listdir(bench_dir) if f.endswith(".png")) if os.path.isdir(bench_dir) else []
    if pngs:
        with tarfile.open(os.path.join(out, "plots.tar"), "w") as tar:
            for f in pngs:
                tar.add(os.path.join(bench_dir, f), arcname=f)
        files.append("plots.tar")
    picks = autotune_picks()
    with open(os.path.join(out, "autotune_picks.txt"), "w") as fh:
        fh.write("# step\tfunction\tkey\tseconds\tbest config (TRITON_PRINT_AUTOTUNING=1)\n")
        for p in picks:
            fh.write("\t".join(p.get(k, "?") for k in ("step", "function", "key", "seconds", "config")) + "\n")
        if not picks:
            fh.write("# none printed" + (" (dry run: the interpreter has one config per kernel, so Triton does "
                                         "not autotune)" if args.cpu_dry_run else "") + "\n")
    files.append("autotune_picks.txt")
    summary = dict(dry_run=args.cpu_dry_run, deadline_s=DEADLINE_S, step_limits_s=STEP_S, elapsed_s=round(now(), 1),
                   steps=recs, autotune_picks=len(picks), files=files + ["summary.json", "first_contact.log"])
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    extra = sorted(set(os.listdir(out)) - set(summary["files"]))
    if extra:
        say(f"collect: WARNING, more under $OUT than planned: {extra}")
    say(f"collect: {len(summary['files'])} files under {out}: {', '.join(summary['files'])}")


def final_table(recs: list, bench_dir: str) -> None:
    print("\n===== GPU first contact: summary =====")
    print(f"{'step':<22} {'rc':>4} {'s':>7} {'limit':>6}  result")
    for r in recs:
        res = r.get("skipped") and f"SKIP: {r['skipped']}" or r.get("summary") or ""
        if r.get("timed_out"):
            res = "TIMED OUT " + res
        print(f"{r['name']:<22} {str(r.get('rc')):>4} {r.get('seconds', 0):>7} {str(r.get('limit_s', '')):>6}  "
              f"{res[:110]}")
    res = os.path.join(bench_dir, "results.json")
    if os.path.isfile(res):
        rows = json.load(open(res)).get("rows", [])
        by = {}
        for r in rows:
            label = f"{r.get('name')} {r.get('direction') or ''} {r.get('backend') or ''}"
            by.setdefault(r.get("status"), []).append(label)
        print("bench rows: " + ", ".join(f"{k}={len(v)}" for k, v in sorted(by.items(), key=lambda kv: str(kv[0]))))
        for st in ("WRONG", "FAIL"):
            for line in by.get(st, [])[:12]:
                print(f"  {st}: {line.strip()}")
    targets = os.path.join(bench_dir, "targets.md")
    if os.path.isfile(targets):
        print("\n" + open(targets).read()[-5000:])
    print(f"total {now():.0f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no build, tests under the Triton interpreter, bench --quick on the CPU: finds typos here")
    p.add_argument("--python", default=sys.executable, help="interpreter for every step (default: this one)")
    args = p.parse_args(argv)
    out = os.environ.get("OUT")
    if not out:
        print("gpu_first_contact: set $OUT (the device tool does; for a dry run: OUT=$(mktemp -d))", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    dry = args.cpu_dry_run
    env = child_env(dry)
    py = args.python
    work = tempfile.mkdtemp(prefix="first_contact_")
    bench_dir = os.path.join(work, "bench-out")
    say(f"gpu_first_contact{' --cpu-dry-run' if dry else ''}: root {ROOT}, OUT {out}, deadline {DEADLINE_S} s")

    recs = step_env(py, env, dry)
    has_timeout_plugin = any("pytest-timeout True" in line for line in LOG_LINES)
    recs += step_build(py, env, dry, min(STEP_S["build"], DEADLINE_S - now() - COLLECT_RESERVE_S))
    left = DEADLINE_S - now() - COLLECT_RESERVE_S
    recs += step_correctness(py, env, dry, min(STEP_S["correctness"], left - 60), has_timeout_plugin)
    left = DEADLINE_S - now() - COLLECT_RESERVE_S
    if left >= 60:
        recs += step_bench(py, env, dry, min(STEP_S["bench"], left), bench_dir)
    else:
        recs.append(skip_record("bench", f"only {left:.0f} s left before the deadline"))
    collect(out, bench_dir, recs, args)
    final_table(recs, bench_dir)
    bad = [r["name"] for r in recs if r.get("rc") not in (None, 0) and not r["name"].startswith("env")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
