"""The demo's table is built from real measurements; check its relations on a tiny stack."""
import pytest
import torch

from fused_ckpt import demo


def test_demo_table_relations(capsys):
    dev, rows = demo.run(layers=3, tokens=40, d_model=32, d_ff=64, steps=3, device="cpu")
    by = {r["variant"]: r for r in rows}
    eager, nonre = by["eager"], by["checkpoint (non-reentrant)"]
    reent, fused = by["checkpoint (reentrant)"], by["FusedCheckpointedFFN"]
    # only the block inputs stay (plus the in_proj/head inputs every variant keeps)
    assert fused["saved_bytes"] == nonre["saved_bytes"] == reent["saved_bytes"] < eager["saved_bytes"]
    assert fused["gflops"] == nonre["gflops"] < reent["gflops"]
    assert eager["gflops"] < fused["gflops"]
    assert fused["grad_diff"] < 1e-4 and fused["loss_diff"] < 1e-4
    table = demo.format_table(dev, rows, 3, 40, 32, 64, "gelu", torch.float32)
    assert table.count("\n| ") == 5 and "FusedCheckpointedFFN" in table


TINY_LM = ["--lm-vocab", "200", "--lm-d-model", "32", "--lm-seq", "16"]


def test_demo_lm_head_relations():
    """The LM-head part: the fused loss head keeps exactly what the planner predicts less than
    Hugging Face's logits + cross-entropy (the rest of the model is the same), with the same
    losses and gradients."""
    pytest.importorskip("transformers")
    dev, rows, pred = demo.run_lm_head(vocab=200, d_model=32, batch=2, seq=16, steps=2, device="cpu")
    hf, fused = rows
    assert (hf["variant"], fused["variant"]) == ("HF logits + cross-entropy", "fused loss head")
    assert hf["peak_bytes"] is None and fused["peak_bytes"] is None   # CPU
    delta = pred[hf["variant"]] - pred[fused["variant"]]
    assert delta >= 2 * 16 * 200 * 4 - 2 * 16 * 12   # the fp32 [tokens, vocab] log-softmax, less the lse + labels
    assert hf["saved_bytes"] - fused["saved_bytes"] == delta
    assert fused["loss_diff"] < 1e-4 and fused["grad_diff"] < 1e-4 and fused["final_loss"] > 0
    table = demo.format_lm_table(dev, rows, pred, 200, 32, 2, 16, torch.float32)
    assert table.count("\n| ") == 3 and f"{delta / 2**20:.2f} MiB" in table


def test_demo_main_prints(capsys):
    pytest.importorskip("transformers")
    demo.main(["--layers", "2", "--tokens", "16", "--d-model", "16", "--d-ff", "32", "--steps", "2", *TINY_LM])
    out = capsys.readouterr().out
    assert "| eager |" in out and "| FusedCheckpointedFFN |" in out
    assert "| HF logits + cross-entropy |" in out and "| fused loss head |" in out
    demo.main(["--layers", "1", "--tokens", "8", "--d-model", "8", "--d-ff", "16", "--steps", "1", "--no-lm-head"])
    out = capsys.readouterr().out
    assert "| eager |" in out and "LM head" not in out


def test_demo_reports_progress_per_variant(capsys):
    """``make demo`` takes a while: one line on stderr as each variant starts and finishes."""
    pytest.importorskip("transformers")
    demo.main(["--layers", "1", "--tokens", "8", "--d-model", "8", "--d-ff", "16", "--steps", "1", *TINY_LM])
    out, err = capsys.readouterr()
    names = [("", 4, "eager"), ("", 4, "checkpoint (non-reentrant)"), ("", 4, "checkpoint (reentrant)"),
             ("", 4, "FusedCheckpointedFFN"), ("LM ", 2, "HF logits + cross-entropy"), ("LM ", 2, "fused loss head")]
    lines = err.splitlines()
    last = -1
    for part, n, name in names:
        k = 1 + [nm for p, _, nm in names if p == part].index(name)
        start = next(i for i, ln in enumerate(lines) if ln.startswith(f"demo: [{part}{k}/{n}] {name}: warm-up"))
        done = next(i for i, ln in enumerate(lines) if ln.startswith(f"demo: [{part}{k}/{n}] {name}: done in"))
        assert last < start < done
        last = done
    assert "| FusedCheckpointedFFN |" in out and "| fused loss head |" in out and "done in" not in out
    demo.main(["--layers", "1", "--tokens", "8", "--d-model", "8", "--d-ff", "16", "--steps", "1", "--quiet",
               *TINY_LM])
    assert capsys.readouterr().err == ""
