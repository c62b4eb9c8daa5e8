"""Timing, counting and memory helpers shared by every benchmark suite (and by benchmarks/).

=====================  =======================================================================
helper                 what it measures
=====================  =======================================================================
``time_cuda``          ``triton.testing.do_bench`` (L2 flushed, CUDA events): median and the
                       20% / 80% quantiles over ``rep_ms`` (>= 200 ms in full runs)
``time_cpu``           wall clock (``time.perf_counter``) after warmup; the callables run
                       round-robin (one rep of each per round), so slow drifts of a shared
                       machine hit every variant alike; median and 20% / 80% quantiles
``count_flops``        ``FlopCounterMode``: the FLOPs a program really dispatches (custom ops
                       count through their registered formulas)
``SavedTensors``       ``saved_tensors_hooks`` accounting of a forward: the distinct storages
                       autograd keeps for backward, parameters excluded
``cuda_peak_bytes``    ``torch.cuda.max_memory_allocated`` of one call after
                       ``reset_peak_memory_stats``, minus what was allocated just before it
                       (weights, inputs)
``grad_error``         max |g - g_ref| of gradients against a float64 (CPU) / float32 (CUDA)
                       reference, and the same relative to the reference's scale
=====================  =======================================================================
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..accounting import SavedTensors  # noqa: F401  (re-exported for the suites and benchmarks/)

MiB = float(2**20)
QUANTILES = (0.5, 0.2, 0.8)  # median, then the 20% and 80% quantiles
MIN_REP_MS = 200.0           # do_bench repetition time of full runs


@dataclass
class Timing:
    """Milliseconds per call: median and the 20% / 80% quantiles over ``n`` repetitions."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    n: int
    method: str
    samples_ms: list = field(default_factory=list)

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


def clear_grads(tensors: Optional[Iterable[torch.Tensor]]) -> None:
    for t in tensors or ():
        t.grad = None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_cuda(fn: Callable[[], object], *, rep_ms: float = MIN_REP_MS, warmup_ms: float = 25.0,
              grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> Timing:
    """``triton.testing.do_bench``: runs ``fn`` for about ``rep_ms`` after ``warmup_ms``, flushing
    L2 and resetting ``.grad`` of ``grad_to_none`` outside the timed region."""
    from triton.testing import do_bench

    med, q20, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none or []),
                             quantiles=list(QUANTILES))
    n = max(1, int(rep_ms / max(med, 1e-6)))  # do_bench does not return its count; it runs rep / median
    return Timing(med, q20, q80, n, f"triton.testing.do_bench(rep={rep_ms:g} ms)")


def time_cpu(fns: dict, *, reps: int = 9, warmup: int = 2, grad_to_none: Optional[dict] = None,
             on_round: Optional[Callable[[], None]] = None) -> dict:
    """Wall-clock times of several callables, measured round-robin.

    Each callable runs ``warmup`` times, then ``reps`` rounds time every callable once (``.grad``
    of its ``grad_to_none`` tensors reset before each call, outside the timing). ``on_round`` is
    called after each round (progress bars)."""
    grad_to_none = grad_to_none or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            clear_grads(grad_to_none.get(name))
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            clear_grads(grad_to_none.get(name))
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if on_round is not None:
            on_round()
    method = f"wall clock, median of {reps} round-robin reps after {warmup} warmup"
    return {name: Timing(quantile(s, 0.5), quantile(s, 0.2), quantile(s, 0.8), len(s), method, s)
            for name, s in samples.items()}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn`` dispatches, as ``torch.utils.flop_counter.FlopCounterMode`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def saved_bytes(forward: Callable[[], object], params: Iterable[torch.Tensor]) -> tuple:
    """Distinct bytes autograd keeps for backward while ``forward`` runs, parameters excluded.
    Returns ``(bytes, forward's result)`` so the caller can run the backward of that graph."""
    with SavedTensors() as s:
        out = forward()
    return s.unique_bytes(list(params)), out


def cuda_peak_bytes(fn: Callable[[], object], *, before: Optional[Callable[[], None]] = None) -> int:
    """Peak CUDA memory of one ``fn()`` above what was allocated just before it."""
    if before is not None:
        before()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def tflops(flops: Optional[float], ms: Optional[float]) -> Optional[float]:
    if not flops or not ms or not math.isfinite(ms):
        return None
    return flops / (ms * 1e-3) / 1e12


def grad_error(got: Sequence[Optional[torch.Tensor]], ref: Sequence[torch.Tensor]) -> dict:
    """Max |got - ref| over a list of gradients, the reference's max |ref| and their ratio.
    A missing gradient is an infinite error (reported as ``missing``)."""
    err, scale, missing = 0.0, 0.0, 0
    for g, r in zip(got, ref):
        if r is None:
            continue
        scale = max(scale, r.detach().abs().max().item() if r.numel() else 0.0)
        if g is None:
            missing += 1
            continue
        if g.numel():
            err = max(err, (g.detach().to(r.dtype) - r.detach()).abs().max().item())
    out = {"max_abs": err if not missing else None, "ref_scale": scale,
           "rel": (err / scale if scale else None) if not missing else None}
    if missing:
        out["missing"] = missing
    return out


def dtype_from_name(name: str) -> torch.dtype:
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
             "float32": torch.float32, "float": torch.float32, "fp64": torch.float64, "float64": torch.float64}
    if name not in names:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(names)}")
    return names[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}.get(dtype, str(dtype))


def reference_dtype(device) -> torch.dtype:
    """float64 on CPU, float32 (TF32 off) on CUDA."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def _tf32_switches() -> list:
    """(object, attribute) pairs that hold PyTorch's TF32 settings for cuBLAS matmuls and cuDNN,
    in the API the process is using. torch >= 2.9 has ``fp32_precision`` ("ieee" / "tf32") next
    to the legacy ``allow_tf32`` booleans; once the new API has been used (e.g. transformers'
    ``enable_tf32``) reading a legacy flag raises RuntimeError, and writing a legacy flag after
    it would make that state mixed. So each setting is switched through the legacy flag while
    that reads cleanly and no global ``torch.backends.fp32_precision`` is set (older torch, or a
    process that only used the legacy API), and through the new one otherwise."""
    cuda_mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    global_new = getattr(torch.backends, "fp32_precision", "none") != "none"
    switches = []
    for legacy, new in ((cuda_mm, (cuda_mm,)), (cudnn, (getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None)))):
        try:
            legacy.allow_tf32
            use_new = global_new
        except RuntimeError:  # the new API is in use for this backend
            use_new = True
        if use_new:
            switches.extend((obj, "fp32_precision") for obj in new if obj is not None)
        else:
            switches.append((legacy, "allow_tf32"))
    return switches


class no_tf32:
    """Context manager: TF32 matmuls and convolutions off (exact fp32 references on CUDA);
    every setting it changed is restored on exit, through the API it was changed with."""

    _OFF = {"allow_tf32": False, "fp32_precision": "ieee"}

    def __enter__(self):
        self._saved = [(obj, attr, getattr(obj, attr)) for obj, attr in _tf32_switches()]
        for obj, attr, _ in self._saved:
            setattr(obj, attr, self._OFF[attr])
        return self

    def __exit__(self, *exc):
        for obj, attr, value in reversed(self._saved):
            setattr(obj, attr, value)
