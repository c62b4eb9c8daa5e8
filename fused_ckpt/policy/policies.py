"""The policies: which dial every site of every layer gets (:class:`Policy` and its kinds)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from ..units import format_bytes, parse_budget
from .dials import FULL, NONE
from .discovery import LayerSpec, Site
from .solver import solve_budget


class Policy:
    """Maps layers to dials: ``assign(layers)`` returns, per layer, ``{site name: dial}``."""

    name = "policy"

    def assign(self, layers: Sequence[LayerSpec]) -> list[dict]:
        raise NotImplementedError

    def needs_tokens(self) -> bool:
        return False

    def __repr__(self) -> str:
        return self.name


def _uniform(layers: Sequence[LayerSpec], chosen: Callable[[int], dict]) -> list[dict]:
    """Per layer, the dials of ``chosen(i)`` (a kind -> dial dict, or a role-aware function)."""
    out = []
    for layer in layers:
        want = chosen(layer.index)
        if want is FULL and layer.alternatives:  # most recompute: the whole-layer option
            out.append({layer.name: layer.alternatives[0].dial})
        else:
            out.append({s.name: _site_dial(s, want) for s in layer.sites})
    return out


def _site_dial(site: Site, want: dict):
    if site.kind == "checkpoint":
        return want.get("checkpoint:" + site.role, want["checkpoint"])
    return want[site.kind]


class _Named(Policy):
    def __init__(self, name: str, dials: dict):
        self.name = name
        self._dials = dials

    def assign(self, layers):
        return _uniform(layers, lambda i: self._dials)


class EveryN(Policy):
    """Full recompute (ffn True, attention "all", checkpoint sites checkpointed) in layers
    ``offset, offset + n, offset + 2n, ...``; no recompute in the others."""

    def __init__(self, n: int, offset: int = 0):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"EveryN: n must be a positive int, got {n!r}")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"EveryN: offset must be a non-negative int, got {offset!r}")
        self.n, self.offset = n, offset
        self.name = f"EveryN(n={n}, offset={offset})"

    def chosen(self, i: int) -> bool:
        return i >= self.offset and (i - self.offset) % self.n == 0

    def assign(self, layers):
        return _uniform(layers, lambda i: FULL if self.chosen(i) else NONE)


class Sqrt(Policy):
    """``"sqrt"``: recompute about sqrt(L) evenly spaced layers fully, leave the rest eager.

    Precisely: k = max(1, floor(sqrt(L) + 1/2)) layers; split the L layers into k equal spans
    and recompute the middle layer of each, i.e. layers ``floor((2j + 1) L / (2k))`` for
    j = 0..k-1, with full dials (ffn True, attention "all", checkpoint sites checkpointed);
    every other layer gets no recompute (ffn "none", attention False, not checkpointed).

    Relation to Chen et al. 2016 ("Training deep nets with sublinear memory cost"): their
    sqrt(n) schedule splits n layers into sqrt(n) segments and keeps only segment boundaries.
    With per-module fused recompute a recomputed layer already keeps only its module inputs, so
    here sqrt(L) sets how many layers pay for recompute: memory saved and FLOPs spent are both
    about sqrt(L)/L of what ``"full"`` saves and spends. It is a fixed, budget-free middle
    point; :class:`MemoryBudget` is the optimal choice for a given memory budget.
    """

    name = "sqrt"

    @staticmethod
    def layers_for(L: int) -> list[int]:
        if L <= 0:
            return []
        k = max(1, int(math.floor(math.sqrt(L) + 0.5)))
        return [((2 * j + 1) * L) // (2 * k) for j in range(k)]

    def assign(self, layers):
        chosen = set(self.layers_for(len(layers)))
        return _uniform(layers, lambda i: FULL if i in chosen else NONE)


_SELECTIVE_FFN = {True: True, "gemm": True, False: "none", "activation": False, "none": "none"}
_SELECTIVE_ATTN = {True: "all", "all": "all", "qkv": "qkv", False: False}


class Selective(Policy):
    """Recompute chosen module kinds in layers ``[skip_first, L - skip_last)``; the others get
    no recompute.

    ==================  =====================================================================
    argument            dial set in the selected layers
    ==================  =====================================================================
    ``ffn=True``        FFN ``True`` (keep x; recompute the fc1 GEMM and the activation)
    ``ffn="activation"``  FFN ``False`` (keep x and the pre-activation; recompute the activation)
    ``ffn=False``       FFN ``"none"`` (no recompute)
    ``attention=True``  attention ``"all"`` (also ``"all"``); ``"qkv"``: ``"qkv"``;
                        ``False``: ``False`` (keep q, k, v, o)
    ==================  =====================================================================

    Checkpoint sites in selected layers: a non-fused attention child is checkpointed when
    ``attention`` recomputes, a non-fused MLP child when ``ffn`` recomputes, a whole non-fused
    layer (or another child) when either does.
    """

    def __init__(self, ffn=True, attention=False, skip_first: int = 0, skip_last: int = 0):
        if not _in(ffn, _SELECTIVE_FFN):
            raise ValueError(f"Selective: ffn must be True, False or 'activation', got {ffn!r}")
        if not _in(attention, _SELECTIVE_ATTN):
            raise ValueError(f"Selective: attention must be True, 'all', 'qkv' or False, got {attention!r}")
        for n, v in (("skip_first", skip_first), ("skip_last", skip_last)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Selective: {n} must be a non-negative int, got {v!r}")
        self.ffn, self.attention = ffn, attention
        self.skip_first, self.skip_last = skip_first, skip_last
        self.name = (f"Selective(ffn={ffn!r}, attention={attention!r}, skip_first={skip_first}, "
                     f"skip_last={skip_last})")

    def assign(self, layers):
        L = len(layers)
        f = _lookup(self.ffn, _SELECTIVE_FFN)
        a = _lookup(self.attention, _SELECTIVE_ATTN)
        f_on, a_on = f != "none", a is not False
        sel = {"ffn": f, "attention": a, "checkpoint": f_on or a_on,
               "checkpoint:attention": a_on, "checkpoint:ffn": f_on}

        def chosen(i):
            return sel if self.skip_first <= i < L - self.skip_last else NONE

        return _uniform(layers, chosen)


def _in(v, table) -> bool:
    return any(v is k or (isinstance(v, str) and isinstance(k, str) and v == k) for k in table)


def _lookup(v, table):
    for k, out in table.items():
        if v is k or (isinstance(v, str) and isinstance(k, str) and v == k):
            return out
    raise KeyError(v)


class PerLayer(Policy):
    """Explicit dials: a list with one ``{site name or kind: dial}`` dict per layer (a kind key,
    "ffn"/"attention"/"checkpoint", sets every site of that kind in the layer; ``{"block":
    "full"}`` or ``{layer name: "full"}`` picks a block's whole-layer recompute). What
    :attr:`CheckpointPlan.policy` returns, so a plan can be re-applied."""

    name = "PerLayer"

    def __init__(self, dials: Sequence[dict]):
        self.dials = [dict(d) for d in dials]

    def assign(self, layers):
        if len(self.dials) != len(layers):
            raise ValueError(f"PerLayer: {len(self.dials)} layer entries for a model with {len(layers)} layers")
        out = []
        for layer, want in zip(layers, self.dials):
            whole = want.get(layer.name, want.get("block"))
            if whole is not None:  # a whole-layer option (a block's "full")
                if not any(o.dial == whole for o in layer.alternatives):
                    raise ValueError(f"PerLayer: layer {layer.index} ({layer.name}) has no whole-layer option "
                                     f"{whole!r}")
                out.append({layer.name: whole})
                continue
            row = {}
            for s in layer.sites:
                if s.name in want:
                    row[s.name] = want[s.name]
                elif s.kind in want:
                    row[s.name] = want[s.kind]
                else:
                    raise ValueError(f"PerLayer: no dial for {s.name} ({s.kind}) in layer {layer.index}")
            out.append(row)
        return out


class MemoryBudget(Policy):
    """The dials with the least recompute whose predicted saved bytes fit ``budget`` bytes.

    Objective, lexicographic: (recompute GEMM + attention FLOPs, elementwise values
    recomputed), then fewest bytes; constraint: sum of predicted saved bytes <= budget. The
    solution is exact (:func:`solve_budget`: a dynamic program over layers that keeps the
    Pareto frontier of (bytes, cost) of partial assignments; dominance pruning never discards
    a partial assignment that could be completed to an optimum). With exact optima and these
    tie-breaks the choice is monotone: a lower budget never keeps more bytes nor costs less.

    Bytes depend on the token count: pass ``batch`` and ``seq`` here or ``tokens``/``batch``
    and ``seq`` to :func:`apply_checkpointing`. Sites whose bytes or FLOPs are not predicted
    (eager checkpoint sites) are checkpointed and left out of the objective.
    """

    def __init__(self, budget, batch: Optional[int] = None, seq: Optional[int] = None):
        self.budget = parse_budget(budget, "MemoryBudget budget")
        for n, v in (("batch", batch), ("seq", seq)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"MemoryBudget: {n} must be a positive int, got {v!r}")
        if (batch is None) != (seq is None):
            raise ValueError("MemoryBudget: batch and seq go together")
        self.batch, self.seq = batch, seq
        self.name = f"MemoryBudget({format_bytes(self.budget)})"

    def needs_tokens(self) -> bool:
        return True

    def assign(self, layers):
        return solve_budget(layers, self.budget)


def resolve_policy(policy) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        if policy == "none":
            return _Named("none", NONE)
        if policy == "full":
            return _Named("full", FULL)
        if policy == "sqrt":
            return Sqrt()
    raise ValueError(f"unknown policy {policy!r}; use 'none', 'full', 'sqrt', EveryN(n), Selective(...), "
                     "MemoryBudget(bytes) or PerLayer([...])")


__all__ = ["Policy", "EveryN", "Sqrt", "Selective", "PerLayer", "MemoryBudget", "resolve_policy"]
