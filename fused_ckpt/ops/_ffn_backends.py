"""The four primitives the FFN driver (``ops/ffn.py``) needs, for each backend.

    up(x, w1, b1, wu, bu, act, store_z) -> (h, z or None)    fc1 GEMM + bias + activation
    down(h, w2, b2, out)               out = h W2^T + b2      fc2 GEMM + bias
    hidden_grad(x, z, dy, w1, b1, wu, bu, w2, act, store_h) -> (dz, h or None)
                                       dH = dY W2, Z recomputed from x when z is None
    mm(a, b, out, accumulate)          out (+)= a @ b         dW / dX GEMMs

Triton: fused kernels (Z lives only in registers). Aten: torch GEMMs plus the csrc
elementwise ops (Z is a temporary of the chunk being processed); float64 off the CPU, which the
csrc CUDA kernels do not take, uses the registry's PyTorch math instead.

``wu``/``bu``: the up weight and bias when the gate and up weights are separate tensors (then
``w1``/``b1`` are the gate's); None when ``w1`` is packed ``[2f, d]`` or the FFN is ungated.
Triton reads both through their own pointers; aten does two GEMMs (one for a packed ``w1``),
never concatenating weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import Activation


class TritonFFN:
    name = "triton"

    @staticmethod
    def up(x, w1, b1, wu, bu, act: Activation, store_z: bool, lora=None):
        """``lora``: LoRA (gate side, up side) of ``kernels.ffn_fwd.split_fc1_lora`` (Triton only)."""
        from ..kernels.ffn_fwd import ffn_up
        return ffn_up(x, w1, _unit_stride(b1), act, store_z, wu, _unit_stride(bu), lora=lora)

    @staticmethod
    def down(h, w2, b2, out, lora=None):
        """``lora``: (t, B, scaling) of an fc2 adapter, added in the GEMM (Triton only)."""
        from ..kernels.matmul import gemm
        gemm(h, w2.t(), b2, out=out, lora=lora)

    @staticmethod
    def hidden_grad(x, z, dy, w1, b1, wu, bu, w2, act: Activation, store_h: bool, lora=None, lora_dh=None):
        """``lora`` / ``lora_dh``: see ``kernels.ffn_bwd.ffn_bwd_hidden`` (Triton only)."""
        from ..kernels.ffn_bwd import ffn_bwd_hidden
        return ffn_bwd_hidden(x, z, dy, w1, _unit_stride(b1), w2, act, store_h, wu, _unit_stride(bu),
                              lora=lora, lora_dh=lora_dh)

    @staticmethod
    def mm(a, b, out, accumulate: bool):
        from ..kernels.matmul import gemm
        gemm(a, b, out=out, accumulate=accumulate)


class AtenFFN:
    name = "aten"

    @staticmethod
    def up(x, w1, b1, wu, bu, act: Activation, store_z: bool):
        from .. import _ext
        z = _linear_fc1(x, w1, b1, wu, bu)
        h = _ext.act_forward(z, act.name) if _ext_takes(z) else act.hidden(z)
        return h, (z if store_z else None)

    @staticmethod
    def down(h, w2, b2, out):
        if b2 is None:
            torch.mm(h, w2.t(), out=out)
        else:
            torch.addmm(b2, h, w2.t(), out=out)

    @staticmethod
    def hidden_grad(x, z, dy, w1, b1, wu, bu, w2, act: Activation, store_h: bool):
        from .. import _ext
        if z is None:
            z = _linear_fc1(x, w1, b1, wu, bu)
        dh = torch.mm(dy, w2)
        if _ext_takes(z):
            return _ext.act_backward(z, dh, act.name, store_h)
        return _torch_act_backward(z, dh, act, store_h)

    @staticmethod
    def mm(a, b, out, accumulate: bool):
        if out.dtype == a.dtype:
            if accumulate:
                out.addmm_(a, b)
            else:
                torch.mm(a, b, out=out)
        else:  # fp32 accumulator for a low-precision chunked backward
            p = _mm_fp32(a, b)
            if accumulate:
                out.add_(p)
            else:
                out.copy_(p)


def _linear_fc1(x, w1, b1, wu, bu):
    """Z = x W1^T + b1 as [tokens, F1]; separate gate/up weights: two GEMMs whose outputs are
    placed side by side (gate columns, then up columns), the weights are never concatenated."""
    if wu is None:
        return F.linear(x, w1, b1)
    f = w1.shape[0]
    z = torch.empty((x.shape[0], 2 * f), device=x.device, dtype=x.dtype)
    z[:, :f] = F.linear(x, w1, b1)
    z[:, f:] = F.linear(x, wu, bu)
    return z


def _unit_stride(b):
    """The Triton kernels read fc1.bias as contiguous: a strided one is copied."""
    return b if b is None or b.stride(-1) == 1 else b.contiguous()


def _ext_takes(z) -> bool:
    """Whether the csrc elementwise ops take z: everything but float64 off the CPU."""
    return z.dtype != torch.float64 or z.device.type == "cpu"


def _torch_act_backward(z, dh, act: Activation, store_h: bool):
    """(dz, h or None) in PyTorch ops, in z's dtype (the float64 path of the csrc op)."""
    if act.gated:
        g, u = z.chunk(2, dim=-1)
        a = act.base_fn(g)
        dz = torch.cat([dh * u * act.base_grad(g), dh * a], -1)
        h = a * u if store_h else None
    else:
        dz = dh * act.base_grad(z)
        h = act.base_fn(z) if store_h else None
    return dz, h


_MM_OUT_DTYPE = [True]  # CUDA torch.mm(..., out_dtype=torch.float32) usable, until it refuses


def _mm_fp32(a, b):
    """a @ b as fp32 without rounding the product to a's dtype first (each chunk's dW partial
    goes into an fp32 accumulator, so the chunked result is rounded once, like the unchunked
    one): cuBLAS's fp32-output GEMM through ``torch.mm(out_dtype=)`` on CUDA where this torch
    has it, else fp32 operands."""
    if a.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # this torch has no such GEMM
            _MM_OUT_DTYPE[0] = False
    return torch.mm(a.float(), b.float())


FFN_BACKENDS = {"triton": TritonFFN, "aten": AtenFFN}
