"""Test setup: without a GPU the Triton kernels run under the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, at
collection time. Tests marked ``gpu`` need CUDA and are skipped without it.

Tests that run Triton kernels are marked ``triton`` (explicitly, or by a ``backend``
parameter equal to "triton"). Where they run:
  * CUDA present: compiled, on CUDA tensors. The test body runs under ``torch.device(DEVICE)``,
    so every tensor, module and parameter it makes without naming a device is on the GPU;
    such tests are also marked ``gpu`` (``pytest -m gpu`` selects all of them).
  * no CUDA, TRITON_INTERPRET=1 (what this file sets by default): under the interpreter, on CPU.
  * neither (TRITON_INTERPRET=0 in the environment, no CUDA): skipped with the reason below.
aten-only tests run on CPU everywhere.
"""
import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or INTERPRET  # Triton kernels can run: compiled on a GPU or interpreted
DEVICE = "cuda" if HAS_CUDA else "cpu"  # where Triton tests make their tensors
TRITON_SKIP_REASON = "Triton kernels need CUDA or TRITON_INTERPRET=1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer tests (still run by `make test`)")
    config.addinivalue_line("markers", "triton: runs Triton kernels: on CUDA tensors with a GPU (and marked gpu "
                                       "there), interpreted on CPU, skipped with neither")


def runs_triton(item) -> bool:
    """Marked ``triton``, or parametrized with backend="triton"."""
    callspec = getattr(item, "callspec", None)
    return item.get_closest_marker("triton") is not None or (
        callspec is not None and callspec.params.get("backend") == "triton")


@pytest.hookimpl(tryfirst=True)  # before -m selection, which reads the gpu marks added here
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason=TRITON_SKIP_REASON)
    for item in items:
        if runs_triton(item):
            item.add_marker(pytest.mark.triton)
            if HAS_CUDA:
                item.add_marker(pytest.mark.gpu)
            elif not TRITON_OK:
                item.add_marker(skip_triton)
        if not HAS_CUDA and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _triton_device(request):
    """A Triton test on a CUDA machine makes its tensors on the GPU (see the module docstring)."""
    if HAS_CUDA and request.node.get_closest_marker("triton") is not None:
        with torch.device(DEVICE):
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
