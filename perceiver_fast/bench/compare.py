"""``perceiver-fast bench --compare OLD/results.json``: each case's change in time against an
earlier run, and whether any case slowed down past a threshold."""
from __future__ import annotations

import json
from typing import Dict, List, Tuple

KEY = ("section", "name", "direction", "dtype", "backend")


def load_rows(path: str) -> List[Dict]:
    """The rows of a results.json written by the bench; ValueError naming the file if it is not one."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--compare {path!r}: cannot read it as JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"--compare {path!r}: not a bench results.json (no 'rows' list)")
    return data["rows"]


def compare(old: List[Dict], new: List[Dict], threshold: float = 0.10) -> Tuple[List[str], List[Dict]]:
    """(lines to print, the regressed cases). A case is regressed when its new median is more than
    ``threshold`` (0.10 = 10%) slower; only cases timed ok in both runs are compared."""
    before = {tuple(r.get(k) for k in KEY): r for r in old if r.get("status") == "ok" and r.get("ms")}
    lines = [f"{'case':<40} {'dir':<7} {'backend':<19} {'old ms':>9} {'new ms':>9} {'change':>8}"]
    regressed: List[Dict] = []
    for r in new:
        o = before.get(tuple(r.get(k) for k in KEY))
        if o is None or r.get("status") != "ok" or not r.get("ms"):
            continue
        change = r["ms"] / o["ms"] - 1.0
        flag = ""
        if change > threshold:
            flag = "  SLOWER"
            regressed.append(dict(r, change=change, old_ms=o["ms"]))
        lines.append(f"{str(r['name'])[:40]:<40} {str(r['direction']):<7} {str(r['backend']):<19} "
                     f"{o['ms']:>9.3f} {r['ms']:>9.3f} {change:>+8.1%}{flag}")
    if len(lines) == 1:
        lines.append("(no case timed ok in both runs)")
    lines.append(f"{len(regressed)} case(s) slower than the threshold of {threshold:.0%}")
    return lines, regressed
