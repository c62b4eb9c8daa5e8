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


def _exactly_rounded_interpreter_dot() -> None:
    """Under the interpreter every ``tl.dot`` is ``np.matmul`` in the accumulator's dtype, so
    an fp32 dot's rounding is whatever inner kernel numpy's BLAS picks for this CPU at run time
    (OpenBLAS: Haswell, SkylakeX, Zen ...). Measured on the fp32 flash-attention backward tests
    (head_dim 256, seeds 0-9): that choice alone moved the kernel's error from 0.4x to 4.9x
    PyTorch's fp32 error, so a 2x bound passed on one CPU and failed on another while the
    kernel's arithmetic was the same. Here a float dot is computed in float64 (products of
    fp32/fp16/bf16 values are exact there) and rounded once to the accumulator's dtype: the
    result is the correctly rounded fp32 dot on every CPU, which is what the tests then judge
    the kernel's algorithm with (tiling, online softmax, masking, accumulation order). On a GPU
    the tests run the hardware's dots; this is only the interpreter's model of ``tl.dot``."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    plain = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        acc = d.data
        if not (np.issubdtype(acc.dtype, np.floating) and acc.dtype.itemsize <= 4
                and a.data.dtype.kind == "f" and b.data.dtype.kind == "f"):
            return plain(self, a, b, d, input_precision, max_num_imprecise_acc)
        wide = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)) + acc.astype(np.float64)
        return interpreter.TensorHandle(wide.astype(acc.dtype), d.dtype.scalar)

    builder.create_dot = create_dot


if INTERPRET:
    _exactly_rounded_interpreter_dot()
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


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards: tiny Hugging Face models run much
    faster than with several threads oversubscribing a small busy machine (measured 25x on 2
    loaded cores). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
