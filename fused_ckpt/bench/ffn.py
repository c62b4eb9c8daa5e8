"""FFN suite: one MLP's forward + backward, every way of checkpointing it side by side.

Variants (per shape; all share one set of weights, one input x [T, d] and one upstream dY):

======================  ===========================================================================
eager                   :class:`fused_ckpt.reference.EagerMLP`, nothing recomputed
ckpt-nonreentrant       ``torch.utils.checkpoint(mlp, x, use_reentrant=False)``
ckpt-reentrant          ``torch.utils.checkpoint(mlp, x, use_reentrant=True)`` (re-runs fc2 too)
compile (budget=b)      ``torch.compile`` of the eager MLP with
                        ``torch._functorch.config.activation_memory_budget = b`` (CUDA by default)
fused-<be> rc=<dial>    :class:`FusedCheckpointedFFN` with ``recompute`` True / False / "none"
                        (the FFN's policy dials) on backend ``triton`` (CUDA) and ``aten``
floor 7 GEMMs           the GEMMs of a recomputing fwd+bwd alone, through ``torch.matmul`` into
                        preallocated outputs: the time a fused FFN cannot beat
floor 6 GEMMs           the same without the recompute GEMM (the model FLOPs)
======================  ===========================================================================

FLOPs, in units of one ungated GEMM ``unit = 2·T·d·f``: model (eager fwd+bwd) 6 for GELU, 9 for
gated activations; non-reentrant checkpointing and the recomputing fused FFN 7 / 11; reentrant
8 / 12 (see :meth:`Shape.model_flops`, :meth:`Shape.floor_flops`).
"""
from __future__ import annotations

import copy
import types
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import _timing as T
from ._harness import Prepared, Variant, measure_variants
from ._report import Target, fmt, grad_text, ms, plot_tradeoff, rows_table, short_error

NAME = "ffn"
DESCRIPTION = "FFN forward + backward: eager, torch.utils.checkpoint, torch.compile, fused dials, GEMM floor"

DEFAULT_SHAPES = {
    "cpu": ["2048x768x3072:gelu", "2048x768x2688:swiglu"],
    "cuda": ["8192x4096x16384:gelu", "8192x4096x14336:swiglu"],
}
QUICK_SHAPES = {
    "cpu": ["128x64x256:gelu", "128x64x224:swiglu"],
    "cuda": ["2048x1024x4096:gelu", "2048x1024x3584:swiglu"],
}
# saved-bytes targets: eager / fused (recompute=True) at the shapes they are defined for
SAVED_TARGET = {"gelu": (4.0, 9.0), "swiglu": (3.5, 15.0)}   # activation: (f/d, min ratio)
GEMM_TARGET = 0.85  # each Triton kernel at >= 85% of torch.matmul's TFLOP/s on the same GEMM

EAGER, NR, RE = "eager", "ckpt-nonreentrant", "ckpt-reentrant"
FLOOR7, FLOOR6 = "floor 7 GEMMs", "floor 6 GEMMs"
DIALS = (True, False, "none")


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
        from ..activations import get_activation

        parts = spec.strip().split(":")
        try:
            t, d, f = (int(v) for v in parts[0].lower().split("x"))
        except ValueError:
            raise ValueError(f"bad FFN shape {spec!r}: expected TxDxF:activation, e.g. 8192x4096x16384:gelu") from None
        if min(t, d, f) <= 0:
            raise ValueError(f"bad FFN shape {spec!r}: sizes must be positive")
        act = get_activation(parts[1] if len(parts) > 1 else "gelu")
        bias = not act.gated
        for p in parts[2:]:
            if p not in ("bias", "nobias"):
                raise ValueError(f"bad FFN shape option {p!r} in {spec!r}: expected bias or nobias")
            bias = p == "bias"
        return cls(t, d, f, act.name, bias)

    @property
    def fc1_rows(self) -> int:
        from ..activations import get_activation

        return get_activation(self.activation).fc1_rows(self.d_ff)

    @property
    def unit(self) -> int:
        """One GEMM of the ungated MLP: 2*T*d*f FLOPs."""
        return 2 * self.tokens * self.d_model * self.d_ff

    def label(self) -> str:
        return (f"T={self.tokens} d={self.d_model} f={self.d_ff} {self.activation}"
                f"{'' if self.bias else ' nobias'}")

    def model_flops(self) -> int:
        """Eager fwd+bwd: forward GEMMs once, backward twice (dgrad + wgrad).

        unit = 2*T*d*f;  GELU 6 = 2 (fwd: fc1, fc2) + 4 (bwd: dH, dW2, dW1, dX)
                         gated 9 = 3 (fwd: gate+up 2, down 1) + 6 (bwd)
        """
        return 3 * 2 * self.tokens * self.d_model * (self.fc1_rows + self.d_ff)

    def floor_flops(self, recompute: bool = True) -> int:
        """The floor's GEMMs (each 2*M*N*K):

            fwd   Z = x W1^T        2*T*d*F1      Y  = H W2^T    2*T*f*d
            bwd  [Z = x W1^T        2*T*d*F1]     dH = dY W2     2*T*d*f
                  dW2 = dY^T H      2*T*d*f       dW1 = dZ^T x   2*T*F1*d
                  dX = dZ W1        2*T*F1*d

        GELU 7 units = 2 (fwd) + 1 (recompute fc1) + 4 (bwd) [6 without recompute];
        gated 11 = 3 + 2 + 6 [9 without]."""
        T_, d, F1, f = self.tokens, self.d_model, self.fc1_rows, self.d_ff
        flops = 2 * T_ * d * (F1 + f) + 2 * T_ * d * (f + f + F1 + F1)
        return flops + (2 * T_ * d * F1 if recompute else 0)


class Floor:
    """The GEMMs of the FFN's fwd+bwd alone, through torch.matmul into preallocated outputs (no
    bias, no activation, no allocation): the time a fused implementation cannot beat."""

    def __init__(self, s: Shape, device, dtype, recompute: bool):
        T_, d, F1, f = s.tokens, s.d_model, s.fc1_rows, s.d_ff

        def r(*shape):
            return torch.randn(*shape, device=device, dtype=dtype)

        def e(*shape):
            return torch.empty(*shape, device=device, dtype=dtype)

        self.x, self.dy, self.w1, self.w2 = r(T_, d), r(T_, d), r(F1, d), r(d, f)
        self.h, self.dz = r(T_, f), r(T_, F1)  # stand-ins for act(Z) and dZ
        self.z, self.y, self.dh = e(T_, F1), e(T_, d), e(T_, f)
        self.dw1, self.dw2, self.dx = e(F1, d), e(d, f), e(T_, d)
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


class CompiledBudget(nn.Module):
    """``torch.compile`` of a module with ``activation_memory_budget = budget`` in force while
    it compiles and runs.

    Dynamo caches compiled code per Python code object and does not key it on the functorch
    config, so two compiled wrappers of one function would share the first budget's graph.
    Each instance therefore compiles a fresh code object (a renamed copy of a one-line
    trampoline), which gets its own cache entry and its own partitioning."""

    _count = 0

    def __init__(self, inner: nn.Module, budget: float):
        super().__init__()
        self.inner = inner
        self.budget = budget
        CompiledBudget._count += 1

        def trampoline(*args, **kwargs):
            return inner(*args, **kwargs)

        code = trampoline.__code__.replace(co_name=f"compiled_budget_{CompiledBudget._count}")
        fresh = types.FunctionType(code, trampoline.__globals__, code.co_name, None, trampoline.__closure__)
        self.compiled = torch.compile(fresh, dynamic=False)

    def forward(self, *args, **kwargs):
        import torch._functorch.config as fconfig

        with fconfig.patch(activation_memory_budget=self.budget):
            return self.compiled(*args, **kwargs)


def compile_variant_name(budget: float) -> str:
    return f"compile (budget={budget:g})"


def _share(m: nn.Module, base: nn.Module) -> nn.Module:
    m.fc1, m.fc2 = base.fc1, base.fc2
    return m


def stack_peak(m: nn.Module, layers: int, x, dy) -> int:
    """Peak CUDA memory of a ``layers``-deep stack of copies of ``m`` (own weights each), fwd+bwd,
    above weights and inputs: saved activations, backward temporaries and weight gradients."""
    stack = nn.Sequential(*[copy.deepcopy(m) for _ in range(layers)])
    xs = x.detach().clone().requires_grad_()
    tensors = [xs] + list(stack.parameters())

    def run():
        stack(xs).backward(dy)

    try:
        run()  # warmup outside the measurement
        return T.cuda_peak_bytes(run, before=lambda: T.clear_grads(tensors))
    finally:
        del stack, tensors
        torch.cuda.empty_cache()


def gemm_kernel_checks(ctx, s: Shape, base, x, dy) -> list:
    """Each Triton GEMM kernel against torch.matmul on the GEMM it replaces (the Triton time
    includes its bias/activation epilogue; the torch side is the bare GEMM)."""
    from ..activations import get_activation
    from ..kernels.ffn_bwd import ffn_bwd_hidden
    from ..kernels.ffn_fwd import ffn_up
    from ..kernels.matmul import gemm

    act = get_activation(s.activation)
    T_, d, F1, f = s.tokens, s.d_model, s.fc1_rows, s.d_ff
    w1, w2 = base.fc1.weight.detach(), base.fc2.weight.detach()
    b1 = base.fc1.bias.detach() if base.fc1.bias is not None else None
    xd = x.detach()
    h = torch.randn(T_, f, device=x.device, dtype=x.dtype)
    dz = torch.randn(T_, F1, device=x.device, dtype=x.dtype)
    mm = torch.matmul
    cases = [
        ("up: H = act(x W1^T + b1)", 2 * T_ * d * F1, lambda: ffn_up(xd, w1, b1, act, False), lambda: mm(xd, w1.t())),
        ("bwd hidden: Z = x W1^T (recompute), dH = dY W2, dZ", 2 * T_ * d * (F1 + f),
         lambda: ffn_bwd_hidden(xd, None, dy, w1, b1, w2, act, True), lambda: (mm(xd, w1.t()), mm(dy, w2))),
        ("gemm: Y = H W2^T", 2 * T_ * f * d, lambda: gemm(h, w2.t()), lambda: mm(h, w2.t())),
        ("gemm: dW2 = dY^T H", 2 * T_ * d * f, lambda: gemm(dy.t(), h), lambda: mm(dy.t(), h)),
        ("gemm: dW1 = dZ^T x", 2 * T_ * F1 * d, lambda: gemm(dz.t(), xd), lambda: mm(dz.t(), xd)),
        ("gemm: dX = dZ W1", 2 * T_ * F1 * d, lambda: gemm(dz, w1), lambda: mm(dz, w1)),
    ]
    out = []
    for what, flops, tri, ref in cases:
        row = {"kernel": what, "flops": flops}
        try:
            tri(), ref()  # autotune outside the timing
            torch.cuda.synchronize()
            tt = T.time_cuda(tri, rep_ms=ctx.rep_ms)
            rt = T.time_cuda(ref, rep_ms=ctx.rep_ms)
            row.update(triton=tt.to_json(), torch=rt.to_json(), triton_tflops=T.tflops(flops, tt.median_ms),
                       torch_tflops=T.tflops(flops, rt.median_ms))
            row["ratio"] = row["triton_tflops"] / row["torch_tflops"]
            row["met"] = row["ratio"] >= GEMM_TARGET
        except Exception as e:  # noqa: BLE001
            row["error"] = short_error(e)
            ctx.log(f"  [ffn gemm check] {what}: {row['error']}")
        out.append(row)
    return out


def _reference_grads(base, s: Shape, x, dy, ref_dtype) -> list:
    from ..reference import ffn_reference

    with T.no_tf32():
        def leaf(t):
            return None if t is None else t.detach().to(ref_dtype).requires_grad_()

        xr = leaf(x)
        w1, b1, w2, b2 = leaf(base.fc1.weight), leaf(base.fc1.bias), leaf(base.fc2.weight), leaf(base.fc2.bias)
        ffn_reference(xr, w1, b1, w2, b2, s.activation).backward(dy.to(ref_dtype))
        return [xr.grad, w1.grad, w2.grad]


def _variants(ctx, s: Shape, base, x, dy, layers: int) -> list:
    from ..modules.ffn import FusedCheckpointedFFN
    from ..reference import EagerMLP

    params = list(base.parameters())
    clear = [x] + params

    def grads():
        return [x.grad, base.fc1.weight.grad, base.fc2.weight.grad]

    def module_variant(build, compiled=False):
        def make():
            m = build()
            peak = (lambda: stack_peak(m, layers, x, dy)) if (ctx.dev == "cuda" and layers > 1) else None
            # compiled kernels run outside the dispatcher: FlopCounterMode cannot see them
            return Prepared(run=lambda: m(x).backward(dy), forward=lambda: m(x), grads=grads, clear=clear,
                            params=params, peak=peak, count_flops=not compiled)
        return make

    def eager(ck):
        return lambda: _share(EagerMLP(s.d_model, s.d_ff, s.activation, s.bias, checkpoint=ck, device="meta"), base)

    out = [
        Variant(EAGER, "eager", module_variant(eager(None)), description="nothing recomputed"),
        Variant(NR, "checkpoint", module_variant(eager("non_reentrant")),
                description="torch.utils.checkpoint(use_reentrant=False)"),
        Variant(RE, "checkpoint", module_variant(eager("reentrant")),
                description="torch.utils.checkpoint(use_reentrant=True)"),
    ]
    why = ctx.compile_skip_reason()
    for b in ctx.compile_budgets:
        out.append(Variant(compile_variant_name(b), "compile",
                           None if why else module_variant(lambda b=b: CompiledBudget(eager(None)(), b),
                                                           compiled=True),
                           skip=why, description=f"torch.compile, activation_memory_budget={b:g}"))
    for backend, why in ctx.fused_backends():
        for dial in DIALS:
            def build(backend=backend, dial=dial):
                return _share(FusedCheckpointedFFN(s.d_model, s.d_ff, s.activation, s.bias, recompute=dial,
                                                   device="meta", backend=backend), base)
            out.append(Variant(f"fused-{backend} rc={dial}", "fused", None if why else module_variant(build),
                               skip=why, description=f"FusedCheckpointedFFN(recompute={dial!r}, backend={backend!r})"))
    for name, rc in ((FLOOR7, True), (FLOOR6, False)):
        def make_floor(rc=rc):
            fl = Floor(s, ctx.device, ctx.dtype, recompute=rc)
            return Prepared(run=fl, extra={"formula_flops": s.floor_flops(rc)})
        out.append(Variant(name, "floor", make_floor, description="torch.matmul GEMMs only"))
    wanted = ctx.options.get("ffn_variants")
    if wanted:
        unknown = [w for w in wanted if w not in {v.name for v in out}]
        if unknown:
            raise ValueError(f"unknown FFN variants {unknown}; choose from {[v.name for v in out]}")
        for v in out:
            if v.name not in wanted and v.skip is None:
                v.skip, v.make = "not selected (--variants)", None
    return out


def fused_main_row(ctx, rows: dict) -> tuple:
    """The fused row the targets are about: Triton rc=True on CUDA, else the aten path."""
    for be in ("triton", "aten"):
        r = rows.get(f"fused-{be} rc=True")
        if r is not None and r.get("status") == "ok":
            return be, r
    return None, None


def _targets(ctx, s: Shape, rows: dict) -> list:
    label = s.label()
    on_cuda_bf16 = ctx.dev == "cuda" and ctx.dtype == torch.bfloat16
    be, fr = fused_main_row(ctx, rows)
    ratios = (fr or {}).get("ratios", {})
    time_ok = on_cuda_bf16 and be == "triton"
    why = "" if time_ok else (f"CUDA bf16 target; this run: {ctx.dev} {T.dtype_name(ctx.dtype)}"
                              + (f", value in () is fused-{be} here" if be else ""))
    out = []
    for key, ref, op, lim in (("vs_floor", FLOOR7, "<=", 1.05), ("vs_nonreentrant", NR, "<=", 0.95),
                              ("vs_reentrant", RE, "<=", 0.87)):
        v = ratios.get(key)
        out.append(Target(f"ffn.{key}[{label}]", NAME, f"FFN fwd+bwd / {ref} ({label})", op, lim,
                          value=v if time_ok else None, measured=time_ok, detail=why,
                          info_value=None if time_ok else v))
    if ctx.dev == "cpu" and not ctx.quick:  # the aten path's own CPU targets (README: results on the development VM)
        ar = rows.get("fused-aten rc=True", {}).get("ratios", {})
        for key, ref, lim in (("vs_nonreentrant", NR, 1.03), ("vs_reentrant", RE, 0.92), ("vs_eager", EAGER, 1.25)):
            out.append(Target(f"ffn.cpu_aten_{key}[{label}]", NAME, f"CPU: fused-aten rc=True / {ref} ({label})",
                              "<=", lim, value=ar.get(key), detail="aten path on CPU (fp32)"))
    # saved bytes: eager / fused
    base_act = "swiglu" if s.activation in ("swiglu", "geglu", "geglu_tanh") else "gelu"
    fd, need = SAVED_TARGET[base_act]
    eager_b = rows.get(EAGER, {}).get("saved_bytes")
    fused_b = (fr or {}).get("saved_bytes")
    ratio = eager_b / fused_b if (eager_b and fused_b) else None
    applies = abs(s.d_ff / s.d_model - fd) < 1e-9
    detail = f"measured on {ctx.dev} {T.dtype_name(ctx.dtype)} (byte ratio is dtype-independent)"
    if not applies:
        detail = f"target defined for f = {fd:g}·d; this shape has f = {s.d_ff / s.d_model:g}·d"
    out.append(Target(f"ffn.saved[{label}]", NAME, f"eager saved bytes / fused saved bytes ({label})", ">=", need,
                      value=ratio if applies else None, measured=applies, detail=detail,
                      info_value=None if applies else ratio))
    # peak
    pk, pnr = (fr or {}).get("peak_bytes"), rows.get(NR, {}).get("peak_bytes")
    pr = pk / pnr if (pk is not None and pnr) else None
    out.append(Target(f"ffn.peak[{label}]", NAME, f"FFN peak / non-reentrant peak ({label})", "<", 1.0,
                      value=pr if on_cuda_bf16 else None, measured=on_cuda_bf16 and pr is not None,
                      detail="" if on_cuda_bf16 else "CUDA only (peak memory)"))
    return out


def run(ctx) -> None:
    shapes_opt = ctx.options.get("ffn_shapes")
    specs = shapes_opt or (QUICK_SHAPES if ctx.quick else DEFAULT_SHAPES)[ctx.dev]
    shapes = [Shape.parse(sp) if isinstance(sp, str) else sp for sp in specs]
    layers = int(ctx.options.get("ffn_layers") or 1)
    gemm_check = ctx.dev == "cuda" and ctx.options.get("gemm_check", not ctx.quick)
    info = ctx.suites.setdefault(NAME, {})
    info.update(description=DESCRIPTION, shapes=[s.label() for s in shapes], peak_layers=layers,
                notes=["unit = 2·T·d·f; model FLOPs = 6 units (GELU) / 9 (gated); HW FLOPs as FlopCounterMode "
                       "counts them", "saved bytes: distinct storages autograd keeps after the forward, "
                       "parameters excluded (saved_tensors_hooks)"])
    for s in shapes:
        ctx.log(f"[ffn] {s.label()} {T.dtype_name(ctx.dtype)}")
        torch.manual_seed(0)
        from ..reference import EagerMLP

        base = EagerMLP(s.d_model, s.d_ff, s.activation, s.bias, device=ctx.device, dtype=ctx.dtype)
        x = torch.randn(s.tokens, s.d_model, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        dy = torch.randn(s.tokens, s.d_model, device=ctx.device, dtype=ctx.dtype)
        ref = _reference_grads(base, s, x, dy, ctx.ref_dtype)
        unit = s.unit

        def extra(row, unit=unit):
            if row.get("hw_flops"):
                row["hw_flops_units"] = row["hw_flops"] / unit

        rows = measure_variants(
            ctx, NAME, s.label(), {**asdict(s), "unit_flops": unit, "floor_flops": s.floor_flops(True)},
            _variants(ctx, s, base, x, dy, layers), ref_grads=ref, model_flops=s.model_flops(),
            ratio_refs={"vs_floor": FLOOR7, "vs_eager": EAGER, "vs_nonreentrant": NR, "vs_reentrant": RE},
            extra_per_row=extra)
        by = {r["variant"]: r for r in rows}
        eager_b = by.get(EAGER, {}).get("saved_bytes")
        for r in rows:
            if eager_b and r.get("saved_bytes"):
                r["saved_vs_eager"] = r["saved_bytes"] / eager_b
        if gemm_check:
            info.setdefault("gemm_kernels", {})[s.label()] = gemm_kernel_checks(ctx, s, base, x, dy)
        ctx.targets.extend(t.to_json() for t in _targets(ctx, s, by))
        del base, x, dy, ref
        if ctx.dev == "cuda":
            torch.cuda.empty_cache()
        ctx.snapshot()
    # plot: time vs saved bytes, first shape of each activation
    for s in shapes:
        pts = [(r["saved_bytes"] / T.MiB, ms(r), r["variant"], r["group"]) for r in ctx.rows
               if r["suite"] == NAME and r["shape"] == s.label() and r.get("saved_bytes") is not None and ms(r)]
        path = plot_tradeoff(
            _plot_path(ctx, f"ffn_{s.activation}_{s.tokens}x{s.d_model}x{s.d_ff}.png"), pts,
            title=f"FFN fwd+bwd, {s.label()}, {T.dtype_name(ctx.dtype)} on {ctx.dev}",
            xlabel="saved activations (MiB, per layer)", ylabel="fwd+bwd time (ms, median)")
        if path:
            ctx.plots.append(path)


def _plot_path(ctx, name: str) -> str:
    import os

    return os.path.join(ctx.out_dir or ".", name)


def markdown(ctx_or_payload_rows: list, suite_info: dict, device: str) -> str:
    rows = [r for r in ctx_or_payload_rows if r["suite"] == NAME]
    cols = [
        ("variant", lambda r: r["variant"]),
        ("fwd+bwd ms", lambda r: fmt(ms(r), ".3f")),
        ("q20–q80 ms", lambda r: f"{r['time_ms']['q20_ms']:.3f}–{r['time_ms']['q80_ms']:.3f}"),
        ("/floor", lambda r: fmt(r["ratios"].get("vs_floor"))),
        ("/eager", lambda r: fmt(r["ratios"].get("vs_eager"))),
        ("/non-reentrant", lambda r: fmt(r["ratios"].get("vs_nonreentrant"))),
        ("/reentrant", lambda r: fmt(r["ratios"].get("vs_reentrant"))),
        ("model TFLOP/s", lambda r: fmt(r.get("tflops_model"), ".3f")),
        ("HW TFLOP/s", lambda r: fmt(r.get("tflops_hw"), ".3f")),
        ("HW FLOPs (units)", lambda r: fmt(r.get("hw_flops_units"), ".2f")),
        ("saved MiB", lambda r: fmt(r["saved_bytes"] / T.MiB if r.get("saved_bytes") is not None else None, ".2f")),
        ("saved / eager", lambda r: fmt(r.get("saved_vs_eager"), ".3f")),
    ]
    if device == "cuda":
        cols.append((f"peak MiB ({suite_info.get('peak_layers', 1)} layer)",
                     lambda r: fmt(r["peak_bytes"] / T.MiB if r.get("peak_bytes") is not None else None, ".0f")))
    cols.append(("grad max err", grad_text))
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = [r for r in rows if r["shape"] == shape]
        out += [f"### {shape}, {sel[0]['dtype']}", "", rows_table(sel, cols), ""]
        gk = suite_info.get("gemm_kernels", {}).get(shape)
        if gk:
            body = []
            for g in gk:
                if "error" in g:
                    body.append([g["kernel"], "error: " + g["error"], "", "", ""])
                else:
                    body.append([g["kernel"], f"{g['triton_tflops']:.1f}", f"{g['torch_tflops']:.1f}",
                                 f"{g['ratio']:.3f}", "met" if g["met"] else "not met"])
            from ._report import markdown_table

            out += [markdown_table(["Triton kernel", "Triton TFLOP/s", "torch TFLOP/s", "ratio",
                                    f">= {GEMM_TARGET}"], body), ""]
    return "\n".join(out)
