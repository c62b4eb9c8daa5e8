"""Argument parsing shared by the ``fused-ckpt`` command (:mod:`fused_ckpt.cli`) and the benchmark
command line (:mod:`fused_ckpt.bench`): the parser class and the argparse types.

Both commands import it; it imports neither, so the command line depends on the benchmarks
and not the other way round.
"""
from __future__ import annotations

import argparse

from .units import parse_budget


class Parser(argparse.ArgumentParser):
    """``error`` prints one line on stderr and exits with status 2 (argparse's own status for
    usage errors), pointing at ``--help``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def byte_size(text: str) -> int:
    """argparse type of ``--budget`` / ``--memory-cap``: :func:`fused_ckpt.units.parse_budget`
    with a unit required (a bare ``24`` would be 24 bytes)."""
    try:
        return parse_budget(text, None, require_unit=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
