"""patch_hf_model is never silently wrong about a config field or a padding row.

* Field walk: for each family fused_ckpt patches, each attention-related config field set to a
  non-default value that changes the math, on a tiny config: the patched model's loss and
  every gradient equal the unpatched model's (fp32). Fields the fused modules cannot compute
  must be refused with a reason that names the field; fields they compute exactly must keep
  the fused attention.
* A config field the attention's code reads that fused_ckpt does not know is refused.
* Left padding: a query row that sees no key follows what the configured attention
  implementation computes (eager: uniform weights over every key; SDPA: zero).
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_ckpt.integrations.hf import FusedHFAttention, FusedHFDecoderLayer, hf_layout, patch_hf_model  # noqa: E402

V, B, S = 96, 2, 8
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, attn_implementation="eager")
FAMILY = {
    "llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "gemma": {"head_dim": 32},
    "gemma2": {"head_dim": 32, "attn_logit_softcapping": None, "final_logit_softcapping": None,
               "layer_types": ["full_attention"]},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "olmo": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, "granite": {},
    "starcoder2": {"residual_dropout": 0.0, "embedding_dropout": 0.0}, "cohere": {}, "stablelm": {},
    "qwen3": {"head_dim": 32},
    "gpt2": None,  # its own keyword names, below
}

# (family, field, value, expected): "exact" = the fused attention stays, no refusal names the
# field and the model is equal; "refused" = some part is left alone with a reason naming the
# field (and the model is equal); "exact+refused": the attention stays fused, another part
# (the whole-layer block) is refused naming the field; "equal" = only equality is required (the
# attention is refused for another reason: packed projections, QK-norm modules, ...)
CASES = [
    ("llama", None, None, "exact"),
    ("llama", "attention_bias", True, "exact"),
    ("llama", "head_dim", 64, "exact"),
    ("llama", "rms_norm_eps", 0.1, "exact"),
    ("llama", "hidden_act", "gelu", "exact"),
    ("llama", "mlp_bias", True, "exact"),
    ("llama", "attention_dropout", 0.1, "refused"),
    ("llama", "rope_parameters", {"rope_type": "default", "rope_theta": 50.0}, "exact"),
    ("llama", "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, "refused"),
    ("mistral", "sliding_window", 4, "exact"),
    ("qwen2", "use_sliding_window", True, "exact"),  # the kernels' window
    ("gemma", "head_dim", 64, "exact"),
    ("gemma2", None, None, "exact"),
    ("gemma2", "attn_logit_softcapping", 0.05, "exact"),  # the fused op's softcap (0.05 bends every score)
    ("gemma2", "query_pre_attn_scalar", 7, "exact"),
    ("gemma2", "final_logit_softcapping", 3.0, "exact"),
    ("gemma2", "sliding_window", 4, "exact"),  # the kernels' window
    ("olmo", None, None, "exact"),
    ("olmo", "clip_qkv", 0.05, "refused"),
    ("olmo", "attention_bias", True, "exact"),
    ("granite", "attention_multiplier", 0.3, "exact"),
    ("granite", "residual_multiplier", 0.5, "exact+refused"),
    ("granite", "embedding_multiplier", 3.0, "exact"),
    ("granite", "logits_scaling", 4.0, "exact"),
    ("starcoder2", None, None, "exact"),
    ("starcoder2", "residual_dropout", 0.1, "refused"),
    ("starcoder2", "sliding_window", 4, "exact"),
    ("cohere", None, None, "equal"),  # interleaved rotary: must not be fused as rotate_half
    ("cohere", "use_qk_norm", True, "refused"),
    ("stablelm", None, None, "equal"),
    ("stablelm", "partial_rotary_factor", 0.5, "exact"),  # partial rotary: the op's rotary_dim
    ("stablelm", "qk_layernorm", True, "equal"),  # per-head norms: no layer list found
    ("qwen3", None, None, "exact"),  # q_norm/k_norm modules: the op's QK-norm
    ("phi3", "partial_rotary_factor", 0.5, "exact"),  # packed qkv_proj, partial rotary
    ("gpt2", "scale_attn_by_inverse_layer_idx", True, "equal"),  # one layer: / (0 + 1) changes nothing
    ("gpt2", "reorder_and_upcast_attn", True, "equal"),
    ("gpt2", "activation_function", "relu", "equal"),
]


def _config(kind, field=None, value=None, **kw):
    if kind == "gpt2":
        base = dict(vocab_size=V, n_positions=32, n_embd=64, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, attn_implementation="eager")
    else:
        base = {**BASE, **FAMILY[kind]}
    if field is not None:
        base[field] = value
    if field == "sliding_window" and kind == "gemma2":
        base["layer_types"] = ["sliding_attention"]
    if field == "use_sliding_window":
        base.update(sliding_window=4, max_window_layers=0)
    if field == "partial_rotary_factor" and kind == "stablelm":
        base["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": value}
    return transformers.AutoConfig.for_model(kind, **{**base, **kw})


def _pair(cfg):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).train()
    return ref, copy.deepcopy(ref)


def _close(a, b, name):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


def _assert_same_training_step(ref, model, ids, **kw):
    """Same loss and every gradient (Hugging Face layout), with the same RNG stream for dropout."""
    losses, logits = [], []
    for m in (ref, model):
        m.zero_grad()
        torch.manual_seed(1)
        out = m(ids, labels=ids, use_cache=False, **kw)
        out.loss.backward()
        losses.append(out.loss.detach())
        if out.logits is None:  # the loss came through the fused linear cross-entropy: same call without labels
            torch.manual_seed(1)
            with torch.no_grad():
                out = m(ids, use_cache=False, **kw)
        logits.append(out.logits.detach())
    _close(losses[1], losses[0], "loss")
    assert torch.isfinite(losses[0])
    g = hf_layout(model, {n: p.grad for n, p in model.named_parameters()})
    g_ref = {n: p.grad for n, p in ref.named_parameters()}
    assert set(g) == set(g_ref)
    for n, t in g_ref.items():
        if t is None:
            assert g[n] is None, n
        else:
            _close(g[n], t, n)
    return logits[0]


@pytest.mark.parametrize("kind,field,value,expected", CASES,
                         ids=[f"{k}-{f}={v}" if f else f"{k}-default" for k, f, v, _ in CASES])
def test_config_field_is_computed_exactly_or_refused(kind, field, value, expected):
    cfg = _config(kind, field, value)
    if field is not None:  # the value reached the config (no silently dropped keyword)
        got = getattr(cfg, field, None)
        if field == "partial_rotary_factor":
            got = cfg.rope_parameters.get(field, got)
        assert got == value, (field, got)
    ref, model = _pair(cfg)
    report = patch_hf_model(model, "full", backend="aten")
    fused_attn = [m for m in model.modules() if isinstance(m, FusedHFAttention)]
    named = [r for r in report.left_alone if field is not None and repr(field)[1:-1] in r[2]]
    if expected.startswith("exact"):
        assert fused_attn, str(report)
    if expected == "exact":
        assert not named, named
    if expected.endswith("refused"):
        assert named, str(report)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    logits = _assert_same_training_step(ref, model, ids)
    if field is not None and expected != "equal":
        # non-vacuous: the field changes this model's output
        default_ref, _ = _pair(_config(kind))
        torch.manual_seed(1)
        with torch.no_grad():
            default_logits = default_ref(ids, use_cache=False).logits
        assert not torch.allclose(default_logits, logits, rtol=2e-5, atol=2e-6), f"{field}={value} changes nothing"


def test_an_unknown_config_field_read_by_the_attention_is_refused():
    """A field fused_ckpt has no rule for is never ignored: the attention that reads it is left
    alone, and the reason names it."""
    base = transformers.models.llama.modeling_llama.LlamaAttention

    class ScaledAttention(base):
        def forward(self, hidden_states, *args, **kwargs):
            out, w = super().forward(hidden_states, *args, **kwargs)
            return out * self.config.fancy_output_scale, w

    cfg = _config("llama")
    cfg.fancy_output_scale = 1.5
    ref, model = _pair(cfg)
    for m in (ref, model):
        for i, layer in enumerate(m.model.layers):
            new = ScaledAttention(m.config, i)
            new.load_state_dict(layer.self_attn.state_dict())
            layer.self_attn = new
    model.load_state_dict(ref.state_dict())
    report = patch_hf_model(model, "full", backend="aten")
    rows = [r for r in report.left_alone if r[0].endswith("self_attn")]
    assert rows and all("fancy_output_scale" in r[2] for r in rows), str(report)
    assert not any(isinstance(m, FusedHFAttention) for m in model.modules())
    _assert_same_training_step(ref, model, torch.randint(0, V, (B, S)))


# ----------------------------------------------------------------------------- left padding
def _left_padded():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (3, S), generator=gen)
    mask = torch.ones(3, S, dtype=torch.long)
    mask[1, :3] = 0      # three pad positions, then real tokens
    mask[2, :S - 1] = 0  # only the last token is real
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("impl,blocks,backend", [("eager", True, "aten"), ("eager", False, "aten"),
                                                 ("eager", True, "triton"), ("sdpa", True, "aten")])
def test_left_padding_matches_the_attention_implementation(impl, blocks, backend):
    """HF's labels include the pad positions' predictions (the last pad position predicts the first
    real token), so what a query row that sees no key outputs enters the loss: eager gives the
    mean of V over all keys (every score gets the same large negative mask), SDPA gives zero.
    The patched model computes the same loss and gradients as the configured implementation."""
    cfg = _config("llama", num_hidden_layers=2, attn_implementation=impl)
    ref, model = _pair(cfg)
    report = patch_hf_model(model, "full", backend=backend, blocks=blocks)
    assert len([m for m in model.modules() if isinstance(m, FusedHFAttention)]) == 2, str(report)
    assert all(isinstance(m, FusedHFDecoderLayer) for m in model.model.layers) == blocks
    ids, mask = _left_padded()
    logits = _assert_same_training_step(ref, model, ids, attention_mask=mask)
    # non-vacuous: the rows that see no key change the output (the two implementations differ)
    other = "sdpa" if impl == "eager" else "eager"
    ref_other, _ = _pair(_config("llama", num_hidden_layers=2, attn_implementation=other))
    with torch.no_grad():
        logits_other = ref_other(ids, attention_mask=mask, use_cache=False).logits
    assert not torch.allclose(logits_other, logits, rtol=2e-5, atol=2e-6)
