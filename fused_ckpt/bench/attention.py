"""Attention suite: the attention kernel and the attention block, fwd+bwd, side by side.

Kernel (q, k, v ``[B, S, H, D]``, causal):

==================  =============================================================================
eager               softmax(q k^T * scale + causal mask) v in plain torch ops (saves the
                    probabilities)
ckpt-nonreentrant   that, under ``torch.utils.checkpoint(use_reentrant=False)``; also reentrant
compile (budget=b)  ``torch.compile`` of the eager attention with activation_memory_budget b
sdpa-<backend>      ``F.scaled_dot_product_attention`` with one backend forced (math, flash,
                    efficient, cudnn; a backend the device lacks is a skipped row)
fused-<be>          :func:`fused_ckpt.functional_attention.flash_attention` (``triton`` on CUDA;
                    ``aten``: the chunked math path with the same contract)
==================  =============================================================================

Block (``o_proj(attention(rope(q_proj x), rope(k_proj x), v_proj x))``, Llama layout, GQA):
eager SDPA block, its non-reentrant / reentrant checkpoint, compiled with each budget, and
:class:`FusedCheckpointedAttention` at each recompute dial ("all", "qkv", False) per backend.

FLOPs: attention forward ``4·B·H·S²·D`` (half when causal), backward 2.5x forward
(``2.0 (bwd) + 0.5 (recompute of S = QK^T)``); the block adds its projection GEMMs, 3x (fwd + bwd).
Model FLOPs count the forward once and the backward without recompute.
"""
from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import _timing as T
from ._harness import Prepared, Variant, measure_variants
from ._report import Target, fmt, ms, plot_tradeoff, per_shape_tables
from .ffn import CompiledBudget, compile_variant_name

NAME = "attention"
DESCRIPTION = "attention kernel (vs SDPA backends) and attention block (eager, checkpoint, compile, fused dials)"

# kernel: (B, S, H, D); block: (B, S, d_model, H, H_kv)
KERNEL = {"cpu": (2, 1024, 8, 64), "cuda": (4, 4096, 32, 128)}
KERNEL_QUICK = {"cpu": (1, 64, 2, 32), "cuda": (2, 2048, 16, 128)}
BLOCK = {"cpu": (2, 512, 1024, 16, 4), "cuda": (2, 4096, 4096, 32, 8)}
BLOCK_QUICK = {"cpu": (1, 32, 64, 2, 1), "cuda": (1, 2048, 2048, 16, 4)}
ROPE_THETA = 10000.0
SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")
BWD_FACTOR = 2.5  # 2.0 (bwd) + 0.5 (recompute)


def attn_flops(B: int, H: int, S: int, D: int, causal: bool = True) -> float:
    f = 4.0 * B * H * S * S * D
    return f / 2 if causal else f


# ------------------------------------------------------------------------------ kernel
def eager_attention(q, k, v, causal: bool = True):
    """Attention in plain torch ops on ``[B, S, H, D]`` tensors (what autograd saves: the
    probabilities and their inputs)."""
    B, S, H, D = q.shape
    g = H // k.shape[2]
    if g > 1:
        k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(D))
    if causal:
        mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.float(), -1).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


class EagerAttention(nn.Module):
    def __init__(self, ck=None):
        super().__init__()
        self.ck = ck

    def forward(self, q, k, v):
        if self.ck is None:
            return eager_attention(q, k, v)
        return checkpoint(eager_attention, q, k, v, use_reentrant=self.ck == "reentrant")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def sdpa(q, k, v, backend: str):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_backend(backend)):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def _sdpa_skip(ctx, backend: str):
    if ctx.dev == "cpu" and backend in ("efficient", "cudnn"):
        return "CUDA only"
    return None


def _kernel(ctx, B, S, H, D) -> list:
    from ..functional_attention import flash_attention

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(ctx.device, ctx.dtype)

    q, k, v = (rnd(B, S, H, D).requires_grad_() for _ in range(3))
    do = rnd(B, S, H, D)
    with T.no_tf32():
        qr, kr, vr = (t.detach().to(ctx.ref_dtype).requires_grad_() for t in (q, k, v))
        eager_attention(qr, kr, vr).backward(do.to(ctx.ref_dtype))
        ref = [qr.grad, kr.grad, vr.grad]
        del qr, kr, vr
    clear = [q, k, v]

    def grads():
        return [q.grad, k.grad, v.grad]

    def fn_variant(f, compiled=False):
        def make():
            return Prepared(run=lambda: f(q, k, v).backward(do), forward=lambda: f(q, k, v), grads=grads,
                            clear=clear, count_flops=not compiled)
        return make

    variants = [
        Variant("eager", "eager", fn_variant(EagerAttention()), description="softmax(QK^T)V in torch ops"),
        Variant("ckpt-nonreentrant", "checkpoint", fn_variant(EagerAttention("non_reentrant"))),
        Variant("ckpt-reentrant", "checkpoint", fn_variant(EagerAttention("reentrant"))),
    ]
    why = ctx.compile_skip_reason()
    for b in ctx.compile_budgets:
        variants.append(Variant(compile_variant_name(b), "compile", None if why else (
            lambda b=b: fn_variant(CompiledBudget(EagerAttention(), b), compiled=True)()), skip=why))
    for be in SDPA_BACKENDS:
        variants.append(Variant(f"sdpa-{be}", "sdpa", fn_variant(lambda q, k, v, be=be: sdpa(q, k, v, be)),
                                skip=_sdpa_skip(ctx, be), description=f"SDPA, {be} backend forced"))
    for be, why in ctx.fused_backends():
        if be == "aten":
            why = None  # the attention aten path is torch math: it needs no compiled extension
        variants.append(Variant(f"fused-{be}", "fused", None if why else fn_variant(
            lambda q, k, v, be=be: flash_attention(q, k, v, causal=True, backend=be)), skip=why,
            description=f"fused_ckpt flash_attention(backend={be!r})"))
    fwd = attn_flops(B, H, S, D)
    shape = f"kernel B={B} S={S} H={H} D={D} causal"
    rows = measure_variants(ctx, NAME, shape, {"part": "kernel", "batch": B, "seqlen": S, "heads": H,
                                               "head_dim": D, "causal": True, "fwd_flops": fwd},
                            variants, ref_grads=ref, model_flops=(1 + 2.0) * fwd,
                            ratio_refs={"vs_eager": "eager", "vs_nonreentrant": "ckpt-nonreentrant"})
    return rows


# ------------------------------------------------------------------------------ block
def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


class EagerSdpaBlock(nn.Module):
    """The eager attention block the fused one replaces: projections, Llama rotary embedding,
    SDPA (the device's default backend), o_proj. Shares the fused module's parameters."""

    def __init__(self, f, ck=None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = f.q_proj, f.k_proj, f.v_proj, f.o_proj
        self.n_heads, self.n_kv_heads, self.head_dim, self.theta = f.n_heads, f.n_kv_heads, f.head_dim, f.rope_theta
        self.ck = ck

    def _block(self, x):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        prec = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=x.device, dtype=prec) / self.head_dim))
        ang = torch.arange(S, device=x.device, dtype=prec)[:, None] * inv
        emb = torch.cat((ang, ang), -1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        g = self.n_heads // self.n_kv_heads
        if g > 1:
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))

    def forward(self, x):
        if self.ck is None:
            return self._block(x)
        return checkpoint(self._block, x, use_reentrant=self.ck == "reentrant")


def _block(ctx, B, S, d, H, Hkv) -> list:
    from ..modules.attention import FusedCheckpointedAttention

    torch.manual_seed(0)
    D = d // H
    base = FusedCheckpointedAttention(d, H, Hkv, causal=True, rope_theta=ROPE_THETA, device=ctx.device,
                                      dtype=ctx.dtype, backend="aten")
    x = torch.randn(B, S, d, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    dy = torch.randn(B, S, d, device=ctx.device, dtype=ctx.dtype)
    projs = [base.q_proj, base.k_proj, base.v_proj, base.o_proj]
    params = [p.weight for p in projs]
    with T.no_tf32():
        rb = copy.deepcopy(base).to(ctx.ref_dtype)
        xr = x.detach().to(ctx.ref_dtype).requires_grad_()
        EagerSdpaBlock(rb)(xr).backward(dy.to(ctx.ref_dtype))
        ref = [xr.grad] + [p.weight.grad for p in (rb.q_proj, rb.k_proj, rb.v_proj, rb.o_proj)]
        del rb, xr
    clear = [x] + list(base.parameters())

    def grads():
        return [x.grad] + [p.grad for p in params]

    def mod_variant(build, compiled=False):
        def make():
            m = build()
            return Prepared(run=lambda: m(x).backward(dy), forward=lambda: m(x), grads=grads, clear=clear,
                            params=list(base.parameters()), count_flops=not compiled)
        return make

    variants = [
        Variant("eager sdpa", "eager", mod_variant(lambda: EagerSdpaBlock(base)),
                description="projections + rotary + SDPA (default backend) + o_proj"),
        Variant("ckpt-nonreentrant", "checkpoint", mod_variant(lambda: EagerSdpaBlock(base, "non_reentrant"))),
        Variant("ckpt-reentrant", "checkpoint", mod_variant(lambda: EagerSdpaBlock(base, "reentrant"))),
    ]
    why = ctx.compile_skip_reason()
    for b in ctx.compile_budgets:
        variants.append(Variant(compile_variant_name(b), "compile", None if why else mod_variant(
            lambda b=b: CompiledBudget(EagerSdpaBlock(base), b), compiled=True), skip=why))
    for be, why in ctx.fused_backends():
        if be == "aten":
            why = None
        for dial in ("all", "qkv", False):
            def build(be=be, dial=dial):
                m = FusedCheckpointedAttention(d, H, Hkv, causal=True, rope_theta=ROPE_THETA, recompute=dial,
                                               device="meta", backend=be)
                m.q_proj, m.k_proj, m.v_proj, m.o_proj = projs
                return m
            variants.append(Variant(f"fused-{be} rc={dial}", "fused", None if why else mod_variant(build), skip=why,
                                    description=f"FusedCheckpointedAttention(recompute={dial!r}, backend={be!r})"))
    proj = 2.0 * B * S * d * (2 * H * D + 2 * Hkv * D)
    fwd_attn = attn_flops(B, H, S, D)
    shape = f"block B={B} S={S} d={d} H={H}/{Hkv}"
    return measure_variants(ctx, NAME, shape, {"part": "block", "batch": B, "seqlen": S, "d_model": d, "heads": H,
                                               "kv_heads": Hkv, "head_dim": D},
                            variants, ref_grads=ref, model_flops=3.0 * (proj + fwd_attn), err_reference="eager sdpa",
                            ratio_refs={"vs_eager": "eager sdpa", "vs_nonreentrant": "ckpt-nonreentrant",
                                        "vs_reentrant": "ckpt-reentrant"})


# ------------------------------------------------------------------------------ suite
def _targets(ctx, kernel_rows: list) -> list:
    by = {r["variant"]: r for r in kernel_rows}
    sdpa_ok = [r for r in kernel_rows if r["group"] == "sdpa" and r.get("status") == "ok" and ms(r)
               and r["variant"] != "sdpa-math"]
    best = min(sdpa_ok, key=ms) if sdpa_ok else None
    on = ctx.dev == "cuda" and ctx.dtype == torch.bfloat16
    fr = by.get("fused-triton") if ctx.dev == "cuda" else by.get("fused-aten")
    val = ms(best) / ms(fr) if (best and fr and ms(fr)) else None
    detail = (f"best SDPA backend here: {best['variant']}" if best else "no SDPA fast backend ran")
    if not on:
        detail = f"CUDA bf16 target; this run: {ctx.dev} {T.dtype_name(ctx.dtype)}; () = fused-aten vs " + (
            best["variant"] if best else "—")
    return [Target(f"attention.vs_sdpa[{kernel_rows[0]['shape']}]", NAME,
                   f"attention fwd+bwd speed / SDPA's best backend ({kernel_rows[0]['shape']})", ">=", 0.8,
                   value=val if on else None, measured=on and val is not None, detail=detail,
                   info_value=None if on else val)]


def run(ctx) -> None:
    info = ctx.suites.setdefault(NAME, {})
    kB = (KERNEL_QUICK if ctx.quick else KERNEL)[ctx.dev]
    bB = (BLOCK_QUICK if ctx.quick else BLOCK)[ctx.dev]
    info.update(description=DESCRIPTION, kernel_shape=kB, block_shape=bB,
                notes=["model FLOPs: forward once + backward twice (no recompute): kernel 3 x 4·B·H·S²·D/2 "
                       "(causal), block adds 3 x its projection GEMMs",
                       "speed ratio for the target = SDPA best time / fused time (>= 0.8 wanted)"])
    ctx.log(f"[attention] kernel B,S,H,D={kB}; block B,S,d,H,Hkv={bB}")
    krows = _kernel(ctx, *kB)
    ctx.targets.extend(t.to_json() for t in _targets(ctx, krows))
    brows = _block(ctx, *bB)
    for rows, part in ((krows, "kernel"), (brows, "block")):
        pts = [(r["saved_bytes"] / T.MiB, ms(r), r["variant"], r["group"]) for r in rows
               if r.get("saved_bytes") is not None and ms(r)]
        path = plot_tradeoff(os.path.join(ctx.out_dir or ".", f"attention_{part}.png"), pts,
                             title=f"attention {part} fwd+bwd, {rows[0]['shape']}, {T.dtype_name(ctx.dtype)} "
                                   f"on {ctx.dev}",
                             xlabel="saved activations (MiB)", ylabel="fwd+bwd time (ms, median)")
        if path:
            ctx.plots.append(path)
    ctx.snapshot()


def markdown(rows: list, suite_info: dict, device: str) -> str:
    rows = [r for r in rows if r["suite"] == NAME]
    cols = [
        ("variant", lambda r: r["variant"]),
        ("fwd+bwd ms", lambda r: fmt(ms(r), ".3f")),
        ("q20–q80 ms", lambda r: f"{r['time_ms']['q20_ms']:.3f}–{r['time_ms']['q80_ms']:.3f}"),
        ("/eager", lambda r: fmt(r["ratios"].get("vs_eager"))),
        ("/non-reentrant", lambda r: fmt(r["ratios"].get("vs_nonreentrant"))),
        ("model TFLOP/s", lambda r: fmt(r.get("tflops_model"), ".3f")),
        ("HW TFLOP/s", lambda r: fmt(r.get("tflops_hw"), ".3f")),
        ("saved MiB", lambda r: fmt(r["saved_bytes"] / T.MiB if r.get("saved_bytes") is not None else None, ".2f")),
    ]
    return per_shape_tables(rows, cols, device)
