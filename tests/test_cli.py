"""Command-line user experience: bad input to ``fused-ckpt`` (plan, bench), ``python -m
fused_ckpt.demo`` and ``python -m fused_ckpt.bench`` ends in exit status 2 and one ``error:``
line on stderr naming what was wrong, never a traceback; the bench fails before running any
benchmark. Most cases run in-process (an escaping exception fails the test just as a traceback
would); a few run the real entry points in a subprocess."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fused_ckpt import __version__
from fused_ckpt import demo
from fused_ckpt.bench import main as bench_main
from fused_ckpt.cli import main as cli_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 2, "vocab_size": 10}


def _exit_code(fn, argv) -> int:
    try:
        rc = fn(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    return rc


def _assert_clean_error(rc, err, *needles):
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    for n in needles:
        assert n in lines[0], (n, err)


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=kw.get("cwd", ROOT))


# ----------------------------------------------------------------------------- plan: malformed configs
@pytest.mark.parametrize("extra,key", [
    ({"model_type": "mistral", "sliding_window": "4096"}, "sliding_window"),
    ({"model_type": "mistral", "sliding_window": -1}, "sliding_window"),
    ({"use_sliding_window": True, "sliding_window": 0}, "sliding_window"),
    ({"rope_parameters": {"rope_theta": [1]}}, "rope_parameters: rope_theta"),
    ({"rope_theta": "abc"}, "rope_theta"),
    ({"rope_theta": -5.0}, "rope_theta"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
])
def test_plan_malformed_config_names_file_and_key(tmp_path, capsys, extra, key):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_CONFIG, **extra}))
    rc = _exit_code(cli_main, ["plan", "--model", str(path), "--batch", "1", "--seq", "16", "--budget", "1GiB"])
    out, err = capsys.readouterr()
    _assert_clean_error(rc, err, str(path), key)
    assert out == ""


def test_plan_config_errors_name_the_file_not_its_name_or_path(tmp_path, capsys):
    """A saved Hugging Face config carries ``_name_or_path``; errors still name the file."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_CONFIG, "_name_or_path": "org/model", "rope_theta": "abc"}))
    rc = _exit_code(cli_main, ["plan", "--model", str(path), "--batch", "1", "--seq", "16", "--budget", "1GiB"])
    _assert_clean_error(rc, capsys.readouterr().err, str(path), "rope_theta")


# ----------------------------------------------------------------------------- sizes need a unit
@pytest.mark.parametrize("argv,option", [
    (["plan", "--model", "llama-7b", "--batch", "1", "--seq", "16", "--budget", "24"], "--budget"),
    (["bench", "--memory-cap", "24"], "--memory-cap"),
])
def test_size_without_unit_is_refused(capsys, argv, option):
    rc = _exit_code(cli_main, argv)
    _assert_clean_error(rc, capsys.readouterr().err, option, "'24' has no unit", "24GiB", "24B")


def test_sizes_accept_units_exponents_and_spaces(capsys):
    for budget in ("160GiB", "160 GiB", "1.5e11B", "171798691840B"):
        assert cli_main(["plan", "--model", "llama-7b", "--batch", "1", "--seq", "512", "--budget", budget]) == 0
    capsys.readouterr()


# ----------------------------------------------------------------------------- bench: errors before any run
def test_bench_out_under_a_file_fails_before_running(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for entry, argv in ((cli_main, ["bench"]), (bench_main, [])):
        rc = _exit_code(entry, argv + ["--device", "cpu", "--out", str(afile / "sub"), "--no-progress"])
        out, err = capsys.readouterr()
        _assert_clean_error(rc, err, "--out", str(afile / "sub"))
        assert "results" not in out  # nothing ran
    rc = _exit_code(cli_main, ["bench", "--device", "cpu", "--out", str(afile), "--no-progress"])
    _assert_clean_error(rc, capsys.readouterr().err, "--out", str(afile))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fused-ckpt {__version__}"


# ----------------------------------------------------------------------------- demo
@pytest.mark.parametrize("argv,needle", [
    (["--steps", "0"], "--steps"),
    (["--layers", "-1"], "--layers"),
    (["--tokens", "many"], "--tokens"),
    (["--activation", "bogus"], "--activation"),
    (["--device", "bogus"], "--device"),
    (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"],
     "--device"),
])
def test_demo_bad_arguments(capsys, argv, needle):
    rc = _exit_code(demo.main, argv)
    _assert_clean_error(rc, capsys.readouterr().err, needle)


def test_demo_help_describes_every_option(capsys):
    parser = demo.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    text = capsys.readouterr().out
    for opt in ("--layers", "--tokens", "--d-model", "--d-ff", "--activation", "--steps", "--device"):
        assert opt in text


# ----------------------------------------------------------------------------- the real entry points
def test_entry_points_in_a_subprocess(tmp_path):
    """A traceback printed by the interpreter (not just an exception) is what the user sees."""
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**TINY_CONFIG, "rope_parameters": {"rope_theta": [1]}}))
    r = _run(["-m", "fused_ckpt.cli", "plan", "--model", str(bad), "--batch", "1", "--seq", "8", "--budget", "1GiB"])
    _assert_clean_error(r.returncode, r.stderr, str(bad), "rope_theta")
    r = _run(["-m", "fused_ckpt.demo", "--steps", "0"])
    _assert_clean_error(r.returncode, r.stderr, "--steps")
