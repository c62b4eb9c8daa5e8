"""Command line of the benchmark suites: ``fused-ckpt bench`` = ``python -m fused_ckpt.bench``."""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import sys
import time
import traceback
from typing import Optional, Sequence

from .._argtypes import Parser, byte_size, positive_int

SUITES = ("ffn", "attention", "block", "step", "loss")
DEFAULT_MEMORY_CAP = "24GiB"


# ------------------------------------------------------------------------------ arguments
def _suites(text: str) -> list:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a suite name")
    out = []
    for n in names:
        if n == "all":
            out.extend(SUITES)
        elif n in SUITES:
            out.append(n)
        else:
            raise argparse.ArgumentTypeError(f"unknown suite {n!r}; choose from {', '.join(SUITES)} or all "
                                             "(comma-separated for several)")
    return list(dict.fromkeys(out))


def _memory_cap(text: str) -> int:
    return byte_size(text)


def _budgets(text: str) -> list:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    return vals


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", type=_suites, default=list(SUITES), metavar="NAME",
                   help=f"which suites to run: {', '.join(SUITES)} or all (default), comma-separated for several")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a short run)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: a new bench-<timestamp>/ under the current directory)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run the torch.compile rows on CPU too (they run on CUDA by default)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    p.add_argument("--compile-budgets", type=_budgets, default=None, metavar="B[,B...]",
                   help="torch._functorch activation_memory_budget values of the compile rows "
                        "(default 1.0,0.5; --quick 0.5)")
    p.add_argument("--memory-cap", type=_memory_cap, default=None, metavar="SIZE",
                   help=f"step suite: device memory for the largest-batch column, with a unit: 24GiB, 80GB, "
                        f"1.5e10B (default {DEFAULT_MEMORY_CAP})")
    p.add_argument("--reps", type=positive_int, default=None, help="CPU: timed round-robin rounds (default 7; --quick 3)")
    p.add_argument("--warmup", type=_nonneg_int, default=None, help="CPU: warmup calls per variant (default 1)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU: torch threads (default: torch's own; --quick: 1, since tiny ops on a shared "
                        "machine mostly measure thread wake-ups)")
    p.add_argument("--rep-ms", type=float, default=200.0, help="CUDA: do_bench repetition time in ms (>= 200)")
    p.add_argument("--ffn-shapes", default=None, metavar="TxDxF:act[,...]",
                   help="FFN suite shapes, e.g. 8192x4096x14336:swiglu,8192x4096x16384:gelu")
    p.add_argument("--step-layers", type=positive_int, default=None, help="step suite: decoder layers")
    p.add_argument("--step-batch", type=positive_int, default=None, help="step suite: sequences per step")
    p.add_argument("--step-seq", type=positive_int, default=None, help="step suite: tokens per sequence")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="print the ratios between two runs' results.json (B relative to A) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing variants")


def build_parser(prog: str = "python -m fused_ckpt.bench") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n")[0],
               epilog="Writes results.json, results.md and PNG plots into --out.")
    add_arguments(p)
    return p


# ------------------------------------------------------------------------------ running
def _suite_module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def _suite_parts(name: str, args, dev: str) -> int:
    """How many shapes a suite measures (one measure_variants call each), for the progress bar:
    ffn one per shape, attention the kernel and the block, the others one."""
    if name == "ffn":
        if args.ffn_shapes:
            return len([s for s in args.ffn_shapes.split(",") if s.strip()])
        mod = _suite_module("ffn")
        return len((mod.QUICK_SHAPES if args.quick else mod.DEFAULT_SHAPES).get(dev, ())) or 1
    if name == "loss":
        mod = _suite_module("loss")
        return len((mod.QUICK_SHAPES if args.quick else mod.DEFAULT_SHAPES).get(dev, ())) or 1
    return 2 if name == "attention" else 1


def _default_out() -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(os.getcwd(), f"bench-{stamp}")
    out, k = base, 1
    while os.path.exists(out):
        k += 1
        out = f"{base}-{k}"
    return out


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _command(args, prog: str) -> str:
    import shlex

    argv = getattr(args, "_argv", None)
    if argv is None:
        argv = list(sys.argv[1:])
        if argv[:1] == ["bench"]:
            argv = argv[1:]
    return " ".join([prog] + [shlex.quote(a) for a in argv])


def _error(prog: str, msg: str) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def run_from_args(args, prog: str = "fused-ckpt bench") -> int:
    if args.compare:
        from .compare import compare_files

        return compare_files(args.compare[0], args.compare[1], prog=prog)

    import torch

    from . import _timing as T

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        return _error(prog, "--device cuda but torch.cuda.is_available() is False")
    if dev == "cuda" and args.rep_ms < T.MIN_REP_MS:
        return _error(prog, f"--rep-ms must be at least {T.MIN_REP_MS:g} on CUDA (got {args.rep_ms:g})")
    ffn_shapes = None
    if args.ffn_shapes:
        from .ffn import Shape

        try:
            ffn_shapes = [Shape.parse(s) for s in args.ffn_shapes.split(",")]
        except ValueError as e:
            return _error(prog, f"--ffn-shapes: {e}")
    dtype = T.dtype_from_name(args.dtype or ("bf16" if dev == "cuda" else "fp32"))
    # the output folder before any benchmark: an unusable --out fails now, not after the run
    out = os.path.abspath(args.out) if args.out else _default_out()
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        return _error(prog, f"--out {args.out or out}: cannot create the folder ({e.strerror or e})")
    if not os.access(out, os.W_OK | os.X_OK):
        return _error(prog, f"--out {args.out or out}: the folder is not writable")
    args._out_dir = out
    threads = args.threads or (1 if (args.quick and dev == "cpu") else None)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, prog, dev, dtype, ffn_shapes)
    finally:
        torch.set_num_threads(prev_threads)


def _run(args, prog: str, dev: str, dtype, ffn_shapes) -> int:
    from . import _timing as T
    from ._harness import Context
    from ._report import (NO_MATPLOTLIB, Progress, exit_cleanly_on_sigterm, machine_info, matplotlib_available,
                          versions, write_results)

    budgets = args.compile_budgets or ([0.5] if args.quick else [1.0, 0.5])
    memory_cap = args.memory_cap
    if memory_cap is None:
        from ..units import parse_bytes

        memory_cap = parse_bytes(DEFAULT_MEMORY_CAP)
    out = args._out_dir
    exit_cleanly_on_sigterm()

    progress = Progress([(name, _suite_parts(name, args, dev)) for name in args.suite],
                        enabled=not args.no_progress, desc="fused-ckpt bench")
    options = {k: v for k, v in vars(args).items() if k != "compare"}
    options.update(ffn_shapes=ffn_shapes, memory_cap=memory_cap, compile_budgets=budgets)
    ctx = Context(device=dev, dtype=dtype, quick=args.quick,
                  reps=args.reps or (3 if args.quick else 7),
                  warmup=args.warmup if args.warmup is not None else 1,
                  rep_ms=args.rep_ms, compile=args.compile, compile_budgets=budgets, memory_cap=memory_cap,
                  progress=progress, verbose=args.verbose, options=options)
    ctx.out_dir = out
    options.update(reps=ctx.reps, warmup=ctx.warmup, threads=torch_threads())
    payload = {
        "schema": "fused_ckpt.bench/1",
        "status": "running",
        "command": _command(args, prog),
        "date": None,
        "device": dev,
        "dtype": T.dtype_name(dtype),
        "quick": args.quick,
        "machine": machine_info(dev),
        "versions": versions(),
        "timing_method": (f"triton.testing.do_bench, rep={args.rep_ms:g} ms per variant; median and 20/80% "
                          "quantiles" if dev == "cuda" else
                          f"wall clock, {ctx.reps} round-robin rounds after {ctx.warmup} warmup call(s) per "
                          "variant; median and 20/80% quantiles; torch.compile rows in a round-robin group of "
                          "their own (the OpenMP threads of compiled CPU kernels slow the calls that follow)"),
        "options": {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v))
                    for k, v in options.items()},
        "suites": ctx.suites,
        "rows": ctx.rows,
        "targets": ctx.targets,
        "plots": [],
    }
    payload["date"] = payload["machine"]["date"]

    def snapshot():
        payload["plots"] = [os.path.relpath(p, out) for p in ctx.plots]
        write_results(out, payload, render_markdown(payload))

    ctx.checkpoint_cb = snapshot
    progress.log(f"fused-ckpt bench: suites {', '.join(args.suite)} on {dev} {T.dtype_name(dtype)}"
                 f"{' (quick)' if args.quick else ''}; torch {payload['versions']['torch']}, "
                 f"triton {payload['versions'].get('triton')}; out={out}")
    plots_ok = matplotlib_available()
    if not plots_ok:
        progress.log(f"fused-ckpt bench: {NO_MATPLOTLIB}")
    t_start = time.perf_counter()
    failed = []
    try:
        for name in args.suite:
            mod = _suite_module(name)
            info = ctx.suites.setdefault(name, {"description": mod.DESCRIPTION})
            info["status"] = "running"
            progress.begin_suite(name)
            t0 = time.perf_counter()
            try:
                mod.run(ctx)
                info["status"] = "complete"
            except Exception as e:  # noqa: BLE001 - one suite failing must not lose the others
                from ._report import short_error

                info["status"] = "failed"
                info["error"] = short_error(e, 600)
                failed.append(name)
                progress.log(f"[{name}] suite FAILED: {info['error']}")
                if args.verbose:
                    traceback.print_exc()
            info["elapsed_s"] = round(time.perf_counter() - t0, 2)
            progress.end_suite()
            snapshot()
        payload["status"] = "complete" if not failed else f"complete, suites failed: {', '.join(failed)}"
    finally:
        progress.close()
        payload["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        if hasattr(os, "getloadavg"):
            payload["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
        if payload["status"] == "running":
            payload["status"] = "partial (interrupted)"
        snapshot()
    print(render_summary(payload))
    print(f"results: {out}  (results.json, results.md"
          + (", " + ", ".join(payload["plots"]) if payload["plots"] else "") + ")"
          + ("" if plots_ok else f"; {NO_MATPLOTLIB}"))
    return 1 if failed else 0


# ------------------------------------------------------------------------------ markdown
def render_markdown(payload: dict) -> str:
    from ._report import targets_table

    m, v = payload["machine"], payload["versions"]
    load = ""
    if m.get("loadavg_1_5_15"):
        load = f", load average {m['loadavg_1_5_15'][0]} at start"
        if m.get("loadavg_at_end"):
            load += f", {m['loadavg_at_end'][0]} at end"
    lines = [f"# fused_ckpt benchmark ({payload['status']})", "",
             f"- date: {payload['date']}",
             f"- machine: {m.get('gpu') or m['cpu']} (host {m['host']}, {m['cpu_count']} CPUs, torch threads "
             f"{m['torch_threads']}{load})",
             f"- device / dtype: {payload['device']} / {payload['dtype']}{' (quick)' if payload.get('quick') else ''}",
             f"- versions: fused_ckpt {v.get('fused_ckpt')}, torch {v['torch']}, triton {v.get('triton')}, "
             f"transformers {v.get('transformers')}, python {v['python']}"
             + (f", CUDA {v['cuda']}" if v.get("cuda") else ""),
             f"- command: `{payload['command']}`",
             f"- timing: {payload['timing_method']}",
             "- ratios are of medians; saved bytes are the distinct storages autograd keeps after the forward "
             "(saved_tensors_hooks), parameters excluded; gradient errors are against a "
             + ("float32 (TF32 off)" if payload["device"] == "cuda" else "float64") + " reference", ""]
    if payload.get("targets"):
        lines += ["## Targets", "",
                  "The issue's targets are for CUDA bf16; on other devices they read `not measured`, with "
                  "the same ratio measured here in parentheses where there is one.", "",
                  targets_table(payload["targets"]), ""]
    for name in SUITES:
        info = payload["suites"].get(name)
        if info is None:
            continue
        lines += [f"## {name}: {info.get('description', '')}", ""]
        if info.get("status") not in (None, "complete"):
            lines += [f"status: {info.get('status')}" + (f" ({info['error']})" if info.get("error") else ""), ""]
        for note in info.get("notes", []):
            lines.append(f"- {note}")
        if info.get("notes"):
            lines.append("")
        try:
            lines.append(_suite_module(name).markdown(payload["rows"], info, payload["device"]))
        except Exception as e:  # noqa: BLE001 - never lose results.md over a report bug
            from ._report import short_error

            lines.append(f"(table failed: {short_error(e)}; see results.json)")
        lines.append("")
    if payload.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in payload["plots"]] + [""]
    lines.append(f"elapsed: {payload.get('elapsed_s', '?')} s")
    return "\n".join(lines) + "\n"


def render_summary(payload: dict) -> str:
    """A short text summary for the terminal: per suite, rows ok / skipped / failed; targets."""
    from collections import Counter

    out = [f"fused-ckpt bench: {payload['status']} in {payload.get('elapsed_s', '?')} s"]
    for name, info in payload["suites"].items():
        c = Counter(r.get("status") for r in payload["rows"] if r["suite"] == name)
        out.append(f"  {name:<10} {info.get('status', '?'):<9} rows: {c.get('ok', 0)} ok, {c.get('skipped', 0)} "
                   f"skipped, {c.get('error', 0)} failed")
    c = Counter(t["status"] for t in payload.get("targets", []))
    if c:
        out.append(f"  targets: {c.get('met', 0)} met, {c.get('not met', 0)} not met, "
                   f"{c.get('not measured', 0)} not measured")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    return run_from_args(args, prog="python -m fused_ckpt.bench")
