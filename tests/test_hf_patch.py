"""patch_hf_model on tiny random Hugging Face models (built from configs, nothing downloaded):
same logits, loss and every gradient as the unpatched model, same training curve, what is
replaced and what is left alone, policies on patched models, and the interplay with Hugging
Face's own activation checkpointing."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_ckpt import FusedCheckpointedFFN  # noqa: E402
from fused_ckpt.integrations.hf import FusedHFAttention, hf_layout, hf_state_dict, patch_hf_model  # noqa: E402
from fused_ckpt.planner import plan  # noqa: E402
from fused_ckpt.policy import EveryN, Selective, apply_checkpointing, is_checkpointed  # noqa: E402

from .helpers import SavedTensors  # noqa: E402
from .helpers import unique_saved_bytes  # noqa: E402
from .test_policy import SavedByModule  # noqa: E402

V, B, S = 96, 2, 8
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, attn_implementation="eager")


def _config(kind, **kw):
    if kind == "llama":
        return transformers.LlamaConfig(**{**COMMON, **kw})
    if kind == "mistral":
        return transformers.MistralConfig(**{**COMMON, "sliding_window": None, **kw})
    if kind == "qwen2":
        return transformers.Qwen2Config(**{**COMMON, **kw})
    if kind == "gemma":
        return transformers.GemmaConfig(**{**COMMON, "head_dim": 32, "hidden_activation": "gelu_pytorch_tanh", **kw})
    if kind == "phi3":
        return transformers.Phi3Config(**{**COMMON, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "pad_token_id": 0,
                                          "bos_token_id": 1, "eos_token_id": 2, **kw})
    if kind == "gpt2":
        return transformers.GPT2Config(**{**dict(vocab_size=V, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                 attn_implementation="eager"), **kw})
    raise KeyError(kind)


def _pair(kind, **kw):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(_config(kind, **kw)).train()
    return ref, copy.deepcopy(ref)


# what each family gets: fused attention?, the MLP's fused activation
EXPECTED = {"llama": (True, "swiglu"), "mistral": (True, "swiglu"), "qwen2": (True, "swiglu"),
            "gemma": (True, "geglu_tanh"), "phi3": (False, "swiglu"), "gpt2": (False, "gelu_tanh")}


def _close(a, b, name):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_patched_model_matches_unpatched(kind):
    ref, model = _pair(kind)
    report = patch_hf_model(model, "full", backend="aten")
    fused_attn, act = EXPECTED[kind]
    norms = [r for r in report.replaced if r[2] == "FusedRMSNorm"]
    rest = [r for r in report.replaced if r[2] != "FusedRMSNorm"]
    replaced = {n.rsplit(".", 1)[-1]: d for n, _, d in rest}
    assert len(rest) == 2 * (1 + fused_attn)
    # Llama-style RMSNorms (2 per layer + the final norm) become FusedRMSNorm; Gemma's (1 + w)
    # norm, GPT-2's LayerNorm and Phi-3's are checked by evaluation, not by name
    llama_norms = kind in ("llama", "mistral", "qwen2", "phi3")
    assert len(norms) == (2 * 2 + 1 if llama_norms else 0), norms
    report.left_alone = [r for r in report.left_alone if "RMSNorm" not in r[2] and "Norm" not in r[1]]
    assert any(act in d for d in replaced.values())
    ffns = [m for m in model.modules() if isinstance(m, FusedCheckpointedFFN)]
    assert len(ffns) == 2 and all(m.activation == act and m.recompute is True for m in ffns)
    attns = [m for m in model.modules() if isinstance(m, FusedHFAttention)]
    assert len(attns) == (2 if fused_attn else 0) and all(m.recompute == "all" for m in attns)
    if not fused_attn:
        assert len(report.left_alone) == 2
        assert all("packed" in reason for _, _, reason in report.left_alone), report.left_alone
    ids = torch.randint(0, V, (B, S))
    out_ref = ref(ids, labels=ids, use_cache=False)
    out = model(ids, labels=ids, use_cache=False)
    _close(out.logits, out_ref.logits, "logits")
    _close(out.loss, out_ref.loss, "loss")
    out_ref.loss.backward()
    out.loss.backward()
    g_ref = {n: p.grad for n, p in ref.named_parameters()}
    g = hf_layout(model, {n: p.grad for n, p in model.named_parameters()})
    assert set(g) == set(g_ref)
    for n in g_ref:
        _close(g[n], g_ref[n], n)
    # the state dict in Hugging Face layout loads into the unpatched model
    fresh = transformers.AutoModelForCausalLM.from_config(_config(kind)).train()
    fresh.load_state_dict(hf_state_dict(model))
    _close(fresh(ids, use_cache=False).logits, out_ref.logits, "reloaded logits")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_curves_agree(kind):
    ref, model = _pair(kind)
    patch_hf_model(model, EveryN(2), backend="aten")  # mixed dials: full in layer 0, none in layer 1
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (ref, model)]
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, V, (4, S), generator=gen) for _ in range(2)]
    curve = []
    for step in range(20):
        ids = data[step % 2]
        losses = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            loss = m(ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6), (step, losses)
        curve.append(losses[0])
    assert curve[-1] < 0.8 * curve[0]  # it trained


def test_padding_mask_is_honoured():
    ref, model = _pair("llama")
    patch_hf_model(model, "full", backend="aten")
    ids = torch.randint(0, V, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    out_ref = ref(ids, attention_mask=mask, labels=labels, use_cache=False)
    out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
    keep = mask.bool()
    _close(out.logits[keep], out_ref.logits[keep], "logits at real tokens")
    _close(out.loss, out_ref.loss, "loss")


def test_generation_uses_the_cache_path():
    ref, model = _pair("llama")
    patch_hf_model(model, "full", backend="aten")
    ref.eval(), model.eval()
    ids = torch.randint(3, V, (1, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_training_with_a_cache_warns_and_matches():
    ref, model = _pair("llama")
    patch_hf_model(model, "full", backend="aten")
    ids = torch.randint(0, V, (B, S))
    with pytest.warns(UserWarning, match="does not fill the KV cache"):
        out = model(ids, labels=ids)  # use_cache defaults to True
    _close(out.loss, ref(ids, labels=ids).loss, "loss")


# ----------------------------------------------------------------------------- left alone
def test_sliding_window_attention_is_left_alone():
    _, model = _pair("mistral", sliding_window=4)
    report = patch_hf_model(model, "full", backend="aten")
    attn = [r for r in report.left_alone if r[0].endswith("self_attn")]
    assert len(attn) == 2 and all("sliding-window" in r[2] for r in attn)
    assert sum(isinstance(m, FusedCheckpointedFFN) for m in model.modules()) == 2


def test_activation_must_match_the_config():
    """Detection uses the config's activation and the function the module computes."""
    _, model = _pair("llama")
    model.config.hidden_act = "gelu"  # the modules still compute SiLU
    report = patch_hf_model(model, None, backend="aten")
    mlps = [r for r in report.left_alone if r[0].endswith("mlp")]
    assert len(mlps) == 2 and all("differs from what the module computes" in r[2] for r in mlps)


def test_active_dropout_is_left_alone():
    _, model = _pair("gpt2", resid_pdrop=0.1)
    report = patch_hf_model(model, None, backend="aten")
    assert any(n.endswith("mlp") and "dropout" in why for n, _, why in report.left_alone)
    assert "left alone" in str(report)


# ----------------------------------------------------------------------------- policies on patched models
def test_gpt2_policies_checkpoint_the_unfused_attention():
    ref, model = _pair("gpt2")
    report = patch_hf_model(model, Selective(ffn=True, attention=True), backend="aten", batch=B, seq=S)
    attn = [model.transformer.h[i].attn for i in range(2)]
    assert all(is_checkpointed(a) for a in attn)
    rows = {r.module: r for r in report.plan.rows}
    assert rows["transformer.h.0.attn"].kind == "checkpoint"
    assert rows["transformer.h.0.attn"].saved_bytes == B * S * 64 * 4  # the attention input
    ids = torch.randint(0, V, (B, S))
    mods = dict(model.named_modules())
    with SavedByModule([mods[r.module] for r in report.plan.rows], model.parameters()) as s:
        out = model(ids, labels=ids, use_cache=False)
    for r in report.plan.rows:
        assert s.bytes(mods[r.module]) == r.saved_bytes, r
    out.loss.backward()
    out_ref = ref(ids, labels=ids, use_cache=False)
    out_ref.loss.backward()
    g = hf_layout(model, {n: p.grad for n, p in model.named_parameters()})
    for n, p in ref.named_parameters():
        _close(g[n], p.grad, n)
    plan2 = apply_checkpointing(model, Selective(ffn=True, attention=False))
    assert not any(is_checkpointed(a) for a in attn)
    assert [r.dial for r in plan2.rows if r.kind == "ffn"] == [True, True]


def test_phi3_policy_rows():
    _, model = _pair("phi3")
    report = patch_hf_model(model, "full", backend="aten", batch=B, seq=S)
    kinds = sorted((r.module, r.kind, r.dial) for r in report.plan.rows)
    assert kinds == [("model.layers.0.mlp", "ffn", True), ("model.layers.0.self_attn", "checkpoint", True),
                     ("model.layers.1.mlp", "ffn", True), ("model.layers.1.self_attn", "checkpoint", True)]
    ids = torch.randint(0, V, (B, S))
    mods = dict(model.named_modules())
    with SavedByModule([mods[r.module] for r in report.plan.rows], model.parameters()) as s:
        model(ids, labels=ids, use_cache=False).loss.backward()
    for r in report.plan.rows:
        assert s.bytes(mods[r.module]) == r.saved_bytes, r


# ----------------------------------------------------------------------------- HF checkpointing interplay
def _enable_hf_checkpointing(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()


def _whole_model_bytes(model, ids):
    params = list(model.parameters())
    with SavedTensors() as s:
        out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    return unique_saved_bytes(s.saved, params)


def test_hf_checkpointing_before_patching_is_switched_off():
    _, model = _pair("llama")
    _enable_hf_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    report = patch_hf_model(model, "full", backend="aten")
    assert report.hf_checkpointing_disabled == ["model.layers.0", "model.layers.1"]
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    ids = torch.randint(0, V, (B, S))
    # exactly the fused prediction: no layer is hidden behind a second checkpoint
    assert _whole_model_bytes(model, ids) == plan(model, B, S, torch.float32, "1GiB").min_activation_bytes


def test_hf_checkpointing_after_patching_is_switched_off_with_a_warning():
    ref, model = _pair("llama")
    patch_hf_model(model, "full", backend="aten")
    _enable_hf_checkpointing(model)
    ids = torch.randint(0, V, (B, S))
    with pytest.warns(UserWarning, match="switched off there to avoid recomputing twice"):
        measured = _whole_model_bytes(model, ids)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    assert measured == plan(model, B, S, torch.float32, "1GiB").min_activation_bytes
    out_ref = ref(ids, labels=ids, use_cache=False)
    _close(model(ids, labels=ids, use_cache=False).loss, out_ref.loss, "loss")
