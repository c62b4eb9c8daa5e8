"""Integrations with model libraries (imported lazily; nothing here imports transformers)."""
from .hf import FusedHFAttention, PatchReport, hf_layout, hf_state_dict, patch_hf_model

__all__ = ["patch_hf_model", "PatchReport", "FusedHFAttention", "hf_state_dict", "hf_layout"]
