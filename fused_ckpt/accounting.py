"""Saved-tensor accounting: what autograd keeps for backward, seen through ``saved_tensors_hooks``.

The one implementation behind every memory claim of the project (tests, demo, benchmarks), and
the attention block's saved-bytes / recompute-FLOP formulas, which both the module layer
(:meth:`FusedCheckpointedBlock.saved_bytes`) and the policies and planner read: they live here,
below both, so that no module imports :mod:`fused_ckpt.policy`."""
from __future__ import annotations

from typing import Iterable

import torch


def _storage_ptrs(tensors: Iterable[torch.Tensor]) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors}


def unique_saved_bytes(saved: Iterable[torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages in ``saved`` (what stays resident: a tensor saved by several
    ops counts once), storages of ``exclude`` (parameters) left out."""
    skip = _storage_ptrs(exclude)
    seen = {}
    for t in saved:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class SavedTensors:
    """Context manager recording every tensor autograd saves while it is active."""

    def __init__(self):
        self.saved: list = []

    def __enter__(self):
        def pack(t):
            self.saved.append(t)
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def unique_bytes(self, exclude: Iterable[torch.Tensor] = ()) -> int:
        """Distinct storages saved, ``exclude`` (parameters) left out: see :func:`unique_saved_bytes`."""
        return unique_saved_bytes(self.saved, exclude)

    def total_bytes(self, exclude: Iterable[torch.Tensor] = ()) -> int:
        """Bytes of every saved tensor by its own size (views at their size, repeats again),
        tensors sharing storage with ``exclude`` (parameters) left out."""
        skip = _storage_ptrs(exclude)
        return sum(t.numel() * t.element_size() for t in self.saved
                   if t.untyped_storage().data_ptr() not in skip)


# ------------------------------------------------------------------ attention block costs
def attention_saved_bytes(tokens: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                          dial, elem_size: int, lse_size: int = 4) -> int:
    """Bytes the fused attention block keeps for backward (parameters excluded): x and the
    fp32 lse always; the attention output o unless ``dial == "all"``; q, k, v when ``dial`` is
    False. ``tokens`` = batch * seqlen."""
    dial = normalize_attention_dial(dial)
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
    dial = normalize_attention_dial(dial)
    if dial is False:
        return 0
    flops = 2 * batch * seq * d_model * (n_heads + 2 * n_kv_heads) * head_dim
    if dial == "all":
        flops += attention_forward_flops(batch, seq, n_heads, head_dim, causal)
    return flops


def normalize_attention_dial(dial):
    """An attention ``recompute`` dial in canonical form: ``True`` is ``"all"``; ``"all"``,
    ``"qkv"`` and ``False`` stand; anything else raises ValueError."""
    if dial is True:
        return "all"
    if dial in ("all", "qkv") or dial is False:
        return dial
    raise ValueError(f"attention dial must be 'all', 'qkv' or False, got {dial!r}")
