"""benchmarks/gpu_check.sh dry run on CPU: PYTHON is a stand-in that answers each step at once
(pytest writes a junit XML with a failure; benchmarks write a partial results.json) or hangs
until killed, so the script's own logic runs in seconds: step order, the time budget, partial
results of a killed step, and a summary that lists every step with its result."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
STEPS = ["info", "build", "tests", "ffn_core", "attention_step", "ffn_rest", "block", "bench_attention"]

FAKE_PYTHON = r"""#!/usr/bin/env bash
# stand-in for python: records its arguments, then plays the step
echo "AUTOTUNE=${FUSED_CKPT_AUTOTUNE:-unset} $*" >> "$FAKE_LOG"
out=""
prev=""
for a in "$@"; do
  case $a in --junitxml=*) junit=${a#--junitxml=} ;; esac
  [ "$prev" = "--out" ] && out=$a
  prev=$a
done
case " $* " in
  *" -m pytest "*)
    printf '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="7" time="0.1"><testcase classname="tests.test_x" name="test_b" time="0.0"><failure message="fake" /></testcase></testsuite></testsuites>' > "$junit"
    echo "FAILED tests/test_x.py::test_b - AssertionError: fake"
    exit 1 ;;
  *" --out "*)
    mkdir -p "$out"
    echo '{"status": "partial (interrupted)", "rows": []}' > "$out/results.json"
    echo "| fake table of $(basename "$out") |" > "$out/results.md"
    if [[ "$*" =~ $FAKE_HANG ]]; then
      sleep 60 &
      pid=$!
      trap 'kill $pid; exit 143' TERM INT
      wait $pid
    fi
    exit 0 ;;
esac
exit 0  # the info report and the build's import probe
"""


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(log), FAKE_HANG="ffn_core|ffn_rest|block",
               GPU_CHECK_BUDGET_S="16", GPU_CHECK_MIN_STEP_S="1")
    env.pop("FUSED_CKPT_AUTOTUNE", None)
    res = subprocess.run(["bash", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (out / "summary.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \| ([^|]*) \|", summary, re.M)}
    assert [s for s in rows if s in STEPS] == STEPS, summary  # every step, in priority order
    assert rows["info"] == rows["build"] == rows["attention_step"] == "ok", summary
    # junit counts: 7 tests, 1 failure, 2 skipped -> 4 passed; the failed test is listed
    assert rows["tests"] == "FAILED (rc=1): 4 passed, 1 failed, 0 errors, 2 skipped", summary
    assert "FAILED tests/test_x.py::test_b" in summary.split("## Failed tests")[1]
    for killed in ("ffn_core", "ffn_rest"):  # killed by the budget: row says so, partial results stay
        assert rows[killed].startswith("TIMED OUT"), summary
        assert (out / killed / "results.json").is_file() and (out / f"{killed}.log").is_file()
    # block hangs too and takes whatever is left (if anything): nothing remains for the last step
    assert rows["block"].startswith("TIMED OUT") or rows["block"] == "skipped: no time left", summary
    assert rows["bench_attention"] == "skipped: no time left", summary
    assert "fake table of ffn_core" in summary and "fake table of attention_step" in summary
    calls = log.read_text().splitlines()
    pytest_calls = [c for c in calls if " -m pytest " in c]
    assert len(pytest_calls) == 1 and pytest_calls[0].startswith("AUTOTUNE=0 ") and " -m gpu " in pytest_calls[0]
    bench_calls = [i for i, c in enumerate(calls) if " --out " in c]
    assert bench_calls and calls.index(pytest_calls[0]) < bench_calls[0]  # the tests run before the benchmarks
    assert "--ffn-shapes 8192x4096x16384:gelu,8192x4096x14336:swiglu" in calls[bench_calls[0]]
