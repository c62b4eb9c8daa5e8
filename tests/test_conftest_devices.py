"""tests/conftest.py's device rule, on a small synthetic test file run in-process (pytester)
with a copy of the conftest: Triton tests run under the interpreter on CPU, are skipped with a
reason when there is neither CUDA nor the interpreter, and on a CUDA machine are all selected by
``-m gpu`` (simulated: torch.cuda.is_available patched, collection only)."""
from __future__ import annotations

import os
import shutil

import torch

pytest_plugins = ["pytester"]

CONFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")
SAMPLE = '''
import pytest
import torch

@pytest.mark.parametrize("backend", ["triton", "aten"])
def test_param(backend):
    assert torch.ones(1).device.type == "cpu"

@pytest.mark.triton
def test_marked():
    pass

def test_plain():
    pass

@pytest.mark.gpu
def test_cuda_only():
    pass
'''


def _setup(pytester, monkeypatch, interpret):
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    pytester.makepyfile(test_sample=SAMPLE)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)


def test_interpreter_runs_triton_tests_on_cpu(pytester, monkeypatch):
    _setup(pytester, monkeypatch, "1")
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    res.assert_outcomes(passed=4, skipped=1)  # only the gpu test skips


def test_neither_cuda_nor_interpreter_skips_triton_tests(pytester, monkeypatch):
    _setup(pytester, monkeypatch, "0")
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")
    res.assert_outcomes(passed=2, skipped=3)
    reasons = [line for line in res.stdout.lines if line.startswith("SKIPPED")]
    assert sum("Triton kernels need CUDA or TRITON_INTERPRET=1" in r for r in reasons) == 2, reasons
    assert sum("needs a CUDA device" in r for r in reasons) == 1, reasons


def test_cuda_machine_selects_every_triton_test_with_m_gpu(pytester, monkeypatch):
    _setup(pytester, monkeypatch, "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--collect-only", "-q", "-m", "gpu")
    res.stdout.fnmatch_lines(["*test_param?triton?*", "*test_marked*", "*test_cuda_only*"])
    res.stdout.no_fnmatch_line("*test_param?aten?*")
    res.stdout.no_fnmatch_line("*test_plain*")
