"""The demo's table is built from real measurements; check its relations on a tiny stack."""
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


def test_demo_main_prints(capsys):
    demo.main(["--layers", "2", "--tokens", "16", "--d-model", "16", "--d-ff", "32", "--steps", "2"])
    out = capsys.readouterr().out
    assert "| eager |" in out and "| FusedCheckpointedFFN |" in out


def test_demo_reports_progress_per_variant(capsys):
    """``make demo`` takes a while: one line on stderr as each variant starts and finishes."""
    demo.main(["--layers", "1", "--tokens", "8", "--d-model", "8", "--d-ff", "16", "--steps", "1"])
    out, err = capsys.readouterr()
    names = ["eager", "checkpoint (non-reentrant)", "checkpoint (reentrant)", "FusedCheckpointedFFN"]
    lines = err.splitlines()
    for k, name in enumerate(names, 1):
        start = next(i for i, ln in enumerate(lines) if ln.startswith(f"demo: [{k}/4] {name}: warm-up"))
        done = next(i for i, ln in enumerate(lines) if ln.startswith(f"demo: [{k}/4] {name}: done in"))
        assert start < done
    assert "| FusedCheckpointedFFN |" in out and "done in" not in out
    demo.main(["--layers", "1", "--tokens", "8", "--d-model", "8", "--d-ff", "16", "--steps", "1", "--quiet"])
    assert capsys.readouterr().err == ""
