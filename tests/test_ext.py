"""The csrc extension ops fused_ckpt_ext::act_forward / act_backward: numerics against float64,
odd shapes and strides, input validation, fake implementations (opcheck), and an nvcc compile
of the CUDA sources (so the .cu is checked on machines without a GPU)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

from fused_ckpt import _ext
from fused_ckpt.activations import ACTIVATIONS, get_activation

from .conftest import HAS_CUDA
from .helpers import assert_close_by_rule

NAMES = sorted(ACTIVATIONS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# M = 0 and tiny rows; f values below, between and above the SIMD step (16 fp32 lanes on AVX2,
# 4/8 elements per 16-byte CUDA access) so vector bodies and scalar tails both run.
MS = [0, 1, 7, 33]
FS = [1, 5, 37, 130]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _loaded():
    _ext.load()  # fails (not skips) with the build command when the extension is missing


def _make_z(M: int, F1: int, dtype, device="cpu", layout="contiguous", scale=3.0) -> torch.Tensor:
    """z [M, F1] with the requested memory layout (values N(0, scale^2))."""
    if layout == "contiguous":
        return (torch.randn(M, F1, device=device) * scale).to(dtype)
    if layout == "transposed":  # column-major
        return (torch.randn(F1, M, device=device) * scale).to(dtype).t()
    if layout == "strided":  # every other column of a wider tensor
        return (torch.randn(M, 2 * F1, device=device) * scale).to(dtype)[:, ::2]
    if layout == "offset":  # contiguous rows but a storage offset of one element (misaligned)
        return (torch.randn(M * F1 + 1, device=device) * scale).to(dtype)[1:].view(M, F1)
    raise AssertionError(layout)


def _reference(name: str, z: torch.Tensor, dh: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """h and dz from the registry's PyTorch math and autograd, computed in ``dtype``."""
    act = get_activation(name)
    zr = z.detach().to(dtype).requires_grad_()
    h = act.hidden(zr)
    (dz,) = torch.autograd.grad(h, zr, dh.to(dtype))
    return h.detach(), dz


def _check_against_reference(name, z, dh):
    h = _ext.act_forward(z, name)
    dz, h_bwd = _ext.act_backward(z, dh, name, need_h=True)
    dz_only, none = _ext.act_backward(z, dh, name, need_h=False)
    assert none is None
    assert h.dtype == z.dtype and dz.dtype == z.dtype and h_bwd.dtype == z.dtype
    assert dz.shape == z.shape and h.shape == dh.shape
    h64, dz64 = _reference(name, z, dh, torch.float64)
    h_pt, dz_pt = _reference(name, z, dh, z.dtype)
    assert_close_by_rule(h, h64, h_pt, f"{name} h")
    assert_close_by_rule(h_bwd, h64, h_pt, f"{name} h (backward)")
    assert_close_by_rule(dz, dz64, dz_pt, f"{name} dz")
    # The CPU build disables FMA contraction, so every kernel variant gives bit-identical values;
    # nvcc contracts a*b+c freely, so on CUDA allow one unit of the dtype's precision.
    ulp = 0.0 if z.device.type == "cpu" else torch.finfo(z.dtype).eps
    for got, want in ((dz_only, dz), (h_bwd, h)):
        atol = ulp * (want.abs().max().item() if want.numel() else 0.0)
        torch.testing.assert_close(got, want, rtol=ulp, atol=atol)
    if z.numel():
        assert h.abs().max() > 0 and dz.abs().max() > 0, "vacuous: all-zero outputs"


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("f", FS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name, dtype, f, M):
    F1 = get_activation(name).fc1_rows(f)
    z = _make_z(M, F1, dtype)
    dh = torch.randn(M, f).to(dtype)
    _check_against_reference(name, z, dh)


@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_inputs(name, dtype, layout):
    M, f = 9, 37
    F1 = get_activation(name).fc1_rows(f)
    z = _make_z(M, F1, dtype, layout=layout)
    dh = _make_z(M, f, dtype, layout=layout, scale=1.0)
    assert layout == "offset" or not z.is_contiguous()
    _check_against_reference(name, z, dh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_multithreaded_sizes(name, dtype):
    """Large enough that at::parallel_for splits the work across threads."""
    M, f = 300, 264
    z = _make_z(M, get_activation(name).fc1_rows(f), dtype)
    _check_against_reference(name, z, torch.randn(M, f).to(dtype))


@pytest.mark.parametrize("name", NAMES)
def test_extreme_values(name):
    """Saturated tails (exp overflow), zero, and tiny values: finite and accurate in fp32."""
    vals = torch.tensor([-100.0, -30.0, -10.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 10.0, 30.0, 100.0])
    g = vals.repeat(17)  # 187 values: vector lanes and scalar tail both see every value
    act = get_activation(name)
    z = torch.cat([g, torch.linspace(-2, 2, g.numel())]) if act.gated else g
    z = z.view(1, -1)
    dh = torch.ones(1, g.numel())
    _check_against_reference(name, z, dh)


@pytest.mark.parametrize("name", NAMES)
def test_float64_on_cpu(name):
    z = _make_z(5, get_activation(name).fc1_rows(19), torch.float64)
    dh = torch.randn(5, 19, dtype=torch.float64)
    h64, dz64 = _reference(name, z, dh, torch.float64)
    dz, h = _ext.act_backward(z, dh, name, True)
    torch.testing.assert_close(_ext.act_forward(z, name), h64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dz, dz64, rtol=1e-12, atol=1e-12)


def test_empty_h_when_not_needed():
    z = torch.randn(4, 10)
    dz, h = torch.ops.fused_ckpt_ext.act_backward(z, torch.randn(4, 5), "swiglu", False)
    assert h.shape == (0,) and h.dtype == z.dtype and dz.shape == (4, 10)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randint(0, 5, (4, 8), dtype=torch.int32), None, "gelu"), "dtype Int"),
        (lambda: (torch.randn(4, 8, dtype=torch.complex64), None, "gelu"), "dtype ComplexFloat"),
        (lambda: (torch.randn(2, 4, 8), None, "gelu"), r"2-D.*\[2, 4, 8\]"),
        (lambda: (torch.randn(8), None, "gelu"), "2-D"),
        (lambda: (torch.randn(4, 7), None, "swiglu"), r"even.*\[4, 7\]"),
        (lambda: (torch.randn(4, 8), None, "mish"), "unknown activation 'mish'"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8), "swiglu"), r"dh must have shape \[4, 4\].*\[4, 8\]"),
        (lambda: (torch.randn(4, 8), torch.randn(3, 8), "gelu"), r"dh must have shape \[4, 8\]"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64), "gelu"), "does not match"),
    ],
    ids=["int", "complex", "rank3", "rank1", "odd-gated", "unknown-name", "dh-gated-shape",
         "dh-shape", "dh-dtype"],
)
def test_bad_inputs_raise(make, match):
    z, dh, name = make()
    with pytest.raises((RuntimeError, ValueError), match=match):
        if dh is None:
            _ext.act_forward(z, name)
        else:
            _ext.act_backward(z, dh, name, True)
    if dh is None:  # backward validates z the same way
        with pytest.raises((RuntimeError, ValueError), match=match):
            _ext.act_backward(z, torch.zeros(1, 1), name, True)


def test_meta_tensors_use_fake_impl():
    z = torch.empty(6, 10, device="meta", dtype=torch.bfloat16)
    h = _ext.act_forward(z, "geglu")
    assert h.shape == (6, 5) and h.device.type == "meta" and h.dtype == torch.bfloat16
    dz, h = _ext.act_backward(z, torch.empty(6, 5, device="meta", dtype=torch.bfloat16), "geglu", True)
    assert dz.shape == (6, 10) and h.shape == (6, 5)
    with pytest.raises(ValueError, match="unknown activation"):
        _ext.act_forward(z, "mish")


@pytest.mark.parametrize("name", ["gelu_tanh", "swiglu"])
def test_opcheck(name):
    f = 6
    z = torch.randn(5, get_activation(name).fc1_rows(f))
    dh = torch.randn(5, f)
    torch.library.opcheck(torch.ops.fused_ckpt_ext.act_forward.default, (z, name))
    for need_h in (True, False):
        torch.library.opcheck(torch.ops.fused_ckpt_ext.act_backward.default, (z, dh, name, need_h))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
@pytest.mark.parametrize("f", [1, 37, 128, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_float64_reference(name, dtype, f, layout):
    if not _ext.has_cuda_kernels():
        pytest.fail("CUDA is available but fused_ckpt._C was built without CUDA kernels; rebuild")
    M = 67
    z = _make_z(M, get_activation(name).fc1_rows(f), dtype, device="cuda", layout=layout)
    dh = _make_z(M, f, dtype, device="cuda", layout=layout, scale=1.0)
    _check_against_reference(name, z, dh)


def test_cuda_tensors_without_cuda_kernels_raise():
    if _ext.has_cuda_kernels() or not HAS_CUDA:
        pytest.skip("only meaningful for a CPU-only build on a CUDA machine")
    with pytest.raises(RuntimeError, match="without CUDA kernels"):
        _ext.act_forward(torch.randn(2, 4, device="cuda"), "gelu")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Compile csrc/act_cuda.cu (kernels + launchers + TORCH_LIBRARY_IMPL) for sm_90 with the
    flags torch's BuildExtension uses; compile only, so no GPU or CUDA torch is needed."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = include_paths() + [sysconfig.get_paths()["include"], os.path.join(REPO, "csrc")]
    cmd = ["nvcc", "-c", os.path.join(REPO, "csrc", "act_cuda.cu"), "-o", str(tmp_path / "act_cuda.o"),
           "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC",
           *COMMON_NVCC_FLAGS, *(f"-I{p}" for p in includes)]
    # CPU wheels of torch ship c10/cuda headers but not the generated cuda_cmake_macros.h (it only
    # sets Windows DLL-export macros); this documented switch skips including it.
    if not any(os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in includes):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "act_cuda.o").stat().st_size > 0
