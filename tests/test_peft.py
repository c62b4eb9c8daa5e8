"""PEFT LoRA and the fused modules (issue 11 item 2).

A fused module reads its projections' weights; PEFT's ``lora.Linear`` forwards ``.weight`` to
its base layer, so reading it would drop the low-rank terms. Checked here: both patch orders
give unpatched PEFT's results (2x rule against float64, random upstream gradients, every
adapter gradient, no gradient for the frozen base) with the low-rank terms inside the fused ops of
a whole-layer block, the patch report names the adapters, a quantized stand-in is refused, and
plain fused modules wrapped by PEFT run exactly.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import OpLog, SeeThrough, assert_close_by_rule, assert_close_by_rule_over_batches

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fused_ckpt import FusedCheckpointedAttention, FusedCheckpointedBlock  # noqa: E402
from fused_ckpt.integrations.hf import patch_hf_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=32, num_hidden_layers=1, vocab_size=64, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _lora(targets=TARGETS, **kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False, **kw)


def _run(model, ids, g):
    """logits with a random upstream gradient, then {name: grad} of every trainable parameter."""
    out = model(input_ids=ids, use_cache=False).logits
    (out.double() * g).sum().backward()
    grads = {n.replace("base_model.model.", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _runs(model, batches):
    out = []
    for ids, g in batches:
        model.zero_grad(set_to_none=True)
        out.append(_run(model, ids, g))
    return out


def _patched_vs_unpatched(base, make_cfg, order, ids, g):
    """Wrap ``base`` with PEFT (``make_cfg()``) and patch it in ``order``, load the weights of an
    unpatched PEFT model, run both (and a float64 copy) with upstream gradient ``g`` on ``ids`` and
    on 3 more random batches, and check the logits and every adapter gradient by the 2x rule's L2
    form over the 4 batches (tests/helpers.py: single-batch max errors of such tiny fp32 tensors are
    noise; GPT-2's c_attn lora_B failed the max rule at 2.2x under ATEN_CPU_CAPABILITY=default).
    Returns (the patched model, its report, the warning messages of patching and the patched runs,
    the ops the first patched run dispatched, its gradients by name)."""
    gen = torch.Generator().manual_seed(11)
    batches = [(ids, g)] + [(torch.randint(0, base.config.vocab_size, ids.shape, generator=gen),
                             torch.randn(g.shape, generator=gen, dtype=g.dtype)) for _ in range(3)]
    ref = peft.get_peft_model(copy.deepcopy(base), make_cfg())
    ref64 = peft.get_peft_model(copy.deepcopy(base).double(), make_cfg())
    ref64.load_state_dict(ref.state_dict())
    m = copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if order == "patch_then_peft":
            report = patch_hf_model(m, backend="aten")
            m = peft.get_peft_model(m, make_cfg())
        else:
            m = peft.get_peft_model(m, make_cfg())
            report = patch_hf_model(m, backend="aten")
        m.load_state_dict(ref.state_dict())
        with OpLog() as seen:
            first = _run(m, *batches[0])
        got = [first] + _runs(m, batches[1:])
    want, pt = _runs(ref64, batches), _runs(ref, batches)
    assert_close_by_rule_over_batches([r[0] for r in got], [r[0] for r in want], [r[0] for r in pt], "logits")
    got_g = first[1]
    assert set(got_g) == set(want[0][1])
    for name in want[0][1]:
        assert all(r[1][name] is not None for r in got), name
        assert_close_by_rule_over_batches([r[1][name] for r in got], [r[1][name] for r in want],
                                          [r[1][name] for r in pt], name)
    return m, report, [str(w.message) for w in caught], seen, got_g


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_both_patch_orders_equal_unpatched_peft(order):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    g = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m, report, messages, seen, got_g = _patched_vs_unpatched(_llama(), _lora, order, ids, g)
    assert len(got_g) == 2 * len(TARGETS)  # lora_A and lora_B of every target
    for name, p in m.named_parameters():  # the frozen base gets no gradient
        if "lora_" not in name:
            assert not p.requires_grad and p.grad is None, name
    # the whole layer runs both LoRA ops (the attention's forward again in the backward's recompute)
    assert seen.count("fused_ckpt.ffn_lora_forward.default") == 1
    assert seen.count("fused_ckpt.attn_lora_forward.default") == 2
    assert seen.count("fused_ckpt.attn_lora_backward.default") == 1
    assert not any("unfused" in s or "LoRA wrapper" in s for s in messages), messages
    if order == "peft_then_patch":  # the report names every adapter the whole-layer op computes
        detail = {q.rsplit(".", 1)[-1]: why for q, _, why in report.replaced if q.endswith("layers.0")
                  or q.endswith("layers.0.mlp") or q.endswith("layers.0.self_attn")}
        assert "PEFT LoRA on gate_proj, up_proj, down_proj computed in the fused op" in detail["mlp"], report
        assert "PEFT LoRA on q_proj, k_proj, v_proj, o_proj computed in the fused op" in detail["self_attn"], report
        assert ("with PEFT LoRA on self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, "
                "mlp.gate_proj, mlp.up_proj, mlp.down_proj in the whole-layer op") in detail["0"], report


class _FakeQuantLinear(nn.Linear):
    """A stand-in for a quantized base layer: its forward uses a rounded weight, not ``weight``."""

    def forward(self, x):
        return nn.functional.linear(x, (self.weight * 16).round() / 16, self.bias)


def _quantize(mlp: nn.Module, name: str) -> None:
    old = getattr(mlp, name)
    new = _FakeQuantLinear(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    setattr(mlp, name, new)


def test_quantized_base_layer_is_refused_or_runs_unfused():
    base = _llama()
    for layer in base.model.layers:
        _quantize(layer.mlp, "up_proj")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    m = copy.deepcopy(base)
    report = patch_hf_model(m, backend="aten", policy=None)
    left = {q: why for q, _, why in report.left_alone}
    assert "own forward" in left["model.layers.0.mlp"] and "up_proj" in left["model.layers.0.mlp"], report
    # replaced after patching: the fused MLP notices and runs the quantized layer itself
    m = _llama()
    patch_hf_model(m, backend="aten", policy=None)
    for layer in m.model.layers:
        _quantize(layer.mlp, "up_proj")
    m.load_state_dict(base.state_dict())
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = m(input_ids=ids).logits
    assert any("_FakeQuantLinear" in str(w.message) for w in caught)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base.model.embed_tokens(ids)).abs().max() > 0  # not vacuous



def test_same_kind_replacement_stays_fused():
    """A plain module of the same class put in a projection's place (weights shared with another
    model by assignment, as the bench does) is read like the old one: the fused op still runs,
    on the new weights. A subclass in its place is a different module: the exact unfused path."""
    from fused_ckpt import FusedCheckpointedFFN

    m = FusedCheckpointedFFN(32, 64, "gelu", backend="aten")
    other = nn.Linear(32, 64)
    m.fc1 = other
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "running the exact unfused path" warning
        with Count():
            got = m(x)
    assert any("fused_ckpt" in c and "ffn_forward" in c for c in calls), calls
    want = m.fc2(nn.functional.gelu(other(x)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    class Sub(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    m.fc1 = Sub(32, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = m(x)
    assert any("unfused" in str(w.message) for w in caught)
    torch.testing.assert_close(got, m.fc2(nn.functional.gelu(m.fc1(x))), rtol=1e-5, atol=1e-5)

def _plain(kind, dtype=None):
    if kind == "block":
        return FusedCheckpointedBlock(64, 2, 96, n_kv_heads=1, activation="swiglu", backend="aten", rope_theta=10000.0,
                                      dtype=dtype)
    return FusedCheckpointedAttention(64, 2, 1, rope_theta=10000.0, backend="aten", head_dim=32, qk_norm="head",
                                      qkv_layout="packed", dtype=dtype)


@pytest.mark.parametrize("kind", ["block", "packed_attention"])
def test_plain_fused_modules_wrapped_by_peft_run_exactly(kind):
    """A FusedCheckpointedBlock built directly (own q_proj..o_proj, fc1/fc2), or a packed-qkv
    attention with QK-norm and a key-padding mask, wrapped by PEFT: computes the merged-weight math
    W + scaling * B A, with the adapters' gradients, inside the fused LoRA ops (no unfused path)."""
    torch.manual_seed(0)
    mod = _plain(kind)
    for name, p in mod.named_parameters():  # QK-norm weights away from 1, so the norm matters
        if "norm" in name:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"] if kind == "block" else ["qkv_proj", "o_proj"]
    m = peft.get_peft_model(mod, _lora(targets))
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(4))
    g = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kpm = None if kind == "block" else torch.tensor([[True] * 8, [False] * 2 + [True] * 6])
    args = (None, kpm)

    with warnings.catch_warnings(record=True) as caught, OpLog() as seen:
        warnings.simplefilter("always")
        y = m(x, *args)
        (y.double() * g).sum().backward()
    assert not any("unfused" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert "fused_ckpt.attn_lora_forward.default" in seen and "fused_ckpt.attn_lora_backward.default" in seen
    if kind == "block":
        assert "fused_ckpt.ffn_lora_backward.default" in seen
    got_g = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert len(got_g) == 2 * len(targets)

    def reference(dtype):
        leaves = {}
        params = {}
        for name, sub in mod.named_modules():
            if hasattr(sub, "lora_A"):
                a = sub.lora_A["default"].weight.detach().to(dtype).requires_grad_()
                b = sub.lora_B["default"].weight.detach().to(dtype).requires_grad_()
                leaves[name] = (a, b)
                params[name + ".weight"] = sub.base_layer.weight.detach().to(dtype) + sub.scaling["default"] * b @ a
        for name, p in mod.named_parameters():
            if "lora_" not in name:
                params.setdefault(name.replace(".base_layer", ""), p.detach().to(dtype))
        out = torch.func.functional_call(_plain(kind, dtype), params, (x.to(dtype),) + args)
        (out.double() * g).sum().backward()
        grads = {}
        for name, (a, b) in leaves.items():
            grads[f"base_model.model.{name}.lora_A.default.weight"] = a.grad
            grads[f"base_model.model.{name}.lora_B.default.weight"] = b.grad
        return out, grads

    want, want_g = reference(torch.float64)
    pt, pt_g = reference(torch.float32)
    assert_close_by_rule(y, want, pt, "output")
    assert set(got_g) == set(want_g)
    for name in want_g:
        assert_close_by_rule(got_g[name], want_g[name], pt_g[name], name)


# ----------------------------------------------------------------------------- the FFN LoRA op
def _op_case(gated: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d, f, r, T = 16, 24, 4, 10

    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5

    base = dict(w1=w(f, d), b1=w(f), w2=w(d, f), b2=w(d), w_up=w(f, d) if gated else None,
                b_up=w(f) if gated else None)
    lora = {"fc1": (w(r, d), w(f, r), 0.5), "fc2": (w(r, f), w(d, r), 2.0)}
    if gated:
        lora["up"] = (w(r + 2, d), w(f, r + 2), 1.5)
    x = torch.randn(2, T // 2, d, generator=gen, dtype=torch.float64)
    g = torch.randn(2, T // 2, d, generator=gen, dtype=torch.float64)
    return base, lora, x, g


def _leaves(base, lora, x, dtype):
    def leaf(t):
        return t.detach().to(dtype, copy=True).requires_grad_()

    b = {k: (v.to(dtype, copy=True) if v is not None else None) for k, v in base.items()}
    lo = {k: (leaf(a), leaf(bb), s) for k, (a, bb, s) in lora.items()}
    return b, lo, leaf(x)


def _grads(y, g, x, lo):
    (y.double() * g).sum().backward()
    out = {"x": x.grad}
    for k, (a, b, _) in lo.items():
        out[f"{k}.A"], out[f"{k}.B"] = a.grad, b.grad
    return out


def _reference(base, lora, x, g, dtype, activation, p, seed, offset):
    """The LoRA FFN in plain PyTorch with the op's dropout masks (regenerated from the seed)."""
    from fused_ckpt.activations import get_activation
    from fused_ckpt.ops.ffn_lora import _keep

    b, lo, xs = _leaves(base, lora, x, dtype)
    x2 = xs.reshape(-1, xs.shape[-1])
    M = x2.shape[0]

    def drop(t, i):
        if not p:
            return t
        return t * _keep(seed, offset + i, p, 0, M, t.shape[1], "cpu") / (1 - p)

    def proj(inp, w_, b_, key, i):
        out = nn.functional.linear(inp, w_, b_)
        if key in lo:
            a, bb, s = lo[key]
            out = out + s * (drop(inp, i) @ a.t()) @ bb.t()
        return out

    z = proj(x2, b["w1"], b["b1"], "fc1", 0)
    if b["w_up"] is not None:
        z = torch.cat([z, proj(x2, b["w_up"], b["b_up"], "up", 1)], -1)
    h = get_activation(activation).hidden(z)
    y = proj(h, b["w2"], b["b2"], "fc2", 2).view(xs.shape)
    return y, _grads(y, g, xs, lo)


@pytest.mark.parametrize("gated,p,recompute,chunk,dtype", [
    (True, 0.0, True, 0, torch.float32), (True, 0.25, True, 3, torch.float32), (False, 0.25, False, 4, torch.float32),
    (True, 0.3, "none", 0, torch.float32), (True, 0.25, True, 3, torch.bfloat16), (False, 0.0, True, 0, torch.float16)])
def test_ffn_lora_op_matches_float64(gated, p, recompute, chunk, dtype):
    """fused_ffn(lora=...) against float64 with the same (replayed) dropout masks: output, dx, every
    dA and dB by the 2x rule, with random upstream gradients; the base gets no gradient."""
    from fused_ckpt.functional import fused_ffn
    from fused_ckpt.ops.attention import draw_dropout_seed

    activation = "swiglu" if gated else "gelu"
    base, lora, x, g = _op_case(gated)
    b, lo, xs = _leaves(base, lora, x, dtype)
    torch.manual_seed(11)
    y = fused_ffn(xs, b["w1"], b["b1"], b["w2"], b["b2"], activation, recompute, chunk_tokens=chunk,
                  backend="aten", w_up=b["w_up"], b_up=b["b_up"], lora=lo, lora_dropout=p)
    got = _grads(y, g, xs, lo)
    torch.manual_seed(11)
    seed, offset = draw_dropout_seed() if p else (0, 0)
    want_y, want = _reference(base, lora, x, g, torch.float64, activation, p, seed, offset)
    pt_y, pt = _reference(base, lora, x, g, dtype, activation, p, seed, offset)
    assert_close_by_rule(y, want_y, pt_y, "y")
    for k in want:
        assert_close_by_rule(got[k], want[k], pt[k], k)
    assert all(v is None or not v.requires_grad for v in b.values())
    if p:  # the masks matter: without them the result differs
        y0, _ = _reference(base, lora, x, g, torch.float64, activation, 0.0, 0, 0)
        assert (y0 - want_y).abs().max() > 1e-2


@pytest.mark.parametrize("recompute", [True, False])
def test_ffn_lora_saves_x_and_rank_r_terms(recompute):
    """Kept for backward besides parameters: x and one [tokens, r] product per adapter (plus the
    pre-activation with recompute=False), counted with saved_tensors_hooks."""
    from fused_ckpt.functional import fused_ffn
    from fused_ckpt.ops.ffn_lora import ffn_lora_saved_bytes

    base, lora, x, _ = _op_case(True)
    b, lo, xs = _leaves(base, lora, x, torch.float32)
    params = {t.data_ptr() for t in list(b.values()) + [t for a, bb, _ in lo.values() for t in (a, bb)]
              if t is not None}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_ffn(xs, b["w1"], b["b1"], b["w2"], b["b2"], "swiglu", recompute, backend="aten", w_up=b["w_up"],
                  b_up=b["b_up"], lora=lo, lora_dropout=0.1)
    tokens, d = 10, 16
    ranks = (4, 6, 4)
    want = tokens * (d + sum(ranks) + (0 if recompute is True else 2 * 24)) * 4
    assert sum(saved) == want == ffn_lora_saved_bytes(tokens, d, ranks, 0 if recompute is True else 1, 48, 4)


def test_ffn_lora_bad_inputs_refused():
    from fused_ckpt.functional import fused_ffn

    base, lora, x, _ = _op_case(True)
    b, lo, xs = _leaves(base, lora, x, torch.float32)
    call = dict(w_up=b["w_up"], b_up=b["b_up"], backend="aten")
    with pytest.raises(ValueError, match="frozen"):
        fused_ffn(xs, b["w1"].requires_grad_(), b["b1"], b["w2"], b["b2"], "swiglu", lora=lo, **call)
    b["w1"].requires_grad_(False)
    bad = dict(lo, fc2=(lo["fc2"][0], lo["fc2"][1].t(), 1.0))
    with pytest.raises(ValueError, match=r"lora\['fc2'\]"):
        fused_ffn(xs, b["w1"], b["b1"], b["w2"], b["b2"], "swiglu", lora=bad, **call)
    with pytest.raises(ValueError, match="keys"):
        fused_ffn(xs, b["w1"], b["b1"], b["w2"], b["b2"], "swiglu", lora={"gate": lo["fc1"]}, **call)
    with pytest.raises(ValueError, match="lora_dropout"):
        fused_ffn(xs, b["w1"], b["b1"], b["w2"], b["b2"], "swiglu", lora=lo, lora_dropout=1.0, **call)


# ----------------------------------------------------------------------------- adapter states
def _one_layer_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=32, num_hidden_layers=1, vocab_size=32, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg)


def _logits(model, ids):
    with torch.no_grad(), OpLog() as seen:
        out = model(input_ids=ids, use_cache=False).logits
    return out, seen


def test_merged_and_disabled_adapters_follow_peft():
    """PEFT first, then patch: the MLP is fused with its adapters; disable_adapter() gives the base
    model (base fused op), merge_adapter() the merged weights (base fused op, exact as is),
    unmerge_adapter() the LoRA op again -- each equal to unpatched PEFT in the same state."""
    base = _one_layer_llama()
    mlp_only = ["gate_proj", "up_proj", "down_proj"]
    ref = peft.get_peft_model(copy.deepcopy(base), _lora(mlp_only))
    ref64 = peft.get_peft_model(copy.deepcopy(base).double(), _lora(mlp_only))
    ref64.load_state_dict(ref.state_dict())
    m = peft.get_peft_model(copy.deepcopy(base), _lora(mlp_only))
    m.load_state_dict(ref.state_dict())
    report = patch_hf_model(m, backend="aten")
    assert any(q.endswith("layers.0.mlp") and "PEFT LoRA" in why for q, _, why in report.replaced), report
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))

    def check(state, op):
        got, seen = _logits(m, ids)
        want, _ = _logits(ref64, ids)
        pt, _ = _logits(ref, ids)
        assert_close_by_rule(got, want, pt, f"logits ({state})")
        assert seen.count(op) == 1, (state, [s for s in seen if "fused_ckpt" in s])
        return want

    with_lora = check("adapters on", "fused_ckpt.ffn_lora_forward.default")
    with m.disable_adapter(), ref.disable_adapter(), ref64.disable_adapter():
        without = check("disabled", "fused_ckpt.ffn_forward.default")
    assert (with_lora - without).abs().max() > 1e-3  # the adapters matter
    for model in (m, ref, ref64):
        model.merge_adapter()
    check("merged", "fused_ckpt.ffn_forward.default")
    for model in (m, ref, ref64):
        model.unmerge_adapter()
    check("unmerged", "fused_ckpt.ffn_lora_forward.default")


def test_lora_dropout_replayed_in_the_fused_mlp():
    """Train mode with lora_dropout: the fused MLP's output and adapter gradients equal the float64
    LoRA MLP computed with the very masks the op drew (regenerated from its seed), and torch's
    seed makes the call reproducible."""
    from fused_ckpt.ops.attention import draw_dropout_seed

    base = _one_layer_llama()
    m = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj",
                            "down_proj"], lora_dropout=0.25, init_lora_weights=False))
    patch_hf_model(m, backend="aten")
    m.train()
    mlp = m.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    g = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xs = x.clone().requires_grad_()
    torch.manual_seed(7)
    y = mlp(xs)
    (y.double() * g).sum().backward()
    torch.manual_seed(7)
    y_again = mlp(x)
    torch.testing.assert_close(y_again, y, rtol=0, atol=0)
    torch.manual_seed(7)
    seed, offset = draw_dropout_seed()
    names = {"fc1": "gate_proj", "up": "up_proj", "fc2": "down_proj"}
    lora = {k: (getattr(mlp, n).lora_A["default"].weight.detach().double(),
                getattr(mlp, n).lora_B["default"].weight.detach().double(), getattr(mlp, n).scaling["default"])
            for k, n in names.items()}
    w = {k: getattr(mlp, n).base_layer.weight.detach().double() for k, n in names.items()}
    base64 = dict(w1=w["fc1"], b1=None, w2=w["fc2"], b2=None, w_up=w["up"], b_up=None)
    want_y, want = _reference(base64, lora, x.double(), g, torch.float64, "swiglu", 0.25, seed, offset)
    pt_y, pt = _reference(base64, lora, x.double(), g, torch.float32, "swiglu", 0.25, seed, offset)
    assert_close_by_rule(y, want_y, pt_y, "y")
    assert_close_by_rule(xs.grad, want["x"], pt["x"], "dx")
    for k, n in names.items():
        mod = getattr(mlp, n)
        assert_close_by_rule(mod.lora_A["default"].weight.grad, want[f"{k}.A"], pt[f"{k}.A"], f"{n}.A")
        assert_close_by_rule(mod.lora_B["default"].weight.grad, want[f"{k}.B"], pt[f"{k}.B"], f"{n}.B")
        assert mod.base_layer.weight.grad is None


def test_dora_is_refused_with_its_reason():
    base = _one_layer_llama()
    ids = torch.randint(0, 32, (1, 5), generator=torch.Generator().manual_seed(4))
    cfg = dict(targets=["gate_proj", "up_proj", "down_proj"], use_dora=True)
    ref = peft.get_peft_model(copy.deepcopy(base), _lora(**cfg))
    want, _ = _logits(ref, ids)
    m = peft.get_peft_model(copy.deepcopy(base), _lora(**cfg))
    m.load_state_dict(ref.state_dict())
    report = patch_hf_model(m, backend="aten", policy=None)
    left = {q.rsplit(".", 1)[-1]: why for q, _, why in report.left_alone if q.endswith("layers.0.mlp")}
    assert "DoRA" in left["mlp"], report
    # patched first, then wrapped with DoRA: the fused MLP runs PEFT's own forward, saying why
    m = copy.deepcopy(base)
    patch_hf_model(m, backend="aten", policy=None)
    m = peft.get_peft_model(m, _lora(**cfg))
    m.load_state_dict(ref.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, seen = _logits(m, ids)
    assert any("'model.layers.0.mlp'" in str(w.message) and "DoRA" in str(w.message) for w in caught)
    assert not any("fused_ckpt.ffn" in s for s in seen)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order,dtype", [("patch_then_peft", torch.float32), ("peft_then_patch", torch.float32),
                                         ("peft_then_patch", torch.bfloat16)])
def test_mlp_only_adapters_keep_the_layer_whole(order, dtype):
    """LoRA on the MLP only: the layer stays a whole-layer block whose FFN runs the LoRA op and whose
    attention runs the plain block op (its forward again in the backward's recompute); logits and
    adapter gradients equal unpatched PEFT's."""
    base = _one_layer_llama().to(dtype)
    mlp_only = ["gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    g = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, report, messages, seen, got_g = _patched_vs_unpatched(base, lambda: _lora(mlp_only), order, ids, g)
    assert len(got_g) == 6
    assert seen.count("fused_ckpt.ffn_lora_forward.default") == 1
    assert seen.count("fused_ckpt.attn_block_forward.default") == 2
    assert "fused_ckpt.attn_lora_forward.default" not in seen
    assert not any("unfused" in s for s in messages), messages
    if order == "peft_then_patch":
        why = {q: w for q, _, w in report.replaced}["base_model.model.model.layers.0"]
        assert "with PEFT LoRA on mlp.gate_proj, mlp.up_proj, mlp.down_proj in the whole-layer op" in why, report


def _see_through_lora():
    """The LoRA FFN ops' Python implementations run, so FlopCounterMode counts their GEMMs."""
    from fused_ckpt.ops import ffn_lora

    ops = torch.ops.fused_ckpt
    return SeeThrough({ops.ffn_lora_forward.default: ffn_lora.ffn_lora_forward_impl,
                       ops.ffn_lora_backward.default: ffn_lora.ffn_lora_backward_impl})


@pytest.mark.parametrize("gated,recompute", [(True, True), (False, False)])
def test_ffn_lora_flop_formulas_and_opcheck(gated, recompute):
    """The ops' registered FLOP formulas equal the GEMMs their implementation runs; opcheck (fake
    implementation, schema, autograd registration)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fused_ckpt.functional import fused_ffn
    from fused_ckpt.ops.ffn_lora import ffn_lora_forward

    base, lora, x, g = _op_case(gated)
    counts = []
    for see_through in (True, False):
        b, lo, xs = _leaves(base, lora, x, torch.float32)
        counter = FlopCounterMode(display=False)
        with counter:
            if see_through:
                with _see_through_lora():
                    y = fused_ffn(xs, b["w1"], b["b1"], b["w2"], b["b2"], "swiglu" if gated else "gelu", recompute,
                                  backend="aten", w_up=b["w_up"], b_up=b["b_up"], lora=lo)
                    (y * g.float()).sum().backward()
            else:
                y = fused_ffn(xs, b["w1"], b["b1"], b["w2"], b["b2"], "swiglu" if gated else "gelu", recompute,
                              backend="aten", w_up=b["w_up"], b_up=b["b_up"], lora=lo)
                (y * g.float()).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
    if gated:
        return  # one opcheck is enough (it is slow)
    b, lo, xs = _leaves(base, lora, x, torch.float32)
    factors = [t for key in ("fc1", "up", "fc2") for t in (lo[key][:2] if key in lo else (None, None))]
    scaling = [lo[k][2] if k in lo else 0.0 for k in ("fc1", "up", "fc2")]
    torch.library.opcheck(ffn_lora_forward, (xs, b["w1"], b["b1"], b["w2"], b["b2"], b["w_up"], b["b_up"], *factors,
                                             scaling, "swiglu" if gated else "gelu", 0 if recompute is True else 1,
                                             0.2, 123, 4, 3),
                           test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("dtype,recompute", [(torch.float32, True), (torch.bfloat16, False)])
def test_fused_lora_mlp_saved_bytes_match_its_prediction(dtype, recompute):
    """The LoRA MLP's saved_bytes() (what the planner reads) equals what saved_tensors_hooks see:
    x plus the [tokens, r] products (fp32 for PEFT's fp32 adapters on a bf16 model), z with
    recompute=False."""
    m = peft.get_peft_model(_one_layer_llama().to(dtype), _lora(["gate_proj", "up_proj", "down_proj"]))
    patch_hf_model(m, backend="aten", policy=None)
    mlp = m.base_model.model.model.layers[0].mlp
    mlp.recompute = recompute
    params = {p.data_ptr() for p in m.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), OpLog() as seen:
        mlp(x)
    assert "fused_ckpt.ffn_lora_forward.default" in seen
    r_elem = 4  # PEFT keeps the adapters in fp32 (autocast_adapter_dtype)
    want = 10 * (32 * x.element_size() + 3 * 4 * r_elem + (0 if recompute is True else 96 * x.element_size()))
    assert sum(saved) == want == mlp.saved_bytes(10)


def _family(name):
    torch.manual_seed(0)
    if name == "gpt2":  # Conv1D projections (PEFT's fan_in_fan_out LoRA), tanh-GELU MLP
        cfg = transformers.GPT2Config(n_embd=64, n_head=2, n_layer=1, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg), ["c_attn", "c_proj", "c_fc"]
    cfg = transformers.Phi3Config(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=2,
                                  num_hidden_layers=1, vocab_size=64, max_position_embeddings=32, pad_token_id=0,
                                  bos_token_id=0, eos_token_id=0)  # packed gate_up_proj and qkv_proj
    return transformers.Phi3ForCausalLM(cfg), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.mark.parametrize("name,order", [("gpt2", "patch_then_peft"), ("gpt2", "peft_then_patch"),
                                        ("phi3", "peft_then_patch")])
def test_other_mlp_layouts_with_lora(name, order):
    """GPT-2 (Conv1D c_fc/c_proj read transposed) and Phi-3 (one packed gate_up_proj adapter): the
    LoRA op runs in the fused MLP; logits and every adapter gradient equal unpatched PEFT's."""
    base, targets = _family(name)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    g = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, _, _, seen, got_g = _patched_vs_unpatched(base, lambda: _lora(targets), order, ids, g)
    assert seen.count("fused_ckpt.ffn_lora_forward.default") == 1
    assert len(got_g) == 8  # A and B of 4 modules (GPT-2: c_proj twice)


def test_mixed_batch_adapter_names_run_peft_forward():
    """PEFT's mixed-batch inference (``adapter_names=`` per sample) works through forward pre-hooks
    on the LoRA layers, which the fused op would skip: the fused MLP sees the hooks and runs PEFT's
    forward for that call (exact), then the LoRA op again."""
    base = _one_layer_llama()
    targets = ["gate_proj", "up_proj", "down_proj"]
    ref = peft.get_peft_model(copy.deepcopy(base), _lora(targets))
    ref.add_adapter("other", _lora(targets))
    m = peft.get_peft_model(copy.deepcopy(base), _lora(targets))
    m.add_adapter("other", _lora(targets))
    m.load_state_dict(ref.state_dict())
    patch_hf_model(m, backend="aten", policy=None)
    ref.eval()
    m.eval()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(5))
    names = ["default", "other"]
    with torch.no_grad():
        want = ref(input_ids=ids, adapter_names=names).logits
        one = ref(input_ids=ids).logits
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = m(input_ids=ids, adapter_names=names).logits
    assert any("forward hooks" in str(w.message) for w in caught)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want[1] - one[1]).abs().max() > 1e-3  # the second sample used the other adapter
    with OpLog() as seen, torch.no_grad():
        again = m(input_ids=ids).logits
    assert "fused_ckpt.ffn_lora_forward.default" in seen
    torch.testing.assert_close(again, one, rtol=1e-5, atol=1e-5)


def test_two_active_adapters_are_joined_in_the_op():
    """Two active adapters (no dropout): their factors are joined along r (B scaled per adapter)
    in one LoRA op; logits and all four adapters' gradients equal unpatched PEFT's."""
    base = _one_layer_llama()
    targets = ["gate_proj", "up_proj", "down_proj"]
    models = []
    for dtype in (torch.float32, torch.float64, torch.float32):
        mm = peft.get_peft_model(copy.deepcopy(base).to(dtype), _lora(targets))
        mm.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False))
        mm.base_model.set_adapter(["default", "other"])
        models.append(mm)
    ref, ref64, m = models
    ref64.load_state_dict(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    patch_hf_model(m, backend="aten")
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(6))
    g = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with OpLog() as seen:
        got, got_g = _run(m, ids, g)
    want, want_g = _run(ref64, ids, g)
    pt, pt_g = _run(ref, ids, g)
    assert seen.count("fused_ckpt.ffn_lora_forward.default") == 1
    assert_close_by_rule(got, want, pt, "logits")
    assert set(got_g) == set(want_g) and len(want_g) == 12
    for k in want_g:
        assert_close_by_rule(got_g[k], want_g[k], pt_g[k], k)


def test_unfused_path_keeps_the_output_dropout():
    """A FusedCheckpointedFFN with output dropout whose fc1 is replaced by a quantized stand-in: the
    unfused path computes fc2(act(fc1(x))) with the new fc1 and still drops outputs in training."""
    from fused_ckpt import FusedCheckpointedFFN

    torch.manual_seed(0)
    ffn = FusedCheckpointedFFN(16, 24, "gelu", dropout=0.5, backend="aten")
    _quantize(ffn, "fc1")
    x = torch.randn(4, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ffn.eval()
        y_eval = ffn(x)
        ffn.train()
        y_train = ffn(x)
    assert any("_FakeQuantLinear" in str(w.message) for w in caught)
    want = ffn.fc2(nn.functional.gelu(ffn.fc1(x)))
    torch.testing.assert_close(y_eval, want, rtol=0, atol=0)
    dropped = y_train == 0
    assert 0.2 < dropped.float().mean() < 0.8
    torch.testing.assert_close(y_train[~dropped], 2 * want[~dropped])


def test_fused_lora_mlp_recompute_flops_match_the_counted_gemms():
    """recompute_flops() with LoRA adapters (what the planner reads) = the backward GEMM FLOPs at
    recompute=True minus those at recompute=False, counted from the implementation."""
    from torch.utils.flop_counter import FlopCounterMode

    m = peft.get_peft_model(_one_layer_llama(), _lora(["gate_proj", "up_proj", "down_proj"]))
    patch_hf_model(m, backend="aten", policy=None)
    mlp = m.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    backward = {}
    for recompute in (True, False):
        mlp.recompute = recompute
        y = mlp(x.clone().requires_grad_())
        counter = FlopCounterMode(display=False)
        with counter, _see_through_lora():
            y.sum().backward()
        backward[recompute] = counter.get_total_flops()
    mlp.recompute = True
    assert mlp.recompute_flops(10) == backward[True] - backward[False] > 2 * 10 * 32 * 96
