"""Timing, counting and reporting helpers shared by the benchmark scripts.

Every benchmark measures the same things the same way:

=====================  =======================================================================
helper                 what it measures / does
=====================  =======================================================================
``time_cuda``          ``triton.testing.do_bench`` (L2 flushed, CUDA events), median and the
                       20% / 80% quantiles over ``rep_ms`` of repetitions
``time_cpu``           wall clock (``time.perf_counter``) after warmup; the callables are run
                       round-robin (one rep of each per round) so slow drifts of a shared
                       machine hit every variant alike
``count_flops``        ``FlopCounterMode``: the FLOPs the program really dispatches (custom ops
                       count through their registered formulas)
``saved_bytes``        ``saved_tensors_hooks`` accounting (``tests/helpers.SavedTensors``) of a
                       forward, parameters excluded
``cuda_peak_bytes``    ``torch.cuda.max_memory_allocated`` of one call, minus what was allocated
                       before it (weights, inputs)
``machine_info``       date, host, CPU/GPU names, torch/triton/CUDA versions
``markdown_table``     a GitHub-flavoured markdown table
=====================  =======================================================================
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # tests/helpers.py holds the one SavedTensors accounting
    sys.path.insert(0, REPO_ROOT)

MiB = float(2**20)
QUANTILES = (0.5, 0.2, 0.8)  # median, then the 20% and 80% quantiles


# --------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Milliseconds per call: median and the 20% / 80% quantiles over ``n`` repetitions."""
    median_ms: float
    q20_ms: float
    q80_ms: float
    n: int
    method: str
    samples_ms: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _clear_grads(tensors: Iterable[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def time_cuda(fn: Callable[[], object], *, rep_ms: float = 200.0, warmup_ms: float = 25.0,
              grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    """``triton.testing.do_bench``: runs ``fn`` for about ``rep_ms`` after ``warmup_ms`` of
    warmup, flushing L2 and resetting ``.grad`` of ``grad_to_none`` outside the timed region."""
    from triton.testing import do_bench

    med, q20, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none or []),
                             quantiles=list(QUANTILES))
    # do_bench does not return its sample count; estimate it as it does (rep / median).
    n = max(1, int(rep_ms / max(med, 1e-6)))
    return Timing(med, q20, q80, n, f"triton.testing.do_bench(rep={rep_ms:g}ms)")


def time_cpu(fns: dict[str, Callable[[], object]], *, reps: int = 9, warmup: int = 2,
             grad_to_none: dict[str, Sequence[torch.Tensor]] | None = None) -> dict[str, Timing]:
    """Wall-clock times of several callables, measured round-robin.

    Each callable runs ``warmup`` times, then ``reps`` rounds time every callable once
    (``.grad`` of its ``grad_to_none`` tensors reset before each call, outside the timing).
    """
    grad_to_none = grad_to_none or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            _clear_grads(grad_to_none.get(name))
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _clear_grads(grad_to_none.get(name))
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    method = f"wall clock, {reps} round-robin reps after {warmup} warmup"
    return {name: Timing(quantile(s, 0.5), quantile(s, 0.2), quantile(s, 0.8), len(s), method, s)
            for name, s in samples.items()}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------ counting
def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn`` dispatches, as ``torch.utils.flop_counter.FlopCounterMode`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def saved_bytes(forward: Callable[[], object], params: Iterable[torch.Tensor]) -> tuple[int, object]:
    """Bytes autograd saves for backward while ``forward`` runs, parameters excluded.

    Returns ``(bytes, forward's result)`` so the caller can run the backward of that graph.
    """
    from tests.helpers import SavedTensors

    with SavedTensors() as s:
        out = forward()
    return s.bytes_excluding(list(params)), out


def cuda_peak_bytes(fn: Callable[[], object], *, before: Callable[[], None] | None = None) -> int:
    """Peak CUDA memory of one ``fn()`` above what was allocated just before it."""
    if before is not None:
        before()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def tflops(flops: float | None, ms: float | None) -> float | None:
    if not flops or not ms:
        return None
    return flops / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------ machine
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str) -> dict:
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):  # a busy shared machine skews CPU timings: record it
        info["loadavg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # pragma: no cover - triton is a dependency
        info["triton"] = f"unavailable ({e})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def dtype_from_name(name: str) -> torch.dtype:
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
             "float32": torch.float32, "float": torch.float32}
    if name not in names:
        raise SystemExit(f"unknown dtype {name!r}; expected one of {sorted(names)}")
    return names[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}.get(dtype, str(dtype))


# ------------------------------------------------------------------------ targets
@dataclass
class Target:
    """``value <op> limit``, e.g. ``fwd+bwd / non-reentrant <= 0.95``."""
    what: str
    op: str  # "<=" or ">="
    limit: float
    value: float | None = None

    @property
    def met(self) -> bool | None:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def short(self) -> str:
        mark = {True: "yes", False: "NO", None: "n/a"}[self.met]
        val = "?" if self.value is None else f"{self.value:.3f}"
        return f"{mark}: {self.what} {val} {self.op} {self.limit:g}"

    def to_json(self) -> dict:
        return {"what": self.what, "op": self.op, "limit": self.limit, "value": self.value,
                "met": self.met}


# ------------------------------------------------------------------------ reporting
def fmt(v, spec: str = ".3f", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_results(out_dir: str, payload: dict, markdown: str) -> None:
    """``results.json`` and ``results.md`` in ``out_dir`` (written atomically, so a run that is
    killed part-way leaves the last complete snapshot)."""
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("results.json", json.dumps(payload, indent=2, default=str) + "\n"),
                       ("results.md", markdown)):
        tmp = os.path.join(out_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``) into SystemExit so ``finally`` blocks write partial results."""
    def handler(signum, frame):
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def short_error(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
