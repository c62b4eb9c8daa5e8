"""``fused-ckpt`` command line (also ``python -m fused_ckpt.cli``).

    fused-ckpt plan --model llama-7b --batch 8 --seq 4096 --dtype bf16 --budget 80GiB [--optimizer adamw|sgd|none]
                   [--head any|fused-recompute|fused-no-recompute|eager]

prints what the budget is taken to hold, the per-layer dials, predicted saved bytes and
recompute FLOPs, the totals and the verdict (:func:`fused_ckpt.planner.plan`). ``--budget`` is
a device budget: weights, gradients and optimizer states (AdamW unless ``--optimizer`` says
otherwise) count against it as well as activations; ``--optimizer none`` plans activations
only. Sizes need a unit (``24GiB``, ``80GB``, ``1.5e11B``).

    fused-ckpt bench [--suite ffn|attention|block|step|loss] [--quick] [--out DIR] [--memory-cap 24GiB]
    fused-ckpt bench --compare A.json B.json

runs the benchmark suites (:mod:`fused_ckpt.bench`, also ``python -m fused_ckpt.bench``) and
writes results.json, results.md and plots into ``--out``; ``--compare`` prints the ratios
between two runs.

Bad input (unknown model, malformed config, zero or negative sizes, a size without a unit, a
budget below the minimum possible, an unusable ``--out``) prints one ``error:`` line on stderr,
no traceback, and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ._argtypes import Parser as _Parser
from ._argtypes import byte_size
from ._argtypes import positive_int as _positive_int
from .configs import BUILTIN_CONFIGS
from .planner import OPTIMIZER_STATES, plan
from .policy import BudgetTooSmall

HEAD_CHOICES = {"any": None, "fused-recompute": True, "fused-no-recompute": False, "eager": "logits"}


def _version() -> str:
    from . import __version__

    return __version__


DEFAULT_OPTIMIZER = "adamw"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fused-ckpt", description="fused_ckpt tools: activation-memory planning and benchmarks")
    p.add_argument("--version", action="version", version=f"fused-ckpt {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="{plan,bench}")
    pl = sub.add_parser("plan", help="choose recompute dials for a model, batch, sequence length and budget",
                        description="Choose recompute dials so that a training step fits a memory budget.",
                        epilog="By default the budget is a device budget: weights, gradients and AdamW states "
                               "(2 per parameter, in --dtype as torch.optim keeps them) count against it, as "
                               "well as activations. --optimizer none plans activations only.")
    pl.add_argument("--model", required=True,
                    help=f"a built-in config ({', '.join(BUILTIN_CONFIGS)}) or a Hugging Face config.json path")
    pl.add_argument("--batch", required=True, type=_positive_int, help="sequences per step")
    pl.add_argument("--seq", required=True, type=_positive_int, help="tokens per sequence")
    pl.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="training dtype of weights, gradients, optimizer states and activations (default bf16)")
    pl.add_argument("--budget", required=True, type=byte_size, metavar="SIZE",
                    help="device memory the step may use, with a unit: 24GiB, 80GB, 1.5TiB, 1.5e11B. It holds "
                         "weights + gradients + optimizer states + activations (see --optimizer)")
    pl.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATES) + ["none"], default=None,
                    help=f"whose states count against --budget besides weights and gradients (default "
                         f"{DEFAULT_OPTIMIZER}); none: the budget is for activations alone")
    pl.add_argument("--no-loss", action="store_true",
                    help="do not count the loss (the LM head keeps its input only)")
    pl.add_argument("--head", choices=sorted(HEAD_CHOICES), default="any",
                    help="LM head + loss: any (the planner picks), fused-recompute (FusedLinearCrossEntropy "
                         "recompute=True), fused-no-recompute (recompute=False), eager (keeps the fp32 "
                         "log-softmax [tokens, vocab])")
    pl.add_argument("--json", action="store_true", help="print the totals as JSON after the table")
    from .bench import add_arguments as _bench_arguments

    bn = sub.add_parser("bench", help="run the benchmark suites (ffn, attention, block, step, loss) or compare two runs",
                        description="Benchmark suites: results.json, results.md and plots in --out.")
    _bench_arguments(bn)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        optimizer = DEFAULT_OPTIMIZER if args.optimizer is None else args.optimizer
        try:
            result = plan(args.model, args.batch, args.seq, args.dtype, args.budget, optimizer,
                          include_loss=not args.no_loss, head=HEAD_CHOICES[args.head])
        except ValueError as e:  # BudgetTooSmall included
            msg = str(e)
            if args.optimizer is None and isinstance(e, BudgetTooSmall):
                msg += f" (counting weights, gradients and {DEFAULT_OPTIMIZER} states; --optimizer none plans " \
                       "activations only)"
            print(f"fused-ckpt plan: error: {msg}", file=sys.stderr)
            return 2
        if args.optimizer is None:
            result.notes.append(f"--optimizer not given: assumed {DEFAULT_OPTIMIZER} (weights, gradients and its "
                                "states count against the budget); --optimizer none plans activations only")
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
