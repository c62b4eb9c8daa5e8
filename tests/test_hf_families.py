"""One block, many families (issue 11 item 3): every Hugging Face family of the family table,
built from a tiny config (2 layers, fp32, nothing downloaded) and patched with
``patch_hf_model``. For each family the report says what became a whole fused layer (placement
and norm kind) or, for a family that cannot be whole yet, why not (the test documents the gap);
logits, loss and every parameter gradient match the unpatched model by the 2x rule against a
float64 copy of it; the bytes each whole layer keeps (saved_tensors_hooks) are the block's and
the planner's prediction; two families train 20 steps on the same loss curve as unpatched."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_ckpt.integrations.hf import FusedHFDecoderLayer, patch_hf_model  # noqa: E402
from fused_ckpt.ops.dropout import fused_dropout_masks  # noqa: E402
from fused_ckpt.policy import find_layers  # noqa: E402

from .helpers import assert_close_by_rule, assert_close_by_rule_over_batches  # noqa: E402
from .test_policy import SavedByModule  # noqa: E402

V, B, S = 64, 2, 8
# head_dim 32: the smallest the flash kernels take; 2 heads, 1 kv head (grouped) where the family has GQA
LLAMA_LIKE = dict(vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, attn_implementation="eager", initializer_range=0.2)
GEMMA2 = dict(LLAMA_LIKE, attn_logit_softcapping=None, final_logit_softcapping=None,
              layer_types=["full_attention"] * 2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(family: str):
    t = transformers
    if family == "llama":
        return t.LlamaConfig(**LLAMA_LIKE)
    if family == "mistral":
        return t.MistralConfig(**LLAMA_LIKE, sliding_window=None)
    if family == "qwen2":
        return t.Qwen2Config(**LLAMA_LIKE)
    if family == "qwen3":
        return t.Qwen3Config(**LLAMA_LIKE)
    if family == "gemma":
        return t.GemmaConfig(**LLAMA_LIKE, hidden_activation="gelu_pytorch_tanh")
    if family == "gemma2":
        return t.Gemma2Config(**GEMMA2)
    if family == "gemma3":
        return t.Gemma3TextConfig(**GEMMA2)
    if family == "gemma3_defaults":  # sliding-window layers (window 4096 > S), per-layer-type rope, query scalar 256
        return t.Gemma3TextConfig(**LLAMA_LIKE)
    if family == "gemma2_defaults":  # attn_logit_softcapping 50, alternating sliding-window layers (4096 > S)
        return t.Gemma2Config(**LLAMA_LIKE)
    if family == "gemma2_window":  # the defaults with a window shorter than the sequence (S = 8)
        return t.Gemma2Config(**LLAMA_LIKE, sliding_window=3)
    if family == "olmo2":
        return t.Olmo2Config(**{k: v for k, v in LLAMA_LIKE.items() if k != "head_dim"})
    if family == "phi3":
        return t.Phi3Config(**{k: v for k, v in LLAMA_LIKE.items() if k != "head_dim"}, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)
    if family == "gpt2_dropout":  # GPT-2's default dropouts (0.1)
        return t.GPT2Config(vocab_size=V, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                            eos_token_id=0, attn_implementation="eager", initializer_range=0.2)
    if family == "gpt2":
        return t.GPT2Config(vocab_size=V, n_positions=32, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", bos_token_id=0,
                            eos_token_id=0, initializer_range=0.2)
    if family in ("gpt_neox", "gpt_neox_defaults"):
        # "gpt_neox": rotary_pct=1.0; "gpt_neox_defaults": NeoX's default partial rotary (0.25), where the
        # key bias's gradient is exactly zero on the unrotated dims (softmax is shift-invariant)
        extra = dict(rotary_pct=1.0) if family == "gpt_neox" else {}
        return t.GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, attn_implementation="eager", bos_token_id=0, eos_token_id=0,
                               initializer_range=0.2, **extra)
    raise KeyError(family)


# family -> (placement, norm kind) of its whole fused layers, or the reason its layers stay
# Hugging Face's (a gap the table documents; it changes when the part named becomes fusable)
EXPECTED = {
    "llama": ("pre", "RMSNorm"),
    "mistral": ("pre", "RMSNorm"),
    "qwen2": ("pre", "RMSNorm"),
    "qwen3": ("pre", "RMSNorm"),
    "gemma": ("pre", "(1 + w) RMSNorm"),
    "gemma2": ("sandwich", "(1 + w) RMSNorm"),
    "gemma2_defaults": ("sandwich", "(1 + w) RMSNorm"),  # softcap 50 and the windows in the fused kernels
    "gemma2_window": ("sandwich", "(1 + w) RMSNorm"),
    "gemma3": ("sandwich", "(1 + w) RMSNorm"),
    "olmo2": ("post", "RMSNorm"),
    "phi3": ("pre", "RMSNorm"),
    "gpt2": ("pre", "LayerNorm"),
    "gpt2_dropout": ("pre", "LayerNorm"),  # dropouts 0.1 replayed in the fused ops (train mode, see _run)
    "gpt_neox": ("parallel", "LayerNorm"),
    "gpt_neox_defaults": ("parallel", "LayerNorm"),  # partial rotary 0.25
    "gemma3_defaults": ("sandwich", "(1 + w) RMSNorm"),
}


# why the attention of a family in EXPECTED that is not whole stays Hugging Face's (the report's reason);
# none at present (Gemma2's softcap and GPT-2's dropouts were the last)
GAPS: dict = {}

# families with active dropout: compared in train mode, every model under fused_dropout_masks()
# after the same torch.manual_seed (Hugging Face's dropouts draw the fused masks, call for call)
DROPOUT = {"gpt2_dropout"}


def _build(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(_config(family)).train()
    with torch.no_grad():  # norms away from their initial values: (1 + w) with w = 0 would hide the offset
        gen = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.to(dtype)


def _run(model, ids, seed=None):
    """(logits, loss, {name: grad}) of one training step on ``ids`` (logits from a call without
    labels: with labels a patched model computes the loss through the fused head). ``seed``:
    ``torch.manual_seed(seed)`` first and every dropout drawing the fused ops' masks."""
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(), (fused_dropout_masks() if seed is not None else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        if seed is not None:
            torch.manual_seed(seed)
        logits = model(ids, use_cache=False).logits.detach()
        loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


LOSS_BATCHES = 8
GRAD_BATCHES = 4


def _losses(model, seed=None, batch=B):
    """The loss of ``model`` on LOSS_BATCHES batches of ids (forward only, ``seed`` as in _run, plus
    the batch index) as one tensor, which the 2x rule then measures. A single fp32 loss is one
    number whose error against float64 is about one ulp either way: PyTorch's own (GPT-NeoX) was exactly 0
    on 10 of 16 batches measured, where the fused head's error on the same hidden states was on
    average PyTorch's (3.2e-7 vs 2.4e-7 Gemma, 3.7e-7 vs 3.5e-7 GPT-NeoX, 3.1e-7 vs 3.4e-7 Llama),
    so the ratio of two single losses' errors is noise, not accuracy."""
    out = []
    for k in range(LOSS_BATCHES):
        ids = torch.randint(0, V, (batch, S), generator=torch.Generator().manual_seed(300 + k))
        with torch.no_grad(), warnings.catch_warnings(), \
                (fused_dropout_masks() if seed is not None else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            if seed is not None:
                torch.manual_seed(seed + k)
            out.append(model(ids, labels=ids, use_cache=False).loss)
    return torch.stack(out)


def _check_losses(model, ref, ref64, name, seed=None, batch=B):
    assert_close_by_rule(_losses(model, seed, batch), _losses(ref64, seed, batch), _losses(ref, seed, batch), name)


def _whole_layers(model):
    return [m for m in find_layers(model)[1] if isinstance(m, FusedHFDecoderLayer)]


def _whole_equals_per_module(ref64, ref):
    """Patch copies of ``ref`` with whole layers and with per-module dials only (``blocks=False``):
    logits and loss of the whole-layer model by the 2x rule against ``ref64``, every gradient equal
    to the per-module model's. Returns (the whole-layer model, its report)."""
    model, modules = copy.deepcopy(ref), copy.deepcopy(ref)
    report = patch_hf_model(model, "full", backend="aten")
    patch_hf_model(modules, "full", backend="aten", blocks=False)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    got, per_module, pt, r64 = _run(model, ids), _run(modules, ids), _run(ref, ids), _run(ref64, ids)
    assert_close_by_rule(got[0], r64[0], pt[0], "logits")
    _check_losses(model, ref, ref64, "loss")
    for n in pt[2]:
        torch.testing.assert_close(got[2][n], per_module[2][n], rtol=1e-5, atol=1e-7, msg=lambda m: f"d{n}: {m}")
    return model, report


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_is_patched_and_matches_unpatched(family):
    ref64 = _build(family, torch.float64)
    ref = _build(family)
    model = copy.deepcopy(ref)
    report = patch_hf_model(model, "full", backend="aten", batch=B, seq=S)
    want = EXPECTED[family]
    layer_rows = [r for r in report.replaced if r[2].startswith("FusedHFDecoderLayer")]
    refused = [r for r in report.left_alone if "not a whole fused block" in r[2]]
    if isinstance(want, tuple):
        placement, kind = want
        assert len(layer_rows) == 2 and not refused, (layer_rows, refused)
        assert all(f"; {placement} placement, {kind})" in r[2] for r in layer_rows), layer_rows
        layers = _whole_layers(model)
        assert len(layers) == 2 and all(m.placement == placement and m.recompute == "full" for m in layers)
    else:
        assert not layer_rows and len(refused) == 2 and all(want in r[2] for r in refused), refused
        assert [r for r in report.left_alone if r[2] == GAPS[family]], report.left_alone
    # every norm is fused whatever happens to the layers (weight / bias Parameters kept)
    assert not [r for r in report.left_alone if "norm not fused" in r[2]], report.left_alone
    assert [p for p in model.parameters()] == [p for p in model.parameters()]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]

    # logits and every gradient over GRAD_BATCHES batches, by the rule's L2 form (see
    # assert_close_by_rule_over_batches: single-batch max errors of these tiny tensors are noise)
    batches = [torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2 + k)) for k in range(GRAD_BATCHES)]
    seed = 7 if family in DROPOUT else None
    got, pt, r64 = ([_run(m, ids, None if seed is None else seed + k) for k, ids in enumerate(batches)]
                    for m in (model, ref, ref64))
    assert_close_by_rule_over_batches([g[0] for g in got], [r[0] for r in r64], [p[0] for p in pt], f"{family} logits")
    _check_losses(model, ref, ref64, f"{family} loss", seed)
    assert set(got[0][2]) == set(pt[0][2])
    for n in pt[0][2]:
        assert_close_by_rule_over_batches([g[2][n] for g in got], [r[2][n] for r in r64], [p[2][n] for p in pt],
                                          f"{family} d{n}")


@pytest.mark.parametrize("family", [f for f, w in EXPECTED.items() if isinstance(w, tuple)])
def test_whole_layers_keep_what_block_and_planner_predict(family):
    """Each whole layer keeps x and its norms' per-row statistics (saved_tensors_hooks), which is
    the block's saved_bytes and the planner's row for the layer."""
    model = _build(family)
    report = patch_hf_model(model, "full", backend="aten", batch=B, seq=S)
    layers = _whole_layers(model)
    rows = {r.module: r for r in report.plan.rows}
    names = {id(m): n for n, m in model.named_modules()}
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    with SavedByModule(layers, model.parameters()) as s, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(ids, labels=ids, use_cache=False).loss.backward()
    stats = {"pre": 2, "sandwich": 4, "post": 2, "parallel": 1}
    for m in layers:
        elem_stats = 2 if m.norm == "layernorm" else 1
        expect = B * S * 64 * 4 + stats[m.placement] * elem_stats * B * S * 4
        assert s.bytes(m) == expect == m.saved_bytes(B, S) == rows[names[id(m)]].saved_bytes, family


@pytest.mark.parametrize("family", ["gemma2", "gemma", "gpt2_dropout"])
def test_twenty_step_loss_curve_equals_unpatched(family):
    """(GPT-2 at its default dropouts: each step after the same torch.manual_seed, Hugging Face's
    dropouts drawing the fused masks.)"""
    ref = _build(family)
    model = copy.deepcopy(ref)
    patch_hf_model(model, "full", backend="aten")
    assert len(_whole_layers(model)) == 2
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (ref, model)]
    gen = torch.Generator().manual_seed(3)
    data = [torch.randint(0, V, (2, S), generator=gen) for _ in range(2)]
    curve = []
    for step in range(20):
        losses = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            with warnings.catch_warnings(), \
                    (fused_dropout_masks() if family in DROPOUT else contextlib.nullcontext()):
                warnings.simplefilter("ignore")
                torch.manual_seed(100 + step)
                loss = m(data[step % 2], labels=data[step % 2], use_cache=False).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6), (step, losses)
        curve.append(losses[0])
    assert curve[-1] < 0.8 * curve[0]  # it trained


@pytest.mark.triton
def test_sandwich_family_on_triton():
    """Gemma2's sandwich-norm (1 + w) layers on the Triton kernels (interpreter on CPU), at its
    default softcap 50 with a sliding window (3) shorter than the sequence on layer 0."""
    ref64, ref = _build("gemma2_window", torch.float64), _build("gemma2_window")
    model = copy.deepcopy(ref)
    patch_hf_model(model, "full", backend="triton")
    assert len(_whole_layers(model)) == 2
    ids = torch.randint(0, V, (1, S), generator=torch.Generator().manual_seed(2))
    got, pt, r64 = _run(model, ids), _run(ref, ids), _run(ref64, ids)
    _check_losses(model, ref, ref64, "loss", batch=1)
    for n in pt[2]:
        assert_close_by_rule(got[2][n], r64[2][n], pt[2][n], f"d{n}")


def test_gpt_neox_sequential_residual_with_partial_rotary():
    """GPT-NeoX with use_parallel_residual=False and its default partial rotary (0.25): evaluation
    picks the pre-norm placement of the same table row; logits and loss match float64 by the rule,
    and every gradient equals the per-module fused path's (blocks=False), so the whole-layer block
    adds nothing to the attention op's own rounding (whose key-bias gradient is analytically zero on
    the unrotated dims, see _config)."""
    def build(dtype=torch.float32):
        torch.manual_seed(0)
        cfg = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, attn_implementation="eager", bos_token_id=0,
                                         eos_token_id=0, initializer_range=0.2, use_parallel_residual=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoModelForCausalLM.from_config(cfg).train().to(dtype)

    ref64, ref = build(torch.float64), build()
    model, report = _whole_equals_per_module(ref64, ref)
    rows = [r for r in report.replaced if r[2].startswith("FusedHFDecoderLayer")]
    assert len(rows) == 2 and all("; pre placement, LayerNorm)" in r[2] for r in rows), rows


def test_gpt_neox_residual_dropout_is_replayed_in_the_whole_layer():
    """GPT-NeoX's post_attention_dropout / post_mlp_dropout (hidden_dropout 0.1) become the block's
    replayed branch dropouts: the layers stay whole, a training step is reproducible under
    ``torch.manual_seed`` (masks from a saved seed, regenerated in backward; the chain is checked
    against autograd with the same masks in test_block.py), the dropout changes the loss, and in
    eval mode the model equals the unpatched one."""
    def build():
        torch.manual_seed(0)
        cfg = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, attn_implementation="eager", bos_token_id=0,
                                         eos_token_id=0, initializer_range=0.2, rotary_pct=1.0, hidden_dropout=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoModelForCausalLM.from_config(cfg).train()

    ref = build()
    model = copy.deepcopy(ref)
    report = patch_hf_model(model, "full", backend="aten")
    assert len(_whole_layers(model)) == 2, report.left_alone
    assert all(m._spec().out_dropout_p == 0.1 and m._spec().ffn_dropout_p == 0.1 for m in _whole_layers(model))
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(_run(model, ids))
    assert torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(runs[0][2][n], runs[1][2][n]) for n in runs[0][2])
    model.eval()
    ref.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eval_loss = model(ids, labels=ids, use_cache=False).loss
        ref_loss = ref(ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(eval_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert abs(runs[0][1].item() - eval_loss.item()) > 1e-4  # the training step dropped something


@pytest.mark.parametrize("family", ["gemma3_defaults"])
def test_default_config_layers_are_whole_and_add_nothing_to_the_ops(family):
    """A family at its default config (Gemma 3: alternating sliding-window layers, per-layer-type
    rope, query_pre_attn_scalar): the layers are whole, logits and loss match float64 by the rule,
    and every gradient equals the per-module fused path's (blocks=False): the whole-layer block adds
    nothing to the ops' own rounding. (Against float64, every gradient by the rule over batches:
    test_family_is_patched_and_matches_unpatched[gemma3_defaults].)"""
    ref64, ref = _build(family, torch.float64), _build(family)
    model, report = _whole_equals_per_module(ref64, ref)
    assert len(_whole_layers(model)) == 2, report.left_alone


def test_gpt2_default_dropouts_follow_seed_mode_and_p():
    """GPT-2 at its default dropouts (attn_pdrop, resid_pdrop, embd_pdrop 0.1), whole fused layers:
    the attention's attn_dropout / resid_dropout and the MLP's dropout are the block's replayed
    dropouts, read from the Dropout modules at each call. A training step is reproducible under
    ``torch.manual_seed``; model.eval() turns them off (equal to unpatched HF in eval); setting the
    modules' p to 0 in train mode also turns them off (equal to unpatched HF at p 0)."""
    ref = _build("gpt2_dropout")
    model = copy.deepcopy(ref)
    report = patch_hf_model(model, "full", backend="aten")
    layers = _whole_layers(model)
    assert len(layers) == 2, report.left_alone
    assert all((s.dropout_p, s.out_dropout_p, s.ffn_dropout_p) == (0.1, 0.1, 0.1) for s in (m._spec() for m in layers))
    attn = [r for r in report.replaced if r[0].endswith(".attn")]
    assert attn and all("dropout (attn_dropout 0.1, resid_dropout 0.1" in r[2] for r in attn), attn
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    runs = [_run(model, ids, 7) for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(runs[0][2][n], runs[1][2][n]) for n in runs[0][2])
    other = _run(model, ids, 8)
    assert not torch.equal(other[1], runs[0][1])  # another seed, other masks

    def loss(m):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return m(ids, labels=ids, use_cache=False).loss

    for m in (model, ref):
        m.eval()
    assert all(s.dropout_p == s.out_dropout_p == s.ffn_dropout_p == 0 for s in (m._spec() for m in layers))
    eval_loss = loss(model)
    torch.testing.assert_close(eval_loss, loss(ref), rtol=1e-5, atol=1e-6)
    assert abs(runs[0][1].item() - eval_loss.item()) > 1e-3  # the training step dropped something
    for m in (model, ref):
        m.train()
        for d in m.modules():
            if isinstance(d, torch.nn.Dropout):
                d.p = 0.0
    torch.manual_seed(7)
    train_loss = loss(model)
    torch.testing.assert_close(train_loss, loss(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(train_loss, eval_loss, rtol=1e-5, atol=1e-6)
