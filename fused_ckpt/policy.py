"""Checkpointing policies: which layers recompute what, set through per-module dials.

The unit is a *layer*: one element of the model's repeated block list (``model.model.layers``
for Hugging Face Llama, ``transformer.h`` for GPT-2, or any ``nn.ModuleList``/``nn.Sequential``
of blocks; :func:`find_layers`). Inside a layer, every dial-controlled unit is a *site*:

==============  ================================  ========================================
site kind       dials, most to least recompute    what is kept for backward
==============  ================================  ========================================
``ffn``         ``True``, ``False``, ``"none"``   :class:`FusedCheckpointedFFN`: x / x and
                                                  the pre-activation / x, pre-activation
                                                  and activation
``attention``   ``"all"``, ``"qkv"``, ``False``   :class:`FusedCheckpointedAttention`:
                                                  x, lse / x, o, lse / x, q, k, v, o, lse
``checkpoint``  ``True``, ``False``               a module with no fused version: wrapped
                                                  in ``torch.utils.checkpoint``
                                                  (``use_reentrant=False``) / left eager
==============  ================================  ========================================

"Full recompute" is the first dial of every site, "no recompute" the last.

Checkpoint sites: a layer with no fused module is one site (the whole layer); in a layer with
fused modules, every direct child that holds a matrix parameter, is not fused and contains no
fused module (GPT-2's or Phi-3's attention after :func:`fused_ckpt.integrations.hf.patch_hf_model`)
is a site of its own. A fused module is never wrapped in a checkpoint (no double recompute).

A :class:`FusedCheckpointedBlock` layer (with ``batch``/``seq`` known) also has a whole-layer
option, ``"full"``: the block's own recompute, keeping only x and the per-row norm statistics. It
is what "full" (and the recomputed layers of EveryN / "sqrt") choose, and MemoryBudget weighs it
against the per-site dial combinations. Choosing site dials instead sets the block's
``recompute`` to None so that its submodules' dials govern.

Policies (:func:`apply_checkpointing`): ``"none"``, ``"full"``, ``"sqrt"``, :class:`EveryN`,
:class:`Selective`, :class:`MemoryBudget`, :class:`PerLayer`.

Predicted bytes (:class:`CheckpointPlan`): what autograd keeps for backward at each site
(parameters excluded), exactly as ``saved_tensors_hooks`` see it:

* ``ffn``: :meth:`FusedCheckpointedFFN.saved_bytes` (x; + pre-activation; + activation).
* ``attention``: :func:`attention_saved_bytes` (x; + o; + q, k, v; lse always, fp32). Position
  ids and key-padding masks, when a caller passes them, are shared by all layers and not counted.
* ``checkpoint`` checkpointed: the non-reentrant checkpoint keeps the layer's hidden-state input,
  ``tokens * hidden_size * itemsize`` (known when the model has a ``config.hidden_size``);
  left eager: unknown (``None``), since eager modules are not modelled.

Recompute FLOPs: the GEMM and attention FLOPs the backward spends recomputing: ffn True
``2 T d F1`` (F1 = d_ff, 2*d_ff gated); attention "qkv" the q/k/v projections
``2 T d (H + 2 H_kv) D``, "all" also the attention forward ``4 B H S^2 D`` (half when causal,
FlashAttention's convention); checkpoint sites: unknown (``None``).
"""
from __future__ import annotations

import math
import numbers
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from .modules.ffn import FusedCheckpointedFFN

FFN_DIALS = (True, False, "none")            # most recompute first
ATTENTION_DIALS = ("all", "qkv", False)
CHECKPOINT_DIALS = (True, False)
# the LM head + loss (planner only): FusedLinearCrossEntropy recompute=True / False, or eager
# (F.linear + cross-entropy, keeping the [T, V] log-softmax)
HEAD_DIALS = (True, False, "logits")
DIALS = {"ffn": FFN_DIALS, "attention": ATTENTION_DIALS, "checkpoint": CHECKPOINT_DIALS, "head": HEAD_DIALS}
FULL = {"ffn": True, "attention": "all", "checkpoint": True, "head": True}
NONE = {"ffn": "none", "attention": False, "checkpoint": False, "head": "logits"}


def _attention_cls():
    try:
        from .modules.attention import FusedCheckpointedAttention
    except ImportError:  # pragma: no cover - attention module absent
        return None
    return FusedCheckpointedAttention


# ============================================================================ cost models
def attention_saved_bytes(tokens: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                          dial, elem_size: int, lse_size: int = 4) -> int:
    """Bytes the fused attention block keeps for backward (parameters excluded): x and the
    fp32 lse always; the attention output o unless ``dial == "all"``; q, k, v when ``dial`` is
    False. ``tokens`` = batch * seqlen."""
    dial = _norm_attention_dial(dial)
    per_token = d_model * elem_size + n_heads * lse_size
    if dial != "all":
        per_token += n_heads * head_dim * elem_size
    if dial is False:
        per_token += (n_heads + 2 * n_kv_heads) * head_dim * elem_size
    return tokens * per_token


def attention_forward_flops(batch: int, seq: int, n_heads: int, head_dim: int, causal: bool) -> int:
    """FLOPs of the attention core (QK^T and PV) in the forward: 4 B H S^2 D, half when causal."""
    flops = 4 * batch * n_heads * seq * seq * head_dim
    return flops // 2 if causal else flops


def attention_recompute_flops(batch: int, seq: int, d_model: int, n_heads: int, n_kv_heads: int,
                              head_dim: int, causal: bool, dial) -> int:
    """FLOPs the backward spends recomputing: q/k/v projections for "qkv" and "all", plus the
    attention forward (to rebuild o) for "all". False: none beyond FlashAttention's usual
    probability recompute, which every setting shares."""
    dial = _norm_attention_dial(dial)
    if dial is False:
        return 0
    flops = 2 * batch * seq * d_model * (n_heads + 2 * n_kv_heads) * head_dim
    if dial == "all":
        flops += attention_forward_flops(batch, seq, n_heads, head_dim, causal)
    return flops


def _norm_attention_dial(dial):
    if dial is True:
        return "all"
    if dial in ("all", "qkv") or dial is False:
        return dial
    raise ValueError(f"attention dial must be 'all', 'qkv' or False, got {dial!r}")


def _norm_dial(kind: str, dial):
    if kind == "attention":
        return _norm_attention_dial(dial)
    for d in DIALS[kind]:
        if dial is d or (isinstance(dial, str) and dial == d):
            return d
    raise ValueError(f"{kind} dial must be one of {DIALS[kind]}, got {dial!r}")


# ============================================================================ sites and layers
@dataclass(frozen=True)
class Option:
    """One dial value of a site with its predicted saved bytes and recompute cost. ``aux`` is the
    tie-breaking cost (elementwise values recomputed); None fields are unknown."""

    dial: Any
    saved_bytes: Optional[int]
    recompute_flops: Optional[int]
    aux: int = 0


@dataclass
class Site:
    """A dial-controlled unit of a layer: a fused module or a checkpointable module."""

    layer: int
    name: str                      # qualified module name (or a label for config-only plans)
    kind: str                      # "ffn" | "attention" | "checkpoint"
    role: str                      # "ffn" | "attention" | "layer" | "other" (used by Selective)
    options: dict                  # dial -> Option (dials of DIALS[kind])
    module: Optional[nn.Module] = None

    def option(self, dial) -> Option:
        return self.options[_norm_dial(self.kind, dial)]


@dataclass
class LayerSpec:
    """The sites of one layer, plus fixed bytes the policy does not control (planner only)."""

    index: int
    name: str
    sites: list
    fixed: list = field(default_factory=list)   # (label, bytes) pairs, always kept
    # whole-layer options replacing every site's dial: a FusedCheckpointedBlock's "full"
    # recompute (keeps x and the norm statistics); chosen as ``{layer name: Option.dial}``
    alternatives: list = field(default_factory=list)
    module: Optional[nn.Module] = None
    site_bytes: int = 0   # kept whenever the site dials govern (a block's two norms: input + stats)


# ============================================================================ policies
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


# ============================================================================ exact solver
class BudgetTooSmall(ValueError):
    """The budget is below the least memory any assignment of dials needs."""

    def __init__(self, budget: int, minimum: int, what: str = "predicted saved bytes"):
        self.budget, self.minimum = budget, minimum
        super().__init__(f"budget {format_bytes(budget)} ({budget} bytes) is below the minimum possible "
                         f"{what}, {format_bytes(minimum)} ({minimum} bytes), reached with full recompute")


def _layer_frontier(layer: LayerSpec):
    """Pareto-optimal (bytes, cost, dials) of one layer's dial combinations.

    Sites with an unknown prediction are pinned to their most-recompute dial (checkpointed)."""
    combos = [(layer.site_bytes, (0, 0), {})]
    for s in layer.sites:
        opts = [(d, o) for d, o in s.options.items()
                if o.saved_bytes is not None and o.recompute_flops is not None]
        if not opts:  # not fully predicted: pinned to the most-recompute dial, FLOPs left out
            d0 = DIALS[s.kind][0]
            opts = [(d0, Option(d0, s.options[d0].saved_bytes or 0, 0, 0))]
        new = []
        for b, c, dials in combos:
            for d, o in opts:
                new.append((b + o.saved_bytes, (c[0] + o.recompute_flops, c[1] + o.aux), {**dials, s.name: d}))
        combos = _pareto(new)
    for o in layer.alternatives:
        combos.append((o.saved_bytes, (o.recompute_flops, o.aux), {layer.name: o.dial}))
    return _pareto(combos)


def _pareto(items):
    """Keep the (bytes, cost, payload) items no other item dominates; one per (bytes, cost),
    sorted by bytes ascending (cost then strictly descending)."""
    items = sorted(items, key=lambda t: (t[0], t[1]))
    out = []
    for it in items:
        if not out or it[1] < out[-1][1]:
            out.append(it)
    return out


def solve_budget(layers: Sequence[LayerSpec], budget: int) -> list[dict]:
    """Exact minimum-recompute dials with sum of predicted saved bytes <= ``budget``.

    A multiple-choice knapsack solved by dynamic programming over layers: after each layer the
    frontier holds, for every achievable byte total, the cheapest partial assignment, pruned to
    the Pareto frontier (a partial assignment with no fewer bytes and no lower cost than another
    can never complete to something better, because costs add and lexicographic order is
    translation invariant). States that cannot fit even with the remaining layers at their
    minimum bytes are dropped. Fixed bytes of layers (``LayerSpec.fixed``) count against the
    budget. The frontier is at most the number of distinct byte totals; for identical layers it
    stays small (1120 states for 80 Llama-70B layers of 9 dial combinations, a quarter of a
    second). Raises :class:`BudgetTooSmall` when nothing fits.
    """
    fronts = [_layer_frontier(layer) for layer in layers]
    fixed = sum(b for layer in layers for _, b in layer.fixed)
    min_rest = [0] * (len(fronts) + 1)
    for i in range(len(fronts) - 1, -1, -1):
        min_rest[i] = min_rest[i + 1] + fronts[i][0][0]
    if fixed + min_rest[0] > budget:
        raise BudgetTooSmall(budget, fixed + min_rest[0])
    cap = budget - fixed
    # state: (bytes, cost, back) with back = (previous state index, option index)
    states = [(0, (0, 0), None)]
    history = []
    for i, front in enumerate(fronts):
        cand = []
        for si, (b, c, _) in enumerate(states):
            for oi, (ob, oc, _) in enumerate(front):
                nb = b + ob
                if nb + min_rest[i + 1] > cap:
                    break  # options are sorted by bytes
                cand.append((nb, (c[0] + oc[0], c[1] + oc[1]), (si, oi)))
        states = _pareto(cand)
        history.append(states)
    best = min(range(len(states)), key=lambda k: (states[k][1], states[k][0]))
    picks = []
    k = best
    for i in range(len(fronts) - 1, -1, -1):
        si, oi = history[i][k][2]
        picks.append(fronts[i][oi][2])
        k = si
    return picks[::-1]


# ============================================================================ layers
def _fused_types():
    t = [FusedCheckpointedFFN]
    a = _attention_cls()
    if a is not None:
        t.append(a)
    return tuple(t)


def _count_fused(module: nn.Module) -> int:
    ft = _fused_types()
    return sum(isinstance(m, ft) for m in module.modules())


def find_layers(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The model's repeated block list: ``(qualified name, blocks)``.

    Among the ``nn.ModuleList``/``nn.Sequential`` containers of the model, the one holding the
    most fused modules; when no container holds any, the longest one whose children share one
    class and carry parameters (Hugging Face ``model.layers``, GPT-2 ``transformer.h``)."""
    best, best_key = None, None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) == 0:
            continue
        children = list(mod)
        n_fused = sum(_count_fused(c) for c in children)
        repeated = len({type(c) for c in children}) == 1 and all(
            any(True for _ in c.parameters()) for c in children)
        if not n_fused and not repeated:
            continue
        key = (n_fused, repeated, len(children), -name.count("."))
        if best_key is None or key > best_key:
            best, best_key = (name, children), key
    if best is None:
        raise ValueError(f"no repeated block list found in {type(model).__name__}: expected an nn.ModuleList "
                         "(or nn.Sequential) of transformer blocks; pass layers=[...] explicitly")
    return best


def _role(name: str) -> str:
    low = name.lower()
    if "attn" in low or "attention" in low:
        return "attention"
    if "mlp" in low or "ffn" in low or "feed_forward" in low:
        return "ffn"
    return "other"


def _has_matrix_param(m: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in m.parameters())


@dataclass
class _Context:
    batch: Optional[int]
    seq: Optional[int]
    hidden_size: Optional[int]
    dtype: Optional[torch.dtype]

    @property
    def tokens(self) -> Optional[int]:
        return None if self.batch is None else self.batch * self.seq


def _module_dtype(m: nn.Module, default=None):
    for p in m.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


def _ffn_site(layer: int, name: str, m: FusedCheckpointedFFN, ctx: _Context) -> Site:
    opts = {}
    T = ctx.tokens
    dtype = ctx.dtype or m.param_dtype
    fc1_rows = m.fc1_rows
    for d in FFN_DIALS:
        if T is None:
            opts[d] = Option(d, None, None)
        else:
            opts[d] = Option(d, m.saved_bytes(T, recompute=d, dtype=dtype), m.recompute_flops(T, recompute=d),
                             0 if d == "none" else T * fc1_rows)
    return Site(layer, name, "ffn", "ffn", opts, m)


def _attention_site(layer: int, name: str, m: nn.Module, ctx: _Context) -> Site:
    opts = {}
    dtype = ctx.dtype or m.q_proj.weight.dtype
    e = torch.empty((), dtype=dtype).element_size()
    lse = 8 if dtype == torch.float64 else 4
    for d in ATTENTION_DIALS:
        if ctx.tokens is None:
            opts[d] = Option(d, None, None)
            continue
        rope = ctx.tokens * (m.n_heads + m.n_kv_heads) * m.head_dim if m.rope_theta is not None else 0
        opts[d] = Option(
            d,
            attention_saved_bytes(ctx.tokens, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, d, e, lse),
            attention_recompute_flops(ctx.batch, ctx.seq, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim,
                                      m.causal, d),
            0 if d is False else rope,
        )
    return Site(layer, name, "attention", "attention", opts, m)


def _checkpoint_site(layer: int, name: str, role: str, m: nn.Module, ctx: _Context) -> Site:
    dtype = ctx.dtype or _module_dtype(m, torch.float32)
    known = ctx.tokens is not None and ctx.hidden_size is not None
    b = ctx.tokens * ctx.hidden_size * torch.empty((), dtype=dtype).element_size() if known else None
    opts = {True: Option(True, b, None), False: Option(False, None, 0)}
    return Site(layer, name, "checkpoint", role, opts, m)


def build_layers(model: nn.Module, layers: Optional[Sequence[nn.Module]] = None, *, batch=None, seq=None,
                 dtype=None) -> list[LayerSpec]:
    """The :class:`LayerSpec` list of ``model`` (sites, options and their predictions)."""
    if layers is None:
        _, layers = find_layers(model)
    layers = list(layers)
    names = {id(m): n for n, m in model.named_modules()}
    cfg = getattr(model, "config", None)
    hidden = None
    if cfg is not None:
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    ctx = _Context(batch, seq, hidden, dtype)
    ft = _fused_types()
    attn_cls = _attention_cls()
    specs = []
    for i, layer in enumerate(layers):
        lname = names.get(id(layer), f"layer{i}")
        sites = []
        fused = [(n, m) for n, m in layer.named_modules() if isinstance(m, ft)]
        for n, m in fused:
            q = f"{lname}.{n}" if lname else n
            if isinstance(m, FusedCheckpointedFFN):
                sites.append(_ffn_site(i, q, m, ctx))
            elif attn_cls is not None and isinstance(m, attn_cls):
                sites.append(_attention_site(i, q, m, ctx))
        if not fused:
            sites.append(_checkpoint_site(i, lname, "layer", layer, ctx))
        else:
            for n, child in layer.named_children():
                if isinstance(child, ft) or _count_fused(child) or not _has_matrix_param(child):
                    continue
                sites.append(_checkpoint_site(i, f"{lname}.{n}", _role(n), child, ctx))
        alts = _block_alternatives(layer, ctx)
        specs.append(LayerSpec(i, lname, sites, alternatives=alts, module=layer,
                               site_bytes=_block_norm_bytes(layer, ctx) if alts and ctx.batch else 0))
    return specs


def block_full_option(batch: int, seq: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                      causal: bool, ffn_recompute_flops: int, fc1_rows: int, elem: int,
                      layer_norm: bool = False) -> Option:
    """A pre-norm block's whole-layer "full" recompute (:mod:`fused_ckpt.ops.block`) as an Option:
    saves x (e T d) and the two norms' fp32 per-row statistics; recomputes the q/k/v projections,
    the attention forward, o_proj and (inside the FFN backward, ``ffn_recompute_flops``) the
    up-projection."""
    from .ops.block import full_saved_bytes

    T = batch * seq
    saved = full_saved_bytes(T, d_model, elem, layer_norm)
    flops = (attention_recompute_flops(batch, seq, d_model, n_heads, n_kv_heads, head_dim, causal, "all")
             + 2 * T * n_heads * head_dim * d_model + ffn_recompute_flops)
    return Option("full", saved, flops, T * fc1_rows)


def _block_alternatives(layer: nn.Module, ctx: "_Context") -> list:
    """A FusedCheckpointedBlock's whole-layer option (:func:`block_full_option`)."""
    if not _is_fused_block(layer):
        return []
    if ctx.batch is None:  # chosen by the uniform policies all the same; bytes unknown
        return [Option("full", None, None)]
    a, m = layer.self_attn, layer.mlp
    dtype = ctx.dtype or m.param_dtype
    return [block_full_option(ctx.batch, ctx.seq, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.causal,
                              m.recompute_flops(ctx.tokens, recompute=True), m.fc1_rows,
                              torch.empty((), dtype=dtype).element_size(), layer.norm == "layernorm")]


def _block_norm_bytes(layer: nn.Module, ctx: "_Context") -> int:
    """What a FusedCheckpointedBlock's two norms keep when its submodules' dials govern."""
    from .ops.norm import norm_saved_bytes

    dtype = ctx.dtype or layer.mlp.param_dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * norm_saved_bytes(ctx.batch * ctx.seq, layer.mlp.d_model, elem, layer.norm == "layernorm")


# ============================================================================ applying dials
def _checkpointed_forward(self, *args, **kwargs):
    """Instance ``forward`` installed on a checkpoint site: non-reentrant checkpoint of the
    module's own forward. A ``hidden_states`` keyword goes positional so that the checkpoint
    saves it through ``save_for_backward`` (visible to saved-tensor hooks); KV caches are
    dropped in training, as Hugging Face's own checkpointing does (a replayed forward would
    update them twice)."""
    inner = self.__dict__.get("_fused_ckpt_prev_forward") or types.MethodType(type(self).forward, self)
    if not (torch.is_grad_enabled() and self.training):
        return inner(*args, **kwargs)
    for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if kwargs.get(key) is not None:
            kwargs[key] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not args and isinstance(kwargs.get("hidden_states"), torch.Tensor):
        h = kwargs.pop("hidden_states")
        return torch.utils.checkpoint.checkpoint(lambda hs, **kw: inner(hidden_states=hs, **kw), h,
                                                 use_reentrant=False, **kwargs)
    return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether fused_ckpt wrapped ``module`` in a non-reentrant checkpoint."""
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, types.MethodType) and fwd.__func__ is _checkpointed_forward


def set_checkpoint(module: nn.Module, on: bool) -> None:
    """Wrap (or unwrap) ``module``'s forward in a non-reentrant checkpoint, in place: the
    state dict and parameter names do not change."""
    if on == is_checkpointed(module):
        return
    if on:
        prev = module.__dict__.get("forward")
        if prev is not None:
            module._fused_ckpt_prev_forward = prev
        module.forward = types.MethodType(_checkpointed_forward, module)
    else:
        prev = module.__dict__.pop("_fused_ckpt_prev_forward", None)
        del module.forward
        if prev is not None:
            module.forward = prev


_GUARD_ATTR = "_fused_ckpt_guard"


def _hf_gc_guard(layer: nn.Module, args, kwargs=None):
    """Forward pre-hook on layers fused_ckpt manages: Hugging Face's own per-layer activation
    checkpointing (``gradient_checkpointing_enable()``) would wrap a layer whose recompute is
    already set by dials, recomputing twice; it is switched off on the layer, with a warning."""
    if getattr(layer, "gradient_checkpointing", False):
        layer.gradient_checkpointing = False
        warnings.warn(
            f"fused_ckpt: Hugging Face activation checkpointing was switched on for {type(layer).__name__} layers "
            "that fused_ckpt manages; it is switched off there to avoid recomputing twice. Set recompute with "
            "fused_ckpt.apply_checkpointing(model, policy) instead.", stacklevel=2)


def install_hf_guard(layer: nn.Module) -> bool:
    """Install :func:`_hf_gc_guard` (once). Returns whether HF checkpointing was on and is now off."""
    was_on = bool(getattr(layer, "gradient_checkpointing", False))
    if was_on:
        layer.gradient_checkpointing = False
    if getattr(layer, _GUARD_ATTR, None) is None:
        object.__setattr__(layer, _GUARD_ATTR, layer.register_forward_pre_hook(_hf_gc_guard))
    return was_on


# ============================================================================ the plan
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


# ============================================================================ entry point
def apply_checkpointing(model: nn.Module, policy: Union[str, Policy] = "full", *, tokens: Optional[int] = None,
                        batch: Optional[int] = None, seq: Optional[int] = None,
                        layers: Optional[Sequence[nn.Module]] = None,
                        dtype: Optional[torch.dtype] = None) -> CheckpointPlan:
    """Set every fused module's ``recompute`` dial and wrap non-fused sites in checkpoints.

    Args:
        policy: ``"none"``, ``"full"``, ``"sqrt"``, :class:`EveryN`, :class:`Selective`,
            :class:`MemoryBudget`, :class:`PerLayer` (module docstring has the dials).
        tokens / batch, seq: the shape predictions are made for (``tokens`` alone means one
            sequence of that length). Required by :class:`MemoryBudget` unless it carries
            ``batch`` and ``seq`` itself.
        layers: the blocks, when :func:`find_layers` does not find them.
        dtype: activation dtype for predictions (default: each module's parameter dtype;
            pass the autocast dtype when training under autocast).

    After this call fused_ckpt owns the recompute of every layer: Hugging Face's per-layer
    checkpointing flag is switched off on them, now and if it is switched on later.
    Returns the :class:`CheckpointPlan` (per-site dials, predicted bytes and FLOPs).
    """
    pol = resolve_policy(policy)
    if tokens is not None:
        if batch is not None or seq is not None:
            raise ValueError("pass either tokens or batch and seq, not both")
        batch, seq = 1, tokens
    if (batch is None) != (seq is None):
        raise ValueError("batch and seq go together")
    if batch is None and isinstance(pol, MemoryBudget) and pol.batch is not None:
        batch, seq = pol.batch, pol.seq
    for n, v in (("batch", batch), ("seq", seq)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"{n} must be a positive int, got {v!r}")
    if pol.needs_tokens() and batch is None:
        raise ValueError(f"{pol.name} needs the token count to predict bytes: pass MemoryBudget(bytes, batch=..., "
                         "seq=...) or apply_checkpointing(..., batch=..., seq=...)")
    specs = build_layers(model, layers, batch=batch, seq=seq, dtype=dtype)
    assignment = pol.assign(specs)
    rows = []
    notes = []
    if tokens is not None:
        notes.append(f"tokens={tokens} taken as one sequence (batch 1) for attention FLOPs")
    hf_off = blocks_released = 0
    for spec, dials in zip(specs, assignment):
        if spec.name in dials and spec.alternatives:  # the whole-layer option was chosen
            o = next(a for a in spec.alternatives if a.dial == dials[spec.name])
            spec.module.recompute = o.dial
            rows.append(PlanRow(spec.index, spec.name, "block", o.dial, o.saved_bytes, o.recompute_flops))
            layer_mod = _layer_module(model, spec.name, layers, spec.index)
            if layer_mod is not None:
                hf_off += install_hf_guard(layer_mod)
            continue
        for s in spec.sites:
            d = _norm_dial(s.kind, dials[s.name])
            if s.kind in ("ffn", "attention"):
                s.module.recompute = d
            else:
                set_checkpoint(s.module, bool(d))
            o = s.options[d]
            rows.append(PlanRow(spec.index, s.name, s.kind, d, o.saved_bytes, o.recompute_flops))
        layer_mod = _layer_module(model, spec.name, layers, spec.index)
        if layer_mod is not None:
            hf_off += install_hf_guard(layer_mod)
            if getattr(layer_mod, "recompute", None) == "full" and _is_fused_block(layer_mod):
                # the block's own whole-block recompute would override the dials just set
                layer_mod.recompute = None
                blocks_released += 1
        if spec.site_bytes:
            rows.append(PlanRow(spec.index, f"{spec.name} (norms)", "fixed", None, spec.site_bytes, 0))
    if hf_off:
        notes.append(f"Hugging Face activation checkpointing switched off on {hf_off} layer(s) (fused_ckpt "
                     "sets their recompute)")
    if blocks_released:
        notes.append(f"{blocks_released} FusedCheckpointedBlock(s) switched from recompute='full' to their "
                     "submodules' dials (the policy's)")
    return CheckpointPlan(rows, pol.name, batch, seq, notes)


def _is_fused_block(m: nn.Module) -> bool:
    from .modules.block import FusedCheckpointedBlock

    return isinstance(m, FusedCheckpointedBlock)


def _layer_module(model, name, layers, index):
    if layers is not None:
        return list(layers)[index]
    return model.get_submodule(name) if name else model


# ============================================================================ byte units
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _parse_size(value, what: Optional[str]):
    """(bytes, whether a unit was written) of an int, an integral float or a string."""
    subj = what or "byte size"
    pre = f"{what}: " if what else ""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ValueError(f"{pre}malformed byte size {value!r}: expected a number of bytes or a string such as "
                         "'24GiB'")
    if isinstance(value, numbers.Integral):
        n = int(value)
        if n < 0:
            raise ValueError(f"{subj} must be positive, got {value!r}")
        return n, False
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{subj} must be a finite positive number of bytes, got {value!r}")
        if not v.is_integer():
            raise ValueError(f"{subj} {value!r} is not a whole number of bytes")
        return int(v), False
    s = value.strip().lower().replace(" ", "").replace("_", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise ValueError(f"{pre}malformed byte size {value!r}: expected a number with an optional unit "
                         "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 24GiB")
    try:
        v = float(num)
    except ValueError:
        raise ValueError(f"{pre}malformed byte size {value!r}: {num!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{subj} must be a finite positive number, got {value!r}")
    if not unit and not v.is_integer():
        raise ValueError(f"{subj} {value!r} is not a whole number of bytes; add a unit, e.g. {num}GiB")
    return int(round(v * _UNITS[unit])), bool(unit)


def parse_bytes(value, what: Optional[str] = None) -> int:
    """A byte count from an int, an integral float (``1.5e11``) or a string: ``"24GiB"``,
    ``"24 GB"``, ``"512MiB"``, ``"1.5e11"``, ``"1000"`` (bytes). GB/MB/KB/TB are decimal,
    GiB/MiB/KiB/TiB and bare G/M/K/T binary. Zero is allowed; negative, non-finite or
    fractional byte counts and anything else raise ValueError (naming ``what`` when given)."""
    return _parse_size(value, what)[0]


def parse_budget(value, what: Optional[str] = "budget", *, require_unit: bool = False) -> int:
    """A memory budget in bytes: the one parser behind :class:`MemoryBudget`,
    :func:`fused_ckpt.plan` and the ``fused-ckpt`` options ``--budget`` and ``--memory-cap``.
    The forms of :func:`parse_bytes`; the result must be positive. ``require_unit``: a bare
    number such as ``"24"`` is refused (it would mean 24 bytes); the command line sets it."""
    n, has_unit = _parse_size(value, what)
    if n <= 0:
        raise ValueError(f"{what or 'size'} must be positive, got {value!r}")
    if require_unit and isinstance(value, str) and not has_unit:
        v = value.strip()
        raise ValueError(f"{what + ' ' if what else ''}{v!r} has no unit (as written it means {n} bytes): "
                         f"write e.g. {v}GiB or {v}GB, or {v}B for bytes")
    return n


def format_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


__all__ = [
    "EveryN", "Selective", "Sqrt", "MemoryBudget", "PerLayer", "Policy", "CheckpointPlan", "PlanRow",
    "apply_checkpointing", "find_layers", "build_layers", "solve_budget", "attention_saved_bytes",
    "attention_recompute_flops", "attention_forward_flops", "parse_bytes", "parse_budget", "format_bytes",
    "BudgetTooSmall",
    "set_checkpoint", "is_checkpointed", "LayerSpec", "Site", "Option",
]
