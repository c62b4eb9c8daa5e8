"""The planner's built-in Qwen3-8B, Gemma2-9B and GPT-NeoX-20B sizes.

Parameter counts are checked against the Hugging Face model classes built on the meta device
from the published config values (written out here, not read from fused_ckpt). Saved bytes and
recompute FLOPs are checked against the formulas written out from first principles below
(bf16, e = 2 bytes; T = B * S tokens): what each fused part keeps for backward, per the contracts
in README "The recompute contract" and fused_ckpt/ops/block.py.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dataclasses  # noqa: E402

from fused_ckpt.configs import BUILTIN_CONFIGS, ModelConfig, load_config  # noqa: E402
from fused_ckpt.planner import VERDICT_FULL, VERDICT_SKIP, model_flops, plan  # noqa: E402

B, S = 2, 256
T = B * S
E = 2  # bf16
BIG = 10**15

# published config.json values (Qwen/Qwen3-8B, google/gemma-2-9b, EleutherAI/gpt-neox-20b)
HF = {
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                     tie_word_embeddings=False, rope_theta=1000000.0)),
    "gemma2-9b": ("Gemma2Config", dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                                       tie_word_embeddings=True)),
    "gpt-neox-20b": ("GPTNeoXConfig", dict(hidden_size=6144, intermediate_size=24576, num_hidden_layers=44,
                                           num_attention_heads=64, vocab_size=50432, tie_word_embeddings=False,
                                           use_parallel_residual=True, rotary_pct=0.25)),
}


@pytest.mark.parametrize("name", sorted(HF))
def test_parameter_count_matches_the_hugging_face_model(name):
    cls, kw = HF[name]
    cfg = getattr(transformers, cls)(**kw)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert BUILTIN_CONFIGS[name].num_parameters() == n
    assert {"qwen3-8b": 8.1e9, "gemma2-9b": 9.2e9, "gpt-neox-20b": 20.5e9}[name] < n  # the published sizes


@pytest.mark.parametrize("name", sorted(HF))
def test_the_hugging_face_config_reads_as_the_builtin(name):
    """load_config of the published Hugging Face config gives the built-in, field for field."""
    cls, kw = HF[name]
    got = load_config(getattr(transformers, cls)(**kw))
    assert dataclasses.replace(got, name=name) == BUILTIN_CONFIGS[name]


TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("cls,kw", [
    ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32)),
    ("Qwen3Config", dict(num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True)),
    ("Gemma2Config", dict(num_key_value_heads=2, head_dim=32)),
    ("Gemma2Config", dict(num_key_value_heads=1, head_dim=64, attention_bias=True, tie_word_embeddings=False)),
    ("GPTNeoXConfig", dict(rotary_pct=0.5)),
    ("GPTNeoXConfig", dict(use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True)),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_parameter_count_of_tiny_family_models(cls, kw):
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**TINY, **kw))
    assert load_config(model.config).num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cls,kw,msg", [
    ("Gemma2Config", dict(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported for gemma2"),
    ("Gemma2Config", dict(layer_types=["full_attention", "sliding_attention"]), "layer_types .* are not supported"),
    ("GPTNeoXConfig", dict(hidden_act="relu"), "hidden_act 'relu' is not supported for gpt_neox"),
    ("GPTNeoXConfig", dict(hidden_dropout=0.1), "hidden_dropout=0.1: dropout masks are not modelled"),
    ("Qwen3Config", dict(use_sliding_window=True, sliding_window=16), "use_sliding_window=true is not supported"),
])
def test_settings_the_planner_does_not_model_are_refused(cls, kw, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(getattr(transformers, cls)(**TINY, **kw))


def _layer_rows(p, i):
    return {r.kind: r for r in p.checkpoint.layer_rows(i)}


def _attn_core(H, D):
    return 4 * B * H * S * S * D // 2  # causal forward QK^T and PV


# Per layer, hand-written: (d, f, H, Hkv, D, V, F1 = fc1 rows, rotated dims,
#   norms' bytes under the site dials, "full" bytes, extra "full" FLOPs besides the attention half)
def _expected(name):
    if name == "qwen3-8b":  # pre-norm, 2 RMSNorms, SwiGLU, per-head QK-norm (nothing saved for it)
        d, f, H, Hkv, D, V = 4096, 12288, 32, 8, 128, 151936
        F1 = 2 * f
        norms = 2 * (T * d * E + 4 * T)             # each norm: input + fp32 rstd
        full = T * d * E + 2 * 4 * T                # x + both norms' rstd
        ffn_fwd = 0
        globals_ = 8 * T + (T * d * E + 4 * T)      # token ids; final RMSNorm
        eager_head = T * d * E + 4 * T * V + 8 * T + 4
    elif name == "gemma2-9b":  # sandwich: 4 RMSNorms, GeGLU(tanh), tied, sqrt(d) embedding scale, softcap
        d, f, H, Hkv, D, V = 3584, 14336, 16, 8, 256, 256000
        F1 = 2 * f
        norms = 4 * (T * d * E + 4 * T)
        full = T * d * E + 4 * 4 * T                # x + four rstd rows
        ffn_fwd = 2 * T * d * F1 + 2 * T * f * d    # the FFN output is N4's input: re-run in backward
        globals_ = 8 * T + E + (T * d * E + 4 * T)  # token ids, the 0-dim scale, final RMSNorm
        eager_head = T * d * E + T * V * E + 4 * T * V + 8 * T + 4  # + tanh's output
    else:  # GPT-NeoX: parallel residual, 2 LayerNorms reading the same x, ungated GELU MLP
        d, f, H, Hkv, D, V = 6144, 24576, 64, 64, 96, 50432
        F1 = f
        norms = T * d * E + 2 * (2 * 4 * T)         # x once; each LayerNorm's mean + rstd
        full = T * d * E + 2 * 4 * T                # x + N1's mean + rstd (N2 shares them)
        ffn_fwd = 0
        globals_ = 8 * T + (T * d * E + 2 * 4 * T)  # token ids; final LayerNorm
        eager_head = T * d * E + 4 * T * V + 8 * T + 4
    attn_max = T * (d * E + H * 4 + H * D * E + (H + 2 * Hkv) * D * E)  # x, lse, o, q, k, v
    ffn_max = T * (d + F1 + f) * E                                       # x, pre-activation, activation
    full_flops = (2 * T * d * (H + 2 * Hkv) * D + _attn_core(H, D)       # q/k/v and the attention again
                  + 2 * T * H * D * d + 2 * T * d * F1 + ffn_fwd)        # o_proj, up-projection (+ FFN fwd)
    head_fused = T * (d * E + 4 + 8)                                     # x, fp32 lse, int64 targets
    head_no_recompute = T * d * E + V * d * E                            # dX and dW
    return dict(d=d, f=f, H=H, Hkv=Hkv, D=D, V=V, F1=F1, norms=norms, full=full, full_flops=full_flops,
                globals=globals_, eager_head=eager_head, head_fused=head_fused, attn_max=attn_max,
                ffn_max=ffn_max, head_no_recompute=head_no_recompute)


@pytest.mark.parametrize("name", sorted(HF))
def test_saved_bytes_and_recompute_flops_from_first_principles(name):
    x = _expected(name)
    L = BUILTIN_CONFIGS[name].num_layers
    # no budget pressure: no recompute anywhere (head: the smaller of eager and recompute=False)
    hi = plan(name, B, S, "bf16", BIG)
    assert hi.verdict == VERDICT_SKIP
    head_max = min(x["eager_head"], x["head_no_recompute"])
    for i in range(L):
        rows = _layer_rows(hi, i)
        assert rows["attention"].dial is False and rows["attention"].saved_bytes == x["attn_max"]
        assert rows["ffn"].dial == "none" and rows["ffn"].saved_bytes == x["ffn_max"]
        assert rows["fixed"].saved_bytes == x["norms"]
    assert hi.activation_bytes == L * (x["attn_max"] + x["ffn_max"] + x["norms"]) + x["globals"] + head_max
    assert hi.max_activation_bytes == hi.activation_bytes and hi.recompute_flops == 0
    # the least memory: every layer a whole-layer "full" block, the head fused with recompute
    lo = plan(name, B, S, "bf16", hi.min_activation_bytes)
    assert lo.verdict == VERDICT_FULL
    for i in range(L):
        blk = _layer_rows(lo, i)["block"]
        assert (blk.saved_bytes, blk.recompute_flops) == (x["full"], x["full_flops"])
    assert lo.activation_bytes == L * x["full"] + x["globals"] + x["head_fused"]
    assert lo.recompute_flops == L * x["full_flops"] + 2 * T * x["d"] * x["V"]
    # the step: GEMMs x3 (forward, two backward products), causal attention x3.5, the LM head x3
    gemm = 2 * T * (x["d"] * (x["H"] + 2 * x["Hkv"]) * x["D"] + x["H"] * x["D"] * x["d"]
                    + (x["F1"] + x["f"]) * x["d"])
    core = _attn_core(x["H"], x["D"])
    assert model_flops(BUILTIN_CONFIGS[name], B, S) == L * (3 * gemm + core + 5 * core // 2) + 3 * 2 * T * x["d"] * x["V"]


def test_gemma2_windows_every_other_layer_beyond_the_window():
    """Gemma2 windows layers 0, 2, 4, ... (4096 tokens): the fused kernels apply the window at every
    length, so those layers are whole blocks like the others (same saved bytes as full attention)
    and the note says only that their attention FLOPs are counted as full causal."""
    p = plan("gemma2-9b", 1, 8192, "bf16", BIG, include_loss=False)
    lo = plan("gemma2-9b", 1, 8192, "bf16", p.min_activation_bytes, include_loss=False)
    kinds = [set(_layer_rows(lo, i)) for i in range(4)]
    assert kinds == [{"block"}] * 4
    assert any("sliding window 4096 < seq 8192 (layers 0, 2, 4, ...)" in n and "over-estimate" in n for n in lo.notes)
    assert not any("sliding window" in n for n in plan("gemma2-9b", 1, 4096, "bf16", BIG).notes)


def test_neox_head_dim_96_is_flagged():
    p = plan("gpt-neox-20b", 1, 128, "bf16", BIG)
    assert any(n.startswith("head_dim 96: the fused attention kernels take (32, 64, 128, 256)") for n in p.notes)
    assert not any("head_dim" in n for n in plan("qwen3-8b", 1, 128, "bf16", BIG).notes)


@pytest.mark.parametrize("kw,msg", [
    (dict(activation="swish"), "activation 'swish' is not one of"),
    (dict(norm="batchnorm"), "norm must be 'rmsnorm' or 'layernorm'"),
    (dict(placement="middle"), "placement must be one of"),
    (dict(rotary_dim=3), "rotary_dim must be an even int in \\(0, head_dim=16\\]"),
    (dict(rotary_dim=32), "rotary_dim must be an even int"),
    (dict(final_logit_softcap=0.0), "final_logit_softcap must be a positive number"),
    (dict(window_every=0), "window_every must be a positive int"),
])
def test_bad_config_fields_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig("tiny", 64, 96, 2, 4, 2, 100, **kw)
