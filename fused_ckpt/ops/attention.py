"""Flash attention and the checkpointed attention block as ``torch.library`` custom ops.

Layout everywhere: q [B, S_q, H, D], k and v [B, S_kv, H_kv, D] (H_kv divides H), as
``flash_attn_func``; the log-sum-exp ``lse`` is [B, H, S_q] fp32 (fp64 for fp64 inputs on the
aten backend), -inf for a query that sees no key (its output and gradients are zero).

Ops
---
``fused_ckpt::flash_attn_forward(q, k, v, key_padding_mask, causal, scale, backend) -> (o, lse)``
    saves q, k, v, o, lse (and the mask when given); the backward
    ``fused_ckpt::flash_attn_backward`` recomputes the probabilities P = exp(scale q k^T - lse)
    tile by tile, as FlashAttention.

``fused_ckpt::attn_block_forward(x, Wq, bq, Wk, bk, Wv, bv, Wo, bo, position_ids,
key_padding_mask, n_heads, n_kv_heads, causal, scale, rope_theta, mode, backend, ...)
-> (y, o, lse, q, k, v)``
    the whole attention block ``y = o_proj(attention(rope(q_proj x), rope(k_proj x), v_proj x))``
    with o_proj inside the op, so autograd saves nothing the contract does not list:

    ======  ===============================================  ===================================
    mode    saved for backward (besides parameters)          recomputed in backward
    ======  ===============================================  ===================================
    "all"   x, lse                                           q, k, v (projection + rotary) and
                                                             o (the forward kernel); then P
    "qkv"   x, o (attention output before o_proj), lse       q, k, v (projection + rotary); P
    "none"  x, q, k, v (after rotary), o, lse                P only (plain flash attention)
    ======  ===============================================  ===================================

    plus ``position_ids`` and ``key_padding_mask`` when given (int64 [B or 1, S] and bool
    [B, S]). Both ops take the attention options of :class:`AttnOptions` (softcap, window,
    dropout_p with its seed and rng_offset: ints, kept as such; the dropout mask is
    regenerated, also when "all" recomputes o). The parameters Wq, bq, Wk, bk, Wv, bv, Wo are saved as themselves (bo is not
    needed). Outputs the mode does not keep come back as empty placeholders (custom ops return
    tensors only): o is empty for "all", q/k/v are empty unless "none".

Everything kept goes through ``ctx.save_for_backward``. Neither op supports double backward.
Backends: "triton" (the kernels of :mod:`fused_ckpt.kernels.flash_attn_fwd`/``_bwd`` and
:mod:`fused_ckpt.kernels.rope`; projections are torch GEMMs) and "aten" (forward: PyTorch's
fused CPU flash-attention kernel on CPU tensors, see ``_use_cpu_flash``, else a PyTorch math
implementation chunked over queries; backward: the math implementation; both backends with the
same contract and saved tensors).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.torch_version import TorchVersion
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

from ..backend import check_backend_dtype

BLOCK_MODES = ("all", "qkv", "none")
ATEN_CHUNK_ELEMS = 2**26  # the aten math path keeps [B, H, chunk, S_kv] scores under 256 MiB (fp32)


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty((0,))


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- rotary tables
def rope_tables(position_ids: Optional[Tensor], seqlen: int, head_dim: int, theta: float,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """fp32 cos/sin [B or 1, S, head_dim/2] exactly as Hugging Face's default rotary embedding
    computes them (inv_freq = 1 / theta^(2i/D) in fp32, angle = position * inv_freq in fp32).
    For partial rotary pass the rotated width as ``head_dim`` (Hugging Face's ``dim`` =
    ``head_dim * partial_rotary_factor``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    pos = (torch.arange(seqlen, device=device)[None] if position_ids is None else position_ids).float()
    freqs = pos[..., None] * inv_freq
    return freqs.cos(), freqs.sin()


def _aten_rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of each head of x [B, S, H, D] (rotate_half
    convention within them); the rest pass through (partial rotary)."""
    half = cos.shape[-1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if inverse:
        s = -s
    acc = lse_dtype(x.dtype)
    x1, x2 = x[..., :half].to(acc), x[..., half:2 * half].to(acc)
    return torch.cat([(x1 * c - x2 * s).to(x.dtype), (x2 * c + x1 * s).to(x.dtype), x[..., 2 * half:]], -1)


# --------------------------------------------------------------------------- attention options
class AttnOptions(NamedTuple):
    """What the attention computes besides ``softmax(scale q k^T) v`` (all off by default):

    * ``softcap``: logits become ``softcap * tanh(scale q k^T / softcap)`` before the masks
      (Gemma 2's ``attn_logit_softcapping``);
    * ``window`` (causal only): key j is visible from query i iff
      ``i' - window < j <= i'``, ``i' = i + S_kv - S_q`` (Hugging Face's ``sliding_window``);
    * ``dropout_p``, ``seed``, ``rng_offset``: dropout on the probabilities with a keep mask
      that is a pure function of (seed, rng_offset, batch, head, query, key) (Philox, see
      :func:`dropout_keep_mask`), so the backward regenerates it: two ints are saved, no mask.
    """
    softcap: Optional[float] = None
    window: Optional[int] = None
    dropout_p: float = 0.0
    seed: int = 0
    rng_offset: int = 0

    def dropout(self) -> Optional[tuple[float, int, int]]:
        return (self.dropout_p, self.seed, self.rng_offset) if self.dropout_p > 0 else None


PLAIN = AttnOptions()


def draw_dropout_seed() -> tuple[int, int]:
    """(seed, rng_offset) for one dropout call, drawn from torch's default (CPU) generator, so
    ``torch.manual_seed`` makes runs reproducible (one ``torch.randint`` of two numbers)."""
    seed, off = torch.randint(0, 2**62, (2,), dtype=torch.int64).tolist()
    return seed, off % 2**31


# Philox-4x32-10 (Salmon et al. 2011), the generator of triton.language.philox, in int64 torch
# ops on uint32 values. Products are split into 16-bit halves so no int64 product overflows.
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_M32 = 0xFFFFFFFF


def _mul32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant ``a`` and uint32s ``b``."""
    x = a * (b >> 16)  # < 2^48
    y = a * (b & 0xFFFF)  # < 2^48
    mid = ((x & 0xFFFF) << 16) + y  # < 2^49
    return (x >> 16) + (mid >> 32), mid & _M32


def philox_word0(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> Tensor:
    """The first uint32 (as int64) of Philox-4x32-10 keyed by the 64-bit ``seed`` at counters
    (c0, c1, c2, c3): bit-identical to ``tl.philox(seed, c0, c1, c2, c3)[0]``."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0


def dropout_keep_mask(seed: int, rng_offset: int, p: float, batch: int, n_heads: int,
                      q_idx: Tensor, k_idx: Tensor) -> Tensor:
    """The attention-dropout keep mask [batch, n_heads, len(q_idx), len(k_idx)] for queries
    ``q_idx`` and keys ``k_idx`` (int64 positions): the bits the Triton kernels draw (Philox at
    seed; counter (key, query, batch * n_heads + head, rng_offset)), kept iff the word's top 31
    bits >= round(p * 2^31). The aten path uses it chunk by chunk; tests use it to build
    references with the same mask."""
    from ..kernels.flash_attn_fwd import dropout_threshold

    bh = torch.arange(batch * n_heads, device=q_idx.device, dtype=torch.int64).view(batch, n_heads, 1, 1)
    r = philox_word0(seed, k_idx.view(1, 1, 1, -1), q_idx.view(1, 1, -1, 1), bh,
                     torch.tensor(rng_offset, dtype=torch.int64, device=q_idx.device))
    return (r >> 1) >= dropout_threshold(p)


# --------------------------------------------------------------------------- aten math
def _keep_mask(i0: int, i1: int, S_q: int, S_kv: int, causal: bool, kpm: Optional[Tensor],
               device, window: Optional[int] = None) -> Optional[Tensor]:
    """Visibility of keys for queries [i0, i1): broadcastable to [B, H_kv, G, i1-i0, S_kv]."""
    keep = None
    if causal:
        qi = torch.arange(i0, i1, device=device)[:, None]
        kj = torch.arange(S_kv, device=device)[None, :]
        keep = kj <= qi + (S_kv - S_q)
        if window is not None:
            keep = keep & (kj > qi + (S_kv - S_q) - window)
        keep = keep[None, None, None]
    if kpm is not None:
        km = kpm[:, None, None, None, :]
        keep = km if keep is None else keep & km
    return keep


def _aten_scores(qc: Tensor, kf: Tensor, keep: Optional[Tensor], scale: float,
                 softcap: Optional[float] = None) -> Tensor:
    """Scaled (and soft-capped) scores [B, H_kv, G, chunk, S_kv], -inf where not ``keep``."""
    s = torch.einsum("bqhgd,bkhd->bhgqk", qc, kf) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s if keep is None else s.masked_fill(~keep, float("-inf"))


def _aten_dropout(opts: AttnOptions, B: int, H_kv: int, G: int, i0: int, i1: int, S_kv: int, device):
    """The keep mask of queries [i0, i1) as [B, H_kv, G, i1 - i0, S_kv], or None."""
    if opts.dropout_p <= 0:
        return None
    z = dropout_keep_mask(opts.seed, opts.rng_offset, opts.dropout_p, B, H_kv * G,
                          torch.arange(i0, i1, device=device), torch.arange(S_kv, device=device))
    return z.view(B, H_kv, G, i1 - i0, S_kv)


def _dense(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype``, contiguous: the math path computes the same numbers whatever the
    inputs' strides (einsum picks its contraction order from them)."""
    return t.to(dtype).contiguous()


def _row_softmax(s: Tensor) -> Tensor:
    """softmax over the last dim, 0 on rows without a visible key (all -inf). The math path
    holds whole rows, so it normalises as eager attention does (max-subtracted exp over their
    sum): exp(s - lse) in fp32 has an error that grows with |lse|, which took the fp32 dq error
    to ~3x eager's (8 seeds, S=90, window 45)."""
    if s.shape[-1] == 0:
        return s
    p = torch.softmax(s, -1)
    return p.masked_fill(s.amax(-1, keepdim=True) == float("-inf"), 0.0)


def _chunk(B: int, H: int, S_kv: int, opts: AttnOptions = PLAIN) -> int:
    # dropout's Philox keeps about 16 int64 temporaries of the chunk's size alive
    elems = ATEN_CHUNK_ELEMS // 16 if opts.dropout_p > 0 else ATEN_CHUNK_ELEMS
    return max(1, elems // max(B * H * S_kv, 1))


# --------------------------------------------------------------------------- aten fused CPU kernel
_CPU_FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CPU_FLASH_TORCH = TorchVersion(torch.__version__) >= "2.9"  # its CPU kernel takes GQA k/v since 2.9


def _use_cpu_flash(q: Tensor, k: Tensor) -> bool:
    """Whether the aten backend's forward runs PyTorch's fused CPU flash-attention kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu``) instead of the chunked math path:
    CPU tensors in fp32/bf16/fp16/fp64, torch >= 2.9, both sequences non-empty. Every case is
    exact then: the kernel runs in lse_dtype (half types upcast, as the math path does: its
    own bf16/fp16 path gives a ~1e-5 lse); GQA k/v go in as they are (query head h reads kv
    head h // G); key padding, and causality when S_q != S_kv (the kernel's is_causal is
    top-left aligned), go in as an additive -inf mask; queries that see no key get o = 0 and
    lse = -inf here. Anything else (CUDA, empty sequences, older torch) takes the math path.
    The backward always takes the math path: PyTorch's fused CPU backward kernel
    (``..._for_cpu_backward``) forms P from the rounded lse and delta from the stored O, and its
    fp32 dq/dk were measured at up to ~3x eager attention's error against float64, beyond the 2x
    rule, where the math path's rounding is eager's own."""
    return (_CPU_FLASH_TORCH and q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES
            and q.shape[1] > 0 and k.shape[1] > 0)


def _cpu_flash_mask(q: Tensor, k: Tensor, kpm: Optional[Tensor], causal: bool, window: Optional[int] = None):
    """The kernels' (is_causal, additive float mask [B or 1, 1, S_q or 1, S_kv] or None); a
    sliding window goes into the mask (with causality)."""
    S_q, S_kv = q.shape[1], k.shape[1]
    is_causal = causal and S_q == S_kv and window is None  # top-left == bottom-right; else masked
    keep = _keep_mask(0, S_q, S_q, S_kv, causal and not is_causal, kpm, q.device, window)
    if keep is None:
        return is_causal, None
    keep = keep[:, 0]
    mask = torch.zeros(keep.shape, dtype=lse_dtype(q.dtype), device=q.device)
    return is_causal, mask.masked_fill_(~keep, float("-inf"))


def _bhsd(t: Tensor) -> Tensor:
    """[B, S, H, D] -> the kernels' [B, H, S, D] view, in lse_dtype. The kernels read the last
    dimension as contiguous whatever its stride says (a strided head_dim gave garbage), so such
    a tensor is copied first; other strides are read as given."""
    t = t.to(lse_dtype(t.dtype))
    return (t if t.stride(-1) == 1 else t.contiguous()).transpose(1, 2)


def _dead_rows(kpm: Optional[Tensor], S_q: int, S_kv: int, causal: bool, device,
               window: Optional[int] = None) -> Optional[Tensor]:
    """[B or 1, S_q] bool, True for a query that sees no key; None when every query sees one."""
    if window is not None:  # from the visibility itself
        dead = ~_keep_mask(0, S_q, S_q, S_kv, causal, kpm, device, window)[:, 0, 0].any(-1)
        return dead if dead.any() else None
    last = torch.arange(S_q, device=device) + (S_kv - S_q) if causal else torch.full((S_q,), S_kv - 1, device=device)
    first = 0 if kpm is None else (~kpm).cumprod(-1).sum(-1, keepdim=True)  # first visible key; S_kv: none
    dead = (last < first).view(-1, S_q)
    return dead if dead.any() else None


def _cpu_flash_forward(q, k, v, kpm, causal, scale, window=None):
    is_causal, mask = _cpu_flash_mask(q, k, kpm, causal, window)
    o, lse = _CPU_FLASH_FWD(_bhsd(q), _bhsd(k), _bhsd(v), 0.0, is_causal, attn_mask=mask, scale=scale)
    o, lse = o.transpose(1, 2).to(q.dtype), lse.contiguous()
    dead = _dead_rows(kpm, q.shape[1], k.shape[1], causal, q.device, window)
    if dead is not None:
        o = o.masked_fill(dead[:, :, None, None], 0.0)
        lse = lse.masked_fill(dead[:, None, :], float("-inf"))
    return o.contiguous(), lse


# FlopCounterMode has formulas for PyTorch's CUDA SDPA kernels, none for this CPU one (seen by a
# counter that looks inside the custom ops below): count it alike (dense, causal not counted).
if _CPU_FLASH_FWD not in flop_registry:
    @register_flop_formula(_CPU_FLASH_FWD)
    def _cpu_flash_fwd_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)


class AtenAttention:
    """Forward: PyTorch's fused CPU kernel where it applies (``_use_cpu_flash``; not with softcap
    or dropout, which it cannot do: a sliding window goes in as a mask), else chunked math.
    Backward: chunked math always (eager's rounding; see ``_use_cpu_flash``)."""
    name = "aten"

    @staticmethod
    def forward(q, k, v, kpm, causal, scale, opts: AttnOptions = PLAIN):
        if opts.softcap is None and opts.dropout_p == 0 and _use_cpu_flash(q, k):
            return _cpu_flash_forward(q, k, v, kpm, causal, scale, opts.window)
        B, S_q, H, D = q.shape
        S_kv, H_kv = k.shape[1], k.shape[2]
        G = H // H_kv
        acc = lse_dtype(q.dtype)
        qf = _dense(q, acc).view(B, S_q, H_kv, G, D)
        kf, vf = _dense(k, acc), _dense(v, acc)
        o = torch.empty((B, S_q, H, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, H_kv, G, S_q), device=q.device, dtype=acc)
        step = _chunk(B, H, S_kv, opts)
        for i0 in range(0, S_q, step):
            i1 = min(i0 + step, S_q)
            s = _aten_scores(qf[:, i0:i1], kf, _keep_mask(i0, i1, S_q, S_kv, causal, kpm, q.device, opts.window),
                             scale, opts.softcap)
            lse_c = torch.logsumexp(s, -1) if S_kv else s.new_full(s.shape[:-1], float("-inf"))
            p = _row_softmax(s)
            z = _aten_dropout(opts, B, H_kv, G, i0, i1, S_kv, q.device)
            if z is not None:
                p = p * z / (1.0 - opts.dropout_p)
            o[:, i0:i1] = torch.einsum("bhgqk,bkhd->bqhgd", p, vf).reshape(B, i1 - i0, H, D).to(q.dtype)
            lse[..., i0:i1] = lse_c
        return o, lse.view(B, H, S_q)

    @staticmethod
    def backward(do, q, k, v, o, lse, kpm, causal, scale, need_dq, need_dkdv, opts: AttnOptions = PLAIN):
        B, S_q, H, D = q.shape
        S_kv, H_kv = k.shape[1], k.shape[2]
        G = H // H_kv
        acc = lse_dtype(q.dtype)
        qf = _dense(q, acc).view(B, S_q, H_kv, G, D)
        dof = _dense(do, acc).view(B, S_q, H_kv, G, D)
        kf, vf = _dense(k, acc), _dense(v, acc)
        dq = torch.empty((B, S_q, H, D), device=q.device, dtype=q.dtype) if need_dq else None
        dk = torch.zeros((B, S_kv, H_kv, D), device=q.device, dtype=acc)
        dv = torch.zeros((B, S_kv, H_kv, D), device=q.device, dtype=acc)
        step = _chunk(B, H, S_kv, opts)
        for i0 in range(0, S_q, step):
            i1 = min(i0 + step, S_q)
            keep = _keep_mask(i0, i1, S_q, S_kv, causal, kpm, q.device, opts.window)
            s = _aten_scores(qf[:, i0:i1], kf, keep, scale, opts.softcap)
            p = _row_softmax(s)  # whole rows are at hand: eager's softmax, not exp(s - lse)
            dp = torch.einsum("bqhgd,bkhd->bhgqk", dof[:, i0:i1], vf)
            z = _aten_dropout(opts, B, H_kv, G, i0, i1, S_kv, q.device)
            pd = p
            if z is not None:  # FlashAttention-2: dV from the dropped P, dP through the mask
                pd = p * z / (1.0 - opts.dropout_p)
                dp = dp * z / (1.0 - opts.dropout_p)
            # delta = rowsum(P * dP) (= rowsum(dO * O) mathematically, also with dropout), formed
            # from the chunk's own rows as eager softmax's backward does: the stored O, rounded to
            # the inputs' dtype, would make dq's fp32 error up to ~3x eager's
            ds = p * (dp - (p * dp).sum(-1, keepdim=True))
            if opts.softcap is not None:  # d(capped)/d(scaled) = 1 - tanh^2, tanh = capped / softcap
                t = (s / opts.softcap).masked_fill(p == 0, 0.0)
                ds = ds * (1 - t * t)
            if need_dkdv:
                dv += torch.einsum("bhgqk,bqhgd->bkhd", pd, dof[:, i0:i1])
                dk += torch.einsum("bhgqk,bqhgd->bkhd", ds, qf[:, i0:i1]) * scale
            if need_dq:
                dq[:, i0:i1] = (torch.einsum("bhgqk,bkhd->bqhgd", ds, kf) * scale).reshape(B, i1 - i0, H, D)
        if need_dq and S_q == 0:
            dq.zero_()
        return dq, (dk.to(k.dtype) if need_dkdv else None), (dv.to(v.dtype) if need_dkdv else None)

    @staticmethod
    def rope(x, cos, sin, inverse=False):
        return _aten_rope(x, cos, sin, inverse)


class TritonAttention:
    name = "triton"

    @staticmethod
    def forward(q, k, v, kpm, causal, scale, opts: AttnOptions = PLAIN):
        from ..kernels.flash_attn_fwd import flash_attn_fwd
        check_backend_dtype("triton", q.dtype, "q")
        return flash_attn_fwd(q, k, v, kpm, causal, scale, opts.softcap, opts.window, opts.dropout())

    @staticmethod
    def backward(do, q, k, v, o, lse, kpm, causal, scale, need_dq, need_dkdv, opts: AttnOptions = PLAIN):
        from ..kernels.flash_attn_bwd import flash_attn_bwd
        check_backend_dtype("triton", q.dtype, "q")
        return flash_attn_bwd(do, q, k, v, o, lse, kpm, causal, scale, need_dq, need_dkdv,
                              opts.softcap, opts.window, opts.dropout())

    @staticmethod
    def rope(x, cos, sin, inverse=False):
        from ..kernels.rope import rope_
        check_backend_dtype("triton", x.dtype, "the rotary embedding's input")
        rope_(x[..., :2 * cos.shape[-1]], cos, sin, inverse)  # x is always a fresh temporary here: in place
        return x


ATTN_BACKENDS = {"triton": TritonAttention, "aten": AtenAttention}


# --------------------------------------------------------------------------- flash attention op
@torch.library.custom_op("fused_ckpt::flash_attn_forward", mutates_args=())
def flash_attn_forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                       causal: bool, scale: float, backend: str, softcap: Optional[float] = None,
                       window: Optional[int] = None, dropout_p: float = 0.0, seed: int = 0,
                       rng_offset: int = 0) -> tuple[Tensor, Tensor]:
    """(o [B, S_q, H, D], lse [B, H, S_q]); softcap, window, dropout: :class:`AttnOptions`
    (the seed and offset are inputs: the op itself is deterministic)."""
    opts = AttnOptions(softcap, window, dropout_p, seed, rng_offset)
    return ATTN_BACKENDS[backend].forward(q, k, v, key_padding_mask, causal, scale, opts)


@flash_attn_forward.register_fake
def _(q, k, v, key_padding_mask, causal, scale, backend, softcap=None, window=None, dropout_p=0.0, seed=0,
      rng_offset=0):
    B, S_q, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, S_q), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("fused_ckpt::flash_attn_backward", mutates_args=())
def flash_attn_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        key_padding_mask: Optional[Tensor], causal: bool, scale: float,
                        needs_grad: list[bool], backend: str, softcap: Optional[float] = None,
                        window: Optional[int] = None, dropout_p: float = 0.0, seed: int = 0,
                        rng_offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); ``needs_grad`` flags them in that order (dk and dv come from one kernel, so
    either flag computes both); unflagged ones come back as empty placeholders. The options
    must be the forward's (dropout: the same seed and offset regenerate the same mask)."""
    need_q, need_k, need_v = needs_grad
    opts = AttnOptions(softcap, window, dropout_p, seed, rng_offset)
    dq, dk, dv = ATTN_BACKENDS[backend].backward(do, q, k, v, o, lse, key_padding_mask, causal, scale,
                                                 need_q, need_k or need_v, opts)
    return (dq if need_q else _empty(q)), (dk if need_k else _empty(k)), (dv if need_v else _empty(v))


@flash_attn_backward.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, causal, scale, needs_grad, backend, softcap=None, window=None,
      dropout_p=0.0, seed=0, rng_offset=0):
    return tuple(t.new_empty(t.shape) if n else t.new_empty((0,)) for t, n in zip((q, k, v), needs_grad))


def _flash_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, backend, *options = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.options, ctx.n_inputs = tuple(options), len(inputs)  # softcap, window, dropout_p, seed, rng_offset


def _no_double_backward(what: str) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(f"fused_ckpt {what} does not support double backward (create_graph=True); "
                           "use torch.nn.functional.scaled_dot_product_attention for higher-order gradients")


def _flash_backward(ctx, grad_o, grad_lse):
    _no_double_backward("flash attention")
    q, k, v, o, lse, kpm = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = flash_attn_backward(grad_o, q, k, v, o, lse, kpm, ctx.causal, ctx.scale, needs, ctx.backend,
                                *ctx.options)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,) * (ctx.n_inputs - 3)


flash_attn_forward.register_autograd(_flash_backward, setup_context=_flash_setup_context)


# --------------------------------------------------------------------------- attention block op
QKV_LAYOUTS = ("separate", "packed", "neox")


def _heads(x: Tensor, n: int) -> Tensor:
    """[B, S, n * D] -> [B, S, n, D] (sizes spelled out: with no tokens, -1 is ambiguous)."""
    return x.view(x.shape[0], x.shape[1], n, x.shape[2] // n)


def _raw_qkv(x, wq, bq, wk, bk, wv, bv, n_heads, n_kv_heads, head_dim, qkv_layout):
    """q, k, v [B, S, heads, D] straight from the projections (bias added; no norm, no
    rotary), each a fresh contiguous tensor. ``qkv_layout`` (see the module docstring):
    "separate" (wq, wk, wv), "packed" (wq = the rows [q; k; v]) or "neox" (wq = rows
    interleaved per head, ``view(H, 3, D, d)``)."""
    B, S, _ = x.shape
    if qkv_layout == "separate":
        return (_heads(F.linear(x, wq, bq), n_heads), _heads(F.linear(x, wk, bk), n_kv_heads),
                _heads(F.linear(x, wv, bv), n_kv_heads))
    qkv = F.linear(x, wq, bq)
    if qkv_layout == "neox":
        q, k, v = qkv.view(B, S, n_heads, 3, head_dim).unbind(3)
    else:
        q, k, v = (_heads(t, n) for t, n in zip(
            qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], -1),
            (n_heads, n_kv_heads, n_kv_heads)))
    # copies (even when a view happens to be contiguous, e.g. one token): no two share storage
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))


def _norm_weight(w: Tensor, offset: float, dtype: torch.dtype) -> Tensor:
    """The weight the RMSNorm multiplies by: ``w``, or ``offset + w`` formed in fp32 (fp64 for
    fp64 inputs), as Gemma's ``(1 + w)`` norm computes it."""
    return w if offset == 0.0 else w.to(lse_dtype(dtype)) + offset


def _qk_norm(t: Tensor, w: Optional[Tensor], eps: float, offset: float, backend: str):
    """(RMSNorm of t [B, S, n, D] over each head (w [D]) or over the whole projection
    (w [n * D]), its rstd); (t, None) without a weight."""
    if w is None:
        return t, None
    from .norm import rms_norm_forward

    flat = t if w.shape[0] == t.shape[-1] else t.view(t.shape[0], t.shape[1], -1)
    y, rstd = rms_norm_forward(flat, _norm_weight(w, offset, t.dtype), eps, backend)
    return y.view(t.shape), rstd


def _qk_norm_backward(g: Tensor, t: Tensor, w: Optional[Tensor], rstd, offset: float, need_w: bool,
                      backend: str):
    """(dL/dt, dL/dw or None) of :func:`_qk_norm` from the norm's input t and its rstd."""
    if w is None:
        return g, None
    from .norm import rms_norm_backward

    flat = (lambda a: a) if w.shape[0] == t.shape[-1] else (lambda a: a.reshape(a.shape[0], a.shape[1], -1))
    dt, dw = rms_norm_backward(flat(g), flat(t), _norm_weight(w, offset, t.dtype), rstd, [True, need_w], backend)
    return dt.view(t.shape), (dw.to(w.dtype) if need_w else None)


def _rotate(be, t: Tensor, tables, inverse: bool = False) -> Tensor:
    return t if tables is None else be.rope(t, *tables, inverse=inverse)


def _qk_ready(be, q: Tensor, k: Tensor, raw: bool, q_norm, k_norm, eps: float, offset: float, backend: str,
              tables) -> tuple:
    """From projections q, k to the attention's inputs: QK-norm, then rotary. ``raw``: fresh
    projections (rotated always; in place on the projection itself without a norm); else the q, k
    the forward's "none" mode kept (already rotated, unless a norm follows: then they are its
    input). Returns (q, k, q0, k0, rq, rk): q0 / k0 the norms' inputs (None without a norm), rq /
    rk their statistics."""
    out = []
    for t, w in ((q, q_norm), (k, k_norm)):
        t0, r = (t if w is not None else None), None
        if raw or w is not None:
            tn, r = _qk_norm(t, w, eps, offset, backend)
            t = _rotate(be, tn, tables)  # in place on a fresh tensor (the projection itself only without a norm)
        out.append((t, t0, r))
    (q, q0, rq), (k, k0, rk) = out
    return q, k, q0, k0, rq, rk


def _mode_outputs(mode: str, x: Tensor, y: Tensor, o: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                  q0: Optional[Tensor], k0: Optional[Tensor]) -> tuple:
    """The forward ops' (y, o, lse, q, k, v) for ``mode``: o only unless "all", q/k/v only for
    "none" (with a QK-norm, its input q0 / k0), empty placeholders otherwise."""
    if mode != "none":
        return y, (o if mode != "all" else _empty(x)), lse, _empty(x), _empty(x), _empty(x)
    return y, o, lse, (q0 if q0 is not None else q), (k0 if k0 is not None else k), v


def _core_backward(be, do: Tensor, q, k, v, o, lse, key_padding_mask, causal: bool, scale: float, opts,
                   tables, q0, k0, rq, rk, q_norm, k_norm, offset: float, need_qn: bool, need_kn: bool,
                   backend: str, qkv_layout: str) -> tuple:
    """The attention core's backward from dO [B, S, H, D] down to the projections' outputs: the
    kernels' dQ/dK/dV, inverse rotary, the QK-norms' backward. Returns (grads, dq_norm, dk_norm):
    grads [dq, dk, dv], or for a packed layout [the packed gradient in the packed weight's row
    order] (one GEMM per product then)."""
    dq, dk, dv = be.backward(do, q, k, v, o.view(do.shape), lse, key_padding_mask, causal, scale, True, True, opts)
    del do
    dq = _rotate(be, dq, tables, inverse=True)
    dk = _rotate(be, dk, tables, inverse=True)
    dqn = dkn = None
    if q_norm is not None:
        dq, dqn = _qk_norm_backward(dq, q0, q_norm, rq, offset, need_qn, backend)
    if k_norm is not None:
        dk, dkn = _qk_norm_backward(dk, k0, k_norm, rk, offset, need_kn, backend)
    if qkv_layout == "separate":
        return [dq, dk, dv], dqn, dkn
    g = (torch.stack((dq, dk, dv), 3) if qkv_layout == "neox"
         else torch.cat((dq.flatten(2), dk.flatten(2), dv.flatten(2)), -1))
    return [g], dqn, dkn


class _Feats:
    """The per-call features of the block op besides the projections: head_dim, packing,
    QK-norm (weights, eps, offset) and the backend name the norms run on."""

    def __init__(self, wo, n_heads, qkv_layout, q_norm, k_norm, eps, offset, backend):
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout must be one of {QKV_LAYOUTS}, got {qkv_layout!r}")
        self.head_dim = wo.shape[1] // n_heads
        self.qkv_layout, self.q_norm, self.k_norm = qkv_layout, q_norm, k_norm
        self.eps, self.offset, self.backend = eps, offset, backend


def _tables(x: Tensor, head_dim: int, position_ids, rope_theta, rotary_dim: Optional[int] = None):
    """cos/sin for the rotated dims (``rotary_dim`` of each head, all when None), or None."""
    if rope_theta is None:
        return None
    return rope_tables(position_ids, x.shape[1], head_dim if rotary_dim is None else rotary_dim, rope_theta, x.device)


@torch.library.custom_op("fused_ckpt::attn_block_forward", mutates_args=())
def attn_block_forward(
    x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Optional[Tensor], bk: Optional[Tensor],
    wv: Optional[Tensor], bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor],
    position_ids: Optional[Tensor], key_padding_mask: Optional[Tensor],
    n_heads: int, n_kv_heads: int, causal: bool, scale: float, rope_theta: Optional[float],
    mode: str, backend: str,
    q_norm: Optional[Tensor] = None, k_norm: Optional[Tensor] = None, qk_norm_eps: float = 1e-6,
    qk_norm_offset: float = 0.0, rotary_dim: Optional[int] = None, qkv_layout: str = "separate",
    softcap: Optional[float] = None, window: Optional[int] = None, dropout_p: float = 0.0, seed: int = 0,
    rng_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y [B, S, d_out], o [B, S, H*D] or empty, lse [B, H, S], q, k, v or empty); see the
    module docstring for which outputs each ``mode`` fills (with QK-norm, the q and k kept by
    "none" are the projections before the norm)."""
    be = ATTN_BACKENDS[backend]
    B, S, _ = x.shape
    feats = _Feats(wo, n_heads, qkv_layout, q_norm, k_norm, qk_norm_eps, qk_norm_offset, backend)
    tables = _tables(x, feats.head_dim, position_ids, rope_theta, rotary_dim)
    q, k, v = _raw_qkv(x, wq, bq, wk, bk, wv, bv, n_heads, n_kv_heads, feats.head_dim, qkv_layout)
    q, k, q0, k0, _, _ = _qk_ready(be, q, k, True, q_norm, k_norm, qk_norm_eps, qk_norm_offset, backend, tables)
    o, lse = be.forward(q, k, v, key_padding_mask, causal, scale,
                        AttnOptions(softcap, window, dropout_p, seed, rng_offset))
    o = o.view(B, S, n_heads * feats.head_dim)
    return _mode_outputs(mode, x, F.linear(o, wo, bo), o, lse, q, k, v, q0, k0)


@attn_block_forward.register_fake
def _(x, wq, bq, wk, bk, wv, bv, wo, bo, position_ids, key_padding_mask, n_heads, n_kv_heads,
      causal, scale, rope_theta, mode, backend, q_norm=None, k_norm=None, qk_norm_eps=1e-6, qk_norm_offset=0.0,
      rotary_dim=None, qkv_layout="separate", softcap=None, window=None, dropout_p=0.0, seed=0, rng_offset=0):
    B, S, _ = x.shape
    D = wo.shape[1] // n_heads
    y = x.new_empty((B, S, wo.shape[0]))
    o = x.new_empty((B, S, n_heads * D)) if mode != "all" else x.new_empty((0,))
    lse = x.new_empty((B, n_heads, S), dtype=lse_dtype(x.dtype))
    if mode == "none":
        return (y, o, lse, x.new_empty((B, S, n_heads, D)), x.new_empty((B, S, n_kv_heads, D)),
                x.new_empty((B, S, n_kv_heads, D)))
    return y, o, lse, x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))


_BLOCK_GRADS = 11  # dx, dWq, dbq, dWk, dbk, dWv, dbv, dWo, dbo, dq_norm, dk_norm


def _weight_grad(g2: Tensor, a2: Tensor, w: Tensor) -> Tensor:
    """dW = g2^T a2 for ``y = a W^T`` with W [out, in], laid out as W is: a transposed view
    (Conv1D weights read through strides) gets a transposed gradient, so the gradient that
    reaches the Parameter is contiguous without a copy."""
    if w.stride(0) == 1 and w.stride(1) != 1:
        return a2.t().mm(g2).t()
    return g2.t().mm(a2)


def _empty_like_layout(ref: Tensor, w: Tensor) -> Tensor:
    """An empty tensor shaped and strided like :func:`_weight_grad`'s result for ``w``."""
    if w.stride(0) == 1 and w.stride(1) != 1:
        return ref.new_empty((w.shape[1], w.shape[0])).t()
    return ref.new_empty(w.shape)


@torch.library.custom_op("fused_ckpt::attn_block_backward", mutates_args=())
def attn_block_backward(
    dy: Tensor, x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Optional[Tensor], bk: Optional[Tensor],
    wv: Optional[Tensor], bv: Optional[Tensor], wo: Tensor,
    q: Optional[Tensor], k: Optional[Tensor], v: Optional[Tensor], o: Optional[Tensor], lse: Tensor,
    position_ids: Optional[Tensor], key_padding_mask: Optional[Tensor],
    n_heads: int, n_kv_heads: int, causal: bool, scale: float, rope_theta: Optional[float],
    needs_grad: list[bool], backend: str,
    q_norm: Optional[Tensor] = None, k_norm: Optional[Tensor] = None, qk_norm_eps: float = 1e-6,
    qk_norm_offset: float = 0.0, rotary_dim: Optional[int] = None, qkv_layout: str = "separate",
    softcap: Optional[float] = None, window: Optional[int] = None, dropout_p: float = 0.0, seed: int = 0,
    rng_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dWq, dbq, dWk, dbk, dWv, dbv, dWo, dbo, dq_norm, dk_norm), flagged by
    ``needs_grad`` in that order (9 or 11 flags; unflagged: empty placeholders; packed
    layouts: dWq/dbq are the packed weight's and bias's, dWk..dbv empty). q, k, v None:
    recomputed from x (projection, QK-norm, rotary); given with QK-norm: q/k are the
    projections before the norm (as the forward's "none" mode returns them), the norm and the
    rotary are re-applied. o None: recomputed with the attention forward kernel."""
    needs = list(needs_grad) + [False] * (_BLOCK_GRADS - len(needs_grad))
    need_x, need_wq, need_bq, need_wk, need_bk, need_wv, need_bv, need_wo, need_bo, need_qn, need_kn = needs
    need_qn, need_kn = need_qn and q_norm is not None, need_kn and k_norm is not None
    be = ATTN_BACKENDS[backend]
    feats = _Feats(wo, n_heads, qkv_layout, q_norm, k_norm, qk_norm_eps, qk_norm_offset, backend)
    B, S, d = x.shape
    x2 = x.reshape(B * S, d)
    dy2 = dy.reshape(B * S, wo.shape[0])
    acc = lse_dtype(dy.dtype)  # bias sums: fp32, fp64 for fp64
    tables = _tables(x, feats.head_dim, position_ids, rope_theta, rotary_dim)
    opts = AttnOptions(softcap, window, dropout_p, seed, rng_offset)
    need_attn = need_x or need_wq or need_bq or need_wk or need_bk or need_wv or need_bv or need_qn or need_kn
    q0 = k0 = rq = rk = None
    if need_attn or (o is None and need_wo):
        raw = q is None
        if raw:  # recompute: projections, then QK-norm and rotary
            q, k, v = _raw_qkv(x, wq, bq, wk, bk, wv, bv, n_heads, n_kv_heads, feats.head_dim, qkv_layout)
        q, k, q0, k0, rq, rk = _qk_ready(be, q, k, raw, q_norm, k_norm, qk_norm_eps, qk_norm_offset, backend,
                                         tables)
    if o is None and (need_attn or need_wo):
        o = be.forward(q, k, v, key_padding_mask, causal, scale, opts)[0]  # same seed: same dropout mask
    out: list[Optional[Tensor]] = [None] * _BLOCK_GRADS
    if need_wo:
        out[7] = _weight_grad(dy2, o.reshape(B * S, wo.shape[1]), wo)
    if need_bo:
        out[8] = dy2.sum(0, dtype=acc).to(dy.dtype)
    if need_attn:
        grads, out[9], out[10] = _core_backward(
            be, _heads(dy2.mm(wo).view(B, S, wo.shape[1]), n_heads), q, k, v, o, lse, key_padding_mask, causal,
            scale, opts, tables, q0, k0, rq, rk, q_norm, k_norm, qk_norm_offset, need_qn, need_kn, backend,
            qkv_layout)
        parts = zip((1, 3, 5), grads, (wq, wk, wv))
        dx = None
        for i, g, w in parts:
            g2 = g.reshape(B * S, w.shape[0])
            if needs[i]:
                out[i] = _weight_grad(g2, x2, w)
            if needs[i + 1]:
                out[i + 1] = g2.sum(0, dtype=acc).to(g.dtype)
            if need_x:
                dx = g2.mm(w) if dx is None else dx.addmm_(g2, w)
        out[0] = dx.view(x.shape) if need_x else None
    refs = (x, wq, wq, x, x, x, x, wo, wo, x, x)
    return tuple(t if t is not None else _empty(r) for t, r in zip(out, refs))


@attn_block_backward.register_fake
def _(dy, x, wq, bq, wk, bk, wv, bv, wo, q, k, v, o, lse, position_ids, key_padding_mask,
      n_heads, n_kv_heads, causal, scale, rope_theta, needs_grad, backend, q_norm=None, k_norm=None,
      qk_norm_eps=1e-6, qk_norm_offset=0.0, rotary_dim=None, qkv_layout="separate", softcap=None, window=None,
      dropout_p=0.0, seed=0, rng_offset=0):
    needs = list(needs_grad) + [False] * (_BLOCK_GRADS - len(needs_grad))
    packed = qkv_layout != "separate"
    like = (x, wq, bq, None if packed else wk, None if packed else bk, None if packed else wv,
            None if packed else bv, wo, wo, q_norm, k_norm)
    out = []
    for i, (t, n) in enumerate(zip(like, needs)):
        if not n or t is None and i != 8:
            out.append(x.new_empty((0,)))
        elif i in (1, 3, 5, 7):
            out.append(_empty_like_layout(x, t))
        elif i == 8:
            out.append(x.new_empty((wo.shape[0],)))
        else:
            out.append(x.new_empty(t.shape, dtype=t.dtype) if i >= 9 else x.new_empty(t.shape))
    return tuple(out)


# the op's inputs, in order (the autograd wrapper reads them by name)
_BLOCK_INPUTS = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "position_ids", "key_padding_mask",
                 "n_heads", "n_kv_heads", "causal", "scale", "rope_theta", "mode", "backend",
                 "q_norm", "k_norm", "qk_norm_eps", "qk_norm_offset", "rotary_dim", "qkv_layout",
                 "softcap", "window", "dropout_p", "seed", "rng_offset")
_BLOCK_GRAD_INPUTS = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "q_norm", "k_norm")
_BLOCK_DEFAULTS = {"q_norm": None, "k_norm": None, "qk_norm_eps": 1e-6, "qk_norm_offset": 0.0, "rotary_dim": None,
                   "qkv_layout": "separate", "softcap": None, "window": None, "dropout_p": 0.0, "seed": 0,
                   "rng_offset": 0}


def _block_setup_context(ctx, inputs, output):
    a = dict(_BLOCK_DEFAULTS)
    a.update(zip(_BLOCK_INPUTS, inputs))
    mode = a["mode"]
    _, o, lse, q, k, v = output
    keep_o = mode != "all"
    keep_qkv = mode == "none"
    ctx.save_for_backward(
        a["x"], a["wq"], a["bq"], a["wk"], a["bk"], a["wv"], a["bv"], a["wo"], a["position_ids"],
        a["key_padding_mask"], lse, o if keep_o else None, *((q, k, v) if keep_qkv else (None, None, None)),
        a["q_norm"], a["k_norm"],
    )
    for t in output[1:]:
        ctx.mark_non_differentiable(t)
    ctx.args = (a["n_heads"], a["n_kv_heads"], a["causal"], a["scale"], a["rope_theta"])
    ctx.kwargs = {n: a[n] for n in ("qk_norm_eps", "qk_norm_offset", "rotary_dim", "qkv_layout",
                                    "softcap", "window", "dropout_p", "seed", "rng_offset")}
    ctx.backend = a["backend"]
    ctx.n_inputs = len(inputs)


def _block_backward(ctx, grad_y, *_unused):
    _no_double_backward("attention block")
    x, wq, bq, wk, bk, wv, bv, wo, position_ids, kpm, lse, o, q, k, v, q_norm, k_norm = ctx.saved_tensors
    flags = dict(zip(_BLOCK_INPUTS, ctx.needs_input_grad))
    needs = [bool(flags.get(n, False)) for n in _BLOCK_GRAD_INPUTS]
    grads = attn_block_backward(grad_y, x, wq, bq, wk, bk, wv, bv, wo, q, k, v, o, lse, position_ids, kpm,
                                *ctx.args, needs, ctx.backend, q_norm=q_norm, k_norm=k_norm, **ctx.kwargs)
    by_name = {n: (g if f else None) for n, g, f in zip(_BLOCK_GRAD_INPUTS, grads, needs)}
    return tuple(by_name.get(n) for n in _BLOCK_INPUTS[:ctx.n_inputs])


attn_block_forward.register_autograd(_block_backward, setup_context=_block_setup_context)


# --------------------------------------------------------------------------- FLOP formulas
# FlopCounterMode cannot see inside a custom op, so each op states the GEMM FLOPs its
# implementation performs (masks by key padding are data-dependent: counted as dense).
def attention_pairs2(S_q: int, S_kv: int, causal: bool, window: Optional[int] = None) -> int:
    """Twice the (query, key) pairs the score GEMMs cover (twice, to stay an integer): all of
    them; for causal attention half of a square (the FlashAttention convention, FLOPs halved)
    and the exact visible count of a non-square one (bottom-right aligned); with a sliding
    window the exact visible count (the kernels skip the tiles outside the windows)."""
    if window is not None:
        diag = S_kv - S_q
        return 2 * sum(max(0, min(S_kv, i + diag + 1) - max(0, i + diag - window + 1)) for i in range(S_q))
    if not causal:
        return 2 * S_q * S_kv
    if S_q == S_kv:
        return S_q * S_kv
    diag = S_kv - S_q
    return 2 * sum(min(S_kv, max(0, i + diag + 1)) for i in range(S_q))


def _attn_fwd_flops(q_shape, k_shape, causal: bool, window: Optional[int] = None) -> int:
    B, S_q, H, D = q_shape
    return 2 * B * H * D * attention_pairs2(S_q, k_shape[1], causal, window)  # S = Q K^T, O = P V: 2 x 2 per pair


def _two_kernel_backward(backend) -> bool:
    """Whether the backward of ``backend`` computes dQ in a kernel of its own, recomputing S and
    dP a second time: the Triton backward under ``torch.use_deterministic_algorithms(True)``
    (:func:`fused_ckpt.kernels.flash_attn_bwd.single_pass` is the launcher's rule)."""
    return backend == "triton" and torch.are_deterministic_algorithms_enabled()


def _attn_bwd_flops(q_shape, k_shape, causal: bool, need_dq: bool, need_dkdv: bool,
                    two_kernels: bool = False, window: Optional[int] = None) -> int:
    """GEMMs per visible (query, key) pair: dK/dV need S, dV, dP, dK (4); dQ needs S, dP, dQ (3);
    all three in one pass share S and dP (5 = 2.5x the forward: the aten path and the Triton
    single-pass backward); the deterministic Triton backward's two kernels both compute S and dP
    (7 = 3.5x)."""
    B, S_q, H, D = q_shape
    per_gemm = B * H * D * attention_pairs2(S_q, k_shape[1], causal, window)  # 2 FLOPs per pair and D
    if need_dq and need_dkdv:
        return per_gemm * (7 if two_kernels else 5)
    return per_gemm * (4 * need_dkdv + 3 * need_dq)


@register_flop_formula(torch.ops.fused_ckpt.flash_attn_forward)
def _flash_forward_flops(q_shape, k_shape, v_shape, mask_shape, causal, *args, out_shape=None, **kwargs) -> int:
    window = kwargs.get("window", args[3] if len(args) > 3 else None)  # after scale, backend, softcap
    return _attn_fwd_flops(q_shape, k_shape, causal, window)


@register_flop_formula(torch.ops.fused_ckpt.flash_attn_backward)
def _flash_backward_flops(do_shape, q_shape, k_shape, v_shape, o_shape, lse_shape, mask_shape, causal, scale,
                          needs_grad, *args, out_shape=None, **kwargs) -> int:
    if q_shape[1] == 0 or k_shape[1] == 0:
        return 0
    backend = args[0] if args else kwargs.get("backend")
    window = kwargs.get("window", args[2] if len(args) > 2 else None)  # after backend, softcap
    return _attn_bwd_flops(q_shape, k_shape, causal, needs_grad[0], needs_grad[1] or needs_grad[2],
                           _two_kernel_backward(backend), window)


def _proj_flops(x_shape, wq_shape, wk_shape, wv_shape) -> int:
    """The q/k/v projection GEMMs (a packed layout: wq is the packed weight, wk/wv None)."""
    T = math.prod(x_shape[:-1])
    return 2 * T * x_shape[-1] * sum(s[0] for s in (wq_shape, wk_shape, wv_shape) if s is not None)


def _block_qk_shapes(x_shape, wo_shape, n_heads, n_kv_heads):
    B, S, _ = x_shape
    D = wo_shape[1] // n_heads
    return (B, S, n_heads, D), (B, S, n_kv_heads, D)


@register_flop_formula(torch.ops.fused_ckpt.attn_block_forward)
def _block_forward_flops(x_shape, wq_shape, bq_shape, wk_shape, bk_shape, wv_shape, bv_shape, wo_shape, bo_shape,
                         pos_shape, mask_shape, n_heads, n_kv_heads, causal, *args, out_shape=None, **kwargs) -> int:
    q_shape, k_shape = _block_qk_shapes(x_shape, wo_shape, n_heads, n_kv_heads)
    T = math.prod(x_shape[:-1])
    window = kwargs.get("window", args[11] if len(args) > 11 else None)  # the op's keyword
    return (_proj_flops(x_shape, wq_shape, wk_shape, wv_shape) + _attn_fwd_flops(q_shape, k_shape, causal, window)
            + 2 * T * wo_shape[0] * wo_shape[1])


@register_flop_formula(torch.ops.fused_ckpt.attn_block_backward)
def _block_backward_flops(dy_shape, x_shape, wq_shape, bq_shape, wk_shape, bk_shape, wv_shape, bv_shape, wo_shape,
                          q_shape, k_shape, v_shape, o_shape, lse_shape, pos_shape, mask_shape,
                          n_heads, n_kv_heads, causal, scale, rope_theta, needs_grad, *args,
                          out_shape=None, **kwargs) -> int:
    needs = list(needs_grad) + [False] * (_BLOCK_GRADS - len(needs_grad))
    need_x, need_wq, need_bq, need_wk, need_bk, need_wv, need_bv, need_wo, _, need_qn, need_kn = needs
    need_attn = need_x or need_wq or need_bq or need_wk or need_bk or need_wv or need_bv or need_qn or need_kn
    qs, ks = _block_qk_shapes(x_shape, wo_shape, n_heads, n_kv_heads)
    T = math.prod(x_shape[:-1])
    d_out, hd = wo_shape
    window = kwargs.get("window", args[8] if len(args) > 8 else None)  # the op's keyword
    flops = 0
    if q_shape is None and (need_attn or (o_shape is None and need_wo)):
        flops += _proj_flops(x_shape, wq_shape, wk_shape, wv_shape)  # recompute q, k, v
    if o_shape is None and (need_attn or need_wo):
        flops += _attn_fwd_flops(qs, ks, causal, window)  # recompute the attention output
    if need_wo:
        flops += 2 * T * d_out * hd  # dWo = dY^T O
    if need_attn:
        flops += 2 * T * d_out * hd  # dO = dY Wo
        backend = args[0] if args else kwargs.get("backend")
        flops += _attn_bwd_flops(qs, ks, causal, True, True, _two_kernel_backward(backend), window)
        for w_shape, need_w in ((wq_shape, need_wq), (wk_shape, need_wk), (wv_shape, need_wv)):
            if w_shape is not None:  # packed: one GEMM each for dW and dX over the packed weight
                flops += 2 * T * w_shape[0] * x_shape[-1] * (int(need_w) + int(need_x))  # dW, dX
    return flops
