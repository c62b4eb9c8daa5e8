"""fused_ckpt: fused Triton kernels whose backward recomputes activations from checkpoints.

Public API only; importing this package queries no device and loads no compiled extension. It
does import triton (through torch.utils.flop_counter), so set TRITON_INTERPRET before importing.
"""
from .activations import ACTIVATIONS
from .functional import fused_ffn
from .functional_attention import flash_attention, fused_attention_block
from .modules import (FusedCheckpointedAttention, FusedCheckpointedBlock, FusedCheckpointedFFN,
                      FusedLayerNorm, FusedRMSNorm)
from .modules.linear_ce import FusedLinearCrossEntropy
from .ops.linear_ce import LinearCrossEntropyOutput, fused_linear_cross_entropy
from .ops.norm import layer_norm, rms_norm
from .planner import plan
from .policy import CheckpointPlan, EveryN, MemoryBudget, PerLayer, Selective, apply_checkpointing

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "CheckpointPlan", "EveryN", "FusedCheckpointedAttention", "FusedCheckpointedBlock",
    "FusedCheckpointedFFN", "FusedLayerNorm", "FusedLinearCrossEntropy", "FusedRMSNorm",
    "LinearCrossEntropyOutput", "MemoryBudget", "PerLayer", "Selective",
    "__version__", "apply_checkpointing", "flash_attention", "fused_attention_block", "fused_ffn",
    "fused_linear_cross_entropy",
    "layer_norm", "plan", "rms_norm",
]


def __getattr__(name):
    if name == "patch_hf_model":  # imports transformers: only when asked for
        from .integrations.hf import patch_hf_model

        return patch_hf_model
    raise AttributeError(f"module 'fused_ckpt' has no attribute {name!r}")
