"""Block suite: one Hugging Face ``LlamaDecoderLayer`` (built from a small ``LlamaConfig``, no
download), forward + backward, every way of checkpointing it side by side.

===========================  ======================================================================
hf eager                     the unpatched layer (SDPA attention), nothing recomputed
hf ckpt-nonreentrant         ``torch.utils.checkpoint(layer, x, use_reentrant=False)``; also reentrant
compile (budget=b)           ``torch.compile`` of the unpatched layer with activation_memory_budget b
patched-<be> <policy>        :func:`fused_ckpt.integrations.hf.patch_hf_model` (fused MLP,
                             attention and norms; the layer becomes a FusedHFDecoderLayer) with
                             the policy: full (whole layer), none, Selective(ffn=True),
                             Selective(ffn=True, attention="qkv"); and "full, modules only"
                             (``blocks=False``: per-module dials); backend triton (CUDA) / aten
FusedCheckpointedBlock-<be>  when the package has it: the whole layer as one fused block,
                             ``recompute="full"`` (keeps x and norm statistics) and ``None``
===========================  ======================================================================

Gradients (of the layer input and of ``o_proj.weight``) are checked against the unpatched layer
in float64 (CPU) / float32 (CUDA). Model FLOPs = 3 x the forward's GEMMs and attention.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import _timing as T
from ._harness import Prepared, Variant, measure_variants
from ._report import fmt, ms, plot_tradeoff, per_shape_tables
from .ffn import CompiledBudget, compile_variant_name

NAME = "block"
DESCRIPTION = "one Llama decoder layer: unpatched, checkpointed, compiled, patch_hf_model policies, fused block"

# hidden, intermediate, heads, kv heads, batch, seq
SHAPES = {"cpu": (1024, 2816, 16, 4, 2, 512), "cuda": (4096, 11008, 32, 32, 1, 4096)}
QUICK = {"cpu": (64, 176, 2, 1, 1, 32), "cuda": (2048, 5504, 16, 16, 1, 2048)}


def llama_config(hidden: int, inter: int, heads: int, kv: int, layers: int = 1, vocab: int = 256, **kw):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(4096, kw.pop("max_pos", 0)),
        attn_implementation="sdpa", use_cache=False, **kw)


def fused_block_class():
    """``fused_ckpt.FusedCheckpointedBlock`` if the package has one (public API first)."""
    import fused_ckpt

    cls = getattr(fused_ckpt, "FusedCheckpointedBlock", None)
    if cls is None:
        try:
            from ..modules.block import FusedCheckpointedBlock as cls  # noqa: N813
        except ImportError:
            return None
    return cls


def fused_block_from_hf(cls, layer, config, recompute, backend):
    """A FusedCheckpointedBlock with the HF layer's weights (gate and up rows stacked into fc1)."""
    from ..modules.attention import _hf_rope_theta

    a = layer.self_attn
    dev, dt = a.q_proj.weight.device, a.q_proj.weight.dtype
    blk = cls(config.hidden_size, config.num_attention_heads, config.intermediate_size,
              n_kv_heads=config.num_key_value_heads, activation="swiglu", norm="rmsnorm",
              norm_eps=config.rms_norm_eps, rope_theta=_hf_rope_theta(config), bias=False,
              recompute=recompute, device=dev, dtype=dt, backend=backend)
    with torch.no_grad():
        blk.input_layernorm.weight.copy_(layer.input_layernorm.weight)
        blk.post_attention_layernorm.weight.copy_(layer.post_attention_layernorm.weight)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(blk.self_attn, n).weight.copy_(getattr(a, n).weight)
        m = layer.mlp
        blk.mlp.fc1.weight.copy_(torch.cat([m.gate_proj.weight, m.up_proj.weight], 0))
        blk.mlp.fc2.weight.copy_(m.down_proj.weight)
    return blk


class _Holder(nn.Module):
    """A one-layer 'model' for patch_hf_model: ``layers`` and ``config``."""

    def __init__(self, layer, config):
        super().__init__()
        self.layers = nn.ModuleList([layer])
        self.config = config


class _HFCall(nn.Module):
    """Calls a decoder layer the way LlamaModel does (position embeddings, causal, no mask),
    optionally under torch.utils.checkpoint."""

    def __init__(self, layer, pos_emb, position_ids, ck=None):
        super().__init__()
        self.layer, self.pos_emb, self.position_ids, self.ck = layer, pos_emb, position_ids, ck

    def _call(self, x):
        out = self.layer(x, attention_mask=None, position_ids=self.position_ids, position_embeddings=self.pos_emb)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, x):
        if self.ck is None:
            return self._call(x)
        return checkpoint(self._call, x, use_reentrant=self.ck == "reentrant")


def policies():
    from ..policy import Selective

    return [("full", "full"), ("none", "none"), ("Selective(ffn)", Selective(ffn=True, attention=False)),
            ("Selective(ffn, attn=qkv)", Selective(ffn=True, attention="qkv"))]


def layer_flops(hidden, inter, heads, kv, batch, seq) -> float:
    D = hidden // heads
    T_ = batch * seq
    gemm = 2.0 * T_ * (hidden * (heads + 2 * kv) * D + heads * D * hidden + 3 * hidden * inter)
    attn = 4.0 * batch * heads * seq * seq * D / 2
    return gemm + attn


def run(ctx) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from ..integrations.hf import patch_hf_model

    hidden, inter, heads, kv, B, S = (QUICK if ctx.quick else SHAPES)[ctx.dev]
    info = ctx.suites.setdefault(NAME, {})
    cfg = llama_config(hidden, inter, heads, kv)
    info.update(description=DESCRIPTION, config=dict(hidden_size=hidden, intermediate_size=inter,
                                                     num_attention_heads=heads, num_key_value_heads=kv),
                batch=B, seq=S, notes=["grad error: max over dx and dW(o_proj) against the unpatched layer in "
                                       + T.dtype_name(ctx.ref_dtype)])
    shape = f"LlamaDecoderLayer d={hidden} f={inter} H={heads}/{kv} B={B} S={S}"
    ctx.log(f"[block] {shape}")
    torch.manual_seed(0)
    base = LlamaDecoderLayer(cfg, 0).to(ctx.device, ctx.dtype).train()
    # LlamaRMSNorm weights start at 1: perturb them so the norms' gradients are not degenerate
    with torch.no_grad():
        for n in (base.input_layernorm, base.post_attention_layernorm):
            n.weight.add_(0.1 * torch.randn_like(n.weight))
    rope = LlamaRotaryEmbedding(cfg).to(ctx.device)
    pos = torch.arange(S, device=ctx.device)[None].expand(B, S)
    x = torch.randn(B, S, hidden, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    dy = torch.randn(B, S, hidden, device=ctx.device, dtype=ctx.dtype)
    pe = rope(x, pos)
    with T.no_tf32():
        rl = copy.deepcopy(base).to(ctx.ref_dtype)
        xr = x.detach().to(ctx.ref_dtype).requires_grad_()
        _HFCall(rl, rope(xr, pos), pos)(xr).backward(dy.to(ctx.ref_dtype))
        ref = [xr.grad, rl.self_attn.o_proj.weight.grad]
        del rl, xr

    def hf_variant(ck=None, patch=None, compile_budget=None):
        def make():
            layer = copy.deepcopy(base)
            if patch is not None:
                holder = _Holder(layer, cfg)
                be, pol, blocks = patch
                patch_hf_model(holder, pol, backend=be, batch=B, seq=S, blocks=blocks)
                layer = holder.layers[0]  # a FusedHFDecoderLayer when blocks=True
            call = _HFCall(layer, pe, pos, ck)
            m = CompiledBudget(call, compile_budget) if compile_budget is not None else call
            params = list(layer.parameters())
            clear = [x] + params
            return Prepared(run=lambda: m(x).backward(dy), forward=lambda: m(x),
                            grads=lambda: [x.grad, layer.self_attn.o_proj.weight.grad], clear=clear, params=params,
                            count_flops=compile_budget is None)
        return make

    variants = [Variant("hf eager", "eager", hf_variant(), description="unpatched LlamaDecoderLayer"),
                Variant("hf ckpt-nonreentrant", "checkpoint", hf_variant("non_reentrant")),
                Variant("hf ckpt-reentrant", "checkpoint", hf_variant("reentrant"))]
    why = ctx.compile_skip_reason()
    for b in ctx.compile_budgets:
        variants.append(Variant(compile_variant_name(b), "compile",
                                None if why else hf_variant(compile_budget=b), skip=why))
    backends = ctx.fused_backends()
    for be, why in backends:
        for label, pol in policies():
            variants.append(Variant(f"patched-{be} {label}", "fused",
                                    None if why else hf_variant(patch=(be, pol, True)),
                                    skip=why, description=f"patch_hf_model(policy={label}, backend={be!r})"))
        variants.append(Variant(f"patched-{be} full, modules only", "fused",
                                None if why else hf_variant(patch=(be, "full", False)), skip=why,
                                description=f"patch_hf_model(policy=full, blocks=False, backend={be!r})"))
    cls = fused_block_class()
    for be, why in backends:
        for rc in ("full", None):
            def make_block(be=be, rc=rc):
                blk = fused_block_from_hf(cls, base, cfg, rc, be).train()
                params = list(blk.parameters())
                return Prepared(run=lambda: blk(x).backward(dy), forward=lambda: blk(x),
                                grads=lambda: [x.grad, blk.self_attn.o_proj.weight.grad], clear=[x] + params,
                                params=params)
            reason = why or (None if cls is not None else "fused_ckpt.FusedCheckpointedBlock not available")
            variants.append(Variant(f"FusedCheckpointedBlock-{be} rc={rc}", "fused block",
                                    None if reason else make_block, skip=reason))
    measure_variants(ctx, NAME, shape, {"hidden_size": hidden, "intermediate_size": inter, "heads": heads,
                                        "kv_heads": kv, "batch": B, "seq": S},
                     variants, ref_grads=ref, model_flops=3.0 * layer_flops(hidden, inter, heads, kv, B, S),
                     err_reference="hf eager",
                     ratio_refs={"vs_eager": "hf eager", "vs_nonreentrant": "hf ckpt-nonreentrant",
                                 "vs_reentrant": "hf ckpt-reentrant"})
    rows = [r for r in ctx.rows if r["suite"] == NAME]
    eager_b = next((r.get("saved_bytes") for r in rows if r["variant"] == "hf eager"), None)
    for r in rows:
        if eager_b and r.get("saved_bytes"):
            r["saved_vs_eager"] = r["saved_bytes"] / eager_b
    pts = [(r["saved_bytes"] / T.MiB, ms(r), r["variant"], r["group"]) for r in rows
           if r.get("saved_bytes") is not None and ms(r)]
    path = plot_tradeoff(os.path.join(ctx.out_dir or ".", "block.png"), pts,
                         title=f"{shape}, {T.dtype_name(ctx.dtype)} on {ctx.dev}: fwd+bwd",
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
        ("/reentrant", lambda r: fmt(r["ratios"].get("vs_reentrant"))),
        ("model TFLOP/s", lambda r: fmt(r.get("tflops_model"), ".3f")),
        ("HW TFLOP/s", lambda r: fmt(r.get("tflops_hw"), ".3f")),
        ("saved MiB", lambda r: fmt(r["saved_bytes"] / T.MiB if r.get("saved_bytes") is not None else None, ".2f")),
        ("saved / eager", lambda r: fmt(r.get("saved_vs_eager"), ".3f")),
    ]
    return per_shape_tables(rows, cols, device)
