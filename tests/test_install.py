"""Install paths: the csrc extension compiled on first use when the prebuilt fused_ckpt._C is
missing (plain `pip install -e .` under build isolation), the errors naming commands that work,
the installed package carrying the csrc sources, the Makefile's choice of environment, and the
README's first snippet running as pasted."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fused_ckpt import _ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_CMD = "pip install -e . --no-build-isolation"


def _env(**changes) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


@pytest.mark.slow
def test_first_use_build_when_prebuilt_missing():
    """With fused_ckpt._C unimportable, load() compiles csrc/ (cached under build/ of the
    checkout: about a minute on a fresh clone, seconds afterwards) and the ops it registers
    match the float64 reference."""
    cache = os.path.join(REPO, "build", "jit-test-cache")
    code = textwrap.dedent("""
        import sys
        sys.modules["fused_ckpt._C"] = None  # as if the install had not compiled it
        import torch
        from fused_ckpt import _ext
        from fused_ckpt.activations import get_activation
        from tests.test_ext import _check_against_reference, _make_z

        mod = _ext.load()
        assert mod.__file__.startswith(sys.argv[1]), mod.__file__
        assert mod.WITH_CUDA == 0
        for name, dtype, f in (("gelu", torch.float32, 37), ("swiglu", torch.bfloat16, 130),
                               ("geglu_tanh", torch.float16, 5)):
            z = _make_z(33, get_activation(name).fc1_rows(f), dtype)
            dh = _make_z(33, f, dtype, scale=1.0)
            _check_against_reference(name, z, dh)
        print("first-use build OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code, cache], cwd=REPO, capture_output=True, text=True,
                          timeout=1200, env=_env(FUSED_CKPT_BUILD_DIR=cache, FUSED_CKPT_NO_CUDA="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "first-use build OK" in proc.stdout


def test_jit_disabled_error_names_install_command(monkeypatch):
    monkeypatch.setenv("FUSED_CKPT_JIT_BUILD", "0")
    with pytest.raises(RuntimeError, match=re.escape(INSTALL_CMD)) as info:
        _ext._build_on_first_use("fused_ckpt._C could not be imported: test")
    assert "FUSED_CKPT_JIT_BUILD=0" in str(info.value)


def test_missing_sources_error(monkeypatch):
    monkeypatch.delenv("FUSED_CKPT_JIT_BUILD", raising=False)
    monkeypatch.setattr(_ext, "csrc_dir", lambda: None)
    with pytest.raises(RuntimeError, match="csrc sources") as info:
        _ext._build_on_first_use("fused_ckpt._C could not be imported: test")
    assert INSTALL_CMD in str(info.value)


def test_missing_ninja_error(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.delenv("FUSED_CKPT_JIT_BUILD", raising=False)
    monkeypatch.setenv("FUSED_CKPT_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    path_before = os.environ.get("PATH")
    with pytest.raises(RuntimeError, match=re.escape("pip install ninja")) as info:
        _ext._build_on_first_use("fused_ckpt._C could not be imported: test")
    assert INSTALL_CMD in str(info.value)
    assert os.environ.get("PATH") == path_before  # the temporary PATH change is undone


def test_build_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_CKPT_BUILD_DIR", str(tmp_path / "x"))
    assert _ext.build_dir() == str(tmp_path / "x")
    monkeypatch.delenv("FUSED_CKPT_BUILD_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert _ext.build_dir() == str(tmp_path / "cache" / "fused_ckpt")


def test_installed_package_carries_csrc(tmp_path, monkeypatch):
    """A non-editable install (build_py) copies csrc/ into fused_ckpt/_csrc, and _ext, installed
    there, finds it."""
    lib = tmp_path / "lib"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shipped = sorted(os.listdir(lib / "fused_ckpt" / "_csrc"))
    assert shipped == sorted(n for n in os.listdir(os.path.join(REPO, "csrc"))
                             if n.endswith((".cpp", ".cu", ".h", ".cuh")))
    assert "act_ops.cpp" in shipped and "act_cuda.cu" in shipped
    # every module of the package is installed (namespace subpackages like ops/ included)
    src_root = os.path.join(REPO, "fused_ckpt")
    want = sorted(os.path.relpath(os.path.join(d, n), src_root) for d, _, names in os.walk(src_root)
                  for n in names if n.endswith(".py"))
    have = sorted(os.path.relpath(os.path.join(d, n), lib / "fused_ckpt") for d, _, names in os.walk(lib / "fused_ckpt")
                  for n in names if n.endswith(".py"))
    assert have == want, f"missing from the install: {sorted(set(want) - set(have))}"
    monkeypatch.setattr(_ext, "__file__", str(lib / "fused_ckpt" / "_ext.py"))
    assert _ext.csrc_dir() == str(lib / "fused_ckpt" / "_csrc")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_uses_an_active_env_with_torch():
    """Inside a virtual environment whose python has torch and triton, make installs into it
    (a fresh .venv would not see that torch); a python without torch gets .venv."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the test interpreter is not in a virtual environment")
    out = subprocess.run(["make", "-n", "install", f"PYTHON={sys.executable}", "STAMP=/nonexistent/stamp"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env=_env()).stdout
    assert f"using the active environment {sys.prefix}" in out, out
    assert "-m venv" not in out
    assert f"{sys.executable} -m pip install -q -e . --no-build-isolation" in out

    base = os.path.join(sys.base_prefix, "bin", "python3")
    has_torch = subprocess.run([base, "-c", "import torch, triton"], capture_output=True, timeout=120)
    if has_torch.returncode == 0:
        return  # the base interpreter has torch too: the .venv route is not exercised here
    out = subprocess.run(["make", "-n", "install", f"PYTHON={base}", "VENV=/tmp/fused-ckpt-no-such-venv"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env=_env()).stdout
    assert f"{base} -m venv /tmp/fused-ckpt-no-such-venv" in out, out
    assert "torch==2.13.0" in out


def _readme_first_python_snippet() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    m = re.search(r"```python\n(.*?)```", text, re.S)
    assert m, "README.md has no ```python block"
    return m.group(1)


def test_readme_first_snippet_runs_on_cpu(tmp_path):
    """The README's first code block runs as pasted (CPU here: no TRITON_INTERPRET, as a user has)."""
    snippet = _readme_first_python_snippet()
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=_env(TRITON_INTERPRET=None, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, f"README snippet failed:\n{snippet}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.strip(), "the snippet printed nothing"
