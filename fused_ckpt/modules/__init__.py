from .ffn import FusedCheckpointedFFN

__all__ = ["FusedCheckpointedFFN"]
