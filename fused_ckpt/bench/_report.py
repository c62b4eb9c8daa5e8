"""Reporting shared by the suites: machine and versions, targets, markdown tables, the
``results.json`` / ``results.md`` writer, plots and the progress bar."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

SCHEMA = "fused_ckpt.bench/1"


# ------------------------------------------------------------------------------ machine
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers", "matplotlib"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - a missing optional package is a fact to record
            out[mod] = f"unavailable ({type(e).__name__})"
    try:
        from .. import __version__ as v
        out["fused_ckpt"] = v
    except Exception:  # pragma: no cover
        out["fused_ckpt"] = "unknown"
    out["cuda"] = torch.version.cuda
    return out


def machine_info(device) -> dict:
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": None,
    }
    if hasattr(os, "getloadavg"):  # a busy shared machine skews CPU timings: record it
        info["loadavg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
    return info


# ------------------------------------------------------------------------------ targets
MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"


@dataclass
class Target:
    """``value <op> limit``; ``status`` is met / not met / not measured (``detail`` says why)."""

    id: str
    suite: str
    what: str
    op: str            # "<=", ">=", "<" or ">"
    limit: float
    value: Optional[float] = None
    measured: bool = True
    detail: str = ""
    info_value: Optional[float] = None   # the same ratio measured where the target does not apply
    force_status: Optional[str] = None   # e.g. "not met" when the target's condition cannot be reached

    @property
    def status(self) -> str:
        if self.force_status is not None:
            return self.force_status
        if not self.measured or self.value is None or not math.isfinite(self.value):
            return NOT_MEASURED
        ok = {"<=": self.value <= self.limit, ">=": self.value >= self.limit,
              "<": self.value < self.limit, ">": self.value > self.limit}[self.op]
        return MET if ok else NOT_MET

    def to_json(self) -> dict:
        return {"id": self.id, "suite": self.suite, "what": self.what, "op": self.op, "limit": self.limit,
                "value": finite(self.value), "status": self.status, "detail": self.detail,
                "info_value": finite(self.info_value)}


# ------------------------------------------------------------------------------ formatting
def finite(v):
    """``v`` if it is a finite number, else None (JSON has no NaN/inf)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def clean_json(obj):
    """Replace non-finite floats by None, recursively."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return finite(obj)


def fmt(v, spec: str = ".3f", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def fmt_bytes(n, none: str = "—") -> str:
    if n is None:
        return none
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c).replace("|", "\\|") for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def short_error(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def write_results(out_dir: str, payload: dict, markdown: str) -> None:
    """``results.json`` and ``results.md`` in ``out_dir``, each written atomically, so a run that
    is killed part-way leaves the last complete snapshot."""
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps(clean_json(payload), indent=1, default=str, allow_nan=False) + "\n"
    for name, body in (("results.json", text), ("results.md", markdown)):
        tmp = os.path.join(out_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(body)
        os.replace(tmp, os.path.join(out_dir, name))


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``) into SystemExit so ``finally`` blocks write partial results."""
    def handler(signum, frame):
        raise SystemExit(f"terminated by signal {signum}")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


# ------------------------------------------------------------------------------ progress
class Progress:
    """The run's progress on stderr: tqdm when installed, else one line per completed step.

    The bar's total is the whole run, fixed up front: ``suites`` is ``[(name, parts), ...]``
    and every suite gets an equal share of the bar, split equally between its ``parts`` (the
    shapes it measures). Within a part the bar follows the steps the harness announces
    (:meth:`add_total`) and completes (:meth:`update`); steps announced while a part runs
    spread over what is left of it, a part the suite did not declare takes half of what is
    left of the suite. The bar only moves forward and reaches 100% when the last suite ends.
    ``log`` prints above the bar (tqdm.write), so messages and the bar do not garble."""

    SCALE = 1000  # bar units of the whole run

    def __init__(self, suites: Sequence = (), enabled: bool = True, desc: str = "bench"):
        self.suites = [(s, 1) if isinstance(s, str) else (s[0], max(1, int(s[1]))) for s in suites]
        self.enabled, self.desc = enabled, desc
        self.total = self.SCALE
        self.n = 0                     # bar units shown
        self._k = -1                   # current suite
        self._part = -1                # current part of it
        self._done = self._known = 0   # steps of the current part
        self._start = self._end = 0.0  # the current part's span of the bar, in units
        self._what = ""
        self._bar = None

    # ---- bar geometry
    def _suite_span(self, k: int) -> tuple:
        share = self.SCALE / max(1, len(self.suites))
        return k * share, (k + 1) * share

    def _pos(self) -> float:
        frac = min(1.0, self._done / self._known) if self._known else 0.0
        return self._start + (self._end - self._start) * frac

    def _show(self, pos: float) -> None:
        new = max(self.n, min(self.SCALE, int(pos)))
        if not self.enabled:
            self.n = new
            return
        self._ensure_bar()
        if self._bar is not None:
            self._bar.set_postfix_str(self._label(), refresh=False)
            self._bar.update(new - self.n)
        self.n = new

    def _label(self) -> str:
        what = self._what
        if 0 <= self._k < len(self.suites):
            name = self.suites[self._k][0]
            head = f"suite {self._k + 1}/{len(self.suites)} {name}"
            what = what[len(name) + 2:] if what.startswith(f"{name}: ") else what
        else:
            head = ""
        return (head + (": " + what if what else ""))[:80]

    def _ensure_bar(self) -> None:
        if self._bar is None and self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=self.SCALE, desc=self.desc, file=sys.stderr, ascii=True, dynamic_ncols=True,
                             initial=self.n, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")

    # ---- what the runner and the harness call
    def begin_suite(self, name: str) -> None:
        names = [s for s, _ in self.suites]
        if name in names:
            self._k = names.index(name)
        else:  # not declared: squeeze it after the others
            self.suites.append((name, 1))
            self._k = len(self.suites) - 1
        self._part, self._done, self._known = -1, 0, 0
        self._start = self._end = max(float(self.n), self._suite_span(self._k)[0])
        self._what = ""
        self._show(self._start)

    def end_suite(self) -> None:
        if self._k >= 0:
            self._show(self._suite_span(self._k)[1])
        self._part, self._done, self._known = -1, 0, 0

    def add_total(self, n: int) -> None:
        if n <= 0:
            return
        pos = self._pos()
        if self._known and self._done < self._known:  # more steps in the running part: spread over its rest
            self._start, self._known, self._done = pos, self._known - self._done + n, 0
            return
        # a new part of the current suite
        self._part += 1
        k = max(self._k, 0)
        s0, s1 = self._suite_span(k)
        parts = self.suites[k][1] if self._k >= 0 else 1
        self._start = max(pos, float(self.n), s0)
        if self._part < parts:
            self._end = max(self._start, s0 + (s1 - s0) * (self._part + 1) / parts)
        else:
            self._end = self._start + (s1 - self._start) / 2
        self._done, self._known = 0, n

    def update(self, n: int = 1, what: str = "") -> None:
        if what:
            self._what = what
        self._done += n
        before = self.n
        self._show(self._pos())
        if self.enabled and self._bar is None and n:  # no tqdm: one line per completed step
            width = 30
            filled = int(width * self.n / self.SCALE)
            print(f"{self.desc}: [{'#' * filled}{'-' * (width - filled)}] {100 * self.n / self.SCALE:3.0f}% "
                  f"{self._label()}", file=sys.stderr, flush=True)
        elif self._bar is not None and n == 0 and before == self.n:
            self._bar.set_postfix_str(self._label())

    def log(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except Exception:  # noqa: BLE001 - broken installs count as missing
        return False
    return True


NO_MATPLOTLIB = "no plots: matplotlib is not installed (pip install matplotlib)"


# ------------------------------------------------------------------------------ plots
def _pareto_front(points: list) -> list:
    """Indices of the points no other point beats on both x and y (lower is better)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _place_labels(fig, ax, pts) -> None:
    """Label every point, greedily: for each point (left to right) the first of a ring of
    candidate offsets whose text box overlaps no placed label, no marker and stays inside the
    axes; a thin leader line joins a label to its point when it sits away from it."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    marker_boxes = []
    for p in pts:
        cx, cy = ax.transData.transform((p[0], p[1]))
        marker_boxes.append((cx - 6, cy - 6, cx + 6, cy + 6))
    placed = []

    def overlaps(b, others):
        return any(not (b[2] < o[0] or o[2] < b[0] or b[3] < o[1] or o[3] < b[1]) for o in others)

    candidates = []
    for radius in (10, 22, 36, 52, 70):
        for dx, dy in ((1, 0.4), (1, -1), (-1, 0.4), (-1, -1), (0, 1.2), (0, -1.6), (1, 1.2), (-1, 1.2)):
            candidates.append((dx * radius, dy * radius))
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], pts[i][1]))
    for i in order:
        x, y, label = pts[i][0], pts[i][1], pts[i][2]
        chosen = None
        for dx, dy in candidates:
            ha = "left" if dx > 0 else ("right" if dx < 0 else "center")
            t = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va="center",
                            fontsize=8, bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
            bb = t.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            inside = bb.x0 >= axbox.x0 and bb.x1 <= axbox.x1 and bb.y0 >= axbox.y0 and bb.y1 <= axbox.y1
            others = marker_boxes[:i] + marker_boxes[i + 1:]
            if inside and not overlaps(box, placed) and not overlaps(box, others):
                chosen = (t, box, abs(dx) + abs(dy))
                break
            t.remove()
        if chosen is None:  # nothing free: the nearest spot, overlapping
            t = ax.annotate(label, (x, y), textcoords="offset points", xytext=(8, 6), fontsize=8,
                            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
            bb = t.get_window_extent(renderer)
            chosen = (t, (bb.x0, bb.y0, bb.x1, bb.y1), 0)
        t, box, dist = chosen
        if dist > 20:  # far from its point: redraw with a leader line
            xy_text, ha = t.xyann, t.get_horizontalalignment()
            t.remove()
            ax.annotate(label, (x, y), textcoords="offset points", xytext=xy_text, ha=ha, va="center", fontsize=8,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8),
                        arrowprops=dict(arrowstyle="-", color="grey", lw=0.6, shrinkA=0, shrinkB=4))
        placed.append(box)


# One colour and marker per method, the same in every plot. A suite's variant group names the
# method; Hugging Face's eager model and its gradient checkpointing (the step suite's "hf",
# "hf checkpoint") are the eager and checkpointing methods.
METHOD_STYLES = {
    "eager": ("#555555", "o"),         # nothing recomputed
    "checkpoint": ("#1f77b4", "s"),    # torch.utils.checkpoint
    "compile": ("#9467bd", "D"),       # torch.compile with activation_memory_budget
    "sdpa": ("#17becf", "v"),          # PyTorch's scaled_dot_product_attention
    "fused": ("#d62728", "^"),         # fused_ckpt's fused modules / patched models
    "fused block": ("#ff7f0e", "P"),   # FusedCheckpointedBlock
    "floor": ("#8c564b", "X"),         # bare GEMMs
}
METHOD_ALIASES = {"hf": "eager", "hf eager": "eager", "hf checkpoint": "checkpoint"}
_LEGEND = {"hf": "eager (Hugging Face)", "hf eager": "eager (Hugging Face)",
           "hf checkpoint": "checkpoint (Hugging Face)"}
_SPARE_STYLES = [("#2ca02c", "*"), ("#e377c2", "h"), ("#bcbd22", "<"), ("#7f7f7f", ">")]


def method_of(group: str) -> str:
    return METHOD_ALIASES.get(group, group)


def _method_order(group: str) -> int:
    names = list(METHOD_STYLES)
    m = method_of(group)
    return names.index(m) if m in names else len(names)


def method_style(group: str) -> tuple:
    """(colour, marker) of a variant group: fixed per method; an unknown group gets a spare
    style chosen from its name, so it too is the same in every plot."""
    m = method_of(group)
    if m in METHOD_STYLES:
        return METHOD_STYLES[m]
    return _SPARE_STYLES[sum(map(ord, m)) % len(_SPARE_STYLES)]


def plot_tradeoff(path: str, points: list, *, title: str, xlabel: str, ylabel: str,
                  note: str = "") -> Optional[str]:
    """Scatter plot of ``(x, y, label, group)`` points with their labels and the Pareto front
    (lower x and lower y are better). Returns the path, or None when matplotlib is missing or
    there is nothing to plot."""
    pts = [p for p in points if p[0] is not None and p[1] is not None
           and math.isfinite(p[0]) and math.isfinite(p[1])]
    if not pts:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - plots are optional
        return None
    groups = sorted({p[3] for p in pts}, key=lambda g: (_method_order(g), g))
    fig, ax = plt.subplots(figsize=(11, 6.5), dpi=110)
    for g in groups:
        sel = [p for p in pts if p[3] == g]
        colour, marker = method_style(g)
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=60, marker=marker, color=colour,
                   label=_LEGEND.get(g, g), zorder=3, edgecolor="black", linewidth=0.5)
    front = _pareto_front([(p[0], p[1]) for p in pts])
    if len(front) > 1:
        fx = [pts[i][0] for i in front]
        fy = [pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color="grey", linestyle="--", linewidth=1, zorder=1,
                label="Pareto front")
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    xpad = (max(xs) - min(xs)) * 0.15 or max(abs(xs[0]) * 0.1, 1e-9)
    ypad = (max(ys) - min(ys)) * 0.15 or max(abs(ys[0]) * 0.1, 1e-9)
    ax.set_xlim(min(xs) - xpad, max(xs) + xpad)
    ax.set_ylim(min(ys) - ypad, max(ys) + ypad)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="dimgrey")
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    _place_labels(fig, ax, pts)  # after the layout: label boxes are measured in final pixels
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ row tables
def ms(row) -> Optional[float]:
    t = row.get("time_ms")
    return t["median_ms"] if t else None


def row_status_text(row) -> Optional[str]:
    """The note shown instead of numbers for a row that was skipped or failed."""
    if row.get("status") == "ok" and row.get("time_ms"):
        return None
    why = row.get("reason") or row.get("error") or "no timing"
    return f"{row.get('status', '?')}: {why}"


def grad_text(row) -> str:
    e = row.get("grad_err")
    if not e:
        return "—"
    if e.get("missing"):
        return f"{e['missing']} grad(s) missing"
    s = f"{e['max_abs']:.1e}"
    if e.get("rel") is not None:
        s += f" ({e['rel']:.0e} rel)"
    if row.get("grad_ok") is False:
        s += " BAD"
    return s


def rows_table(rows: Sequence[dict], columns: Sequence[tuple], note_width: int = 60) -> str:
    """A markdown table, one line per row: ``columns`` are ``(header, row -> text)``. Rows that
    were skipped or failed show their reason after the variant name (long reasons as numbered
    notes under the table)."""
    body, notes = [], []
    for r in rows:
        note = row_status_text(r)
        if note is not None:
            if len(note) > note_width:
                notes.append(note)
                note = note[: note_width - 8].rstrip() + f"… [{len(notes)}]"
            body.append([r["variant"], note] + [""] * (len(columns) - 2))
        else:
            body.append([fn(r) for _, fn in columns])
    text = markdown_table([h for h, _ in columns], body)
    if notes:
        text += "\n\n" + "\n".join(f"[{i}] {n}" for i, n in enumerate(notes, 1))
    return text


def per_shape_tables(rows: Sequence[dict], columns: list, device: str) -> str:
    """One markdown table per shape (in first-seen order) with ``columns``, then a CUDA peak
    column when the suite ran on CUDA and the gradient-check column: the layout every
    per-variant suite (attention, block, loss) reports in."""
    from . import _timing as T

    cols = list(columns)
    if device == "cuda":
        cols.append(("peak MiB", lambda r: fmt(r["peak_bytes"] / T.MiB if r.get("peak_bytes") is not None else None,
                                               ".0f")))
    cols.append(("grad max err", grad_text))
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = [r for r in rows if r["shape"] == shape]
        out += [f"### {shape}, {sel[0]['dtype']}", "", rows_table(sel, cols), ""]
    return "\n".join(out)


def targets_table(targets: Sequence[dict]) -> str:
    body = []
    for t in targets:
        val = fmt(t.get("value"), ".3f")
        if t.get("value") is None and t.get("info_value") is not None:
            val = f"({fmt(t['info_value'], '.3f')})"
        body.append([t["suite"], t["what"], f"{t['op']} {t['limit']:g}", val, t["status"], t.get("detail", "")])
    return markdown_table(["suite", "target", "limit", "value", "status", "detail"], body)
