"""``fused-ckpt bench --compare A.json B.json``: ratios between two benchmark runs.

Rows are matched by (suite, shape, variant); for each pair measured in both runs it prints
B's median time / A's (below 1: B is faster), the speed-up A/B, and B/A of saved bytes, CUDA
peak and tokens/s where both runs have them; then the targets side by side. A folder may be
given instead of its ``results.json``.
"""
from __future__ import annotations

import json
import os
import sys

from ._report import fmt, markdown_table


class CompareError(ValueError):
    pass


def load(path: str) -> dict:
    p = os.path.join(path, "results.json") if os.path.isdir(path) else path
    if not os.path.exists(p):
        raise CompareError(f"no such file: {p}")
    try:
        with open(p) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{p} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise CompareError(f"{p} is not a fused-ckpt bench results.json (no 'rows' list)")
    return data


def _key(r: dict) -> tuple:
    return (r.get("suite"), r.get("shape"), r.get("variant"))


def _ms(r: dict):
    t = r.get("time_ms")
    return t.get("median_ms") if isinstance(t, dict) else None


def _ratio(b, a):
    if a is None or b is None or not a:
        return None
    return b / a


def compare(a: dict, b: dict) -> tuple:
    """(matched rows, keys only in A, keys only in B); each matched row is a dict of ratios."""
    ra = {_key(r): r for r in a["rows"] if r.get("status") == "ok"}
    rb = {_key(r): r for r in b["rows"] if r.get("status") == "ok"}
    out = []
    for k in ra:
        if k not in rb:
            continue
        x, y = ra[k], rb[k]
        out.append({"suite": k[0], "shape": k[1], "variant": k[2], "a_ms": _ms(x), "b_ms": _ms(y),
                    "time_ratio": _ratio(_ms(y), _ms(x)), "speedup": _ratio(_ms(x), _ms(y)),
                    "saved_ratio": _ratio(y.get("saved_bytes"), x.get("saved_bytes")),
                    "peak_ratio": _ratio(y.get("peak_bytes"), x.get("peak_bytes")),
                    "tokens_ratio": _ratio(y.get("tokens_per_s"), x.get("tokens_per_s"))})
    return out, [k for k in ra if k not in rb], [k for k in rb if k not in ra]


def _describe(d: dict, path: str) -> str:
    m = d.get("machine", {})
    return (f"{path}: {d.get('date', '?')}, {d.get('device', '?')} {d.get('dtype', '?')}, "
            f"{m.get('gpu') or m.get('cpu', '?')}{' (quick)' if d.get('quick') else ''}")


def render(a: dict, b: dict, path_a: str, path_b: str) -> str:
    rows, only_a, only_b = compare(a, b)
    lines = ["A = " + _describe(a, path_a), "B = " + _describe(b, path_b), ""]
    if rows:
        body = [[r["suite"], r["shape"], r["variant"], fmt(r["a_ms"], ".3f"), fmt(r["b_ms"], ".3f"),
                 fmt(r["time_ratio"]), fmt(r["speedup"]), fmt(r["saved_ratio"]), fmt(r["peak_ratio"]),
                 fmt(r["tokens_ratio"])] for r in rows]
        lines.append(markdown_table(["suite", "shape", "variant", "A ms", "B ms", "B/A time", "speed-up A/B",
                                     "B/A saved", "B/A peak", "B/A tokens/s"], body))
    lines.append("")
    lines.append(f"{len(rows)} rows in both runs; {len(only_a)} only in A, {len(only_b)} only in B "
                 "(rows are matched by suite, shape and variant; skipped or failed rows are left out)")
    ta = {t["id"]: t for t in a.get("targets", [])}
    tb = {t["id"]: t for t in b.get("targets", [])}
    common = [k for k in ta if k in tb]
    if common:
        body = [[k, f"{fmt(ta[k].get('value'))} ({ta[k]['status']})", f"{fmt(tb[k].get('value'))} ({tb[k]['status']})"]
                for k in common]
        lines += ["", markdown_table(["target", "A", "B"], body)]
    return "\n".join(lines)


def compare_files(path_a: str, path_b: str, prog: str = "fused-ckpt bench") -> int:
    try:
        a, b = load(path_a), load(path_b)
    except CompareError as e:
        print(f"{prog}: error: --compare: {e}", file=sys.stderr)
        return 2
    print(render(a, b, path_a, path_b))
    rows, _, _ = compare(a, b)
    if not rows:
        print(f"{prog}: error: --compare: the two runs have no row in common (different suites or shapes?)",
              file=sys.stderr)
        return 1
    return 0
