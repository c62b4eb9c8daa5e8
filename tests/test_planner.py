"""The planner: whole-model saved bytes predicted exactly (patched tiny Hugging Face models,
measured with saved_tensors_hooks), parameter counts, FLOPs, verdicts, configs, and the CLI."""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

from fused_ckpt.cli import main  # noqa: E402
from fused_ckpt.configs import BUILTIN_CONFIGS, ModelConfig, load_config  # noqa: E402
from fused_ckpt.integrations.hf import patch_hf_model  # noqa: E402
from fused_ckpt.planner import (VERDICT_FULL, VERDICT_SELECTIVE, VERDICT_SKIP, model_flops,  # noqa: E402
                                plan)
from fused_ckpt.policy import BudgetTooSmall, apply_checkpointing  # noqa: E402

from .helpers import SavedTensors  # noqa: E402
from .helpers import unique_saved_bytes  # noqa: E402

B, S = 2, 8
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, attn_implementation="eager")


def _tiny(kind: str, **kw):
    cfgs = {
        "llama": lambda: transformers.LlamaConfig(**{**TINY, **kw}),
        "mistral": lambda: transformers.MistralConfig(**{**TINY, "sliding_window": None, **kw}),
        "qwen2": lambda: transformers.Qwen2Config(**{**TINY, **kw}),
    }
    cfg = cfgs[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).train()


def _measure(model, ids):
    params = list(model.parameters())
    with SavedTensors() as s:
        out = model(ids, labels=ids, use_cache=False)
    return unique_saved_bytes(s.saved, params), out


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_whole_model_saved_bytes_are_predicted_exactly(kind, dtype):
    """For three budgets (full recompute, selective, none) the planner's activation bytes
    equal the distinct storages autograd keeps for model(ids, labels=ids)."""
    model = _tiny(kind)
    patch_hf_model(model, None, backend="aten")
    model.to(dtype)
    ids = torch.randint(0, 96, (B, S))
    lo = plan(model, B, S, dtype, 10**9).min_activation_bytes
    hi = plan(model, B, S, dtype, 10**9).max_activation_bytes
    verdicts = set()
    for budget in (lo, (lo + hi) // 2, hi):
        p = plan(model, B, S, dtype, budget)
        verdicts.add(p.verdict)
        apply_checkpointing(model, p.policy, batch=B, seq=S)
        measured, out = _measure(model, ids)
        assert measured == p.activation_bytes, (budget, p.verdict)
        out.loss.backward()
    assert verdicts == {VERDICT_FULL, VERDICT_SELECTIVE, VERDICT_SKIP}


def test_prediction_without_loss_and_with_tied_embeddings():
    model = _tiny("llama", tie_word_embeddings=True)
    patch_hf_model(model, "full", backend="aten")
    ids = torch.randint(0, 96, (B, S))
    params = list(model.parameters())
    with SavedTensors() as s:
        model(ids, use_cache=False)
    p = plan(model, B, S, torch.float32, 10**9, include_loss=False)
    assert unique_saved_bytes(s.saved, params) == p.min_activation_bytes


@pytest.mark.parametrize("kind,kw", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                     ("llama", {"attention_bias": True, "mlp_bias": True}), ("qwen2", {}),
                                     ("mistral", {"head_dim": 64})])
def test_parameter_count_matches_the_model(kind, kw):
    model = _tiny(kind, **kw)
    assert load_config(model.config).num_parameters() == sum(p.numel() for p in model.parameters())


def test_model_flops_gemm_part_matches_flop_counter():
    """FlopCounterMode on the unpatched eager model counts the GEMMs (x3 for fwd+bwd) and the
    eager attention in full (QK^T, PV: 4 B H S^2 D forward, twice that backward); the planner
    counts the same GEMMs and causal attention as half of that with a 2.5x backward."""
    model = _tiny("llama")
    ids = torch.randint(0, 96, (B, S))
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids, labels=ids, use_cache=False).loss.backward()
    cfg = load_config(model.config)
    core = 4 * B * cfg.num_heads * S * S * cfg.head_dim
    eager_attn = cfg.num_layers * 3 * core
    planned_attn = cfg.num_layers * (core // 2 + (5 * (core // 2)) // 2)
    assert counter.get_total_flops() - eager_attn == model_flops(cfg, B, S) - planned_attn


# ----------------------------------------------------------------------------- verdicts and budgets
def test_verdicts_minimum_and_monotone():
    lo = plan("llama-7b", 8, 4096, "bf16", 10**15).min_activation_bytes
    hi = plan("llama-7b", 8, 4096, "bf16", 10**15).max_activation_bytes
    assert plan("llama-7b", 8, 4096, "bf16", lo).verdict == VERDICT_FULL
    assert plan("llama-7b", 8, 4096, "bf16", hi).verdict == VERDICT_SKIP
    with pytest.raises(BudgetTooSmall) as e:
        plan("llama-7b", 8, 4096, "bf16", lo - 1)
    assert e.value.minimum == lo and str(lo) in str(e.value)
    prev = None
    for k in range(0, 11):
        p = plan("llama-7b", 8, 4096, "bf16", lo + (hi - lo) * k // 10)
        assert p.activation_bytes <= p.budget
        if prev is not None:
            assert p.activation_bytes >= prev.activation_bytes
            assert p.recompute_flops <= prev.recompute_flops
        prev = p


def test_optimizer_states_count_against_the_budget():
    cfg = BUILTIN_CONFIGS["llama3-8b"]
    n = cfg.num_parameters()
    assert 8.0e9 < n < 8.1e9  # the published size
    p = plan("llama3-8b", 1, 2048, "bf16", "200GiB", optimizer="adamw")
    assert (p.weight_bytes, p.grad_bytes, p.optimizer_bytes) == (2 * n, 2 * n, 4 * n)
    assert p.total_bytes == 8 * n + p.activation_bytes <= p.budget
    sgd = plan("llama3-8b", 1, 2048, "bf16", "200GiB", optimizer="sgd")
    assert sgd.optimizer_bytes == 0
    assert plan("llama3-8b", 1, 2048, "bf16", "200GiB").static_bytes == 0
    with pytest.raises(BudgetTooSmall, match="static \\+ activations"):
        plan("llama3-8b", 1, 2048, "bf16", "40GiB", optimizer="adamw")


def test_builtin_shapes():
    assert {k: (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size)
            for k, c in BUILTIN_CONFIGS.items()} == {
        "llama-7b": (4096, 11008, 32, 32, 32, 32000), "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
        "mistral-7b": (4096, 14336, 32, 32, 8, 32000), "qwen2-7b": (3584, 18944, 28, 28, 4, 152064),
        "qwen3-8b": (4096, 12288, 36, 32, 8, 151936), "gemma2-9b": (3584, 14336, 42, 16, 8, 256000),
        "gpt-neox-20b": (6144, 24576, 44, 64, 64, 50432)}  # the new three: tests/test_planner_configs.py
    assert 6.7e9 < BUILTIN_CONFIGS["llama-7b"].num_parameters() < 6.8e9
    assert 7.2e9 < BUILTIN_CONFIGS["mistral-7b"].num_parameters() < 7.3e9
    assert 7.6e9 < BUILTIN_CONFIGS["qwen2-7b"].num_parameters() < 7.7e9


def test_plan_of_a_non_hf_module_uses_its_fused_sites():
    from .test_policy import Net

    torch.manual_seed(0)
    net = Net(n_layers=3)
    full = apply_checkpointing(net, "full", batch=B, seq=S).total_saved_bytes
    p = plan(net, B, S, torch.float32, full + 3000)
    assert p.activation_bytes <= full + 3000 and p.model_flops is None
    assert p.weight_bytes == 4 * sum(q.numel() for q in net.parameters())


# ----------------------------------------------------------------------------- configs
def test_config_json_path_and_folder(tmp_path):
    cfg = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "attn_implementation"})
    cfg.save_pretrained(tmp_path)
    a = load_config(str(tmp_path / "config.json"))
    b = load_config(str(tmp_path))
    assert a.hidden_size == b.hidden_size == 64 and a.num_kv_heads == 1
    assert plan(str(tmp_path / "config.json"), B, S, "fp32", "1GiB").verdict == VERDICT_SKIP


@pytest.mark.parametrize("content,match", [
    ("{not json", "malformed JSON"),
    ('{"model_type": "gpt2", "n_embd": 64}', "model_type 'gpt2' is not supported"),
    ('{"model_type": "llama", "hidden_size": 64}', "missing required key '"),
    ('{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 0, '
     '"num_attention_heads": 2, "vocab_size": 10}', "num_hidden_layers must be a positive integer"),
    ('{"model_type": "llama", "hidden_size": "64", "intermediate_size": 96, "num_hidden_layers": 2, '
     '"num_attention_heads": 2, "vocab_size": 10}', "hidden_size must be a positive integer"),
    ('{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, '
     '"num_attention_heads": 2, "vocab_size": 10, "hidden_act": "gelu"}', "hidden_act 'gelu'"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_configs(tmp_path, content, match):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_config(str(path))


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        plan("llama-9000", 1, 1, "bf16", "1GiB")
    for kw in ({"batch": 0}, {"seq": -3}, {"batch": 1.5}):
        args = {"batch": 1, "seq": 16, **kw}
        with pytest.raises(ValueError, match="positive integer"):
            plan("llama-7b", args["batch"], args["seq"], "bf16", "1GiB")
    with pytest.raises(ValueError, match="dtype"):
        plan("llama-7b", 1, 16, "int8", "1GiB")
    with pytest.raises(ValueError, match="malformed"):
        plan("llama-7b", 1, 16, "bf16", "lots")
    with pytest.raises(ValueError, match="optimizer"):
        plan("llama-7b", 1, 16, "bf16", "1GiB", optimizer="lion")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig("x", 64, 96, 2, 4, 3, 10)


# ----------------------------------------------------------------------------- CLI
BUDGETS = {"8.6GiB": VERDICT_FULL, "100GiB": VERDICT_SELECTIVE, "200GiB": VERDICT_SKIP}


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_cli_plan_llama_7b(budget, capsys):
    rc = main(["plan", "--model", "llama-7b", "--batch", "8", "--seq", "4096", "--dtype", "bf16",
               "--budget", budget, "--optimizer", "none", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("model llama-7b: batch 8, seq 4096, bfloat16")
    layer_rows = [ln for ln in lines if ln.split() and ln.split()[0].isdigit()
                  and ("self_attn=" in ln or "block=" in ln)]
    assert [int(ln.split()[0]) for ln in layer_rows] == list(range(32))
    # a layer is either whole-block recompute or per-site dials for both its sites
    assert all("block='full'" in ln or "mlp=" in ln for ln in layer_rows)
    if BUDGETS[budget] == VERDICT_FULL:
        assert all("block='full'" in ln for ln in layer_rows)
    for item in ("model.embed_tokens", "model.norm", "lm_head+loss:"):
        assert any(ln.split()[:2] == ["-", item] for ln in lines), item
    assert any(ln.startswith("total ") for ln in lines)
    assert f"verdict: {BUDGETS[budget]}" in lines
    summary = json.loads(lines[-1])
    p = plan("llama-7b", 8, 4096, "bf16", budget)
    assert summary["activation_bytes"] == p.activation_bytes
    assert summary["recompute_flops"] == p.recompute_flops
    assert summary["verdict"] == p.verdict == BUDGETS[budget]
    assert f"({p.activation_bytes} bytes" in out
    assert f"= {p.overhead_pct:.2f}% of" in out


def test_cli_optimizer_rows(capsys):
    assert main(["plan", "--model", "qwen2-7b", "--batch", "1", "--seq", "1024", "--budget", "80GB",
                 "--optimizer", "adamw"]) == 0
    out = capsys.readouterr().out
    assert "optimizer (adamw" in out and "gradients" in out


def test_cli_budget_is_a_device_budget_by_default(capsys):
    """Without --optimizer the plan counts weights, gradients and AdamW states (and says so):
    llama-7b does not "fit" in 1 GiB; --optimizer none plans activations alone."""
    argv = ["plan", "--model", "llama-7b", "--batch", "1", "--seq", "512", "--budget"]
    assert main(argv + ["1GiB"]) == 2
    out, err = capsys.readouterr()
    p = plan("llama-7b", 1, 512, "bf16", "80GiB", optimizer="adamw")
    assert out == "" and "static + activations" in err and "--optimizer none" in err
    assert f"({p.minimum_bytes} bytes)" in err
    assert main(argv + ["80GiB"]) == 0
    out = capsys.readouterr().out
    assert "counted against the budget: weights and gradients (bfloat16), adamw states (2 per parameter" in out
    assert "note: --optimizer not given: assumed adamw" in out
    assert f"({p.total_bytes} bytes) of budget" in out
    # the totals rows: label, then the size; no padding inside the parentheses
    rows = {ln[2:].split("  ")[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert set(rows) >= {"activations", "weights", "gradients", "optimizer (adamw)", "total"}, rows
    assert re.search(r"^  optimizer \(adamw\) +\d+\.\d\d GiB$", rows["optimizer (adamw)"])
    assert main(argv + ["1GiB", "--optimizer", "none"]) == 0
    out = capsys.readouterr().out
    assert "counted against the budget: activations only" in out and "assumed" not in out
    assert plan("llama-7b", 1, 512, "bf16", "1GiB", optimizer="none").static_bytes == 0


@pytest.mark.parametrize("budget", [150_000_000_000, 1.5e11, "1.5e11", "150GB", "150 GB", "0.15TB"])
def test_plan_accepts_the_budget_forms_of_memory_budget(budget):
    from fused_ckpt import MemoryBudget

    want = 150_000_000_000
    assert plan("llama-7b", 1, 512, "bf16", budget).budget == want
    assert MemoryBudget(budget).budget == want


@pytest.mark.parametrize("args,match", [
    (["--model", "llama-9000"], "unknown model 'llama-9000'"),
    (["--model", "{BAD}"], "malformed JSON"),
    (["--budget", "1GiB"], "below the minimum possible activation memory, 8.51 GiB (9135980544 bytes)"),
    (["--batch", "0"], "argument --batch: must be a positive integer"),
    (["--seq", "-5"], "argument --seq: must be a positive integer"),
    (["--batch", "two"], "expected a positive integer"),
    (["--budget", "24 gigs"], "malformed byte size"),
    (["--budget", "0"], "must be positive"),
    (["--dtype", "int4"], "invalid choice"),
])
def test_cli_bad_input(args, match, capsys, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{oops")
    base = {"--model": "llama-7b", "--batch": "8", "--seq": "4096", "--budget": "100GiB", "--optimizer": "none"}
    argv = ["plan"]
    given = dict(zip(args[::2], args[1::2]))
    for k, v in {**base, **given}.items():
        argv += [k, str(bad) if v == "{BAD}" else v]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert match in err and "Traceback" not in err and out == ""


def test_cli_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "fused_ckpt.cli", "plan", "--model", "mistral-7b", "--batch", "1",
                        "--seq", "8192", "--budget", "1KiB"], capture_output=True, text=True, timeout=120,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
    assert r.returncode == 2
    assert "minimum possible" in r.stderr and "Traceback" not in r.stderr
