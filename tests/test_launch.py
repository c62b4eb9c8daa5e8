"""Launch plumbing: every Triton launch goes through ``kernels._common.launch`` (device guard,
same-device check, interpreter lock); TF32 detection and the benchmarks' ``no_tf32`` in both of
PyTorch's TF32 APIs."""
from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from triton.runtime.jit import KernelInterface

import fused_ckpt
from fused_ckpt import FusedCheckpointedAttention, FusedCheckpointedFFN
from fused_ckpt.activations import get_activation
from fused_ckpt.kernels import _common, ffn_bwd, ffn_fwd, flash_attn_bwd, flash_attn_fwd, matmul, norm, rope

from .conftest import INTERPRET
from .helpers import deterministic

PKG = pathlib.Path(fused_ckpt.__file__).parent
ROOT = PKG.parent
DEV = "cpu" if INTERPRET else "cuda"


# ----------------------------------------------------------------------------- device guard
def _launches_in(path: pathlib.Path) -> tuple[set, list]:
    """(kernels passed to ``launch(...)``, direct ``kernel[grid](...)`` calls on Triton kernels)
    in one source file; what counts as a kernel is decided by the imported module's attribute."""
    tree = ast.parse(path.read_text())
    mod_name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    mod = sys.modules.get(mod_name)
    launched, direct = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "launch" and node.args and isinstance(node.args[0], ast.Name):
            launched.add(node.args[0].id)
        if isinstance(f, ast.Subscript) and isinstance(f.value, ast.Name):
            if f.value.id.endswith("_kernel") or isinstance(getattr(mod, f.value.id, None), KernelInterface):
                direct.append(f"{path.relative_to(ROOT)}:{node.lineno} {f.value.id}[...](...)")
    return launched, direct


def test_no_triton_launch_bypasses_launch():
    """Statically: no ``kernel[grid](...)`` anywhere in the package outside ``_common.launch``
    (kernels, ops, modules, integrations...), so each launch gets the device guard."""
    direct = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "_common.py" and path.parent.name == "kernels":
            continue
        direct += _launches_in(path)[1]
    assert not direct, "Triton launches that bypass kernels._common.launch:\n" + "\n".join(direct)


@pytest.mark.triton
def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    """Each launcher once (every kernel it can start); the patched ``device_context`` records the
    device each launch was entered with: all launches are seen, all on the inputs' device."""
    seen = []
    real_ctx, real_dev = _common.device_context, _common.launch_device

    def record_dev(kernel, args, kwargs):
        d = real_dev(kernel, args, kwargs)
        seen.append([_common._kernel_name(kernel), d])
        return d

    def record_ctx(device):
        seen[-1].append(device)
        return real_ctx(device)

    monkeypatch.setattr(_common, "launch_device", record_dev)
    monkeypatch.setattr(_common, "device_context", record_ctx)

    dt, dev = torch.float32, torch.device(DEV)
    M, d, f = 8, 32, 32
    x, dy = torch.randn(M, d, device=dev, dtype=dt), torch.randn(M, d, device=dev, dtype=dt)
    w1, w2 = torch.randn(2 * f, d, device=dev, dtype=dt), torch.randn(d, f, device=dev, dtype=dt)
    act = get_activation("swiglu")
    h, z = ffn_fwd.ffn_up(x, w1, None, act, store_z=True)
    ffn_fwd.lora_dropout(x, 0.25, 1, 0, 0)  # LoRA dropout's mask kernel
    ffn_bwd.ffn_bwd_hidden(x, None, dy, w1, None, w2, act, store_h=True)
    matmul.gemm(h, w2.t())
    B, S, H, D = 1, 16, 2, 32
    q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dt) for _ in range(3))
    o, lse = flash_attn_fwd.flash_attn_fwd(q, k, v, None, True, D ** -0.5)
    with deterministic():  # the two-kernel path: preprocess, dK/dV and dQ kernels
        flash_attn_bwd.flash_attn_bwd(torch.randn_like(o), q, k, v, o, lse, None, True, D ** -0.5)
    y, mean, rstd = norm.norm_fwd(x, w2[:, 0].contiguous(), None, 1e-5, rms=False)
    norm.norm_bwd(dy, x, w2[:, 0].contiguous(), mean, rstd, rms=False, need_dx=True, need_dw=True, need_db=True)
    cos = torch.randn(1, S, D // 2, device=dev)
    rope.rope_(q, cos, torch.randn_like(cos))

    expected = set()
    for m in (ffn_fwd, ffn_bwd, matmul, flash_attn_fwd, flash_attn_bwd, norm, rope):
        expected |= _launches_in(pathlib.Path(m.__file__))[0]
    assert {name for name, *_ in seen} == expected
    for name, got, entered in seen:
        assert got == dev and entered == dev, (name, got, entered)


@pytest.mark.triton
def test_mixed_devices_raise_naming_the_tensor():
    x = torch.randn(8, 32, device=DEV)
    w1 = torch.randn(64, 32, device="meta")  # a second device that exists on every machine
    with pytest.raises(RuntimeError, match=r"_ffn_up_kernel: wg_ptr is on meta but x_ptr is on "):
        ffn_fwd.ffn_up(x, w1, None, get_activation("gelu"), store_z=False)
    with pytest.raises(RuntimeError, match=r"_gemm_kernel: b_ptr is on meta but a_ptr is on "):
        matmul.gemm(x, w1.t())


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    x = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors \(_gemm_kernel's a_ptr is on cpu\)"):
        _common.launch_device(matmul._gemm_kernel, (x, x), {})


# ----------------------------------------------------------------------------- threads
def _fwd_bwd(m, x, g):
    x = x.detach().requires_grad_()
    y = m(x)
    y.backward(g)
    return [y.detach(), x.grad]


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["ffn", "attention"])
def test_two_threads_same_module(kind):
    """Two threads run forward+backward of one module at the same time (under the interpreter
    this crashed before interpreted launches were serialised): each thread's output and input
    gradient equal those of a sequential run, and the parameters' gradients, accumulated from
    both threads, equal the sequential sum (fp32 addition of two terms is order-independent).
    Deterministic mode: on a GPU the attention backward would otherwise add dQ atomically."""
    torch.manual_seed(0)
    if kind == "ffn":
        m = FusedCheckpointedFFN(32, 64, "swiglu", device=DEV, dtype=torch.float32)
        shape = (2, 12, 32)
    else:
        m = FusedCheckpointedAttention(64, 2, rope_theta=10000.0, device=DEV, dtype=torch.float32)
        shape = (1, 24, 64)
    xs = [torch.randn(shape, device=DEV) for _ in range(2)]
    gs = [torch.randn(shape, device=DEV) for _ in range(2)]
    with deterministic():
        want = [_fwd_bwd(m, x, g) for x, g in zip(xs, gs)]  # also compiles / autotunes first
        want_p = [p.grad.clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)

        got, errors = [None, None], []

        def work(i):
            try:
                got[i] = _fwd_bwd(m, xs[i], gs[i])
            except BaseException as e:  # noqa: BLE001  (reported by the main thread)
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    pairs = [(a, b) for i in range(2) for a, b in zip(got[i], want[i])]
    pairs += list(zip([p.grad for p in m.parameters()], want_p))
    assert len(pairs) >= 5
    for a, b in pairs:
        assert b.abs().max() > 0 and torch.isfinite(b).all()
        assert torch.equal(a, b), (kind, (a - b).abs().max().item())


# ----------------------------------------------------------------------------- TF32
# Each state runs in a forked child of one fresh interpreter, so the process-wide
# torch.backends settings the test changes never leak into other tests.
_TF32_CHILD = textwrap.dedent("""
    import json, os, sys
    import torch
    from fused_ckpt.kernels._common import dot_flags, tf32_matmul_allowed
    from fused_ckpt.bench._timing import no_tf32

    b = torch.backends
    STATES = json.loads(sys.argv[1])

    def cudnn_tf32():
        conv = getattr(b.cudnn, "conv", None)
        return conv.fp32_precision == "tf32" if conv is not None else bool(b.cudnn.allow_tf32)

    def legacy_readable():
        try:
            return b.cuda.matmul.allow_tf32
        except RuntimeError:
            return "raises"

    out = {}
    for name, setup in STATES.items():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            res = {}
            try:
                exec(setup)
                res["allowed"] = tf32_matmul_allowed()
                res["prec"] = dot_flags(torch.float32)["INPUT_PRECISION"]
                before = (tf32_matmul_allowed(), cudnn_tf32(), legacy_readable())
                with no_tf32():
                    res["inside"] = [tf32_matmul_allowed(), cudnn_tf32()]
                res["restored"] = (tf32_matmul_allowed(), cudnn_tf32(), legacy_readable()) == before
            except Exception as e:
                res["error"] = repr(e)[:300]
            os.write(w, json.dumps(res).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        out[name] = json.loads(data)
    print(json.dumps(out))
""")

# state -> (setup code, whether TF32 matmuls are then allowed)
_TF32_STATES = {
    "default": ("pass", False),
    "legacy allow_tf32": ("b.cuda.matmul.allow_tf32 = True", True),
    "set_float32_matmul_precision high": ("torch.set_float32_matmul_precision('high')", True),
    "new global tf32": ("b.fp32_precision = 'tf32'", True),
    "new matmul tf32": ("b.cuda.matmul.fp32_precision = 'tf32'", True),
    "new global tf32, matmul ieee": ("b.fp32_precision = 'tf32'; b.cuda.matmul.fp32_precision = 'ieee'", False),
    "legacy then new ieee": ("b.cuda.matmul.allow_tf32 = True; b.cuda.matmul.fp32_precision = 'ieee'", False),
    "new global ieee": ("b.fp32_precision = 'ieee'", False),
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_tf32_detection_and_no_tf32_in_both_apis():
    new_api = hasattr(torch.backends, "fp32_precision")
    states = {k: v for k, v in _TF32_STATES.items() if new_api or "new" not in k}
    env = dict(os.environ, TRITON_INTERPRET="0")  # dot_flags reads the flag only when compiling
    proc = subprocess.run([sys.executable, "-c", _TF32_CHILD, json.dumps({k: v[0] for k, v in states.items()})],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == set(states)
    for name, (_, allowed) in states.items():
        res = out[name]
        assert "error" not in res, (name, res["error"])
        assert res["allowed"] is allowed, (name, res)
        assert res["prec"] == ("tf32" if allowed else "ieee"), (name, res)
        assert res["inside"] == [False, False], (name, res)  # no_tf32: matmuls and cuDNN exact
        assert res["restored"], (name, res)
