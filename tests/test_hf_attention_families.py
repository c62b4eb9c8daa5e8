"""Hugging Face attention adoption per family: Qwen3 (per-head QK-norm), Gemma 3 (``(1 + w)``
QK-norm, ``query_pre_attn_scalar``, alternating sliding-window layers with per-layer-type rope),
OLMo2 (QK-norm over the whole projection), Phi-3 (packed ``qkv_proj``, partial rotary), GPT-2
(Conv1D ``c_attn``/``c_proj``, no rope, layer-index scaling) and GPT-NeoX (interleaved
``query_key_value``, partial rotary, ``dense``). With only the attentions patched, the model's
logits and every parameter gradient match the unpatched model (float64 reference, 2x rule in
fp32), the parameters stay the same objects and the state-dict keys do not change."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fused_ckpt.integrations.hf import FusedHFAttention, patch_hf_model

from .helpers import assert_close_by_rule, assert_close_by_rule_over_batches

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96)


def _family(name: str):
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, Gemma2Config,
                              Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    fams = {
        "qwen3": lambda: (Qwen3ForCausalLM, Qwen3Config(**COMMON, num_key_value_heads=1, head_dim=32,
                                                        attention_bias=True)),
        "gemma3": lambda: (Gemma3ForCausalLM, Gemma3TextConfig(
            **COMMON, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"])),
        # logit softcap 5 (the default 50 barely bends these scores) and a window 4 shorter than the sequence
        "gemma2": lambda: (Gemma2ForCausalLM, Gemma2Config(
            **COMMON, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=4,
            attn_logit_softcapping=5.0, final_logit_softcapping=None,
            layer_types=["sliding_attention", "full_attention"])),
        "olmo2": lambda: (Olmo2ForCausalLM, Olmo2Config(**COMMON, num_key_value_heads=2)),
        "phi3": lambda: (Phi3ForCausalLM, Phi3Config(**COMMON, num_key_value_heads=1, pad_token_id=0,
                                                     partial_rotary_factor=0.75)),
        "gpt2": lambda: (GPT2LMHeadModel, GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=2, n_inner=96,
                                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                     scale_attn_by_inverse_layer_idx=True)),
        "neox": lambda: (GPTNeoXForCausalLM, GPTNeoXConfig(**COMMON, hidden_dropout=0.0, attention_dropout=0.0)),
    }
    cls, cfg = fams[name]()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).float()
    with torch.no_grad():  # make every parameter matter (norm weights, biases are 1 / 0 at init)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _patch(model, backend="aten"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return patch_hf_model(model, policy=None, mlp=False, norm=False, blocks=False, fused_loss=False,
                              backend=backend)


def _run(model, ids, mask, g):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    out.backward(g.to(out.dtype))
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


FAMILIES = ["qwen3", "gemma3", "gemma2", "olmo2", "phi3", "gpt2", "neox"]
BATCHES = 4


def _compare(name, backend="aten", B=2, S=7, left_pad=0):
    model = _family(name)
    ref64, pt32 = copy.deepcopy(model).double(), copy.deepcopy(model)
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    rep = _patch(model, backend)
    attns = [m for m in model.modules() if isinstance(m, FusedHFAttention)]
    assert len(attns) == 2, rep
    assert all(a is b for a, b in zip(model.parameters(), params_before)) and \
        len(list(model.parameters())) == len(params_before)
    assert list(model.state_dict()) == keys_before
    runs = {"64": [], "32": [], "fused": []}
    for k in range(BATCHES):  # the rule's L2 form over batches (tests/helpers.py: tiny fp32 tensors)
        gen = torch.Generator().manual_seed(1 + k)
        ids = torch.randint(1, 64, (B, S), generator=gen)
        mask = torch.ones(B, S, dtype=torch.long)
        mask[0, :left_pad] = 0
        g = torch.randn(B, S, 64, generator=gen, dtype=torch.float64)
        for key, m in (("64", ref64), ("32", pt32), ("fused", model)):
            runs[key].append(_run(m, ids, mask, g))
    r64, r32, rf = runs["64"], runs["32"], runs["fused"]
    assert_close_by_rule_over_batches([r[0] for r in rf], [r[0] for r in r64], [r[0] for r in r32], f"{name} logits")
    for n in r64[0][1]:
        assert all(r[1][n] is not None for r in rf), f"{name}: no gradient for {n}"
        assert_close_by_rule_over_batches([r[1][n] for r in rf], [r[1][n] for r in r64], [r[1][n] for r in r32],
                                          f"{name} {n}")
    return model, rep


@pytest.mark.parametrize("name", FAMILIES)
def test_family_attention_matches_hf(name):
    _compare(name)


@pytest.mark.triton
@pytest.mark.parametrize("name", ["neox", "gemma3"])
def test_family_attention_matches_hf_triton(name):
    _compare(name, backend="triton")


@pytest.mark.parametrize("name", ["qwen3", "neox", "gpt2", "gemma2"])
def test_family_left_padding_eager_rows(name):
    """Left padding under eager: the query rows that see no key take Hugging Face's eager values
    (the fix-up recomputes them with the family's projections, QK-norm and partial rotary). The
    reference is Hugging Face's fp32 model (its float64 eager model gives NaN on such rows);
    non-vacuous: SDPA, which gives those rows zero, differs."""
    model = _family(name)
    ref = copy.deepcopy(model)
    _patch(model)
    assert len([m for m in model.modules() if isinstance(m, FusedHFAttention)]) == 2
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    g = torch.randn(2, 7, 64, generator=gen)
    y_ref, g_ref = _run(ref, ids, mask, g)
    y, grads = _run(model, ids, mask, g)
    # fp32 against fp32: a few roundings at each tensor's own scale (measured <= 1e-6 relative)
    for n, got, want in [("logits", y, y_ref)] + [(n, grads[n], g_ref[n]) for n in g_ref]:
        scale = want.abs().max().item()
        assert scale > 0 and (got - want).abs().max().item() <= 32 * torch.finfo(torch.float32).eps * scale, n
    # Gemma2's softcap has no SDPA path: the patched model under "sdpa" (the fused output, no eager fix-up)
    sdpa = copy.deepcopy(ref if name != "gemma2" else model)
    sdpa.config._attn_implementation = "sdpa"
    with torch.no_grad():
        assert not torch.allclose(sdpa(input_ids=ids, attention_mask=mask, use_cache=False).logits, y,
                                  rtol=2e-5, atol=2e-6)


def test_family_features_reported():
    reasons = {}
    for name in FAMILIES:
        rep = _patch(_family(name))
        reasons[name] = " | ".join(d for _, _, d in rep.replaced)
    assert "QK-norm per head" in reasons["qwen3"] and "(1 + w)" not in reasons["qwen3"]
    assert "QK-norm per head (1 + w)" in reasons["gemma3"] and "sliding window 8" in reasons["gemma3"]
    assert "rope_theta 1000000.0" in reasons["gemma3"]  # the full layer's own rope parameters
    assert "sliding window 4" in reasons["gemma2"] and "logit softcap 5" in reasons["gemma2"]
    assert "QK-norm over the projection" in reasons["olmo2"]
    assert "packed qkv_proj (packed)" in reasons["phi3"] and "rotary_dim 24" in reasons["phi3"]
    assert "packed c_attn (packed)" in reasons["gpt2"] and "rope_theta None" in reasons["gpt2"]
    assert "packed query_key_value (neox)" in reasons["neox"] and "rotary_dim 8" in reasons["neox"]


def test_gpt2_dropout_is_honoured():
    """GPT-2 at its default dropouts (attn_pdrop = resid_pdrop = embd_pdrop = 0.1), only the
    attentions patched: attn_dropout (probabilities) and resid_dropout (output) are the fused op's
    replayed dropouts in train mode. Against unpatched Hugging Face run under fused_dropout_masks()
    after the same seed (its dropouts draw the fused masks), logits and every gradient match by the
    2x rule vs float64; the same seed repeats the step exactly; eval mode drops nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fused_ckpt.ops.dropout import fused_dropout_masks

    cfg = GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=2, n_inner=96)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.train()
    ref64, pt32 = copy.deepcopy(model).double(), copy.deepcopy(model)
    rep = _patch(model)
    attns = [m for m in model.modules() if isinstance(m, FusedHFAttention)]
    assert len(attns) == 2, rep.left_alone
    assert all(a.dropout_p == a.out_dropout_p == 0.1 for a in attns)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    g = torch.randn(2, 7, 64, generator=gen, dtype=torch.float64)

    def run(m, seed=3):
        with fused_dropout_masks():
            torch.manual_seed(seed)
            return _run(m, ids, mask, g)

    (y64, g64), (y32, g32), (yf, gf) = run(ref64), run(pt32), run(model)
    assert_close_by_rule(yf, y64, y32, "gpt2 dropout logits")
    for n in g64:
        assert_close_by_rule(gf[n], g64[n], g32[n], f"gpt2 dropout {n}")
    again = run(model)
    assert torch.equal(again[0], yf) and all(torch.equal(again[1][n], gf[n]) for n in gf)
    model.eval()
    pt32.eval()
    assert all(a.dropout_p == a.out_dropout_p == 0 for a in attns)
    y_eval, _ = run(model)
    torch.testing.assert_close(y_eval, run(pt32)[0], rtol=1e-5, atol=1e-5)
    assert (y_eval - yf).abs().max().item() > 1e-2  # train mode dropped something


def test_gpt2_dropout_with_eager_dead_rows_runs_hf_attention():
    """Left padding under eager in train mode with GPT-2's dropouts: the rows that see no key take
    Hugging Face's eager values, which the fix-up cannot combine with the fused dropout masks, so
    that call runs Hugging Face's attention (warning) and equals unpatched HF under the same masks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fused_ckpt.ops.dropout import fused_dropout_masks

    cfg = GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=2, n_inner=96)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(cfg).train()
    model = copy.deepcopy(ref)
    _patch(model)
    assert isinstance(model.transformer.h[0].attn, FusedHFAttention)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    outs = []
    for m in (ref, model):
        with fused_dropout_masks(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(4)
            outs.append(m(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    assert any("with active dropout" in str(w.message) for w in caught)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def test_from_module_copy_takes_gpt2_dropouts():
    """A from_module copy of GPT-2's attention takes its dropouts' p (0.1): in train mode it draws
    what the shared module draws after the same seed (equal outputs), in eval mode nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fused_ckpt import FusedCheckpointedAttention

    attn = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=2)).transformer.h[0].attn.train()
    shared = FusedHFAttention.from_hf(copy.deepcopy(attn), backend="aten")
    copied = FusedCheckpointedAttention.from_module(attn, backend="aten")
    assert copied.dropout_p == copied.out_dropout_p == 0.1 and copied.training
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(3))
    outs = []
    for m in (shared, copied):
        torch.manual_seed(11)
        outs.append(FusedCheckpointedAttention.forward(m, x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    copied.eval()
    plain = copied(x)
    assert (plain - outs[1]).abs().max().item() > 1e-3  # train mode dropped something
    assert torch.equal(copied(x), plain)


def test_attention_dropout_of_other_families_is_refused():
    """A dropout the fused attention does not take from the module (Qwen3's attention_dropout,
    a float read by its forward) is still refused, naming the field."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(**COMMON, num_key_value_heads=1, head_dim=32, attention_dropout=0.1))
    rep = _patch(model)
    why = [d for n, _, d in rep.left_alone if n.endswith(".self_attn")]
    assert len(why) == 2 and all("attention_dropout=0.1" in w for w in why), rep.left_alone


def test_packed_gradients_land_on_the_hf_parameters():
    """Training step on GPT-2 and GPT-NeoX: the packed Conv1D / interleaved weights receive
    their gradients directly (the same Parameter objects, contiguous, HF's layout)."""
    for name in ("gpt2", "neox"):
        model = _family(name).train()
        _patch(model)
        packed = [m for m in model.modules() if isinstance(m, FusedHFAttention)][0]
        w = packed._modules[packed._qkv_names[0]].weight
        ids = torch.randint(1, 64, (1, 5))
        model(input_ids=ids, use_cache=False).logits.square().mean().backward()
        assert w.grad is not None and w.grad.shape == w.shape and w.grad.is_contiguous()


@pytest.mark.parametrize("name", ["qwen3", "olmo2", "phi3", "gpt2", "neox", "gemma2"])
def test_from_module_copy_matches_the_shared_module(name):
    """``FusedCheckpointedAttention.from_module(attn)`` (weights copied: packed layouts into one
    ``qkv_proj`` with rows [q; k; v], NeoX's interleaved rows regrouped, Conv1D transposed,
    QK-norm weights into ``q_norm``/``k_norm``; Gemma2's softcap and sliding window as the copy's
    ``softcap``/``window``) computes what the shared-parameter module does."""
    from fused_ckpt import FusedCheckpointedAttention

    model = _family(name)
    attn = next(m for n, m in model.named_modules() if n.endswith(("self_attn", ".attn", ".attention")))
    shared = FusedHFAttention.from_hf(copy.deepcopy(attn), backend="aten")
    copied = FusedCheckpointedAttention.from_module(attn, backend="aten")
    assert copied.qkv_layout == ("separate" if name in ("qwen3", "olmo2", "gemma2") else "packed")
    assert (copied.softcap, copied.window) == ((5.0, 4) if name == "gemma2" else (None, None))
    assert copied.rotary_dim == shared.rotary_dim and copied.rope_theta == shared.rope_theta
    assert ("q_norm" in copied._modules) == (name in ("qwen3", "olmo2"))
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(6) if shared.rope_theta is not None else None
    want = FusedCheckpointedAttention.forward(shared, x, position_ids=pos)
    got = copied(x, position_ids=pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.square().sum().backward()
    assert all(p.grad is not None for p in copied.parameters())


def test_standalone_module_features():
    """The module's own feature options: per-head QK-norm with Gemma's offset, partial rotary
    and a packed ``qkv_proj``; state-dict keys as Hugging Face names them."""
    from fused_ckpt import FusedCheckpointedAttention

    m = FusedCheckpointedAttention(64, 2, 1, rope_theta=1e4, head_dim=32, qk_norm="head", qk_norm_offset=1.0,
                                   rotary_dim=16, qkv_layout="packed", backend="aten")
    assert sorted(m.state_dict()) == ["k_norm.weight", "o_proj.weight", "q_norm.weight", "qkv_proj.weight"]
    assert m.q_norm.weight.shape == (32,) and torch.all(m.q_norm.weight == 0)  # (1 + w) starts at 1
    x = torch.randn(1, 5, 64, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m.qkv_proj.weight.grad is not None and m.q_norm.weight.grad is not None
    with pytest.raises(ValueError, match="qk_norm must be"):
        FusedCheckpointedAttention(64, 2, qk_norm="layer")
    with pytest.raises(ValueError, match="rotary_dim must be an even int"):
        FusedCheckpointedAttention(64, 2, rope_theta=1e4, rotary_dim=40)
