"""``FusedLinearCrossEntropy``: an LM head and its cross-entropy loss as one module."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.linear_ce import REDUCTIONS, fused_linear_cross_entropy


class FusedLinearCrossEntropy(nn.Module):
    """``cross_entropy(lm_head(x), target)`` without materialising the ``[tokens, V]`` logits.

    ==========  =====================================  ======================================
    recompute   kept for backward (besides W, b)       backward
    ==========  =====================================  ======================================
    True        x, one fp32 log-sum-exp per token,     logits recomputed tile by tile, then
                the targets                            dX and dW GEMMs
    False       dX, dW (and db), formed in forward     scaled by the upstream gradient only
    ==========  =====================================  ======================================

    ``weight`` (``[vocab, d_model]``) and ``bias`` are laid out as ``nn.Linear``'s, so an LM
    head's state dict loads as is; :meth:`from_linear` shares the head's parameter objects
    (tied input embeddings stay tied).

    Equivalent PyTorch::

        logits = F.linear(x, weight, bias)           # softcap: softcap * tanh(logits / softcap)
        loss = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=...,
                               label_smoothing=..., reduction=...)   # + z_loss * lse**2 per token
    """

    def __init__(self, d_model: int, vocab_size: int, bias: bool = False, *, ignore_index: int = -100,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
                 z_loss: float = 0.0, recompute: bool = True, chunk_tokens: int = 0, chunk_vocab: int = 0,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, v in (("d_model", d_model), ("vocab_size", vocab_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
        if recompute not in (True, False):
            raise ValueError(f"recompute must be True or False, got {recompute!r}")
        self.d_model, self.vocab_size = d_model, vocab_size
        self.ignore_index, self.label_smoothing, self.reduction = ignore_index, label_smoothing, reduction
        self.softcap, self.z_loss, self.recompute = softcap, z_loss, recompute
        self.chunk_tokens, self.chunk_vocab, self.backend = chunk_tokens, chunk_vocab, backend
        lin = nn.Linear(d_model, vocab_size, bias=bias, device=device, dtype=dtype)
        self.weight = lin.weight
        self.bias = lin.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "FusedLinearCrossEntropy":
        """A loss module reading ``linear``'s own ``weight`` / ``bias`` Parameters (not copies):
        training it trains the head, and a head tied to the input embedding stays tied."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear LM head, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        d_model, vocab = linear.in_features, linear.out_features
        for k, v in dict(ignore_index=-100, label_smoothing=0.0, reduction="mean", softcap=None,
                         z_loss=0.0, recompute=True, chunk_tokens=0, chunk_vocab=0, backend="auto").items():
            setattr(new, k, kwargs.pop(k, v))
        if kwargs:
            raise TypeError(f"from_linear got unexpected arguments {sorted(kwargs)}")
        if new.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {tuple(REDUCTIONS)}, got {new.reduction!r}")
        new.d_model, new.vocab_size = d_model, vocab
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor, target: torch.Tensor, num_items=None, return_details: bool = False):
        return fused_linear_cross_entropy(
            x, self.weight, target, self.bias, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, reduction=self.reduction, softcap=self.softcap,
            z_loss=self.z_loss, num_items=num_items, recompute=self.recompute,
            return_details=return_details, chunk_tokens=self.chunk_tokens, chunk_vocab=self.chunk_vocab,
            backend=self.backend)

    def saved_bytes(self, tokens: int, recompute=None, dtype: torch.dtype | None = None,
                    target_dtype: torch.dtype = torch.int64) -> int:
        """Bytes kept for backward for ``tokens`` tokens (parameters excluded), at the module's
        ``recompute`` or the one given; recompute=False counts dX and dW (and db if trainable)."""
        from ..ops.linear_ce import linear_ce_saved_bytes

        dtype = dtype or self.weight.dtype
        rc = self.recompute if recompute is None else recompute
        needs = (True, self.weight.requires_grad, self.bias is not None and self.bias.requires_grad)
        return linear_ce_saved_bytes(tokens, self.d_model, self.vocab_size, rc,
                                     torch.empty((), dtype=dtype).element_size(),
                                     torch.empty((), dtype=target_dtype).element_size(), needs)

    def recompute_flops(self, tokens: int, recompute=None) -> int:
        """Extra GEMM FLOPs its backward spends recomputing logits (recompute=True: one logits
        GEMM; recompute=False: none, its forward does 3 GEMMs instead of 1)."""
        from ..ops.linear_ce import linear_ce_recompute_flops

        rc = self.recompute if recompute is None else recompute
        return linear_ce_recompute_flops(tokens, self.d_model, self.vocab_size, rc)

    def extra_repr(self) -> str:
        extras = "".join(f", {k}={getattr(self, k)!r}" for k in ("softcap", "z_loss", "label_smoothing")
                         if getattr(self, k))
        return (f"d_model={self.d_model}, vocab_size={self.vocab_size}, bias={self.bias is not None}, "
                f"reduction={self.reduction!r}, recompute={self.recompute}{extras}")
