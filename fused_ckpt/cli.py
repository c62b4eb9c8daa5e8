"""``fused-ckpt`` command line (also ``python -m fused_ckpt.cli``).

    fused-ckpt plan --model llama-7b --batch 8 --seq 4096 --dtype bf16 --budget 80GiB [--optimizer adamw]

prints the per-layer dials, predicted saved bytes and recompute FLOPs, the totals and the
verdict (:func:`fused_ckpt.planner.plan`). Bad input (unknown model, malformed config, zero or
negative sizes, a malformed budget, a budget below the minimum possible) prints one ``error:``
line on stderr and exits with status 2.

    fused-ckpt bench [--suite ffn|attention|block|step] [--quick] [--out DIR] [--memory-cap 24GiB]
    fused-ckpt bench --compare A.json B.json

runs the benchmark suites (:mod:`fused_ckpt.bench`, also ``python -m fused_ckpt.bench``) and
writes results.json, results.md and plots into ``--out``; ``--compare`` prints the ratios
between two runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .configs import BUILTIN_CONFIGS
from .planner import OPTIMIZER_STATES, plan
from .policy import BudgetTooSmall, parse_bytes


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, status 2 (argparse's own convention)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _budget(text: str) -> int:
    try:
        v = parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fused-ckpt", description="fused_ckpt tools: activation-memory planning and benchmarks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    pl = sub.add_parser("plan", help="choose recompute dials for a model, batch, sequence length and budget")
    pl.add_argument("--model", required=True,
                    help=f"a built-in config ({', '.join(BUILTIN_CONFIGS)}) or a Hugging Face config.json path")
    pl.add_argument("--batch", required=True, type=_positive_int, help="sequences per step")
    pl.add_argument("--seq", required=True, type=_positive_int, help="tokens per sequence")
    pl.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="training dtype")
    pl.add_argument("--budget", required=True, type=_budget,
                    help="device memory budget, e.g. 24GiB, 80GB, 1.5TiB or bytes")
    pl.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATES), default=None,
                    help="count weights, gradients and these optimizer states against the budget")
    pl.add_argument("--no-loss", action="store_true", help="do not count the loss's saved log-softmax")
    pl.add_argument("--json", action="store_true", help="print the totals as JSON after the table")
    from .bench import add_arguments as _bench_arguments

    bn = sub.add_parser("bench", help="run the benchmark suites (ffn, attention, block, step) or compare two runs",
                        description="Benchmark suites: results.json, results.md and plots in --out.")
    _bench_arguments(bn)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        try:
            result = plan(args.model, args.batch, args.seq, args.dtype, args.budget, args.optimizer,
                          include_loss=not args.no_loss)
        except BudgetTooSmall as e:
            print(f"fused-ckpt: error: {e}", file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"fused-ckpt: error: {e}", file=sys.stderr)
            return 2
        print(result)
        if args.json:
            print(json.dumps(result.summary()))
        return 0
    if args.command == "bench":
        from .bench import run_from_args

        return run_from_args(args, prog="fused-ckpt bench")
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
