"""The benchmark suites (``fused-ckpt bench``) in --quick mode on CPU with tiny shapes: the
results.json schema, finite numbers, saved bytes of the fused variants below eager, the PNG
plots, ``--compare``, and clear errors for bad arguments. One quick run of all four suites
is shared by the tests (a few seconds)."""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from fused_ckpt.bench import SUITES, main  # noqa: E402
from fused_ckpt.cli import main as cli_main  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"suite", "shape", "variant", "group", "status", "device", "dtype"}
TOP_KEYS = {"schema", "status", "command", "date", "device", "dtype", "machine", "versions", "timing_method",
            "options", "suites", "rows", "targets", "plots"}
# per suite: (a fused variant, the eager variant it must save less than)
FUSED_VS_EAGER = {
    "ffn": [("fused-aten rc=True", "eager")],
    "attention": [("fused-aten", "eager"), ("fused-aten rc=all", "eager sdpa")],
    "block": [("patched-aten full", "hf eager")],
    "step": [("fused-aten full", "hf eager"), ("fused-aten Selective(ffn)", "hf eager")],
    "loss": [("fused-aten rc=True", "eager"), ("fused-aten rc=False", "eager")],
}


def _strict_json(path):
    def reject(c):
        raise ValueError(f"non-finite number {c} in {path}")

    with open(path) as f:
        return json.load(f, parse_constant=reject)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    rc = main(["--quick", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    return out, _strict_json(out / "results.json")


def _ok_rows(data, suite):
    return [r for r in data["rows"] if r["suite"] == suite and r["status"] == "ok"]


def test_results_json_schema(quick_run):
    out, data = quick_run
    assert TOP_KEYS <= set(data), TOP_KEYS - set(data)
    assert data["schema"] == "fused_ckpt.bench/1"
    assert data["status"] == "complete"
    assert data["device"] == "cpu" and data["dtype"] == "fp32" and data["quick"] is True
    assert "gpu" in data["machine"] and data["machine"]["cpu"]
    for key in ("torch", "triton", "fused_ckpt", "python"):
        assert data["versions"][key]
    assert set(data["suites"]) == set(SUITES)
    assert all(info["status"] == "complete" for info in data["suites"].values()), data["suites"]
    for r in data["rows"]:
        assert ROW_KEYS <= set(r), (r["variant"], ROW_KEYS - set(r))
        assert r["status"] in ("ok", "skipped", "error")
        assert r["status"] != "error", (r["suite"], r["variant"], r.get("error"))
        if r["status"] == "skipped":
            assert r["reason"]


def test_every_measured_number_is_finite(quick_run):
    _, data = quick_run
    for suite in SUITES:
        rows = _ok_rows(data, suite)
        assert len(rows) >= 4, suite
        for r in rows:
            t = r["time_ms"]
            for k in ("median_ms", "q20_ms", "q80_ms"):
                assert isinstance(t[k], float) and math.isfinite(t[k]) and t[k] > 0, (suite, r["variant"], k)
            assert t["q20_ms"] <= t["median_ms"] <= t["q80_ms"]
            assert t["n"] == data["options"]["reps"]
            assert r["tflops_model"] > 0 and math.isfinite(r["tflops_model"])
            if r["group"] != "floor":
                assert r["saved_bytes"] > 0
                e = r["grad_err"]
                assert e["max_abs"] is not None and math.isfinite(e["max_abs"]), (suite, r["variant"], e)
                assert r["grad_ok"] is not False, (suite, r["variant"], e)


def test_fused_saves_fewer_bytes_than_eager(quick_run):
    _, data = quick_run
    for suite, pairs in FUSED_VS_EAGER.items():
        by = {(r["shape"], r["variant"]): r for r in _ok_rows(data, suite)}
        shapes = {s for s, _ in by}
        assert shapes
        for shape in shapes:
            for fused, eager in pairs:
                if (shape, fused) not in by:
                    continue
                assert by[(shape, fused)]["saved_bytes"] < by[(shape, eager)]["saved_bytes"], (suite, shape, fused)
        assert any((s, f) in by for s in shapes for f, _ in pairs), suite


def test_step_suite_reports_throughput_and_max_batch(quick_run):
    _, data = quick_run
    rows = _ok_rows(data, "step")
    names = {r["variant"] for r in rows}
    assert {"hf eager", "hf ckpt-nonreentrant", "hf ckpt-reentrant", "fused-aten none", "fused-aten full",
            "fused-aten EveryN(2)", "fused-aten Selective(ffn)", "fused-aten sqrt",
            "fused-aten MemoryBudget(25%)", "fused-aten MemoryBudget(50%)"} <= names
    for r in rows:
        assert r["tokens_per_s"] > 0
        assert isinstance(r["max_batch"], int) and r["max_batch"] > 0
    by = {r["variant"]: r for r in rows}
    # less saved memory per sequence -> a larger batch under the same cap
    assert by["fused-aten full"]["max_batch"] > by["fused-aten none"]["max_batch"]
    assert by["hf ckpt-nonreentrant"]["max_batch"] > by["hf eager"]["max_batch"]


def test_step_suite_runs_every_row_with_both_heads(quick_run):
    """Each step row says which LM head + loss it ran (Hugging Face's logits or the fused linear
    cross-entropy) and has a twin with the other head (the compile rows excepted); the saved-bytes
    difference of every measured pair is on both rows and equals the planner's head prediction."""
    _, data = quick_run
    rows = [r for r in data["rows"] if r["suite"] == "step"]
    by = {r["variant"]: r for r in rows}
    pred = data["suites"]["step"]["head_prediction"]
    assert pred["delta_bytes"] == pred["hf_head_bytes"] - pred["fused_head_bytes"] > 0
    pairs = 0
    for r in rows:
        assert r["head"] in ("hf", "fused"), r["variant"]
        if r["variant"].startswith("compile"):
            assert r["head"] == "hf"
            continue
        twin = by[r["head_twin"]]
        assert twin["head_twin"] == r["variant"] and {r["head"], twin["head"]} == {"hf", "fused"}
        assert r["head"] == ("hf" if r["variant"].startswith("hf ") != r["variant"].endswith(" head") else "fused")
        if r["status"] == twin["status"] == "ok" and r["head"] == "hf":
            assert r["saved_bytes"] - twin["saved_bytes"] == pred["delta_bytes"], r["variant"]
            assert r["head_saved_delta_bytes"] == twin["head_saved_delta_bytes"] == pred["delta_bytes"]
            pairs += 1
    assert pairs >= 10, pairs
    assert by["hf eager +fused head"]["status"] == by["fused-aten full +hf head"]["status"] == "ok"


def test_loss_suite_saved_bytes_are_measured_and_planned(quick_run):
    """The loss suite measures every row's saved bytes, equal to the planner's head prediction for
    the same dial; the fused recompute=True head keeps far less than eager's log-softmax."""
    _, data = quick_run
    rows = {r["variant"]: r for r in _ok_rows(data, "loss")}
    assert {"eager", "fused-aten rc=True", "fused-aten rc=False", "floor 3 GEMMs"} <= set(rows)
    for name in ("eager", "fused-aten rc=True", "fused-aten rc=False"):
        r = rows[name]
        assert r["saved_bytes"] > 0 and r["saved_bytes"] == r["planned_saved_bytes"], (name, r)
        assert r["grad_ok"] is True, (name, r["grad_err"])
    assert rows["fused-aten rc=True"]["hw_flops_units"] == pytest.approx(4.0)
    assert rows["fused-aten rc=False"]["hw_flops_units"] == pytest.approx(3.0)
    assert rows["fused-aten rc=True"]["saved_vs_eager"] < 0.2
    skipped = [r for r in data["rows"] if r["suite"] == "loss" and r["status"] == "skipped"]
    assert {r["variant"] for r in skipped} >= {"compile"} and all(r["reason"] for r in skipped)


def test_targets_are_reported(quick_run):
    out, data = quick_run
    statuses = {t["status"] for t in data["targets"]}
    assert statuses <= {"met", "not met", "not measured"}
    saved = [t for t in data["targets"] if t["id"].startswith("ffn.saved")]
    assert saved and all(t["status"] == "met" for t in saved), saved
    # CUDA targets read "not measured" on CPU
    assert all(t["status"] == "not measured" for t in data["targets"] if "vs_floor" in t["id"])
    md = (out / "results.md").read_text()
    assert "## Targets" in md and "not measured" in md
    for suite in SUITES:
        assert f"## {suite}:" in md


def test_plots_are_pngs(quick_run):
    out, data = quick_run
    assert "step_pareto.png" in data["plots"]
    assert len(data["plots"]) >= 4
    for name in data["plots"]:
        raw = (out / name).read_bytes()
        assert raw[:8] == PNG_SIGNATURE, name
        assert raw[12:16] == b"IHDR"
        width, height = struct.unpack(">II", raw[16:24])
        assert width >= 600 and height >= 400, (name, width, height)
        assert len(raw) > 20_000, (name, len(raw))


def test_compare_prints_ratios(quick_run, tmp_path, capsys):
    out, data = quick_run
    slower = json.loads(json.dumps(data))
    for r in slower["rows"]:
        if r.get("time_ms"):
            r["time_ms"]["median_ms"] *= 2.0
    b = tmp_path / "b.json"
    b.write_text(json.dumps(slower))
    rc = main(["--compare", str(out / "results.json"), str(b)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "B/A time" in text and "2.000" in text and "0.500" in text
    n_ok = sum(r["status"] == "ok" for r in data["rows"])
    assert f"{n_ok} rows in both runs" in text
    # a folder works in place of its results.json, through the fused-ckpt CLI too
    assert cli_main(["bench", "--compare", str(out), str(b)]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--suite", "nope"], "unknown suite 'nope'"),
    (["--memory-cap", "24 lightyears"], "malformed byte size"),
    (["--memory-cap", "0"], "must be positive"),
    (["--compare", "only-one.json"], "expected 2 arguments"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    for entry in (lambda: main(argv), lambda: cli_main(["bench"] + argv)):
        with pytest.raises(SystemExit) as exc:
            entry()
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err


def test_compare_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert main(["--compare", str(missing), str(missing)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "no such file" in err and str(missing) in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["--compare", str(bad), str(bad)]) == 2
    assert "not readable JSON" in capsys.readouterr().err


def test_module_entry_point_reports_errors_on_stderr(tmp_path):
    """``python -m fused_ckpt.bench`` is wired up and bad input gives a non-zero exit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fused_ckpt.bench", "--compare", str(tmp_path / "a.json"),
                           str(tmp_path / "b.json")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and proc.stdout == ""


def test_step_target_counts_only_rows_at_the_same_peak():
    """The end-to-end target on CUDA bf16: the better MemoryBudget row whose peak is within
    PEAK_MATCH of Hugging Face checkpointing's; rows above it do not count."""
    import types

    import torch

    from fused_ckpt.bench import step

    ctx = types.SimpleNamespace(dev="cuda", dtype=torch.bfloat16)
    hf = {"status": "ok", "peak_bytes": 1000}

    def row(peak, ratio):
        return {"status": "ok", "peak_bytes": peak, "tokens_per_s_vs_hf_ckpt": ratio}

    def target(peak_row, saved_row):
        by = {step.HF_NR: hf, f"fused-triton {step.MB_HF_PEAK}": peak_row, f"fused-triton {step.MB_HF}": saved_row}
        return step._target(ctx, by, "triton").to_json()

    t = target(row(1015, 1.2), row(900, 1.05))
    assert t["status"] == "met" and t["value"] == 1.2 and step.MB_HF_PEAK in t["detail"]
    t = target(row(1100, 1.3), row(900, 1.05))  # the faster row is 10% above the peak: not counted
    assert t["status"] == "not met" and t["value"] == 1.05
    t = target(row(1100, 1.3), row(1050, 1.2))
    assert t["status"] == "not met" and "NOT at the same memory" in t["detail"]
    t = target({"status": "skipped", "reason": "unreachable: x"}, {"status": "skipped", "reason": "unreachable: y"})
    assert t["status"] == "not met" and t["value"] is None
    ctx.dev, ctx.dtype = "cpu", torch.float32  # elsewhere: informational only
    by = {step.HF_NR: {"status": "ok", "saved_bytes": 10}, f"fused-aten {step.MB_HF}": {
        "status": "ok", "saved_bytes": 10, "tokens_per_s_vs_hf_ckpt": 0.9}}
    t = step._target(ctx, by, "aten").to_json()
    assert t["status"] == "not measured" and t["info_value"] == 0.9


def test_progress_total_is_fixed_and_reaches_100_percent_once():
    """The bar's total is the whole run from the start; it only moves forward and is full only
    after the last suite, however the steps are announced (parts, extensions, an undeclared
    extra part)."""
    from fused_ckpt.bench._report import Progress

    p = Progress([("ffn", 2), ("attention", 2), ("block", 1)], enabled=False)
    total, seen = p.total, []

    def steps(n, announce=None):
        p.add_total(announce or n)
        for _ in range(n):
            p.update(1, "x")
            seen.append(p.n)

    p.begin_suite("ffn")
    steps(5)
    steps(3, 2)           # announced 2 ...
    p.add_total(1)        # ... and one more while the part runs (the compile timing group)
    p.update(1)
    seen.append(p.n)
    p.end_suite()
    seen.append(p.n)
    after_ffn = p.n
    p.begin_suite("attention")
    steps(4)
    steps(4)
    steps(4)              # a third part the suite did not declare
    p.end_suite()
    seen.append(p.n)
    p.begin_suite("block")
    steps(6)
    assert p.total == total
    assert seen == sorted(seen) and all(n < total for n in seen[:-1]), seen  # full at the last step only
    p.end_suite()
    assert p.n == total
    assert after_ffn == total // 3 and seen[-2] >= total * 2 // 3  # equal shares per suite


def test_one_colour_per_method_in_every_plot():
    from fused_ckpt.bench._report import METHOD_STYLES, method_style

    styles = {g: method_style(g) for g in METHOD_STYLES}
    assert len({c for c, _ in styles.values()}) == len(styles)  # distinct methods, distinct colours
    assert method_style("hf") == method_style("eager")            # the step suite's group names
    assert method_style("hf checkpoint") == method_style("checkpoint")
    assert method_style("something new") == method_style("something new")


def test_bench_says_when_matplotlib_is_missing(tmp_path, monkeypatch, capsys):
    from fused_ckpt.bench import block

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(block, "run", lambda ctx: None)
    assert main(["--suite", "block", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    notes = [ln for ln in out.splitlines() if "pip install matplotlib" in ln]
    assert notes and "no plots" in notes[0], out
