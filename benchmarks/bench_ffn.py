#!/usr/bin/env python
"""FFN fwd+bwd: FusedCheckpointedFFN against eager, torch.utils.checkpoint, torch.compile and
the bare-GEMM floor, side by side in one run.

This is the ``ffn`` suite of ``fused-ckpt bench`` (:mod:`fused_ckpt.bench.ffn`: the variants,
FLOP formulas, targets and tables live there) with this script's defaults: the shapes below,
an 8-layer stack for the CUDA peak, the per-kernel GEMM comparison on CUDA, and results under
``benchmarks/results/<device>-<date>/``.

    python benchmarks/bench_ffn.py                  # default shapes of the device (CUDA if present)
    python benchmarks/bench_ffn.py --quick          # tiny shapes, few reps (seconds on CPU)
    python benchmarks/bench_ffn.py --device cpu --shapes 2048x1024x4096:gelu --out DIR
    python benchmarks/bench_ffn.py --variants eager,ckpt-nonreentrant,"fused-aten rc=True"

See benchmarks/README.md for every column; results go to --out (results.json, results.md, plots).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402,F401  (puts the repository root on sys.path)

DEFAULT_SHAPES = {
    "cpu": ["2048x1024x4096:gelu"],
    "cuda": ["8192x4096x16384:gelu", "8192x4096x11008:swiglu", "8192x4096x14336:swiglu"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--shapes", default=None,
                   help="comma-separated TxDxF:activation[:bias|:nobias], e.g. 8192x4096x14336:swiglu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few reps")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device>-<date>)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run the torch.compile rows on CPU too")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    p.add_argument("--compile-budgets", default=None, help="activation_memory_budget values, e.g. 1.0,0.5")
    p.add_argument("--variants", default=None, help="comma-separated subset of the rows (names as in the tables)")
    p.add_argument("--rep-ms", type=float, default=200.0, help="CUDA: do_bench rep per variant (ms, >= 200)")
    p.add_argument("--reps", type=int, default=None, help="CPU: timed rounds (default 9; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="CPU: warmup calls per variant (default 2; --quick 1)")
    p.add_argument("--layers", type=int, default=8, help="CUDA: depth of the peak-memory stack (1 = one layer)")
    p.add_argument("--no-gemm-check", action="store_true", help="CUDA: skip the per-kernel GEMM comparison")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing variants")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    from fused_ckpt.bench._main import build_parser, run_from_args

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or os.path.join(C.REPO_ROOT, "benchmarks", "results", f"{dev}-{dt.date.today().isoformat()}")
    bench = ["--suite", "ffn", "--device", dev, "--out", out, "--rep-ms", str(args.rep_ms)]
    shapes = args.shapes or (None if args.quick else ",".join(DEFAULT_SHAPES[dev]))
    if shapes:
        bench += ["--ffn-shapes", shapes]
    if args.quick:
        bench.append("--quick")
    for flag, value in (("--dtype", args.dtype), ("--compile-budgets", args.compile_budgets),
                        ("--reps", args.reps or (None if args.quick else 9)),
                        ("--warmup", args.warmup if args.warmup is not None else (None if args.quick else 2))):
        if value is not None:
            bench += [flag, str(value)]
    if args.compile is True:
        bench.append("--compile")
    elif args.compile is False:
        bench.append("--no-compile")
    if args.verbose:
        bench.append("--verbose")
    ns = build_parser("benchmarks/bench_ffn.py").parse_args(bench)
    ns.ffn_layers = max(1, args.layers)
    ns.gemm_check = not args.no_gemm_check
    ns.ffn_variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    ns._argv = argv
    return run_from_args(ns, prog="benchmarks/bench_ffn.py")


if __name__ == "__main__":
    sys.exit(main())
