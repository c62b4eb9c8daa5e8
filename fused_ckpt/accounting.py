"""Saved-tensor accounting: what autograd keeps for backward, seen through ``saved_tensors_hooks``.

The one implementation behind every memory claim of the project (tests, demo, benchmarks)."""
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
