"""Replayed dropout: the elementwise op (fused_ckpt.ops.dropout), FFN output dropout, and the
attention block's options (softcap, window, attention-probability dropout, output dropout),
every gradient against float64 references that take the same masks (2x rule)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fused_ckpt.functional import fused_ffn
from fused_ckpt.functional_attention import fused_attention_block
from fused_ckpt.ops.attention import draw_dropout_seed, dropout_keep_mask
from fused_ckpt.ops.dropout import dropout_keep, dropout_replay, replayed_dropout

from .conftest import DEVICE
from .helpers import SavedTensors, assert_close_by_rule
from .test_flash_options import reference_attention

DEV = DEVICE
BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "aten"]


def _out_mask(seed_state: int, shape, p: float, skip_draws: int = 0) -> torch.Tensor:
    """The output-dropout keep mask a call made right after ``torch.manual_seed(seed_state)``
    (after ``skip_draws`` earlier draws of the same call)."""
    torch.manual_seed(seed_state)
    for _ in range(skip_draws):
        draw_dropout_seed()
    seed, off = draw_dropout_seed()
    return dropout_keep(seed, off, p, 0, math.prod(shape), "cpu").view(shape).to(DEV)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_op_values_and_backward(dtype, backend):
    x = torch.randn(3, 1500, device=DEV, dtype=dtype, requires_grad=True)  # ragged last block
    p, seed, off = 0.3, 2**50 + 7, 11
    y = dropout_replay(x, p, seed, off, backend)
    keep = dropout_keep(seed, off, p, 0, x.numel(), "cpu").view(x.shape).to(DEV)
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    for got, inp in ((y, x.detach()), (dx, g)):
        expected = torch.where(keep, inp.double() / (1 - p), 0.0)
        assert torch.equal(got == 0, ~keep | (inp == 0))
        # one rounding of the exact product (the interpreter rounds bf16 toward zero: 1 ulp)
        torch.testing.assert_close(got.double(), expected, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.triton
def test_dropout_triton_and_aten_agree_on_a_strided_input():
    x = torch.randn(64, 48, device=DEV).t()  # read in row-major order of the logical shape
    a = dropout_replay(x, 0.5, 123, 4, "triton")
    b = dropout_replay(x.cpu(), 0.5, 123, 4, "aten")
    assert torch.equal(a.cpu(), b) and a.is_contiguous()


def test_dropout_streams_differ_from_attention_masks():
    """Element dropout (third counter word 0xFFFFFFFF) and attention dropout (batch * H + head)
    draw different bits for the same seed and offset."""
    a = dropout_keep(5, 0, 0.5, 0, 64, "cpu")
    b = dropout_keep_mask(5, 0, 0.5, 1, 1, torch.zeros(1, dtype=torch.long), torch.arange(64))[0, 0, 0]
    assert (a != b).float().mean() > 0.3


@pytest.mark.parametrize("backend", BACKENDS)
def test_replayed_dropout_saves_nothing_and_is_seeded(backend):
    x = torch.randn(8, 33, device=DEV, requires_grad=True)
    with SavedTensors() as st:
        torch.manual_seed(0)
        y0 = replayed_dropout(x, 0.5, backend)
    assert st.total_bytes([]) == 0
    torch.manual_seed(0)
    y1 = replayed_dropout(x, 0.5, backend)
    torch.manual_seed(1)
    y2 = replayed_dropout(x, 0.5, backend)
    assert torch.equal(y0, y1) and not torch.equal(y0, y2)
    assert replayed_dropout(x, 0.0, backend) is x
    with pytest.raises(ValueError, match="dropout"):
        replayed_dropout(x, 1.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [True, False])
def test_ffn_output_dropout_gradients(recompute, backend):
    """GPT-2's MLP in training: dropout(c_proj(gelu(c_fc x))), every gradient against float64
    with the same mask."""
    d, f, p = 32, 64, 0.1
    x = torch.randn(2, 9, d, device=DEV)
    w1, b1 = torch.randn(f, d, device=DEV) / d**0.5, torch.randn(f, device=DEV) * 0.1
    w2, b2 = torch.randn(d, f, device=DEV) / f**0.5, torch.randn(d, device=DEV) * 0.1
    params = (x, w1, b1, w2, b2)
    leaves = [t.clone().requires_grad_() for t in params]
    torch.manual_seed(5)
    y = fused_ffn(*leaves, activation="gelu_tanh", recompute=recompute, backend=backend, dropout_p=p)
    keep = _out_mask(5, y.shape, p)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)

    def ref(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2) * keep / (1 - p)

    r_leaves = [t.double().requires_grad_() for t in params]
    r = ref(*r_leaves)
    r_grads = torch.autograd.grad(r, r_leaves, dy.double())
    p_leaves = [t.clone().requires_grad_() for t in params]
    pt = ref(*p_leaves)
    p_grads = torch.autograd.grad(pt, p_leaves, dy)
    assert (y == 0).float().mean() > 0.03  # the mask is applied
    assert_close_by_rule(y, r, pt, "y")
    for name, g, rg, pg in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, r_grads, p_grads):
        assert_close_by_rule(g, rg, pg, name)


# --------------------------------------------------------------------------- attention block
def _block_reference(x, wq, bq, wk, bk, wv, bv, wo, bo, H, H_kv, attn_keep, out_keep, softcap, window, p_attn,
                     p_out):
    B, S, _ = x.shape
    q = F.linear(x, wq, bq).view(B, S, H, -1)
    k = F.linear(x, wk, bk).view(B, S, H_kv, -1)
    v = F.linear(x, wv, bv).view(B, S, H_kv, -1)
    o = reference_attention(q, k, v, causal=True, softcap=softcap, window=window, keep=attn_keep, dropout_p=p_attn)
    y = F.linear(o.flatten(2), wo, bo)
    return y if out_keep is None else y * out_keep / (1 - p_out)


@pytest.mark.parametrize("recompute,backend", [("all", "aten"), ("qkv", "aten"), (False, "aten"),
                                               pytest.param("all", "triton", marks=pytest.mark.triton)])
def test_block_softcap_window_and_dropouts(recompute, backend):
    """Gemma 2 / GPT-2 features through the block op: softcap 5, window 12, attention dropout
    0.2 and output dropout 0.1, every gradient (x, all weights and biases) against float64 with
    the same masks; "all" regenerates the attention mask when it recomputes o."""
    B, S, d, H, H_kv, D = 2, 36, 48, 4, 2, 32
    p_attn, p_out = 0.2, 0.1
    g = torch.Generator().manual_seed(3)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(DEV)  # noqa: E731
    params = (mk(B, S, d), mk(H * D, d, sc=0.3), mk(H * D, sc=0.1), mk(H_kv * D, d, sc=0.3), mk(H_kv * D, sc=0.1),
              mk(H_kv * D, d, sc=0.3), mk(H_kv * D, sc=0.1), mk(d, H * D, sc=0.1), mk(d, sc=0.1))
    leaves = [t.clone().requires_grad_() for t in params]
    torch.manual_seed(11)
    y = fused_attention_block(*leaves, H, H_kv, causal=True, recompute=recompute, backend=backend, softcap=5.0,
                              window=12, dropout_p=p_attn, out_dropout_p=p_out)
    torch.manual_seed(11)
    seed, off = draw_dropout_seed()
    attn_keep = dropout_keep_mask(seed, off, p_attn, B, H, torch.arange(S), torch.arange(S)).to(DEV)
    out_keep = _out_mask(11, y.shape, p_out, skip_draws=1)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    extra = (H, H_kv, attn_keep, out_keep, 5.0, 12, p_attn, p_out)
    r_leaves = [t.double().requires_grad_() for t in params]
    r = _block_reference(*r_leaves, *extra)
    r_grads = torch.autograd.grad(r, r_leaves, dy.double())
    p_leaves = [t.clone().requires_grad_() for t in params]
    pt = _block_reference(*p_leaves, *extra)
    p_grads = torch.autograd.grad(pt, p_leaves, dy)
    assert_close_by_rule(y, r, pt, "y")
    names = ("dx", "dWq", "dbq", "dWk", "dbk", "dWv", "dbv", "dWo", "dbo")
    for name, gr, rg, pg in zip(names, grads, r_grads, p_grads):
        assert_close_by_rule(gr, rg, pg, name)


def test_block_dropout_reproducible_and_eval_free():
    B, S, d, H = 1, 16, 64, 2
    x = torch.randn(B, S, d)
    w = [torch.randn(64, d) * 0.1 for _ in range(4)]
    args = (x, w[0], None, w[1], None, w[2], None, w[3], None, H)

    def run(seed, **kw):
        torch.manual_seed(seed)
        return fused_attention_block(*args, backend="aten", **kw)

    assert torch.equal(run(0, dropout_p=0.3, out_dropout_p=0.3), run(0, dropout_p=0.3, out_dropout_p=0.3))
    assert not torch.equal(run(0, dropout_p=0.3), run(1, dropout_p=0.3))
    assert not torch.equal(run(0, dropout_p=0.3), run(0))
    with pytest.raises(ValueError, match="window"):
        run(0, window=4, causal=False)


# --------------------------------------------------------------------------- eager references
@pytest.mark.parametrize("backend", ["aten"])  # Triton == torch masks: test_dropout_op_values_and_backward
def test_hf_gpt2_attention_and_mlp_in_train_mode(backend):
    """Hugging Face GPT-2 attention and MLP modules in train mode at their default dropout 0.1
    (attention probabilities, resid_dropout, MLP dropout), run eagerly under
    fused_dropout_masks(), against the fused block and FFN after the same torch.manual_seed:
    outputs and every gradient by the 2x rule (float64 eager reference, fp32 eager as
    PyTorch's error). The module alone gets no causal mask from HF (the model builds it), so
    the block runs non-causal here."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention

    from fused_ckpt.ops.dropout import fused_dropout_masks

    cfg = GPT2Config(n_embd=64, n_head=2, n_layer=1)
    cfg._attn_implementation = "eager"
    assert cfg.attn_pdrop == cfg.resid_pdrop == 0.1
    torch.manual_seed(0)
    att, mlp = GPT2Attention(cfg, layer_idx=0).train(), GPT2MLP(256, cfg).train()
    x = torch.randn(2, 20, 64, device=DEV)
    dy = torch.randn(2, 20, 64, device=DEV)

    def eager(dtype):
        a, m = [type(mod)(*args).to(DEV, dtype).train() for mod, args in ((att, (cfg, 0)), (mlp, (256, cfg)))]
        a.load_state_dict(att.state_dict()), m.load_state_dict(mlp.state_dict())
        xx = x.to(dtype).requires_grad_()
        with fused_dropout_masks():
            torch.manual_seed(7)
            y = m(a(xx)[0])
        params = [xx, a.c_attn.weight, a.c_attn.bias, a.c_proj.weight, a.c_proj.bias,
                  m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias]
        return (y, *torch.autograd.grad(y, params, dy.to(dtype)))

    a, m = att.to(DEV), mlp.to(DEV)
    xx = x.clone().requires_grad_()
    torch.manual_seed(7)
    h = fused_attention_block(xx, a.c_attn.weight.t(), a.c_attn.bias, None, None, None, None, a.c_proj.weight.t(),
                              a.c_proj.bias, 2, causal=False, qkv_layout="packed", recompute="all", backend=backend,
                              dropout_p=0.1, out_dropout_p=0.1)
    y = fused_ffn(h, m.c_fc.weight.t(), m.c_fc.bias, m.c_proj.weight.t(), m.c_proj.bias, "gelu_tanh",
                  backend=backend, dropout_p=0.1)
    params = [xx, a.c_attn.weight, a.c_attn.bias, a.c_proj.weight, a.c_proj.bias,
              m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias]
    got = (y, *torch.autograd.grad(y, params, dy))
    ref, pt = eager(torch.float64), eager(torch.float32)
    names = ("y", "dx", "dc_attn.w", "dc_attn.b", "dc_proj.w", "dc_proj.b", "dc_fc.w", "dc_fc.b", "dmlp.c_proj.w",
             "dmlp.c_proj.b")
    assert (y == 0).float().mean() > 0.05  # the MLP dropout is on
    for name, g, r, p in zip(names, got, ref, pt):
        assert_close_by_rule(g, r, p, name)
    torch.manual_seed(8)  # another seed, other masks
    assert (fused_ffn(h, m.c_fc.weight.t(), m.c_fc.bias, m.c_proj.weight.t(), m.c_proj.bias, "gelu_tanh",
                      backend=backend, dropout_p=0.1) != y).any()


@pytest.mark.parametrize("share", [False, True])
def test_gpt2_mlp_from_module_keeps_its_dropout(share):
    """FusedCheckpointedFFN.from_module(GPT2MLP) at resid_pdrop 0.1 (refused before): in train
    mode it drops what HF's module drops under fused_dropout_masks() (output and every gradient
    by the 2x rule against float64 HF); in eval mode no dropout."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    from fused_ckpt.modules.ffn import FusedCheckpointedFFN
    from fused_ckpt.ops.dropout import fused_dropout_masks

    cfg = GPT2Config(n_embd=32, n_head=2, n_layer=1)
    torch.manual_seed(0)
    hf = GPT2MLP(128, cfg).train()
    fused = FusedCheckpointedFFN.from_module(hf if share else copy.deepcopy(hf), share_parameters=share,
                                             backend="aten")
    assert fused._output_dropout() == 0.1 and "dropout=0.1" in repr(fused)
    x, dy = torch.randn(2, 10, 32), torch.randn(2, 10, 32)

    def run(mod, dtype, seed=4):
        m = copy.deepcopy(mod).to(dtype)
        xx = x.to(dtype).requires_grad_()
        torch.manual_seed(seed)
        y = m(xx)
        params = [xx, m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias] if hasattr(m, "c_fc") else \
            [xx, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias]
        grads = list(torch.autograd.grad(y, params, dy.to(dtype)))
        if not hasattr(m, "c_fc"):  # a copy: nn.Linear layout, HF's Conv1D is [in, out]
            grads[1], grads[3] = grads[1].t(), grads[3].t()
        return (y, *grads)

    got = run(fused, torch.float32)
    with fused_dropout_masks():
        ref, pt = run(hf, torch.float64), run(hf, torch.float32)
    assert (got[0] == 0).float().mean() > 0.05
    for name, g, r, p in zip(("y", "dx", "dc_fc.w", "dc_fc.b", "dc_proj.w", "dc_proj.b"), got, ref, pt):
        assert_close_by_rule(g, r, p, name)
    assert not torch.equal(run(fused, torch.float32, seed=5)[0], got[0])
    fused.eval(), hf.eval()
    torch.testing.assert_close(fused(x), hf(x), atol=1e-5, rtol=1e-5)
    assert (fused(x) != 0).all()
