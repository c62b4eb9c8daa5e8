"""What a policy chose, as data and as a printed table: :class:`CheckpointPlan` of :class:`PlanRow`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..units import format_bytes
from .policies import PerLayer


@dataclass
class PlanRow:
    layer: Optional[int]        # None for rows outside the layers (embeddings, head, loss)
    module: str
    kind: str                   # "ffn" | "attention" | "checkpoint" | "block" | "head" | "fixed"
    dial: Any
    saved_bytes: Optional[int]
    recompute_flops: Optional[int]


@dataclass
class CheckpointPlan:
    """What a policy chose: one row per site (and, in planner plans, per fixed item), with
    predicted saved bytes and recompute FLOPs; ``None`` where not predicted."""

    rows: list
    policy_name: str
    batch: Optional[int] = None
    seq: Optional[int] = None
    notes: list = field(default_factory=list)

    @property
    def tokens(self) -> Optional[int]:
        return None if self.batch is None else self.batch * self.seq

    @property
    def total_saved_bytes(self) -> Optional[int]:
        """Sum of predicted saved bytes (None when no token count was given)."""
        vals = [r.saved_bytes for r in self.rows if r.saved_bytes is not None]
        return sum(vals) if self.tokens is not None else None

    @property
    def total_recompute_flops(self) -> Optional[int]:
        vals = [r.recompute_flops for r in self.rows if r.recompute_flops is not None]
        return sum(vals) if self.tokens is not None else None

    @property
    def unpredicted(self) -> list:
        return [r for r in self.rows if r.saved_bytes is None or r.recompute_flops is None]

    @property
    def num_layers(self) -> int:
        return 1 + max((r.layer for r in self.rows if r.layer is not None), default=-1)

    def layer_rows(self, i: int) -> list:
        return [r for r in self.rows if r.layer == i]

    def layer_saved_bytes(self, i: int) -> Optional[int]:
        rows = self.layer_rows(i)
        if any(r.saved_bytes is None for r in rows):
            return None
        return sum(r.saved_bytes for r in rows)

    def dials(self) -> list[dict]:
        """Per layer ``{module name: dial}`` of the dial-controlled sites."""
        return [{r.module: r.dial for r in self.layer_rows(i) if r.kind != "fixed"} for i in range(self.num_layers)]

    @property
    def policy(self) -> PerLayer:
        """These dials as a policy (:func:`apply_checkpointing` re-applies it)."""
        return PerLayer(self.dials())

    def __str__(self) -> str:
        head = f"checkpoint plan: {self.policy_name}"
        if self.tokens is not None:
            head += f"  (batch {self.batch}, seq {self.seq}, {self.tokens} tokens)"
        lines = [head, f"{'layer':>5}  {'dials':<48} {'saved':>12} {'recompute GFLOP':>16}"]
        for i in range(self.num_layers):
            rows = self.layer_rows(i)
            dials = ", ".join(f"{'block' if r.kind == 'block' else _short(r.module)}={_fmt_dial(r.dial)}"
                              for r in rows if r.kind != "fixed")
            b = self.layer_saved_bytes(i)
            fl = [r.recompute_flops for r in rows]
            f = None if any(v is None for v in fl) else sum(fl)
            lines.append(f"{i:>5}  {dials:<48} {_fmt_b(b):>12} {_fmt_f(f):>16}")
        for r in self.rows:
            if r.layer is None:
                lines.append(f"{'-':>5}  {r.module:<48} {_fmt_b(r.saved_bytes):>12} {_fmt_f(r.recompute_flops):>16}")
        lines.append(f"{'total':>5}  {'':<48} {_fmt_b(self.total_saved_bytes):>12} "
                     f"{_fmt_f(self.total_recompute_flops):>16}")
        if self.unpredicted and self.tokens is not None:
            lines.append(f"note: {len(self.unpredicted)} row(s) not predicted (eager or checkpointed modules "
                         "without a cost model); totals exclude them")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _short(name: str) -> str:
    parts = name.split(".")
    return parts[-1] if parts else name


def _fmt_dial(d) -> str:
    return repr(d) if isinstance(d, str) else str(d)


def _fmt_b(b) -> str:
    return "n/a" if b is None else format_bytes(b)


def _fmt_f(f) -> str:
    return "n/a" if f is None else f"{f / 1e9:.3f}"


__all__ = ["PlanRow", "CheckpointPlan"]
