from .attention import FusedCheckpointedAttention
from .block import FusedCheckpointedBlock
from .ffn import FusedCheckpointedFFN
from .norm import FusedLayerNorm, FusedRMSNorm

__all__ = ["FusedCheckpointedAttention", "FusedCheckpointedBlock", "FusedCheckpointedFFN",
           "FusedLayerNorm", "FusedRMSNorm"]
