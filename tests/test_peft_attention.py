"""PEFT LoRA on the attention projections, computed inside the fused attention op.

A Hugging Face model wrapped with ``peft.get_peft_model`` (LoRA on q/k/v/o, or GPT-2's packed
Conv1D ``c_attn`` and ``c_proj``, plus the MLP) and patched by ``patch_hf_model`` before or after
wrapping runs :mod:`fused_ckpt.ops.attn_lora` for its attention: logits and every adapter gradient
equal unpatched PEFT's (float64 reference, 2x rule, random upstream gradient); LoRA dropout equals
PEFT's forward with the op's masks; disabled and merged adapters take the plain block op; DoRA is
refused with its reason and runs PEFT's own forward.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from tests.helpers import OpLog, assert_close_by_rule, assert_close_by_rule_over_batches

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fused_ckpt.integrations.hf import patch_hf_model  # noqa: E402

LORA_OP = "fused_ckpt.attn_lora_forward.default"
BLOCK_OP = "fused_ckpt.attn_block_forward.default"
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=32, num_hidden_layers=1, vocab_size=64, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_head=2, n_layer=1, n_positions=32, vocab_size=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _lora(targets, dropout=0.0, **kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, init_lora_weights=False,
                           **kw)


def _patch(m):
    # the attention module on its own (blocks=False): the whole-layer block is tested elsewhere
    return patch_hf_model(m, policy=None, blocks=False, backend="aten")


def _wrap_and_patch(base, cfg, order):
    """(PEFT model patched in ``order``, the patch report, warning messages of patching)."""
    m = copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if order == "patch_then_peft":
            report = _patch(m)
            m = peft.get_peft_model(m, cfg())
        else:
            m = peft.get_peft_model(m, cfg())
            report = _patch(m)
    return m, report, [str(w.message) for w in caught]


def _run(model, ids, g):
    """logits with upstream gradient ``g``, then {name: grad} of every trainable parameter, the
    ops dispatched and the warnings."""
    with warnings.catch_warnings(record=True) as caught, OpLog() as seen:
        warnings.simplefilter("always")
        out = model(input_ids=ids, use_cache=False).logits
        (out.double() * g).sum().backward()
    grads = {n.replace("base_model.model.", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads, seen, [str(w.message) for w in caught]


def _batches(n=4, B=2, S=7):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (B, S), generator=gen), torch.randn(B, S, 64, generator=gen, dtype=torch.float64))
            for _ in range(n)]


def _check_against_peft(m, ref, ref64, batches, before=None):
    """Logits and every adapter gradient of ``m`` against unpatched PEFT (``ref64`` float64,
    ``ref`` fp32) by the 2x rule in its L2 form over the batches (tests/helpers.py: single-batch
    max errors of these small gradients are noisy); ``before(k)`` runs before each model's batch
    k. Returns (the ops ``m`` dispatched, its warnings, its gradients of the last batch)."""
    runs = {}
    for key, model in (("got", m), ("want", ref64), ("pt", ref)):
        runs[key] = []
        for k, (ids, g) in enumerate(batches):
            for p in model.parameters():
                p.grad = None
            if before is not None:
                before(k)
            runs[key].append(_run(model, ids, g))
    seen = [s for r in runs["got"] for s in r[2]]
    messages = [s for r in runs["got"] for s in r[3]]
    assert_close_by_rule_over_batches(*([r[0] for r in runs[k]] for k in ("got", "want", "pt")), "logits")
    names = set(runs["want"][0][1])
    assert set(runs["got"][0][1]) == names and names
    for name in sorted(names):
        assert all(r[1][name] is not None for r in runs["got"]), name
        assert_close_by_rule_over_batches(*([r[1][name] for r in runs[k]] for k in ("got", "want", "pt")), name)
    for name, p in m.named_parameters():  # the frozen base gets no gradient
        if "lora_" not in name:
            assert not p.requires_grad and p.grad is None, name
    return seen, messages, runs["got"][-1][1]


def _references(base, cfg):
    ref = peft.get_peft_model(copy.deepcopy(base), cfg())
    ref64 = peft.get_peft_model(copy.deepcopy(base).double(), cfg())
    ref64.load_state_dict(ref.state_dict())
    return ref, ref64


FAMILIES = {
    # name: (model, LoRA targets, adapted modules, the attention's qualified name, its adapted projections)
    "llama": (_llama, ATTN + MLP, 7, "model.layers.0.self_attn", "q_proj, k_proj, v_proj, o_proj"),
    "gpt2_conv1d": (_gpt2, ["c_attn", "c_proj", "c_fc"], 4, "transformer.h.0.attn", "c_attn, c_proj"),
}


@pytest.mark.parametrize("family,order,dtype", [(f, o, torch.float32) for f in FAMILIES
                                                 for o in ("patch_then_peft", "peft_then_patch")]
                         + [("llama", "peft_then_patch", torch.bfloat16)])
def test_attention_lora_in_the_fused_op_equals_peft(family, order, dtype):
    """bf16: PEFT keeps the adapters in fp32 over the bf16 base (autocast_adapter_dtype)."""
    make, targets, n_adapted, attn_name, adapted = FAMILIES[family]
    base = make().to(dtype)
    cfg = lambda: _lora(targets)  # noqa: E731
    ref, ref64 = _references(base, cfg)
    m, report, patch_messages = _wrap_and_patch(base, cfg, order)
    m.load_state_dict(ref.state_dict())
    batches = _batches()
    seen, messages, got_g = _check_against_peft(m, ref, ref64, batches)
    assert sum("lora_A" in n for n in got_g) == n_adapted  # every adapted module got its gradients
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if "lora_" in n)
    assert seen.count(LORA_OP) == len(batches) and BLOCK_OP not in seen, [s for s in seen if "fused_ckpt" in s]
    assert not any("unfused" in s for s in patch_messages + messages), patch_messages + messages
    if order == "peft_then_patch":
        detail = {q: why for q, _, why in report.replaced}
        assert f"PEFT LoRA on {adapted} computed in the fused op" in detail[f"base_model.model.{attn_name}"], report


class _FixedMaskDropout(nn.Module):
    """PEFT's lora_dropout with a given keep mask (the fused op's, regenerated from its seed)."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.view(x.shape).to(x.dtype) / (1 - self.p)


def test_lora_dropout_equals_peft_with_the_op_masks():
    """Train mode, lora_dropout 0.25 on q/k/v/o: the patched model's logits and adapter gradients
    equal unpatched PEFT's (float64 and fp32) whose dropout modules apply the masks the op drew
    (offsets 0-3 of its seed: q, k, v on x, o on the attention output); the same torch seed
    reproduces the call."""
    from fused_ckpt.ops.attention import draw_dropout_seed
    from fused_ckpt.ops.ffn_lora import _keep

    base = _llama()
    cfg = lambda: _lora(ATTN, dropout=0.25)  # noqa: E731
    ref, ref64 = _references(base, cfg)
    m, _, _ = _wrap_and_patch(base, cfg, "patch_then_peft")
    m.load_state_dict(ref.state_dict())
    for model in (m, ref, ref64):
        model.train()
    B, S = 2, 7
    batches = _batches(B=B, S=S)
    seeds = []
    for k in range(len(batches)):
        torch.manual_seed(7 + k)
        seeds.append(draw_dropout_seed())  # what the fused attention draws first in its forward

    def before(k):  # the op's masks of batch k in the references' dropout modules; the seed for m
        seed, offset = seeds[k]
        for model in (ref, ref64):
            attn = model.base_model.model.model.layers[0].self_attn
            for i, name in enumerate(ATTN):
                lin = getattr(attn, name)
                keep = _keep(seed, offset + i, 0.25, 0, B * S, lin.in_features, "cpu")
                lin.lora_dropout["default"] = _FixedMaskDropout(keep, 0.25)
        torch.manual_seed(7 + k)

    seen, _, got_g = _check_against_peft(m, ref, ref64, batches, before)
    assert seen.count(LORA_OP) == len(batches)
    for p in m.parameters():
        p.grad = None
    before(len(batches) - 1)
    _, again, _, _ = _run(m, *batches[-1])
    for name in got_g:
        assert torch.equal(again[name], got_g[name]), name


def test_disabled_and_merged_adapters_take_the_block_op():
    """disable_adapter(): the base model (plain block op); merge_adapter(): the merged weights
    (plain block op, exact as is); unmerge_adapter(): the LoRA op again -- each equal to
    unpatched PEFT in the same state."""
    base = _llama()
    cfg = lambda: _lora(ATTN)  # noqa: E731
    ref, ref64 = _references(base, cfg)
    m, _, _ = _wrap_and_patch(base, cfg, "peft_then_patch")
    m.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))

    def check(state, op):
        outs = []
        for model in (m, ref64, ref):
            with torch.no_grad(), OpLog() as seen:
                outs.append(model(input_ids=ids, use_cache=False).logits)
            if model is m:
                assert seen.count(op) == 1, (state, [s for s in seen if "fused_ckpt" in s])
        assert_close_by_rule(*outs, f"logits ({state})")
        return outs[1]

    with_lora = check("adapters on", LORA_OP)
    with m.disable_adapter(), ref.disable_adapter(), ref64.disable_adapter():
        without = check("disabled", BLOCK_OP)
    assert (with_lora - without).abs().max() > 1e-3  # the adapters matter
    for model in (m, ref, ref64):
        model.merge_adapter()
    check("merged", BLOCK_OP)
    for model in (m, ref, ref64):
        model.unmerge_adapter()
    check("unmerged", LORA_OP)


def test_dora_on_the_attention_is_refused_with_its_reason():
    """DoRA on the attention: PEFT first, then patch: the attention is left alone, naming DoRA;
    patch first: the fused attention runs PEFT's own forward (neither fused op), saying why, and
    the logits equal unpatched PEFT's (the fused MLP and norms around it: 2x rule)."""
    base = _llama()
    cfg = lambda: _lora(ATTN, use_dora=True)  # noqa: E731
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    ref, ref64 = _references(base, cfg)
    m, report, _ = _wrap_and_patch(base, cfg, "peft_then_patch")
    left = {q: why for q, _, why in report.left_alone}
    assert "DoRA" in left["base_model.model.model.layers.0.self_attn"], report
    m, _, _ = _wrap_and_patch(base, cfg, "patch_then_peft")
    m.load_state_dict(ref.state_dict())
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), OpLog() as seen:
        warnings.simplefilter("always")
        got = m(input_ids=ids, use_cache=False).logits
    assert any("'model.layers.0.self_attn'" in str(w.message) and "DoRA" in str(w.message) for w in caught)
    assert LORA_OP not in seen and BLOCK_OP not in seen
    with torch.no_grad():
        want, pt = (r(input_ids=ids, use_cache=False).logits for r in (ref64, ref))
        assert_close_by_rule(got, want, pt, "logits")


@pytest.mark.parametrize("case", ["trainable_base", "mixed_dropout", "autocast"])
def test_unsupported_lora_runs_the_exact_unfused_path_with_the_reason(case):
    """A FusedCheckpointedAttention wrapped by PEFT where the LoRA op would not be exact: a
    trainable base weight, adapters with different dropout p, autocast -- the unfused path (PEFT's
    own forward of each projection), a warning naming the reason, no fused op."""
    from fused_ckpt import FusedCheckpointedAttention

    torch.manual_seed(0)
    mod = FusedCheckpointedAttention(64, 2, 1, rope_theta=1e4, backend="aten", head_dim=32)
    m = peft.get_peft_model(mod, _lora(ATTN, dropout=0.1 if case == "mixed_dropout" else 0.0))
    attn = m.base_model.model
    want_reason = {"trainable_base": "trainable base weights", "mixed_dropout": "LoRA dropout differ",
                   "autocast": "LoRA under autocast"}[case]
    if case == "trainable_base":
        attn.q_proj.base_layer.weight.requires_grad_(True)
    if case == "mixed_dropout":
        attn.k_proj.lora_dropout["default"].p = 0.2  # (training mode: the p's count)
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else torch.enable_grad()
    with warnings.catch_warnings(record=True) as caught, OpLog() as seen, ctx:
        warnings.simplefilter("always")
        m(x)
    assert any(want_reason in str(w.message) and "unfused" in str(w.message) for w in caught), \
        [str(w.message) for w in caught]
    assert LORA_OP not in seen and BLOCK_OP not in seen


def test_two_active_adapters_on_the_attention_are_joined_in_the_op():
    """Two active adapters (no dropout) on q/k/v/o: their factors are joined along r (B scaled per
    adapter) in one attention LoRA op; logits and all eight adapters' gradients equal PEFT's."""
    base = _llama()
    models = []
    for dtype in (torch.float32, torch.float64, torch.float32):
        mm = peft.get_peft_model(copy.deepcopy(base).to(dtype), _lora(ATTN))
        mm.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=ATTN, init_lora_weights=False))
        mm.base_model.set_adapter(["default", "other"])
        models.append(mm)
    ref, ref64, m = models
    ref64.load_state_dict(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    _patch(m)
    seen, _, got_g = _check_against_peft(m, ref, ref64, _batches())
    assert seen.count(LORA_OP) == 4 and len(got_g) == 16
