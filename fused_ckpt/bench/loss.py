"""Loss suite: the LM head + cross-entropy, forward + backward, every way of computing it.

Variants (per shape; one weight W [V, d], one input x [T, d], one set of targets):

======================  ===========================================================================
eager                   ``F.cross_entropy(F.linear(x, W).float(), t)`` (Hugging Face's loss: the
                        logits upcast to fp32); keeps the fp32 log-softmax [T, V]
compile                 ``torch.compile`` of that (CUDA by default; ``--compile`` runs it on CPU)
fused-<be> rc=True      :func:`fused_ckpt.fused_linear_cross_entropy` ``recompute=True``: keeps x,
                        one fp32 lse and the target per token; recomputes the logits in backward
fused-<be> rc=False     ``recompute=False``: dX and dW formed in the forward and kept
floor 3 GEMMs           logits, dX and dW through ``torch.matmul`` into preallocated outputs (the
                        model FLOPs, nothing else)
======================  ===========================================================================

FLOPs, in units of one GEMM ``unit = 2·T·d·V``: model (eager fwd+bwd) 3, the floor 3,
recompute=False 3 (the backward GEMMs run in the forward), recompute=True 4. Every row also
carries the planner's prediction of its saved bytes (:func:`fused_ckpt.planner.head_options`),
next to the bytes measured with ``saved_tensors_hooks``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import _timing as T
from ._harness import Prepared, Variant, measure_variants
from ._report import fmt, ms, plot_tradeoff, per_shape_tables

NAME = "loss"
DESCRIPTION = "LM head + cross-entropy forward + backward: eager, torch.compile, fused recompute dials, GEMM floor"

DEFAULT_SHAPES = {
    "cpu": ["2048x512x32000"],
    "cuda": [f"{t}x4096x{v}" for t in (8192, 32768) for v in (32000, 128256, 151936)],
}
QUICK_SHAPES = {"cpu": ["128x64x512"], "cuda": ["2048x1024x32000"]}

EAGER, COMPILE, FLOOR = "eager", "compile", "floor 3 GEMMs"
DIALS = (True, False)


@dataclass(frozen=True)
class Shape:
    """T tokens, d model width, V vocabulary."""

    tokens: int
    d_model: int
    vocab: int

    @classmethod
    def parse(cls, spec: str) -> "Shape":
        parts = spec.strip().lower().split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != 3 or any(v <= 0 for v in vals):
            raise ValueError(f"loss shape must be TxDxV with positive integers, got {spec!r}")
        return cls(*vals)

    def label(self) -> str:
        return f"T={self.tokens} d={self.d_model} V={self.vocab}"

    @property
    def unit(self) -> int:
        return 2 * self.tokens * self.d_model * self.vocab

    def model_flops(self) -> int:
        return 3 * self.unit  # fwd logits; bwd dX, dW


def _eager_loss(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


class Floor:
    """The three GEMMs of the loss alone: logits = x W^T, dX = dZ W, dW = dZ^T x."""

    def __init__(self, x, w):
        T_, V = x.shape[0], w.shape[0]
        self.x, self.w = x.detach(), w.detach()
        self.z = torch.empty(T_, V, device=x.device, dtype=x.dtype)
        self.dx = torch.empty_like(self.x)
        self.dw = torch.empty_like(self.w)

    def __call__(self):
        torch.matmul(self.x, self.w.t(), out=self.z)
        torch.matmul(self.z, self.w, out=self.dx)
        torch.matmul(self.z.t(), self.x, out=self.dw)


def _variants(ctx, s: Shape, x, w, t) -> list:
    from ..planner import head_options
    from ..ops.linear_ce import fused_linear_cross_entropy

    e = torch.empty((), dtype=ctx.dtype).element_size()
    planned = {dl: o.saved_bytes for dl, o in head_options(s.tokens, s.d_model, s.vocab, e).items()}
    clear = [x, w]

    def grads():
        return [x.grad, w.grad]

    def variant(fn, dial, compiled=False):
        def make():
            f = torch.compile(fn) if compiled else fn
            return Prepared(run=lambda: f(x, w, t).backward(), forward=lambda: f(x, w, t), grads=grads,
                            clear=clear, params=[w], count_flops=not compiled,
                            extra={"planned_saved_bytes": planned[dial], "planner_dial": dial})
        return make

    out = [Variant(EAGER, "eager", variant(_eager_loss, "logits"),
                   description="F.linear + F.cross_entropy on fp32 logits")]
    why = ctx.compile_skip_reason()
    out.append(Variant(COMPILE, "compile", None if why else variant(_eager_loss, "logits", compiled=True),
                       skip=why, description="torch.compile of the eager loss"))
    for backend, why in ctx.fused_backends():
        for dial in DIALS:
            def fn(x, w, t, backend=backend, dial=dial):
                return fused_linear_cross_entropy(x, w, t, recompute=dial, backend=backend)
            out.append(Variant(f"fused-{backend} rc={dial}", "fused", None if why else variant(fn, dial), skip=why,
                               description=f"fused_linear_cross_entropy(recompute={dial}, backend={backend!r})"))
    out.append(Variant(FLOOR, "floor", lambda: Prepared(run=Floor(x, w), extra={"formula_flops": s.model_flops()}),
                       description="torch.matmul GEMMs only"))
    return out


def _reference_grads(x, w, t, ref_dtype) -> list:
    xr = x.detach().to(ref_dtype).requires_grad_()
    wr = w.detach().to(ref_dtype).requires_grad_()
    F.cross_entropy(F.linear(xr, wr), t).backward()
    return [xr.grad, wr.grad]


def run(ctx) -> None:
    specs = (QUICK_SHAPES if ctx.quick else DEFAULT_SHAPES)[ctx.dev]
    shapes = [Shape.parse(sp) for sp in specs]
    info = ctx.suites.setdefault(NAME, {})
    info.update(description=DESCRIPTION, shapes=[s.label() for s in shapes],
                notes=["unit = 2·T·d·V; model FLOPs = 3 units; recompute=True runs 4, recompute=False 3 (its "
                       "backward GEMMs in the forward)",
                       "saved bytes: distinct storages autograd keeps after the forward, W excluded "
                       "(saved_tensors_hooks); planned: fused_ckpt.planner.head_options for the same dial"])
    for s in shapes:
        ctx.log(f"[loss] {s.label()} {T.dtype_name(ctx.dtype)}")
        torch.manual_seed(0)
        x = torch.randn(s.tokens, s.d_model, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        w = (torch.randn(s.vocab, s.d_model, device=ctx.device, dtype=ctx.dtype) * s.d_model ** -0.5).requires_grad_()
        t = torch.randint(0, s.vocab, (s.tokens,), device=ctx.device)
        ref = _reference_grads(x, w, t, ctx.ref_dtype)
        unit = s.unit

        def extra(row, unit=unit):
            if row.get("hw_flops"):
                row["hw_flops_units"] = row["hw_flops"] / unit

        rows = measure_variants(ctx, NAME, s.label(), {**asdict(s), "unit_flops": unit},
                                _variants(ctx, s, x, w, t), ref_grads=ref, model_flops=s.model_flops(),
                                ratio_refs={"vs_eager": EAGER, "vs_floor": FLOOR}, extra_per_row=extra)
        eager_b = next((r.get("saved_bytes") for r in rows if r["variant"] == EAGER), None)
        for r in rows:
            if eager_b and r.get("saved_bytes"):
                r["saved_vs_eager"] = r["saved_bytes"] / eager_b
        del x, w, t, ref
        if ctx.dev == "cuda":
            torch.cuda.empty_cache()
        ctx.snapshot()
    s = shapes[0]
    pts = [(r["saved_bytes"] / T.MiB, ms(r), r["variant"], r["group"]) for r in ctx.rows
           if r["suite"] == NAME and r["shape"] == s.label() and r.get("saved_bytes") is not None and ms(r)]
    import os

    path = plot_tradeoff(os.path.join(ctx.out_dir or ".", f"loss_{s.tokens}x{s.d_model}x{s.vocab}.png"), pts,
                         title=f"LM head + cross-entropy fwd+bwd, {s.label()}, {T.dtype_name(ctx.dtype)} on {ctx.dev}",
                         xlabel="saved activations (MiB)", ylabel="fwd+bwd time (ms, median)")
    if path:
        ctx.plots.append(path)


def markdown(rows: list, suite_info: dict, device: str) -> str:
    rows = [r for r in rows if r["suite"] == NAME]

    def mib(key):
        return lambda r: fmt(r[key] / T.MiB if r.get(key) is not None else None, ".2f")

    cols = [
        ("variant", lambda r: r["variant"]),
        ("fwd+bwd ms", lambda r: fmt(ms(r), ".3f")),
        ("q20–q80 ms", lambda r: f"{r['time_ms']['q20_ms']:.3f}–{r['time_ms']['q80_ms']:.3f}"),
        ("/eager", lambda r: fmt(r["ratios"].get("vs_eager"))),
        ("/floor", lambda r: fmt(r["ratios"].get("vs_floor"))),
        ("model TFLOP/s", lambda r: fmt(r.get("tflops_model"), ".3f")),
        ("HW FLOPs (units)", lambda r: fmt(r.get("hw_flops_units"), ".2f")),
        ("saved MiB", mib("saved_bytes")),
        ("planned MiB", mib("planned_saved_bytes")),
        ("saved / eager", lambda r: fmt(r.get("saved_vs_eager"), ".4f")),
    ]
    return per_shape_tables(rows, cols, device)
