"""Printing and writing a bench run: a text table, results.csv, results.json
(environment + rows, one schema), targets.md, and PNG plots."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict

from .schema import ROW_FIELDS
from .targets import evaluate


def _f(x, fmt="{:.3f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return fmt.format(x)


def format_table(result: Dict) -> str:
    rows = result["rows"]
    lines = []
    env = result["env"]
    lines.append(f"# perceiver-fast bench  {env['date']}  {env['device']}  torch {env['torch']}  "
                 f"triton {env['triton']}  commit {env['git_commit']}  fused path: {env['fused_path']}")
    hdr = f"{'case':<46} {'dir':<7} {'backend':<19} {'ms':>9} {'p20-p80 ms':>17} {'x eager':>7} {'x sdpa':>7} " \
          f"{'TFLOP/s':>7} {'GB/s':>6} {'img/s':>7} {'peakMiB':>8}  note"
    for section in ("ceiling", "op", "sweep", "headdim", "fit", "layer", "model"):
        srows = [r for r in rows if r["section"] == section]
        if not srows:
            continue
        lines.append("")
        lines.append(f"## {section}")
        lines.append(hdr)
        for r in srows:
            case = r["label"] if section in ("op", "layer") and r.get("label") else r["name"]
            if section in ("sweep", "fit") and r.get("M") is not None:
                case = f"M={r['M']} (B{r['B']} N{r['N']} H{r['H']} D{r['Dqk']})"
            if section == "headdim":
                case = f"D={r['Dqk']} (B{r['B']} N{r['N']} M{r['M']} H{r['H']})"
            spread = f"{_f(r['ms_p20'])}-{_f(r['ms_p80'])}" if r.get("ms_p20") is not None else ""
            note = r["reason"] or ""
            if r["status"] not in ("ok",):
                note = f"{r['status']} {note}".strip()
            lines.append(
                f"{str(case)[:46]:<46} {str(r['direction'] or ''):<7} {str(r['backend'] or ''):<19} "
                f"{_f(r['ms']):>9} {spread:>17} {_f(r['speedup_vs_eager'], '{:.2f}'):>7} "
                f"{_f(r['speedup_vs_best_sdpa'], '{:.2f}'):>7} {_f(r['tflops'], '{:.1f}'):>7} "
                f"{_f(r['gbs'], '{:.0f}'):>6} {_f(r['images_per_s'], '{:.0f}'):>7} "
                f"{_f(r['peak_mib'], '{:.0f}'):>8}  {note[:70]}")
    return "\n".join(lines)


def targets_markdown(result: Dict) -> str:
    env = result["env"]
    if env.get("small_sizes") or not env.get("gpu"):
        return ("Targets are defined for the H200 at full sizes; this run was on "
                f"{env['device']} at small sizes, so they were not evaluated.\n")
    res = evaluate(result["rows"])
    out = [f"Targets, measured {env['date']} on {env['device']}:", "",
           "| target | anchor (2026-11-20) | this run | verdict |", "|---|---|---|---|"]
    for r in res:
        out.append(f"| {r['target']} | {r['anchor']} | {r['measured']} | {r['verdict']} |")
    return "\n".join(out) + "\n"


def write_csv(result: Dict, path: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=ROW_FIELDS)
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in ROW_FIELDS})


def write_json(result: Dict, path: str) -> None:
    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        return x

    data = {"env": result["env"], "fields": ROW_FIELDS,
            "rows": [{k: clean(r[k]) for k in ROW_FIELDS} for r in result["rows"]],
            "targets": evaluate(result["rows"]) if not result["env"].get("small_sizes") else []}
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, default=str)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(result: Dict, path: str) -> bool:
    rows = [r for r in result["rows"] if r["section"] == "sweep" and r["status"] == "ok" and r["ms"]]
    if not rows:
        return False
    plt = _plt()
    env = result["env"]
    has_mem = any(r["peak_mib"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(12 if has_mem else 6.5, 4.5), squeeze=False)
    backends = sorted({r["backend"] for r in rows}, key=lambda b: (b != "eager", b != "fused", b))
    r0 = rows[0]
    for b in backends:
        br = sorted((r for r in rows if r["backend"] == b), key=lambda r: r["M"])
        ms = [r["M"] for r in br]
        style = dict(marker="o", lw=2.5 if b == "fused" else 1.5)
        axes[0][0].plot(ms, [r["ms"] for r in br], label=b, **style)
        if has_mem:
            axes[0][1].plot(ms, [max(r["peak_mib"] or 0, 1e-2) for r in br], label=b, **style)
    axes[0][0].set(xscale="log", yscale="log", xlabel="input length M", ylabel="forward time (ms)",
                   title=f"cross-attention B{r0['B']} N{r0['N']} H{r0['H']} D{r0['Dqk']} {r0['dtype']}")
    if has_mem:
        axes[0][1].set(xscale="log", yscale="log", xlabel="input length M", ylabel="peak extra memory (MiB)",
                       title="memory beyond inputs and outputs")
    for ax in axes[0]:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{env['device']} - {env['date'][:10]} - fused path: {env['fused_path']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_models(result: Dict, path: str) -> bool:
    rows = [r for r in result["rows"] if r["section"] == "model" and r["status"] == "ok" and r["images_per_s"]]
    if not rows:
        return False
    plt = _plt()
    env = result["env"]
    labels = []
    values = []
    for r in rows:
        labels.append(f"{r['name']} {r['direction']}\n{r['backend']}")
        values.append(r["images_per_s"])
    fig, ax = plt.subplots(figsize=(max(6.5, 0.55 * len(rows) + 2), 4.8))
    colors = ["tab:green" if "fused" in r["backend"] else ("tab:blue" if "sdpa" in r["backend"] else "tab:gray")
              for r in rows]
    ax.bar(range(len(rows)), values, color=colors)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("images / s")
    ax.set_title(f"model throughput, {rows[0]['dtype']} - {env['device']} - {env['date'][:10]}", fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(result: Dict, out_dir: str) -> Dict[str, str]:
    """Write results.csv, results.json, table.txt, targets.md and the plots; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"csv": os.path.join(out_dir, "results.csv"), "json": os.path.join(out_dir, "results.json"),
             "table": os.path.join(out_dir, "table.txt"), "targets": os.path.join(out_dir, "targets.md")}
    write_csv(result, paths["csv"])
    write_json(result, paths["json"])
    with open(paths["table"], "w") as fh:
        fh.write(format_table(result) + "\n")
    with open(paths["targets"], "w") as fh:
        fh.write(targets_markdown(result))
    p = os.path.join(out_dir, "cross_attention_vs_M.png")
    if plot_sweep(result, p):
        paths["plot_sweep"] = p
    p = os.path.join(out_dir, "models_images_per_s.png")
    if plot_models(result, p):
        paths["plot_models"] = p
    return paths
