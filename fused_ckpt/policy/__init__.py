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

Files, in dependency order: each imports only files above it (tests/test_layering.py checks
it); the package imports the module layer, which never imports it back.

==================  =========================================================================
``dials.py``        dial constants, :class:`Option`, the per-site cost formulas
                    (attention ones from :mod:`fused_ckpt.accounting`, :func:`block_full_option`)
``discovery.py``    :func:`find_layers`, :func:`build_layers`: a model's layers, :class:`Site`,
                    :class:`LayerSpec`
``solver.py``       the exact budget solver :func:`solve_budget`, :class:`BudgetTooSmall`
``policies.py``     :class:`Policy` and its kinds, ``resolve_policy``
``wrap.py``         checkpoint wrapping of non-fused sites (:func:`set_checkpoint`)
``hf_guard.py``     switching off Hugging Face's own per-layer checkpointing
``report.py``       :class:`CheckpointPlan` / :class:`PlanRow` and the printed table
``apply.py``        :func:`apply_checkpointing`
==================  =========================================================================

Byte sizes (:func:`parse_bytes`, :func:`parse_budget`, :func:`format_bytes`) live in
:mod:`fused_ckpt.units` and are re-exported here.
"""
from __future__ import annotations

from ..units import format_bytes, parse_budget, parse_bytes
from .apply import apply_checkpointing
from .dials import (ATTENTION_DIALS, CHECKPOINT_DIALS, DIALS, FFN_DIALS, FULL, HEAD_DIALS, NONE, Option,
                    attention_forward_flops, attention_recompute_flops, attention_saved_bytes, block_full_option)
from .discovery import LayerSpec, Site, build_layers, find_layers
from .hf_guard import _hf_gc_guard, install_hf_guard  # noqa: F401  (_hf_gc_guard: integrations.hf)
from .policies import EveryN, MemoryBudget, PerLayer, Policy, Selective, Sqrt, resolve_policy
from .report import CheckpointPlan, PlanRow
from .solver import BudgetTooSmall, solve_budget
from .wrap import is_checkpointed, set_checkpoint

__all__ = [
    "EveryN", "Selective", "Sqrt", "MemoryBudget", "PerLayer", "Policy", "CheckpointPlan", "PlanRow",
    "apply_checkpointing", "find_layers", "build_layers", "solve_budget", "attention_saved_bytes",
    "attention_recompute_flops", "attention_forward_flops", "parse_bytes", "parse_budget", "format_bytes",
    "BudgetTooSmall",
    "set_checkpoint", "is_checkpointed", "LayerSpec", "Site", "Option",
    "ATTENTION_DIALS", "CHECKPOINT_DIALS", "DIALS", "FFN_DIALS", "FULL", "HEAD_DIALS", "NONE",
    "block_full_option", "install_hf_guard", "resolve_policy",
]
