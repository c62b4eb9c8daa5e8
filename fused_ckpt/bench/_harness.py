"""The measurement loop every suite shares: variants of one computation, measured side by side.

A suite describes each *variant* (eager, checkpointed, compiled, fused, ...) by a factory that
returns a :class:`Prepared` (the callables to run). :func:`measure_variants` then, for one shape:

1. builds each variant and runs it once (compile / autotune warmup), checking its gradients
   against the suite's float64 (CPU) / float32 (CUDA) reference;
2. counts the bytes its forward saves for backward (``saved_tensors_hooks``, distinct storages,
   parameters excluded) and the FLOPs of one run (``FlopCounterMode``);
3. times all variants: ``triton.testing.do_bench`` per variant on CUDA, round-robin wall clock
   on CPU (all variants alive at once, one call of each per round);
4. on CUDA, the peak memory of one run above weights and inputs.

On CUDA each variant is built, measured and freed before the next (large models do not fit
many times over).

and writes one row per variant into the run's results. A variant that fails to build or run
becomes a row with ``status: error``; one that does not apply, a row with ``status: skipped``
and the reason. Nothing here is specific to a suite.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from . import _timing as T
from ._report import short_error


@dataclass
class Prepared:
    """What :func:`measure_variants` needs of a built variant.

    run        one timed call (forward + backward, or one optimizer step)
    forward    a forward whose saved tensors are counted (None: not counted)
    grads      returns the gradients compared with the reference, after ``run``
    clear      tensors whose ``.grad`` is reset before every call
    params     storages excluded from saved bytes (parameters)
    flops_run  what FlopCounterMode counts (default ``run``; compiled code runs outside the
               dispatcher, so compiled variants count their eager program)
    peak       computes the CUDA peak itself (default: one ``run`` after clearing grads)
    extra      fields merged into the row
    count_flops  whether to count FLOPs (one more call)
    after_first / after_timing  hooks that add fields to the row
    """

    run: Callable[[], Any]
    forward: Optional[Callable[[], Any]] = None
    grads: Optional[Callable[[], list]] = None
    clear: list = field(default_factory=list)
    params: list = field(default_factory=list)
    flops_run: Optional[Callable[[], Any]] = None
    peak: Optional[Callable[[], int]] = None
    extra: dict = field(default_factory=dict)
    count_flops: bool = True
    after_first: Optional[Callable[[dict], None]] = None    # adds fields to the row after the first call
    after_timing: Optional[Callable[[dict], None]] = None   # ... after timing (and peak), before release


@dataclass
class Variant:
    name: str
    group: str                                   # eager | checkpoint | compile | fused | floor | ...
    make: Optional[Callable[[], Prepared]] = None
    skip: Optional[str] = None                   # reason, when the variant does not apply
    description: str = ""


class Context:
    """Options and shared state of one benchmark run (built by :mod:`fused_ckpt.bench._main`)."""

    def __init__(self, *, device, dtype, quick: bool, reps: int, warmup: int, rep_ms: float,
                 compile: Optional[bool], compile_budgets: list, memory_cap: int, progress, verbose: bool = False,
                 options: Optional[dict] = None):
        self.device = torch.device(device)
        self.dev = self.device.type
        self.dtype = dtype
        self.quick = quick
        self.reps, self.warmup, self.rep_ms = reps, warmup, rep_ms
        self.compile = compile
        self.compile_budgets = compile_budgets
        self.memory_cap = memory_cap
        self.progress = progress
        self.verbose = verbose
        self.options = options or {}
        self.rows: list = []
        self.targets: list = []
        self.suites: dict = {}
        self.plots: list = []
        self.out_dir: Optional[str] = None
        self.checkpoint_cb: Optional[Callable[[], None]] = None  # writes a results snapshot

    # ------------------------------------------------------------------ helpers for suites
    def log(self, msg: str) -> None:
        self.progress.log(msg)

    @property
    def ref_dtype(self) -> torch.dtype:
        return T.reference_dtype(self.device)

    def compile_skip_reason(self) -> Optional[str]:
        if self.compile is False:
            return "--no-compile"
        if self.dev != "cuda" and not self.compile:
            return "CUDA only by default (--compile runs it here)"
        return None

    def fused_backends(self) -> list:
        """(backend, skip reason or None): Triton on CUDA; the aten path (torch GEMMs + csrc
        elementwise ops) wherever the extension is built."""
        from .. import _ext

        out = []
        if self.dev == "cuda":
            out.append(("triton", None))
        else:
            out.append(("triton", "CUDA only"))
        if not _ext.available():
            out.append(("aten", "fused_ckpt._C could not be loaded or compiled (`python -c "
                                "\"from fused_ckpt import _ext; _ext.load()\"` says why and what to install)"))
        elif self.dev == "cuda" and not _ext.has_cuda_kernels():
            out.append(("aten", "fused_ckpt._C built without CUDA kernels"))
        else:
            out.append(("aten", None))
        return out

    def snapshot(self) -> None:
        if self.checkpoint_cb is not None:
            self.checkpoint_cb()


def _err_ok(err: dict, eager_err: Optional[dict], dtype: torch.dtype) -> Optional[bool]:
    """The tests' tolerance rule: error <= 2x the eager variant's error + one unit of the dtype's
    precision at the gradient's scale."""
    if err.get("max_abs") is None:
        return False if err.get("missing") else None
    if eager_err is None or eager_err.get("max_abs") is None:
        return None
    eps = torch.finfo(dtype).eps * (err.get("ref_scale") or 0.0)
    return err["max_abs"] <= 2.0 * eager_err["max_abs"] + eps


def measure_variants(ctx: Context, suite: str, shape: str, shape_info: dict, variants: list, *,
                     ref_grads: Optional[list], model_flops: Optional[float], ratio_refs: dict,
                     err_reference: Optional[str] = "eager", timing_dtype: Optional[torch.dtype] = None,
                     extra_per_row: Optional[Callable[[dict], None]] = None) -> list:
    """Measure ``variants`` of one shape side by side; returns (and records) one row each.

    ``ratio_refs``: ``{"vs_eager": "eager", ...}``: each row gets ``ratios[key]`` = its median time
    / that variant's median time. ``err_reference``: the variant whose gradient error sets the
    tolerance of the others (the tests' 2x rule)."""
    dtype = timing_dtype or ctx.dtype
    rows: dict = {}
    active = [v for v in variants if v.skip is None]
    rounds = ctx.reps if ctx.dev == "cpu" else 2 * len(active)
    ctx.progress.add_total(len(variants) + rounds)

    def base_row(v: Variant) -> dict:
        return {"suite": suite, "shape": shape, "variant": v.name, "group": v.group, "device": ctx.dev,
                "dtype": T.dtype_name(dtype), "shape_info": shape_info,
                **({"description": v.description} if v.description else {})}

    def prepare(v: Variant):
        """Build, first call, gradient check, saved bytes, FLOPs. Returns the Prepared or None."""
        row = rows[v.name]
        if v.skip is not None:
            row.update(status="skipped", reason=v.skip)
            ctx.progress.update(1, f"{suite}: {v.name} skipped")
            return None
        ctx.progress.update(0, f"{suite}: {v.name} (build + first call)")
        p = None
        try:
            p = v.make()
            row.update(p.extra)
            T.clear_grads(p.clear)
            t0 = time.perf_counter()
            p.run()
            T.sync(ctx.device)
            row["first_call_s"] = time.perf_counter() - t0
            if p.grads is not None and ref_grads is not None:
                row["grad_err"] = T.grad_error(p.grads(), ref_grads)
            if p.after_first is not None:
                p.after_first(row)
            T.clear_grads(p.clear)
            if p.forward is not None:
                try:
                    nbytes, out = T.saved_bytes(p.forward, p.params)
                    row["saved_bytes"] = nbytes
                    del out
                except Exception as e:  # noqa: BLE001 - e.g. compiled code refusing saved-tensor hooks
                    row["saved_bytes"] = None
                    row["saved_bytes_error"] = short_error(e)
                T.clear_grads(p.clear)
            if p.count_flops:
                try:
                    row["hw_flops"] = T.count_flops(p.flops_run or p.run)
                    if p.flops_run is not None:
                        row["hw_flops_note"] = "counted on the eager program"
                except Exception as e:  # noqa: BLE001
                    row["hw_flops"] = None
                    row["hw_flops_error"] = short_error(e)
                T.clear_grads(p.clear)
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the others
            row.update(status="error", error=short_error(e))
            ctx.log(f"  [{suite}/{v.name}] ERROR {row['error']}")
            if ctx.verbose:
                traceback.print_exc()
            p = None
        T.sync(ctx.device)
        ctx.progress.update(1, f"{suite}: {v.name}")
        return p

    by_name = {v.name: v for v in variants}
    for v in variants:
        rows[v.name] = base_row(v)
    timings: dict = {}
    if ctx.dev == "cuda":
        # one variant at a time: build, measure, time, peak, free (big models do not fit twice)
        for v in variants:
            p = prepare(v)
            if p is None:
                continue
            ctx.progress.update(0, f"{suite}: timing {v.name}")
            try:
                timings[v.name] = T.time_cuda(p.run, rep_ms=ctx.rep_ms, grad_to_none=p.clear)
            except Exception as e:  # noqa: BLE001
                rows[v.name].update(status="error", error="timing: " + short_error(e))
                ctx.log(f"  [{suite}/{v.name}] timing ERROR {rows[v.name]['error']}")
            ctx.progress.update(1, f"{suite}: timed {v.name}")
            if rows[v.name].get("status") == "ok":
                try:
                    rows[v.name]["peak_bytes"] = (p.peak() if p.peak is not None else T.cuda_peak_bytes(
                        p.run, before=lambda p=p: T.clear_grads(p.clear)))
                except Exception as e:  # noqa: BLE001
                    rows[v.name]["peak_error"] = short_error(e)
            if p.after_timing is not None:
                p.after_timing(rows[v.name])
            T.clear_grads(p.clear)
            del p
            torch.cuda.empty_cache()
            ctx.progress.update(1, f"{suite}: peak {v.name}")
    else:
        prepared = {}
        for v in variants:
            p = prepare(v)
            if p is not None:
                prepared[v.name] = p
        # compiled variants are timed in a round-robin group of their own: the OpenMP threads of
        # Inductor's CPU kernels keep spinning after each call and slow whatever runs next
        groups = [[n for n in prepared if by_name[n].group != "compile"],
                  [n for n in prepared if by_name[n].group == "compile"]]
        groups = [g for g in groups if g]
        if len(groups) > 1:
            ctx.progress.add_total(ctx.reps * (len(groups) - 1))
        for k, names in enumerate(groups):
            ctx.progress.update(0, f"{suite}: timing {len(names)} variants round-robin")
            try:
                got = T.time_cpu({n: prepared[n].run for n in names}, reps=ctx.reps, warmup=ctx.warmup,
                                 grad_to_none={n: prepared[n].clear for n in names},
                                 on_round=lambda: ctx.progress.update(1, f"{suite}: timing round"))
                if len(groups) > 1:
                    for t in got.values():
                        t.method += (" (compiled variants timed in their own round-robin group)" if k
                                     else " (without the compiled variants)")
                timings.update(got)
            except Exception as e:  # noqa: BLE001
                for name in names:
                    rows[name].update(status="error", error="timing: " + short_error(e))
                ctx.log(f"  [{suite}] timing ERROR {short_error(e)}")
        for name, p in prepared.items():
            if p.after_timing is not None:
                p.after_timing(rows[name])
        del prepared
    for name, t in timings.items():
        rows[name]["time_ms"] = t.to_json()

    # ---- derived numbers
    med = {n: t.median_ms for n, t in timings.items()}
    ref_err = rows.get(err_reference, {}).get("grad_err") if err_reference else None
    for name, row in rows.items():
        if "grad_err" in row:
            row["grad_ok"] = _err_ok(row["grad_err"], ref_err, dtype)
        if name not in timings:
            continue
        t = timings[name]
        row["ratios"] = {k: (t.median_ms / med[r] if r in med else None) for k, r in ratio_refs.items()}
        if ctx.dev == "cpu":  # the i-th sample of every variant in a timing group comes from one round
            same = by_name[name].group == "compile"
            row["paired_ratios"] = {
                k: T.quantile([a / b for a, b in zip(t.samples_ms, timings[r].samples_ms)], 0.5)
                for k, r in ratio_refs.items() if r in timings and (by_name[r].group == "compile") == same}
        row["model_flops"] = model_flops
        row["tflops_model"] = T.tflops(model_flops, t.median_ms)
        row["tflops_hw"] = T.tflops(row.get("hw_flops"), t.median_ms)
        if extra_per_row is not None:
            extra_per_row(row)
    out = [rows[v.name] for v in variants]
    ctx.rows.extend(out)
    if ctx.dev == "cuda":
        torch.cuda.empty_cache()
    ctx.snapshot()
    return out
