"""The LM head + loss as a planner site: each dial's predicted bytes equal what autograd keeps
(saved_tensors_hooks) for the fused op / eager head on tiny shapes, and the solver trades the
head against the layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ckpt
from fused_ckpt.cli import main
from fused_ckpt.configs import load_config
from fused_ckpt.planner import head_options, plan

from .helpers import SavedTensors

T, D, V = 24, 16, 40


def _measure(dial, dtype, bias):
    torch.manual_seed(0)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, dtype=dtype, requires_grad=True)
    b = torch.randn(V, dtype=dtype, requires_grad=True) if bias else None
    t = torch.randint(0, V, (T,))
    params = [w] + ([b] if bias else [])
    with SavedTensors() as s:
        if dial == "logits":  # the eager head + Hugging Face's loss (logits upcast to fp32)
            loss = F.cross_entropy(F.linear(x, w, b).float(), t)
        else:
            loss = fused_ckpt.fused_linear_cross_entropy(x, w, t, b, recompute=dial, backend="aten")
    loss.backward()
    assert x.grad is not None and w.grad.abs().sum() > 0
    return s.unique_bytes(params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dial", [True, False, "logits"], ids=str)
def test_head_option_bytes_equal_saved_tensors(dial, dtype):
    e = torch.empty((), dtype=dtype).element_size()
    for bias in (False, True):
        measured = _measure(dial, dtype, bias)
        assert measured > 0
        assert head_options(T, D, V, e, bias=bias)[dial].saved_bytes == measured, (dial, bias)


def test_head_option_flops():
    opts = head_options(T, D, V, 2)
    assert opts[True].recompute_flops == 2 * T * D * V  # one logits GEMM in backward
    assert opts[False].recompute_flops == 0 and opts["logits"].recompute_flops == 0


def test_solver_trades_the_head_against_the_layers():
    """The free head lowers the minimum by exactly eager - recompute=True bytes; at the minimum
    the head recomputes, with room it does not; pinning reproduces the eager-only plan."""
    cfg = load_config("llama-7b")
    B, S = 2, 512
    Tk, Vc = B * S, cfg.vocab_size
    eager = plan(cfg, B, S, "bf16", 10**12, head="logits")
    free = plan(cfg, B, S, "bf16", 10**12)
    drop = 4 * Tk * Vc + 8 * Tk + 4 - (4 * Tk + 8 * Tk)
    assert eager.min_activation_bytes - free.min_activation_bytes == drop
    low = plan(cfg, B, S, "bf16", free.min_activation_bytes)
    assert low.head_dial is True and low.activation_bytes == free.min_activation_bytes
    roomy = plan(cfg, B, S, "bf16", 10**12)
    opts = head_options(Tk, cfg.hidden_size, Vc, 2)
    assert roomy.head_dial == min((False, "logits"), key=lambda dl: opts[dl].saved_bytes)  # no recompute, fewer bytes
    assert roomy.verdict == "memory sufficient: skip checkpointing"
    # at the eager-only minimum, the free head never costs more recompute (it may buy the layers room)
    p_e = plan(cfg, B, S, "bf16", eager.min_activation_bytes, head="logits")
    p_f = plan(cfg, B, S, "bf16", eager.min_activation_bytes)
    assert p_f.recompute_flops <= p_e.recompute_flops and p_f.activation_bytes <= eager.min_activation_bytes
    assert plan(cfg, B, S, "bf16", 10**12, head=(True,)).head_dial is True
    with pytest.raises(ValueError, match="head dial"):
        plan(cfg, B, S, "bf16", 10**12, head="yes")


def test_cli_plan_head_row(capsys):
    assert main(["plan", "--model", "llama3-8b", "--batch", "8", "--seq", "4096", "--budget", "100GiB",
                 "--head", "eager"]) == 0
    out = capsys.readouterr().out
    assert "lm_head+loss: eager (fp32 log-softmax)" in out
    assert main(["plan", "--model", "llama3-8b", "--batch", "1", "--seq", "4096", "--budget", "100GiB"]) == 0
    assert "lm_head+loss: fused recompute=False" in capsys.readouterr().out
