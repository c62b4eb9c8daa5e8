#!/usr/bin/env python
"""FFN fwd+bwd: FusedCheckpointedFFN against eager, torch.utils.checkpoint, torch.compile and
the bare-GEMM floor, side by side in one run.

    python benchmarks/bench_ffn.py                  # default shapes of the device (CUDA if present)
    python benchmarks/bench_ffn.py --quick          # small shapes, few reps (< 60 s on CPU)
    python benchmarks/bench_ffn.py --device cpu --shapes 2048x1024x4096:gelu --out DIR

Rows (per shape)
    eager                EagerMLP, nothing recomputed
    ckpt-nonreentrant    torch.utils.checkpoint(EagerMLP, use_reentrant=False)
    ckpt-reentrant       torch.utils.checkpoint(EagerMLP, use_reentrant=True)
    compile+ckpt         torch.compile of the non-reentrant checkpointed MLP (CUDA by default;
                         --compile forces it on CPU, --no-compile skips it)
    fused-aten rc=T/F    FusedCheckpointedFFN(backend="aten", recompute=True/False)
    fused-triton rc=T/F  FusedCheckpointedFFN(backend="triton", ...)   (CUDA only)
    floor 7 GEMMs        the GEMMs of a recomputing fwd+bwd through torch.matmul, nothing else
    floor 6 GEMMs        the GEMMs of a non-recomputing fwd+bwd (= the model FLOPs)

See benchmarks/README.md for every column; results go to --out (results.json, results.md).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (also puts the repository root on sys.path)

from fused_ckpt import FusedCheckpointedFFN  # noqa: E402
from fused_ckpt.activations import get_activation  # noqa: E402
from fused_ckpt.reference import EagerMLP, ffn_reference  # noqa: E402

# --------------------------------------------------------------------------------- shapes
DEFAULT_SHAPES = {
    "cpu": ["2048x1024x4096:gelu"],
    "cuda": ["8192x4096x16384:gelu", "8192x4096x11008:swiglu", "8192x4096x14336:swiglu"],
}
QUICK_SHAPES = {
    "cpu": ["512x256x1024:gelu", "512x256x512:swiglu"],
    "cuda": ["2048x1024x4096:gelu", "2048x1024x2816:swiglu"],
}


@dataclass(frozen=True)
class Shape:
    """T tokens, d model width, f FFN width. Gated activations have fc1 rows F1 = 2f."""
    tokens: int
    d_model: int
    d_ff: int
    activation: str
    bias: bool

    @classmethod
    def parse(cls, spec: str) -> "Shape":
        """``TxDxF:activation[:bias|:nobias]``; the default is a bias for plain activations
        (GPT-2 / ViT MLPs) and none for gated ones (Llama-style SwiGLU)."""
        parts = spec.strip().split(":")
        try:
            t, d, f = (int(v) for v in parts[0].lower().split("x"))
        except ValueError:
            raise SystemExit(f"bad shape {spec!r}: expected TxDxF:activation, e.g. 8192x4096x16384:gelu")
        act = get_activation(parts[1] if len(parts) > 1 else "gelu")
        bias = not act.gated
        for p in parts[2:]:
            if p not in ("bias", "nobias"):
                raise SystemExit(f"bad shape option {p!r} in {spec!r}: expected bias or nobias")
            bias = p == "bias"
        return cls(t, d, f, act.name, bias)

    @property
    def fc1_rows(self) -> int:
        return get_activation(self.activation).fc1_rows(self.d_ff)

    @property
    def unit(self) -> int:
        """One GEMM of the ungated MLP: 2*T*d*f FLOPs."""
        return 2 * self.tokens * self.d_model * self.d_ff

    def label(self) -> str:
        return (f"T={self.tokens} d={self.d_model} f={self.d_ff} {self.activation}"
                f"{'' if self.bias else ' (no bias)'}")

    def model_flops(self) -> int:
        """Eager fwd+bwd: forward GEMMs once, backward twice (dgrad + wgrad).

        unit = 2*T*d*f;  GELU 6 = 2 (fwd: fc1, fc2) + 4 (bwd: dH, dW2, dW1, dX)
                         gated 9 = 3 (fwd: gate+up 2, down 1) + 6 (bwd)
        """
        T, d, F1, f = self.tokens, self.d_model, self.fc1_rows, self.d_ff
        return 3 * 2 * T * d * (F1 + f)

    def floor_flops(self, recompute: bool = True) -> int:
        """The floor's GEMMs (each 2*M*N*K):

            fwd   Z = x W1^T        2*T*d*F1      Y  = H W2^T    2*T*f*d
            bwd  [Z = x W1^T        2*T*d*F1]     dH = dY W2     2*T*d*f
                  dW2 = dY^T H      2*T*d*f       dW1 = dZ^T x   2*T*F1*d
                  dX = dZ W1        2*T*F1*d

        GELU:  7 units = 2 (fwd) + 1 (recompute fc1) + 4 (bwd)   [6 without recompute]
        gated: 11 units = 3 (fwd) + 2 (recompute gate+up) + 6 (bwd) [9 without]
        """
        T, d, F1, f = self.tokens, self.d_model, self.fc1_rows, self.d_ff
        flops = 2 * T * d * (F1 + f) + 2 * T * d * (f + f + F1 + F1)
        return flops + (2 * T * d * F1 if recompute else 0)


# ------------------------------------------------------------------------- variants
EAGER, NR, RE, COMPILE = "eager", "ckpt-nonreentrant", "ckpt-reentrant", "compile+ckpt"
ATEN_T, ATEN_F = "fused-aten rc=T", "fused-aten rc=F"
TRITON_T, TRITON_F = "fused-triton rc=T", "fused-triton rc=F"
FLOOR7, FLOOR6 = "floor 7 GEMMs", "floor 6 GEMMs"
VARIANTS = [EAGER, NR, RE, COMPILE, ATEN_T, ATEN_F, TRITON_T, TRITON_F, FLOOR7, FLOOR6]
FLOORS = (FLOOR7, FLOOR6)


def _mlp_math(x, w1, b1, w2, b2, activation):
    return ffn_reference(x, w1, b1, w2, b2, activation)


def _ckpt_mlp(x, w1, b1, w2, b2, activation: str):
    return checkpoint(_mlp_math, x, w1, b1, w2, b2, activation, use_reentrant=False)


_COMPILED = None


def _compiled_ckpt_mlp(*args):
    """One compiled function for every layer and shape: parameters are its inputs, so an
    8-layer stack reuses one graph instead of compiling each module."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_ckpt_mlp, dynamic=False)
    return _COMPILED(*args)


class CompiledCheckpointMLP(nn.Module):
    """torch.compile of ``checkpoint(mlp, x, use_reentrant=False)`` with EagerMLP's parameters."""

    def __init__(self, base: EagerMLP, activation: str):
        super().__init__()
        self.fc1, self.fc2, self.activation = base.fc1, base.fc2, activation
        self.compiled = True

    def forward(self, x):
        fn = _compiled_ckpt_mlp if self.compiled else _ckpt_mlp
        return fn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.activation)


def _share_params(m: nn.Module, base: EagerMLP) -> nn.Module:
    """Point ``m``'s fc1/fc2 at the base module's (all rows use the same weights)."""
    m.fc1, m.fc2 = base.fc1, base.fc2
    return m


def build_module(name: str, base: EagerMLP, s: Shape) -> nn.Module:
    if name in (EAGER, NR, RE):
        ck = {EAGER: None, NR: "non_reentrant", RE: "reentrant"}[name]
        return _share_params(EagerMLP(s.d_model, s.d_ff, s.activation, s.bias, checkpoint=ck,
                                      device="meta"), base)
    if name == COMPILE:
        return CompiledCheckpointMLP(base, s.activation)
    backend = "aten" if name in (ATEN_T, ATEN_F) else "triton"
    recompute = name in (ATEN_T, TRITON_T)
    return _share_params(FusedCheckpointedFFN(s.d_model, s.d_ff, s.activation, s.bias, recompute=recompute,
                                              device="meta", backend=backend), base)


class Floor:
    """The GEMMs of the FFN's fwd+bwd alone, through torch.matmul into preallocated outputs
    (no bias, no activation, no allocation): the time a fused implementation cannot beat."""

    def __init__(self, s: Shape, device, dtype, recompute: bool):
        T, d, F1, f = s.tokens, s.d_model, s.fc1_rows, s.d_ff
        r = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
        e = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)  # noqa: E731
        self.x, self.dy, self.w1, self.w2 = r(T, d), r(T, d), r(F1, d), r(d, f)
        self.h, self.dz = r(T, f), r(T, F1)  # stand-ins for act(Z) and dZ
        self.z, self.y, self.dh = e(T, F1), e(T, d), e(T, f)
        self.dw1, self.dw2, self.dx = e(F1, d), e(d, f), e(T, d)
        self.recompute = recompute

    def __call__(self):
        mm = torch.matmul
        mm(self.x, self.w1.t(), out=self.z)        # fwd  Z = x W1^T
        mm(self.h, self.w2.t(), out=self.y)        # fwd  Y = H W2^T
        if self.recompute:
            mm(self.x, self.w1.t(), out=self.z)    # bwd  recompute Z = x W1^T
        mm(self.dy, self.w2, out=self.dh)          # bwd  dH = dY W2
        mm(self.dy.t(), self.h, out=self.dw2)      # bwd  dW2 = dY^T H
        mm(self.dz.t(), self.x, out=self.dw1)      # bwd  dW1 = dZ^T x
        mm(self.dz, self.w1, out=self.dx)          # bwd  dX = dZ W1


# ------------------------------------------------------------------------- targets
def row_targets(name: str, device: str, row: dict, peak_nr: int | None) -> list[C.Target]:
    r = row.get("ratios", {})
    if device == "cpu" and name == ATEN_T:
        return [C.Target("/non-reentrant", "<=", 1.03, r.get("vs_nonreentrant")),
                C.Target("/reentrant", "<=", 0.92, r.get("vs_reentrant")),
                C.Target("/eager", "<=", 1.25, r.get("vs_eager"))]
    if device == "cuda" and name == TRITON_T:
        peak = row.get("peak_bytes")
        peak_ratio = peak / peak_nr if (peak is not None and peak_nr) else None
        row["peak_vs_nonreentrant"] = peak_ratio
        return [C.Target("/floor", "<=", 1.05, r.get("vs_floor")),
                C.Target("/non-reentrant", "<=", 0.95, r.get("vs_nonreentrant")),
                C.Target("/reentrant", "<=", 0.87, r.get("vs_reentrant")),
                C.Target("8-layer peak/non-reentrant", "<=", 0.85, peak_ratio)]
    return []


GEMM_TARGET = 0.85  # each Triton kernel at >= 85% of torch.matmul's TFLOP/s on the same shape


# ------------------------------------------------------------------------- one shape
def _grads(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [x] + [p for p in m.parameters()]


def _clear(tensors) -> None:
    for t in tensors:
        t.grad = None


def reference_dx(base: EagerMLP, s: Shape, x, dy, ref_dtype) -> torch.Tensor:
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cast = lambda t: None if t is None else t.detach().to(ref_dtype)  # noqa: E731
        xr = x.detach().to(ref_dtype).requires_grad_()
        y = ffn_reference(xr, cast(base.fc1.weight), cast(base.fc1.bias), cast(base.fc2.weight),
                          cast(base.fc2.bias), s.activation)
        y.backward(dy.to(ref_dtype))
        return xr.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32


def skip_reason(name: str, device: str, args, have_ext: bool) -> str | None:
    if args.variants and name not in args.variants:
        return "not selected (--variants)"
    if name in (TRITON_T, TRITON_F) and device != "cuda":
        return "CUDA only"
    if name in (ATEN_T, ATEN_F) and not have_ext:
        return "fused_ckpt._C not built (pip install -e . --no-build-isolation)"
    if name == COMPILE:
        if args.compile is False:
            return "--no-compile"
        if device != "cuda" and not args.compile:
            return "CUDA only by default (--compile forces it)"
    return None


def prepare_variant(name, m, s, x, dy, dx_ref, device, log) -> dict:
    """One fwd+bwd for the gradient check (and compile/autotune warmup), then the saved bytes
    of a forward under saved_tensors_hooks, then the FLOPs of a fwd+bwd under FlopCounterMode."""
    row: dict = {}
    params = list(m.parameters())
    grads = _grads(m, x)
    _clear(grads)
    t0 = time.perf_counter()
    m(x).backward(dy)
    C.sync(device)
    row["first_call_s"] = time.perf_counter() - t0
    err = (x.grad.to(dx_ref.dtype) - dx_ref).abs().max().item()
    row["dx_max_err"] = err
    _clear(grads)
    try:
        nbytes, y = C.saved_bytes(lambda: m(x), params)
        row["saved_bytes"] = nbytes
        del y
    except Exception as e:  # e.g. torch.compile refusing saved_tensors_hooks
        row["saved_bytes"] = None
        row["saved_bytes_error"] = C.short_error(e)
        log(f"  [{name}] saved-bytes accounting failed: {row['saved_bytes_error']}")
    _clear(grads)
    # torch.compile's kernels run outside the dispatcher, so its FLOPs are counted on the same
    # program run eagerly (the checkpoint tags fix what it recomputes).
    if isinstance(m, CompiledCheckpointMLP):
        m.compiled = False
        row["hw_flops_note"] = "counted on the uncompiled program"
    try:
        row["hw_flops"] = C.count_flops(lambda: m(x).backward(dy))
    except Exception as e:
        row["hw_flops"] = None
        row["hw_flops_error"] = C.short_error(e)
    finally:
        if isinstance(m, CompiledCheckpointMLP):
            m.compiled = True
    _clear(grads)
    return row


def stack_peak(m: nn.Module, layers: int, x, dy) -> int:
    """Peak CUDA memory of an ``layers``-deep stack of copies of ``m`` (own weights each), fwd+bwd,
    above weights and inputs: saved activations, backward temporaries and the weight gradients."""
    stack = nn.Sequential(*[copy.deepcopy(m) for _ in range(layers)])
    xs = x.detach().clone().requires_grad_()
    tensors = [xs] + list(stack.parameters())

    def run():
        stack(xs).backward(dy)

    try:
        run()  # warmup: autotune / compile outside the measurement
        return C.cuda_peak_bytes(run, before=lambda: _clear(tensors))
    finally:
        del stack, tensors
        torch.cuda.empty_cache()


def gemm_kernel_checks(s: Shape, base: EagerMLP, x, dy, rep_ms: float, log) -> list[dict]:
    """Each Triton GEMM kernel vs torch.matmul on the GEMM it replaces (bias and activation
    work of the Triton kernels included in their time; the torch side is the bare GEMM)."""
    from fused_ckpt.kernels.ffn_bwd import ffn_bwd_hidden
    from fused_ckpt.kernels.ffn_fwd import ffn_up
    from fused_ckpt.kernels.matmul import gemm

    act = get_activation(s.activation)
    T, d, F1, f = s.tokens, s.d_model, s.fc1_rows, s.d_ff
    w1, w2 = base.fc1.weight.detach(), base.fc2.weight.detach()
    b1 = base.fc1.bias.detach() if base.fc1.bias is not None else None
    xd = x.detach()
    h = torch.randn(T, f, device=x.device, dtype=x.dtype)
    dz = torch.randn(T, F1, device=x.device, dtype=x.dtype)
    mm = torch.matmul
    cases = [
        ("up: H = act(x W1^T + b1)", 2 * T * d * F1,
         lambda: ffn_up(xd, w1, b1, act, False), lambda: mm(xd, w1.t())),
        ("bwd hidden: Z = x W1^T (recompute), dH = dY W2, dZ", 2 * T * d * (F1 + f),
         lambda: ffn_bwd_hidden(xd, None, dy, w1, b1, w2, act, True),
         lambda: (mm(xd, w1.t()), mm(dy, w2))),
        ("gemm: Y = H W2^T", 2 * T * f * d, lambda: gemm(h, w2.t()), lambda: mm(h, w2.t())),
        ("gemm: dW2 = dY^T H", 2 * T * d * f, lambda: gemm(dy.t(), h), lambda: mm(dy.t(), h)),
        ("gemm: dW1 = dZ^T x", 2 * T * F1 * d, lambda: gemm(dz.t(), xd), lambda: mm(dz.t(), xd)),
        ("gemm: dX = dZ W1", 2 * T * F1 * d, lambda: gemm(dz, w1), lambda: mm(dz, w1)),
    ]
    out = []
    for what, flops, tri, ref in cases:
        row = {"kernel": what, "flops": flops}
        try:
            tri(), ref()  # autotune outside the timing
            torch.cuda.synchronize()
            tt = C.time_cuda(tri, rep_ms=rep_ms)
            rt = C.time_cuda(ref, rep_ms=rep_ms)
            row.update(triton=tt.to_json(), torch=rt.to_json(),
                       triton_tflops=C.tflops(flops, tt.median_ms), torch_tflops=C.tflops(flops, rt.median_ms))
            row["ratio"] = row["triton_tflops"] / row["torch_tflops"]
            row["target"] = C.Target("Triton/torch TFLOP/s", ">=", GEMM_TARGET, row["ratio"]).to_json()
        except Exception as e:
            row["error"] = C.short_error(e)
            log(f"  [gemm check] {what}: {row['error']}")
        out.append(row)
    return out


def run_shape(s: Shape, args, device: torch.device, dtype: torch.dtype, have_ext: bool, log,
              result: dict, progress) -> None:
    """Fills ``result`` in place; ``progress()`` saves what is there so far (a run killed by a
    timeout keeps the finished phases of the shape it was in)."""
    torch.manual_seed(0)
    dev = device.type
    T, d = s.tokens, s.d_model
    result.update({"status": "running", "unit_flops": s.unit, "model_flops": s.model_flops(),
                   "floor_flops": s.floor_flops(True), "floor_flops_no_recompute": s.floor_flops(False),
                   "rows": {}, "gemm_kernels": []})
    base = EagerMLP(s.d_model, s.d_ff, s.activation, s.bias, device=device, dtype=dtype)
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, d, device=device, dtype=dtype)
    ref_dtype = torch.float64 if dev == "cpu" else torch.float32
    dx_ref = reference_dx(base, s, x, dy, ref_dtype)
    result["dx_reference_dtype"] = C.dtype_name(ref_dtype)
    result["dx_scale"] = dx_ref.abs().max().item()

    rows = result["rows"]
    modules: dict[str, nn.Module] = {}
    fns, grad_sets = {}, {}
    for name in VARIANTS:
        reason = skip_reason(name, dev, args, have_ext)
        if reason:
            rows[name] = {"status": "skipped", "reason": reason}
            continue
        try:
            if name in FLOORS:
                fl = Floor(s, device, dtype, recompute=name == FLOOR7)
                row = {"hw_flops": C.count_flops(fl), "formula_flops": s.floor_flops(name == FLOOR7)}
                fns[name], grad_sets[name] = fl, []
            else:
                m = build_module(name, base, s)
                log(f"  [{name}] first call + saved bytes + FLOP count ...")
                row = prepare_variant(name, m, s, x, dy, dx_ref, dev, log)
                modules[name] = m
                fns[name] = (lambda m=m: m(x).backward(dy))
                grad_sets[name] = _grads(m, x)
            row["status"] = "ok"
            rows[name] = row
        except Exception as e:
            rows[name] = {"status": "error", "error": C.short_error(e)}
            log(f"  [{name}] ERROR {rows[name]['error']}")
            if args.verbose:
                traceback.print_exc()
        C.sync(device)

    # ---- timing
    log(f"  timing {len(fns)} variants ...")
    if dev == "cuda":
        timings = {}
        for name, fn in fns.items():
            try:
                timings[name] = C.time_cuda(fn, rep_ms=args.rep_ms, grad_to_none=grad_sets[name])
            except Exception as e:
                rows[name].update(status="error", error=C.short_error(e))
                log(f"  [{name}] timing ERROR {rows[name]['error']}")
    else:
        timings = C.time_cpu(fns, reps=args.reps, warmup=args.warmup, grad_to_none=grad_sets)
    for name, t in timings.items():
        rows[name]["timing"] = t.to_json()
    _clear([x] + list(base.parameters()))

    # ---- derived numbers
    med = {n: t.median_ms for n, t in timings.items()}
    refs = {"vs_floor": FLOOR7, "vs_eager": EAGER, "vs_nonreentrant": NR, "vs_reentrant": RE}
    eager_err = rows.get(EAGER, {}).get("dx_max_err")
    eps = torch.finfo(dtype).eps * result["dx_scale"]
    for name, t in timings.items():
        row = rows[name]
        row["ratios"] = {k: (t.median_ms / med[r] if r in med else None) for k, r in refs.items()}
        if dev == "cpu":  # the i-th sample of every variant comes from the same round
            row["paired_ratio_medians"] = {
                k: C.quantile([a / b for a, b in zip(t.samples_ms, timings[r].samples_ms)], 0.5)
                for k, r in refs.items() if r in timings}
        row["tflops_model"] = C.tflops(s.model_flops(), t.median_ms)
        row["tflops_hw"] = C.tflops(row.get("hw_flops"), t.median_ms)
        if row.get("hw_flops"):
            row["hw_flops_units"] = row["hw_flops"] / s.unit
        if "dx_max_err" in row and eager_err is not None:
            row["dx_ok"] = row["dx_max_err"] <= 2 * eager_err + eps
    _set_targets(rows, dev)
    progress()

    # ---- CUDA: 8-layer stacks, Triton GEMM kernels
    if dev == "cuda" and args.layers > 0:
        for name, m in modules.items():
            if rows[name].get("status") != "ok":
                continue
            log(f"  [{name}] {args.layers}-layer peak ...")
            try:
                rows[name]["peak_bytes"] = stack_peak(m, args.layers, x, dy)
            except Exception as e:
                rows[name]["peak_error"] = C.short_error(e)
                log(f"  [{name}] peak ERROR {rows[name]['peak_error']}")
        result["peak_layers"] = args.layers
        _set_targets(rows, dev)
        progress()
    if dev == "cuda" and not args.no_gemm_check and (not args.variants or TRITON_T in args.variants):
        log("  Triton GEMM kernels vs torch.matmul ...")
        result["gemm_kernels"] = gemm_kernel_checks(s, base, x, dy, args.rep_ms, log)
    result["status"] = "complete"


def _set_targets(rows: dict, dev: str) -> None:
    peak_nr = rows.get(NR, {}).get("peak_bytes")
    for name, row in rows.items():
        targets = row_targets(name, dev, row, peak_nr)
        if targets:
            row["targets"] = [t.to_json() for t in targets]


# ------------------------------------------------------------------------- report
def _target_text(row: dict) -> str:
    ts = row.get("targets")
    if not ts:
        return "—"
    parts = []
    for t in ts:
        mark = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        val = "?" if t["value"] is None else f"{t['value']:.3f}"
        parts.append(f"{mark} ({t['what']} {val} {t['op']} {t['limit']:g})")
    return "; ".join(parts)


def shape_markdown(res: dict, device: str) -> str:
    headers = ["variant", "fwd+bwd ms", "q20–q80 ms", "/floor", "/eager", "/non-reentrant",
               "/reentrant", "model TFLOP/s", "HW TFLOP/s", "HW FLOPs (units)", "saved MiB"]
    if device == "cuda":
        headers.append(f"{res.get('peak_layers', 8)}-layer peak MiB")
    headers += ["dx max err", "target met?"]
    table = []
    for name, row in res["rows"].items():
        if row.get("status") != "ok" or "timing" not in row:
            why = row.get("reason") or row.get("error") or "no timing"
            table.append([name, f"{row.get('status', '?')}: {why}"] + [""] * (len(headers) - 2))
            continue
        t, r = row["timing"], row["ratios"]
        err = row.get("dx_max_err")
        err_s = "—" if err is None else f"{err:.2e}" + ("" if row.get("dx_ok", True) else " BAD")
        cells = [name, C.fmt(t["median_ms"], ".2f"), f"{t['q20_ms']:.2f}–{t['q80_ms']:.2f}",
                 C.fmt(r["vs_floor"]), C.fmt(r["vs_eager"]), C.fmt(r["vs_nonreentrant"]),
                 C.fmt(r["vs_reentrant"]), C.fmt(row.get("tflops_model"), ".2f"),
                 C.fmt(row.get("tflops_hw"), ".2f"), C.fmt(row.get("hw_flops_units"), ".2f"),
                 C.fmt(row["saved_bytes"] / C.MiB, ".1f") if row.get("saved_bytes") is not None else "—"]
        if device == "cuda":
            cells.append(C.fmt(row["peak_bytes"] / C.MiB, ".0f") if row.get("peak_bytes") is not None else "—")
        cells += [err_s, _target_text(row)]
        table.append(cells)
    units = res["unit_flops"]
    status = "" if res.get("status") == "complete" else f" ({res.get('status')}: incomplete)"
    lines = [f"### {res['label']}, {res['dtype']}{status}", "",
             f"unit = 2·T·d·f = {units / 1e9:.2f} GFLOP; model FLOPs (eager fwd+bwd) = "
             f"{res['model_flops'] / units:g} units; floor = {res['floor_flops'] / units:g} units "
             f"(with recompute), {res['floor_flops_no_recompute'] / units:g} without; "
             f"dx reference: {res.get('dx_reference_dtype', '?')}, max |dx| = {C.fmt(res.get('dx_scale'), '.3g')}", "",
             C.markdown_table(headers, table), ""]
    if res.get("gemm_kernels"):
        gh = ["Triton kernel", "GFLOP", "Triton ms", "torch ms", "Triton TFLOP/s", "torch TFLOP/s",
              "ratio", f"target met? (>= {GEMM_TARGET})"]
        grows = []
        for g in res["gemm_kernels"]:
            if "error" in g:
                grows.append([g["kernel"], f"error: {g['error']}"] + [""] * 6)
                continue
            met = g["target"]["met"]
            grows.append([g["kernel"], f"{g['flops'] / 1e9:.1f}", f"{g['triton']['median_ms']:.3f}",
                          f"{g['torch']['median_ms']:.3f}", f"{g['triton_tflops']:.1f}",
                          f"{g['torch_tflops']:.1f}", f"{g['ratio']:.3f}", "yes" if met else "NO"])
        lines += [C.markdown_table(gh, grows), ""]
    met = [t["met"] for row in res["rows"].values() for t in row.get("targets", [])]
    met += [g["target"]["met"] for g in res.get("gemm_kernels", []) if "target" in g]
    if met:
        lines += [f"targets met: {sum(m is True for m in met)} of {len(met)}"
                  + (f" ({sum(m is None for m in met)} not measurable)" if any(m is None for m in met) else ""), ""]
    return "\n".join(lines)


def full_markdown(payload: dict) -> str:
    m = payload["machine"]
    dev = payload["device"]
    head = [f"# bench_ffn results ({payload['status']})", "",
            f"- date: {m['date']}",
            f"- machine: {m.get('gpu') or m['cpu']} (host {m['host']}, {m['cpu_count']} CPUs, "
            f"torch threads {m['torch_threads']}"
            + (f", load average {m['loadavg_1_5_15'][0]} at start" if "loadavg_1_5_15" in m else "")
            + (f", {m['loadavg_at_end'][0]} at end" if "loadavg_at_end" in m else "") + ")",
            f"- torch {m['torch']}, triton {m['triton']}" + (f", CUDA {m['cuda']}" if m.get("cuda") else ""),
            f"- command: `{payload['command']}`",
            f"- timing: {payload['timing_method']}",
            "- ratios are of medians; `/floor` is against the 7-GEMM (recompute) floor; "
            "see benchmarks/README.md for every column", ""]
    body = []
    for r in payload["shapes"]:
        if "error" in r:
            body.append(f"### {r['label']}\n\nfailed: {r['error']}\n")
        elif "rows" in r:
            body.append(shape_markdown(r, dev))
    return "\n".join(head + body)


# ------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated TxDxF:activation[:bias|:nobias], e.g. 8192x4096x14336:swiglu")
    p.add_argument("--quick", action="store_true", help="small shapes and few reps")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device>-<date>)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run the torch.compile row on CPU too")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--rep-ms", type=float, default=200.0, help="CUDA: do_bench rep per variant (ms)")
    p.add_argument("--reps", type=int, default=None, help="CPU: timed rounds (default 9; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="CPU: warmup calls per variant (default 2; --quick 1)")
    p.add_argument("--layers", type=int, default=8, help="CUDA: depth of the peak-memory stack (0 skips)")
    p.add_argument("--no-gemm-check", action="store_true", help="CUDA: skip the per-kernel GEMM comparison")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing variants")
    args = p.parse_args(argv)
    if args.variants:
        args.variants = [v.strip() for v in args.variants.split(",")]
        bad = [v for v in args.variants if v not in VARIANTS]
        if bad:
            p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    return args


def main(argv=None) -> int:
    C.exit_cleanly_on_sigterm()
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dev = device.type
    if dev not in ("cpu", "cuda"):
        raise SystemExit(f"unsupported device {device}")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    dtype = C.dtype_from_name(args.dtype or ("bf16" if dev == "cuda" else "fp32"))
    specs = args.shapes.split(",") if args.shapes else (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)[dev]
    shapes = [Shape.parse(sp) for sp in specs]
    if args.reps is None:
        args.reps = 3 if args.quick else 9
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.quick:
        args.rep_ms = min(args.rep_ms, 50.0)
    out = args.out or os.path.join(C.REPO_ROOT, "benchmarks", "results", f"{dev}-{dt.date.today().isoformat()}")

    from fused_ckpt import _ext
    have_ext = _ext.available()

    def log(msg):
        print(msg, flush=True)

    payload = {
        "benchmark": "bench_ffn", "status": "running", "device": dev, "dtype": C.dtype_name(dtype),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": C.machine_info(device), "extension_built": have_ext,
        "timing_method": (f"triton.testing.do_bench, rep={args.rep_ms:g} ms per variant, median and "
                          "20/80% quantiles" if dev == "cuda" else
                          f"wall clock, {args.reps} round-robin rounds after {args.warmup} warmup calls "
                          "per variant, median and 20/80% quantiles"),
        "options": {k: v for k, v in vars(args).items()},
        "shapes": [],
    }
    log(f"bench_ffn: {dev} {C.dtype_name(dtype)}, torch {payload['machine']['torch']}, "
        f"triton {payload['machine']['triton']}, extension {'built' if have_ext else 'NOT built'}; out={out}")
    t_start = time.perf_counter()
    try:
        for s in shapes:
            log(f"== {s.label()} ({C.dtype_name(dtype)})")
            res = {"shape": asdict(s), "label": s.label(), "dtype": C.dtype_name(dtype)}
            payload["shapes"].append(res)
            progress = lambda: C.write_results(out, payload, full_markdown(payload))  # noqa: E731
            try:
                run_shape(s, args, device, dtype, have_ext, log, res, progress)
                log(shape_markdown(res, dev))
            except Exception as e:  # keep going with the next shape (e.g. CUDA out of memory)
                res.update(status="failed", error=C.short_error(e))
                log(f"  shape failed: {res['error']}")
                if args.verbose:
                    traceback.print_exc()
            if dev == "cuda":
                torch.cuda.empty_cache()
            C.write_results(out, payload, full_markdown(payload))
        payload["status"] = "complete"
    finally:
        payload["elapsed_s"] = time.perf_counter() - t_start
        if hasattr(os, "getloadavg"):
            payload["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
        if payload["status"] != "complete":
            payload["status"] = "partial (interrupted)"
        try:
            md = full_markdown(payload)
        except Exception as e:  # never lose results.json over a report bug
            md = f"# bench_ffn results\n\nmarkdown report failed: {C.short_error(e)}; see results.json\n"
        C.write_results(out, payload, md)
        log(f"wrote {out}/results.json and results.md ({payload['elapsed_s']:.0f} s, {payload['status']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
