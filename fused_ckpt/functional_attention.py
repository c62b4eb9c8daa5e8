"""Functional attention: input checks, autocast and backend choice, then the custom ops of
:mod:`fused_ckpt.ops.attention`."""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch
from torch import Tensor

from .backend import resolve_backend

# The head dims the flash-attention kernels support; kept here so importing the package does
# not import triton (tests/test_flash_attention.py checks it equals kernels.flash_attn_fwd's).
HEAD_DIMS = (32, 64, 128, 256)

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RECOMPUTE_MODES = {"all": "all", True: "all", "qkv": "qkv", False: "none"}


def _check_dtype(t: Tensor, what: str, backend: str) -> None:
    allowed = _KERNEL_DTYPES + ((torch.float64,) if backend == "aten" else ())
    if t.dtype not in allowed:
        names = "float32/float16/bfloat16" + (" (float64 on the aten backend)" if backend != "aten" else "/float64")
        raise TypeError(f"{what} must be {names}, got {t.dtype}")


def _check_same(named: list[tuple[str, Tensor]], what: str) -> None:
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        raise ValueError(f"all {what} tensors must be on one device, got "
                         + ", ".join(f"{n} on {t.device}" for n, t in named))
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) > 1:
        raise TypeError(f"{what} tensors must share one dtype outside autocast, got "
                        + ", ".join(f"{n} {t.dtype}" for n, t in named))


def _check_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"unsupported head_dim {head_dim}: the flash attention kernels support "
                         f"{HEAD_DIMS}")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def _check_mask(mask: Optional[Tensor], batch: int, seqlen: int, device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError("key_padding_mask must be a bool tensor (True = attend to this key), got "
                        + (str(mask.dtype) if isinstance(mask, Tensor) else type(mask).__name__))
    if tuple(mask.shape) != (batch, seqlen):
        raise ValueError(f"key_padding_mask has shape {tuple(mask.shape)}, expected (batch, kv_seqlen) = "
                         f"({batch}, {seqlen})")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but the inputs are on {device}")


def check_flash_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                       backend: str) -> None:
    """Raise a ValueError/TypeError that names the offending sizes, dtypes or devices."""
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{n} must be 4-D (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, _, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch and head_dim")
    H_kv = k.shape[2]
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"n_kv_heads={H_kv} must divide n_heads={H} (grouped-query attention)")
    _check_head_dim(D)
    _check_same([("q", q), ("k", k), ("v", v)], "attention")
    for n, t in (("q", q), ("k", k), ("v", v)):
        _check_dtype(t, n, backend)
    _check_mask(key_padding_mask, B, k.shape[1], q.device)


def _autocast(*ts: Optional[Tensor], device_type: str) -> list[Optional[Tensor]]:
    """Cast to the autocast dtype when autocast is on for ``device_type`` (the op then runs
    with autocast off: the kernels see one dtype)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return list(ts)
    dt = torch.get_autocast_dtype(device_type)
    return [t.to(dt) if t is not None else None for t in ts]


def _autocast_off(device_type: str):
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def check_attention_options(softcap, window, dropout_p, causal: bool) -> tuple:
    """(softcap, window, dropout_p) validated and normalised (float or None, int or None, float)."""
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (math.isfinite(softcap)
                                                                                     and softcap > 0):
            raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
        softcap = float(softcap)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        if not causal:
            raise ValueError("window (a sliding window) needs causal=True: key j is visible from query i iff "
                             "i - window < j <= i")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return softcap, window, float(dropout_p)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                    key_padding_mask: Optional[Tensor] = None, backend: str = "auto", *,
                    softcap: Optional[float] = None, window: Optional[int] = None,
                    dropout_p: float = 0.0) -> Tensor:
    """Exact attention whose backward recomputes the probabilities (FlashAttention-2).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_kv, nheads_kv, headdim)``; ``nheads_kv`` divides ``nheads``
            (grouped-query / multi-query attention). headdim in (32, 64, 128, 256).
        causal: query i attends key j iff ``j <= i + seqlen_kv - seqlen_q`` (aligned to the
            bottom-right corner, as FlashAttention 2.1+).
        scale: softmax scale, default ``1/sqrt(headdim)``.
        key_padding_mask: bool ``(batch, seqlen_kv)``, True = attend to this key.
        backend: "auto", "triton" or "aten" (see :mod:`fused_ckpt.backend`).
        softcap: logit soft-capping, ``s = softcap * tanh(s / softcap)`` after the scale and
            before the masks (Gemma 2 ``attn_logit_softcapping``).
        window: sliding window (needs causal): query i sees key j iff
            ``i' - window < j <= i'``, ``i' = i + seqlen_kv - seqlen_q`` (Hugging Face
            ``sliding_window``).
        dropout_p: dropout on the attention probabilities (applied whenever > 0, as
            ``scaled_dot_product_attention``). The mask comes from Philox with a seed and
            offset drawn from torch's default generator (``torch.manual_seed`` reproduces
            it), saved as two ints; the backward regenerates it (no mask tensor is kept).

    A query that sees no key (all its keys padded, or causal with seqlen_q > seqlen_kv)
    gets a zero output and zero gradients. Saved for backward: q, k, v, the output and the
    fp32 log-sum-exp (see :mod:`fused_ckpt.ops.attention`).

    Equivalent PyTorch::

        g = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        s = softcap * torch.tanh(s / softcap)                 # softcap only
        s = s.masked_fill(~visible, float("-inf"))          # causal, window and padding
        p = torch.softmax(s, -1).nan_to_num(0.0)             # rows with no key -> 0
        p = p * keep / (1 - dropout_p)                       # dropout only (keep: the Philox mask)
        out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    """
    from .ops.attention import flash_attn_forward

    if isinstance(q, Tensor):
        q, k, v = _autocast(q, k, v, device_type=q.device.type)
    be = resolve_backend(backend, q.device, q.dtype) if isinstance(q, Tensor) else backend
    check_flash_inputs(q, k, v, key_padding_mask, be)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    scale = _check_scale(scale, q.shape[-1])
    softcap, window, dropout_p = check_attention_options(softcap, window, dropout_p, causal)
    if softcap is None and window is None and dropout_p == 0:  # the op's schema without the options
        with _autocast_off(q.device.type):
            return flash_attn_forward(q, k, v, key_padding_mask, causal, scale, be)[0]
    from .ops.attention import draw_dropout_seed

    seed, offset = draw_dropout_seed() if dropout_p > 0 else (0, 0)
    with _autocast_off(q.device.type):
        o, _ = flash_attn_forward(q, k, v, key_padding_mask, causal, scale, be, softcap, window, dropout_p,
                                  seed, offset)
    return o


def fused_attention_block(
    x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Optional[Tensor], bk: Optional[Tensor],
    wv: Optional[Tensor], bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor], n_heads: int,
    n_kv_heads: Optional[int] = None, *, causal: bool = True, scale: Optional[float] = None,
    rope_theta: Optional[float] = None, position_ids: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None, recompute: Union[str, bool] = "qkv",
    backend: str = "auto", q_norm: Optional[Tensor] = None, k_norm: Optional[Tensor] = None,
    qk_norm_eps: float = 1e-6, qk_norm_offset: float = 0.0, rotary_dim: Optional[int] = None,
    qkv_layout: str = "separate", softcap: Optional[float] = None, window: Optional[int] = None,
    dropout_p: float = 0.0, out_dropout_p: float = 0.0, lora: Optional[dict] = None, lora_dropout: float = 0.0,
) -> Tensor:
    """Self-attention block ``o_proj(attention(rope(norm(q_proj x)), rope(norm(k_proj x)), v_proj x))``
    as one op whose backward recomputes what ``recompute`` says (table in
    :mod:`fused_ckpt.ops.attention`).

    Args:
        x: ``(batch, seqlen, d_model)``.
        wq, bq: ``[n_heads * head_dim, d_model]``; wk, bk, wv, bv:
            ``[n_kv_heads * head_dim, d_model]``; wo, bo: ``[d_out, n_heads * head_dim]``
            (``nn.Linear`` layout, any strides: a Conv1D weight can be passed as ``w.t()``;
            biases may be None).
        rope_theta: rotary base (Hugging Face Llama ``rotate_half`` convention) or None.
        position_ids: int ``(seqlen,)``, ``(1, seqlen)`` or ``(batch, seqlen)``; default 0..S-1.
        key_padding_mask: bool ``(batch, seqlen)``, True = attend to this key.
        recompute: "all" (keep x, lse), "qkv" (keep x, attention output, lse) or False (keep
            x, q, k, v, attention output, lse). True means "all".
        q_norm, k_norm: QK-norm: RMSNorm weights applied to q and k after the projection (and
            bias), before the rotary embedding: ``[head_dim]`` normalises each head (Qwen3,
            Gemma3), ``[n_heads * head_dim]`` / ``[n_kv_heads * head_dim]`` the whole
            projection (OLMo2). Recomputed in backward with q/k, never saved.
        qk_norm_eps: the norms' epsilon. qk_norm_offset: 1.0 multiplies by ``(1 + w)``
            (Gemma), formed in fp32.
        rotary_dim: rotate only the first ``rotary_dim`` dims of each head (GPT-NeoX, Phi
            partial rotary; tables with ``dim = rotary_dim``); None = all.
        qkv_layout: "separate" (wq, wk, wv), "packed" (wq is one ``[(H + 2 H_kv) D, d]``
            weight with rows [q; k; v] and bq its bias, as Phi-3 ``qkv_proj`` and GPT-2
            ``c_attn.weight.t()``; wk, bk, wv, bv None) or "neox" (wq ``[3 H D, d]`` with
            rows interleaved per head, ``view(H, 3, D, d)``, as GPT-NeoX ``query_key_value``;
            H_kv = H). Gradients land on the packed weight (one GEMM each for dW and dx).
        softcap, window, dropout_p: the attention options of :func:`flash_attention` (logit
            soft-capping, sliding window, dropout on the probabilities); dropout_p applies
            whenever > 0 (a module passes 0 in eval mode).
        out_dropout_p: dropout on the block output (GPT-2 ``resid_dropout``, GPT-NeoX
            ``post_attention_dropout``), replayed in backward (:mod:`fused_ckpt.ops.dropout`).
            Both dropouts draw one (seed, offset) from torch's default generator per call.
        lora: LoRA adapters on frozen base weights (PEFT's vanilla LoRA), a dict with any of the
            keys "q", "k", "v", "o" (separate layout) or "qkv" (the packed weight of a "packed" /
            "neox" layout: ``B`` has the packed rows in the weight's row order), "o"; each
            ``(A [r, in], B [out, r], scaling)`` in x's dtype (or float32 over a 16-bit x, PEFT's
            default): each projection becomes ``linear(in, W, b) + scaling * linear(linear(
            drop(in), A), B)``, ``in`` = x for q/k/v, the attention output for o. The base
            weights, biases and QK-norm weights must not require grad (no gradient is computed
            for them); x, A and B get gradients. Under autocast the factors are cast with the
            rest. Kept for backward besides the mode's tensors: each adapter's ``[tokens, r]``
            product (:mod:`fused_ckpt.ops.attn_lora`).
        lora_dropout: dropout on each adapter's input (PEFT's ``lora_dropout`` p), applied
            whenever > 0 (a module passes 0 in eval mode); one mask per projection from a
            Philox seed drawn from torch's default generator, regenerated in backward.

    Equivalent PyTorch::

        q = rope(rms_norm(F.linear(x, wq, bq).view(B, S, H, D), q_norm))   # norms: when given
        k = rope(rms_norm(F.linear(x, wk, bk).view(B, S, H_kv, D), k_norm))
        v = F.linear(x, wv, bv).view(B, S, H_kv, D)
        y = F.linear(flash_attention(q, k, v, causal, scale, key_padding_mask).flatten(2), wo, bo)
        y = F.dropout(y, out_dropout_p)                      # with the replayed mask
        # with lora: each F.linear(in, w, b) above gets + scaling * F.linear(F.linear(
        #            F.dropout(in, lora_dropout), A), B)      (with the replayed masks)
    """
    from .ops.attention import attn_block_forward, draw_dropout_seed

    mode = recompute_mode(recompute)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    lora_keys, factors = _lora_factors(lora, qkv_layout)
    x, wq, bq, wk, bk, wv, bv, wo, bo, q_norm, k_norm, *factors = _autocast(
        x, wq, bq, wk, bk, wv, bv, wo, bo, q_norm, k_norm, *factors, device_type=x.device.type)
    be = resolve_backend(backend, x.device, x.dtype)
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    _check_block(x, wq, bq, wk, bk, wv, bv, wo, bo, n_heads, n_kv_heads, be, qkv_layout)
    head_dim = wo.shape[1] // n_heads
    _check_qk_norm(q_norm, k_norm, qk_norm_eps, qk_norm_offset, n_heads, n_kv_heads, head_dim, x)
    rotary_dim = _check_rotary_dim(rotary_dim, head_dim, rope_theta)
    scale = _check_scale(scale, head_dim)
    B, S, _ = x.shape
    _check_mask(key_padding_mask, B, S, x.device)
    if position_ids is not None:
        position_ids = _check_positions(position_ids, B, S, x.device)
        if rope_theta is None:
            raise ValueError("position_ids were given but the block has no rotary embedding (rope_theta=None)")
    if rope_theta is not None and (not isinstance(rope_theta, (int, float)) or isinstance(rope_theta, bool)
                                   or not rope_theta > 0):
        raise ValueError(f"rope_theta must be a positive number or None, got {rope_theta!r}")
    softcap, window, dropout_p = check_attention_options(softcap, window, dropout_p, bool(causal))
    if lora is not None:
        lora_args = _check_lora(lora, lora_keys, factors, lora_dropout, x, wq, wk, wv, wo,
                                (("wq", wq), ("bq", bq), ("wk", wk), ("bk", bk), ("wv", wv), ("bv", bv),
                                 ("wo", wo), ("bo", bo), ("q_norm", q_norm), ("k_norm", k_norm)))
        seed, offset = draw_dropout_seed() if dropout_p > 0 else (0, 0)
        lora_seed, lora_offset = draw_dropout_seed() if lora_dropout > 0 else (0, 0)
        from .ops.attn_lora import attn_lora_forward

        with _autocast_off(x.device.type):
            y = attn_lora_forward(x, wq, bq, wk, bk, wv, bv, wo, bo, *lora_args, position_ids, key_padding_mask,
                                  n_heads, n_kv_heads, bool(causal), scale,
                                  None if rope_theta is None else float(rope_theta), mode, be,
                                  q_norm=q_norm, k_norm=k_norm, qk_norm_eps=float(qk_norm_eps),
                                  qk_norm_offset=float(qk_norm_offset), rotary_dim=rotary_dim, qkv_layout=qkv_layout,
                                  softcap=softcap, window=window, dropout_p=dropout_p, seed=seed, rng_offset=offset,
                                  lora_dropout_p=float(lora_dropout), lora_seed=lora_seed,
                                  lora_offset=lora_offset)[0]
        return _out_dropout(y, out_dropout_p, be)
    options = {}
    if softcap is not None or window is not None or dropout_p > 0:  # else: the schema without them
        seed, offset = draw_dropout_seed() if dropout_p > 0 else (0, 0)
        options = dict(softcap=softcap, window=window, dropout_p=dropout_p, seed=seed, rng_offset=offset)
    with _autocast_off(x.device.type):
        y = attn_block_forward(x, wq, bq, wk, bk, wv, bv, wo, bo, position_ids, key_padding_mask,
                               n_heads, n_kv_heads, bool(causal), scale,
                               None if rope_theta is None else float(rope_theta), mode, be,
                               q_norm=q_norm, k_norm=k_norm, qk_norm_eps=float(qk_norm_eps),
                               qk_norm_offset=float(qk_norm_offset), rotary_dim=rotary_dim,
                               qkv_layout=qkv_layout, **options)[0]
    return _out_dropout(y, out_dropout_p, be)


def _out_dropout(y: Tensor, p: float, backend: str) -> Tensor:
    if not p:
        return y
    from .ops.dropout import replayed_dropout

    with _autocast_off(y.device.type):
        return replayed_dropout(y, p, backend)


_LORA_KEYS = {"separate": ("q", "k", "v", "o"), "packed": ("qkv", "o"), "neox": ("qkv", "o")}


def _lora_factors(lora, qkv_layout) -> tuple:
    """(the keys in op order -- q or qkv, k, v, o -- , [A, B per key, None where absent]) of a
    ``lora`` dict, its keys and value shapes checked (tensors themselves: :func:`_check_lora`)."""
    if lora is None:
        return (), []
    if not isinstance(lora, dict):
        raise TypeError(f"lora must be a dict of (A, B, scaling) per projection or None, got {type(lora).__name__}")
    allowed = _LORA_KEYS.get(qkv_layout, _LORA_KEYS["separate"])
    bad = [k for k in lora if k not in allowed]
    if bad:
        hint = (" (a packed layout has one adapter on the packed weight: key 'qkv')" if qkv_layout != "separate"
                else " (key 'qkv' is the packed weight's, for qkv_layout='packed' / 'neox')")
        raise ValueError(f"lora has keys {bad} not among {allowed} for qkv_layout={qkv_layout!r}{hint}")
    keys = (allowed[0], "k", "v", "o")
    factors = []
    for key in keys:
        f = lora.get(key)
        if f is None:
            factors += [None, None]
            continue
        if not isinstance(f, (tuple, list)) or len(f) != 3:
            raise ValueError(f"lora[{key!r}] must be (A, B, scaling), got {f!r:.100}")
        if not isinstance(f[0], Tensor) or not isinstance(f[1], Tensor) or f[0].dim() != 2 or f[1].dim() != 2:
            raise ValueError(f"lora[{key!r}]: A and B must be 2-D tensors")
        factors += [f[0], f[1]]
    return keys, factors


def _check_lora(lora: dict, keys, factors: list, lora_dropout, x, wq, wk, wv, wo, base) -> tuple:
    """The op's LoRA arguments (A_q, A_k, A_v, A_o, B_q, B_k, B_v, B_o, scalings [4]) after the
    checks: shapes against the projections, dtypes, devices, scaling, lora_dropout, a frozen base."""
    from .functional import lora_dtype_ok

    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if torch.is_grad_enabled():
        trainable = [n for n, t in base if t is not None and t.requires_grad]
        if trainable:
            raise ValueError(f"fused_attention_block with lora: the base weights, biases and QK-norm weights must be "
                             f"frozen (requires_grad=False), as PEFT sets them; {', '.join(trainable)} require grad "
                             "(no gradient is computed for them)")
    d = x.shape[-1]
    ws = (wq, wk, wv, wo)
    a_s, b_s, scalings = [], [], []
    for i, key in enumerate(keys):
        a, b = factors[2 * i], factors[2 * i + 1]
        scalings.append(0.0)
        a_s.append(a)
        b_s.append(b)
        if a is None:
            continue
        s = lora[key][2]
        n_in, n_out = (d if key != "o" else wo.shape[1]), ws[i].shape[0]
        r = a.shape[0]
        if r == 0 or tuple(a.shape) != (r, n_in) or tuple(b.shape) != (n_out, r):
            raise ValueError(f"lora[{key!r}]: A {tuple(a.shape)} and B {tuple(b.shape)} must be [r, {n_in}] and "
                             f"[{n_out}, r] with r > 0")
        if not lora_dtype_ok(a.dtype, x.dtype) or b.dtype != a.dtype:
            raise TypeError(f"lora[{key!r}]: A and B must share one dtype, x's ({x.dtype}) or float32 for a 16-bit "
                            f"x; got {a.dtype} and {b.dtype}")
        if a.device != x.device or b.device != x.device:
            raise ValueError(f"lora[{key!r}]: A is on {a.device} and B on {b.device}, x on {x.device}")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"lora[{key!r}]: scaling must be a finite number, got {s!r}")
        scalings[-1] = float(s)
    return (*a_s, *b_s, scalings)


def recompute_mode(recompute: Union[str, bool]) -> str:
    """The op's mode name for a module/functional ``recompute`` value."""
    if isinstance(recompute, bool) or (isinstance(recompute, str) and recompute in ("all", "qkv")):
        return RECOMPUTE_MODES[recompute]
    raise ValueError(f"recompute must be 'all', 'qkv' or False (True = 'all'), got {recompute!r}")


def _check_positions(position_ids: Tensor, batch: int, seqlen: int, device: torch.device) -> Tensor:
    if not isinstance(position_ids, Tensor) or position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise TypeError("position_ids must be an integer tensor")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[1] != seqlen or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected (seqlen,), (1, seqlen) "
                         f"or (batch, seqlen) with batch={batch}, seqlen={seqlen}")
    if position_ids.device != device:
        raise ValueError(f"position_ids is on {position_ids.device} but x is on {device}")
    return position_ids.long()


def _check_qk_norm(q_norm, k_norm, eps, offset, n_heads: int, n_kv_heads: int, head_dim: int, x: Tensor) -> None:
    for name, val in (("qk_norm_eps", eps), ("qk_norm_offset", offset)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise ValueError(f"{name} must be a finite number, got {val!r}")
    if not eps >= 0:
        raise ValueError(f"qk_norm_eps must be >= 0, got {eps!r}")
    for name, w, n in (("q_norm", q_norm, n_heads), ("k_norm", k_norm, n_kv_heads)):
        if w is None:
            continue
        if not isinstance(w, Tensor):
            raise TypeError(f"{name} must be a tensor (the RMSNorm weight) or None, got {type(w).__name__}")
        if w.dim() != 1 or w.shape[0] not in (head_dim, n * head_dim):
            raise ValueError(f"{name} has shape {tuple(w.shape)}, expected ({head_dim},) (per head) or "
                             f"({n * head_dim},) (the whole projection: {n} heads x head_dim {head_dim})")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device} but x is on {x.device}")
        if w.dtype != x.dtype:
            raise TypeError(f"{name} is {w.dtype} but x is {x.dtype} (outside autocast they must match)")


def _check_rotary_dim(rotary_dim, head_dim: int, rope_theta) -> Optional[int]:
    if rotary_dim is None or (rope_theta is not None and rotary_dim == head_dim):
        return None
    if rope_theta is None:
        raise ValueError(f"rotary_dim={rotary_dim!r} was given but the block has no rotary embedding (rope_theta=None)")
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or not 0 < rotary_dim <= head_dim \
            or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even int in (0, head_dim={head_dim}], got {rotary_dim!r}")
    return rotary_dim


def _check_block(x, wq, bq, wk, bk, wv, bv, wo, bo, n_heads, n_kv_heads, backend, qkv_layout="separate") -> None:
    for name, n in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads} (grouped-query attention)")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, seqlen, d_model), got shape {tuple(x.shape)}")
    if qkv_layout not in ("separate", "packed", "neox"):
        raise ValueError(f"qkv_layout must be 'separate', 'packed' or 'neox', got {qkv_layout!r}")
    packed = qkv_layout != "separate"
    if packed:
        for name, t in (("wk", wk), ("bk", bk), ("wv", wv), ("bv", bv)):
            if t is not None:
                raise ValueError(f"qkv_layout={qkv_layout!r}: wq holds the packed q/k/v weight (and bq its bias); "
                                 f"{name} must be None")
        if qkv_layout == "neox" and n_kv_heads != n_heads:
            raise ValueError(f"qkv_layout='neox' interleaves q, k, v per head: n_kv_heads={n_kv_heads} must equal "
                             f"n_heads={n_heads}")
    qname = "the packed qkv weight" if packed else "q_proj.weight"
    projs = (("q_proj.weight" if not packed else qname, wq), ("o_proj.weight", wo)) + \
        ((("k_proj.weight", wk), ("v_proj.weight", wv)) if not packed else ())
    for name, w in projs:
        if not isinstance(w, Tensor) or w.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor")
    d = x.shape[-1]
    if wo.shape[1] % n_heads:
        raise ValueError(f"o_proj.weight has shape {tuple(wo.shape)}: its {wo.shape[1]} input columns are not a "
                         f"multiple of n_heads={n_heads}")
    D = wo.shape[1] // n_heads
    _check_head_dim(D)
    if packed:
        rows = (n_heads + 2 * n_kv_heads) * D
        if tuple(wq.shape) != (rows, d):
            raise ValueError(f"{qname} has shape {tuple(wq.shape)}, expected ({rows}, {d}) for d_model={d}, "
                             f"head_dim={D}, n_heads={n_heads}, n_kv_heads={n_kv_heads} (x {tuple(x.shape)})")
    else:
        for name, w, rows in (("q_proj", wq, n_heads * D), ("k_proj", wk, n_kv_heads * D),
                              ("v_proj", wv, n_kv_heads * D)):
            if tuple(w.shape) != (rows, d):
                raise ValueError(f"{name}.weight has shape {tuple(w.shape)}, expected ({rows}, {d}) for d_model={d}, "
                                 f"head_dim={D}, n_heads={n_heads}, n_kv_heads={n_kv_heads} (x {tuple(x.shape)})")
    named = [("x", x)] + list(projs)
    biases = (("qkv" if packed else "q_proj", bq, wq), ("o_proj", bo, wo))
    if not packed:
        biases += (("k_proj", bk, wk), ("v_proj", bv, wv))
    for name, b, w in biases:
        if b is not None:
            if tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"{name}.bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
            named.append((name + ".bias", b))
    _check_same(named, "attention block")
    for name, t in named:
        _check_dtype(t, name, backend)
