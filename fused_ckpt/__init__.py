"""fused_ckpt: fused Triton kernels whose backward recomputes activations from checkpoints.

Public API only; importing this package queries no device and loads no compiled extension.
"""
from .activations import ACTIVATIONS
from .functional import fused_ffn
from .modules import FusedCheckpointedFFN

__version__ = "0.1.0"

__all__ = ["ACTIVATIONS", "FusedCheckpointedFFN", "fused_ffn", "__version__"]
