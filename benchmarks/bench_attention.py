#!/usr/bin/env python
"""Attention: fused_ckpt's Triton flash attention against PyTorch SDPA (flash and cuDNN), and
the checkpointed attention block against torch.utils.checkpoint of an eager SDPA block. CUDA only.

    python benchmarks/bench_attention.py --out DIR             # the FlashAttention paper grid
    python benchmarks/bench_attention.py --quick --out DIR     # a few points, < 60 s

Kernel grid (as in the FlashAttention papers): batch * seqlen = 16k tokens, n_heads * head_dim
= 2048, head_dim 64 and 128, seqlen 512 .. 16k, causal and not, bf16 by default. For each
point and provider: forward, backward and forward+backward TFLOP/s, with

    fwd FLOPs = 4 * B * H * S^2 * D            (halved when causal)
    bwd FLOPs = 2.5 * fwd FLOPs                # 2.0 (bwd GEMMs) + 0.5 (recompute of S = QK^T)

Providers: ``fused_ckpt`` (this package), ``sdpa-flash`` and ``sdpa-cudnn`` (PyTorch SDPA
with one backend forced). Times: ``triton.testing.do_bench`` medians (rep >= 200 ms).

Block rows (Llama-like: d_model 4096, 32 heads of 128, 8 kv heads, rotary, causal): time of
forward+backward and the bytes saved for backward (parameters excluded), for
FusedCheckpointedAttention with recompute "qkv", "all" and False, the eager SDPA block, and
torch.utils.checkpoint (non-reentrant) of the eager block.

Results: ``results.json`` and ``results.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (also puts the repository root on sys.path)

TOKENS = 16384
HIDDEN = 2048  # n_heads * head_dim
FULL_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (2048,)  # one autotune bucket, shared with the quick block rows: compiles dominate
PROVIDERS = ("fused_ckpt", "sdpa-flash", "sdpa-cudnn")
BWD_FACTOR = 2.5  # 2.0 (bwd) + 0.5 (recompute)


def attn_flops(B: int, H: int, S: int, D: int, causal: bool) -> float:
    f = 4.0 * B * H * S * S * D
    return f / 2 if causal else f


# --------------------------------------------------------------------------------- providers
def make_provider(name: str, causal: bool):
    """A function (q, k, v) -> out on (batch, seqlen, heads, head_dim) tensors."""
    if name == "fused_ckpt":
        from fused_ckpt.functional_attention import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="triton")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def run(q, k, v):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=causal)
        return out.transpose(1, 2)

    return run


def bench_point(provider: str, B: int, S: int, H: int, D: int, causal: bool, dtype, rep_ms: float,
                reference: torch.Tensor | None) -> dict:
    row = {"provider": provider, "batch": B, "seqlen": S, "heads": H, "head_dim": D, "causal": causal}
    fwd_flops = attn_flops(B, H, S, D, causal)
    try:
        fn = make_provider(provider, causal)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=gen).requires_grad_()
                   for _ in range(3))
        do = torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=gen)
        with torch.no_grad():
            out = fn(q, k, v)
        if reference is not None:
            row["max_abs_diff_vs_first_provider"] = (out.float() - reference.float()).abs().max().item()
        else:
            row["reference"] = out.detach()
        with torch.no_grad():
            t_fwd = C.time_cuda(lambda: fn(q, k, v), rep_ms=rep_ms)
        o = fn(q, k, v)
        t_bwd = C.time_cuda(lambda: o.backward(do, retain_graph=True), rep_ms=rep_ms, grad_to_none=[q, k, v])
        t_all = C.time_cuda(lambda: fn(q, k, v).backward(do), rep_ms=rep_ms, grad_to_none=[q, k, v])
        row.update(
            fwd_ms=t_fwd.median_ms, bwd_ms=t_bwd.median_ms, fwd_bwd_ms=t_all.median_ms,
            fwd_tflops=C.tflops(fwd_flops, t_fwd.median_ms),
            bwd_tflops=C.tflops(BWD_FACTOR * fwd_flops, t_bwd.median_ms),
            fwd_bwd_tflops=C.tflops((1 + BWD_FACTOR) * fwd_flops, t_all.median_ms),
            timings={"fwd": t_fwd.to_json(), "bwd": t_bwd.to_json(), "fwd_bwd": t_all.to_json()},
        )
        del q, k, v, do, o, out
    except Exception as e:  # an unsupported backend/shape is a row with an error, not a crash
        row["error"] = C.short_error(e)
    torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------- block
def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


class EagerSdpaBlock(nn.Module):
    """The eager attention block the fused one replaces: projections, Llama rotary embedding,
    SDPA (flash when available), o_proj. Shares the fused module's parameters."""

    def __init__(self, fused):
        super().__init__()
        self.f = fused

    def forward(self, x):
        f = self.f
        B, S, _ = x.shape
        q = f.q_proj(x).view(B, S, f.n_heads, f.head_dim).transpose(1, 2)
        k = f.k_proj(x).view(B, S, f.n_kv_heads, f.head_dim).transpose(1, 2)
        v = f.v_proj(x).view(B, S, f.n_kv_heads, f.head_dim).transpose(1, 2)
        inv = 1.0 / (f.rope_theta ** (torch.arange(0, f.head_dim, 2, device=x.device, dtype=torch.float32) / f.head_dim))
        ang = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * inv
        emb = torch.cat((ang, ang), -1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return f.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class CheckpointedBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def bench_block(B: int, S: int, d: int, H: int, H_kv: int, dtype, rep_ms: float, log) -> list[dict]:
    from fused_ckpt.modules.attention import FusedCheckpointedAttention

    torch.manual_seed(0)
    D = d // H
    base = FusedCheckpointedAttention(d, H, H_kv, causal=True, rope_theta=500000.0, recompute="qkv",
                                      device="cuda", dtype=dtype)
    x = torch.randn(B, S, d, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(B, S, d, device="cuda", dtype=dtype)
    variants = {}
    for rc in ("qkv", "all", False):
        m = FusedCheckpointedAttention(d, H, H_kv, causal=True, rope_theta=500000.0, recompute=rc,
                                       device="cuda", dtype=dtype)
        m.load_state_dict(base.state_dict())
        variants[f"fused rc={rc}"] = m
    eager = EagerSdpaBlock(base)
    variants["eager sdpa"] = eager
    variants["ckpt(eager sdpa)"] = CheckpointedBlock(eager)
    flops = 2.0 * B * S * d * (2 * H * D + 2 * H_kv * D) + attn_flops(B, H, S, D, True)  # proj + attention
    rows = []
    ref_y = None
    for name, m in variants.items():
        row = {"variant": name, "batch": B, "seqlen": S, "d_model": d, "heads": H, "kv_heads": H_kv}
        try:
            params = list(m.parameters())
            nbytes, y = C.saved_bytes(lambda: m(x), params)
            row["saved_MiB"] = nbytes / C.MiB
            if ref_y is None:
                ref_y = y.detach()
            else:
                row["max_abs_diff_vs_first"] = (y.float() - ref_y.float()).abs().max().item()
            del y
            grads = [x] + params
            t = C.time_cuda(lambda: m(x).backward(dy), rep_ms=rep_ms, grad_to_none=grads)
            row["fwd_bwd_ms"] = t.median_ms
            row["model_tflops"] = C.tflops(3.0 * flops, t.median_ms)  # fwd + 2x bwd, no recompute counted
            row["peak_MiB"] = C.cuda_peak_bytes(lambda: m(x).backward(dy),
                                                before=lambda: [setattr(g, "grad", None) for g in grads]) / C.MiB
            row["timing"] = t.to_json()
        except Exception as e:
            row["error"] = C.short_error(e)
        log(f"  block {name:18s} " + (f"{row['fwd_bwd_ms']:.3f} ms, saved {row['saved_MiB']:.1f} MiB"
                                       if "fwd_bwd_ms" in row else row.get("error", "")))
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------- report
def markdown(info: dict, kernel_rows: list[dict], block_rows: list[dict], args) -> str:
    lines = [f"# Attention benchmark ({info.get('gpu', '?')}, {args.dtype})", "",
             f"{info['date']}, torch {info['torch']}, triton {info['triton']}, CUDA {info.get('cuda')}.",
             "TFLOP/s with fwd = 4·B·H·S²·D (halved when causal), bwd = 2.5 × fwd; "
             "do_bench medians, rep ≥ 200 ms.", ""]
    for D in sorted({r["head_dim"] for r in kernel_rows}):
        for causal in (False, True):
            sel = [r for r in kernel_rows if r["head_dim"] == D and r["causal"] == causal]
            if not sel:
                continue
            lines += [f"## head_dim {D}, {'causal' if causal else 'non-causal'}", ""]
            table = []
            for r in sel:
                if "error" in r:
                    table.append([r["seqlen"], r["provider"], "error", r["error"][:80], "", ""])
                else:
                    table.append([r["seqlen"], r["provider"], C.fmt(r["fwd_tflops"], ".1f"),
                                  C.fmt(r["bwd_tflops"], ".1f"), C.fmt(r["fwd_bwd_tflops"], ".1f"),
                                  C.fmt(r.get("max_abs_diff_vs_first_provider"), ".2e")])
            lines += [C.markdown_table(["seqlen", "provider", "fwd TFLOP/s", "bwd TFLOP/s",
                                        "fwd+bwd TFLOP/s", "max abs diff vs fused_ckpt"], table), ""]
    if block_rows:
        r0 = block_rows[0]
        lines += [f"## Attention block (B={r0['batch']}, S={r0['seqlen']}, d={r0['d_model']}, "
                  f"{r0['heads']} heads / {r0['kv_heads']} kv heads, rotary, causal)", ""]
        table = [[r["variant"], C.fmt(r.get("fwd_bwd_ms"), ".3f"), C.fmt(r.get("saved_MiB"), ".1f"),
                  C.fmt(r.get("peak_MiB"), ".1f"), C.fmt(r.get("max_abs_diff_vs_first"), ".2e"),
                  r.get("error", "")[:60]] for r in block_rows]
        lines += [C.markdown_table(["variant", "fwd+bwd ms", "saved MiB", "peak MiB", "max abs diff vs first",
                                    "error"], table), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out-attention", help="output directory")
    p.add_argument("--quick", action="store_true", help="a few points (< 60 s)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--rep-ms", type=float, default=200.0, help="do_bench repetition time (>= 200)")
    p.add_argument("--head-dims", default=None, help="comma-separated, default 64,128 (quick: 128)")
    p.add_argument("--no-block", action="store_true", help="skip the attention-block rows")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (it times GPU kernels with triton.testing.do_bench); "
              "no CUDA device is visible, so nothing was run.", file=sys.stderr)
        return 2
    if args.rep_ms < 200:
        raise SystemExit("--rep-ms must be at least 200")
    C.exit_cleanly_on_sigterm()
    dtype = C.dtype_from_name(args.dtype)
    head_dims = [int(v) for v in args.head_dims.split(",")] if args.head_dims else ([128] if args.quick else [64, 128])
    seqlens = QUICK_SEQLENS if args.quick else FULL_SEQLENS
    info = C.machine_info("cuda")
    t0 = time.time()
    log = lambda s: print(f"[{time.time() - t0:6.1f}s] {s}", flush=True)  # noqa: E731
    kernel_rows: list[dict] = []
    block_rows: list[dict] = []
    try:
        for D in head_dims:
            H = HIDDEN // D
            for causal in (False, True):
                for S in seqlens:
                    B = max(1, TOKENS // S)
                    reference = None
                    for prov in PROVIDERS:
                        row = bench_point(prov, B, S, H, D, causal, dtype, args.rep_ms, reference)
                        if prov == PROVIDERS[0]:
                            reference = row.pop("reference", None)
                        row.pop("reference", None)
                        kernel_rows.append(row)
                        log(f"D={D} causal={causal} S={S} {prov:11s} " + (
                            f"fwd {row['fwd_tflops']:.1f} bwd {row['bwd_tflops']:.1f} "
                            f"fwd+bwd {row['fwd_bwd_tflops']:.1f} TFLOP/s" if "error" not in row else row["error"]))
                    del reference
        if not args.no_block:
            B, S = (1, 2048) if args.quick else (4, 4096)
            block_rows = bench_block(B, S, 4096, 32, 8, dtype, args.rep_ms, log)
    finally:
        payload = {"machine": info, "args": vars(args), "kernel": kernel_rows, "block": block_rows,
                   "flops": {"fwd": "4*B*H*S^2*D (/2 causal)", "bwd": f"{BWD_FACTOR} * fwd"}}
        C.write_results(args.out, payload, markdown(info, kernel_rows, block_rows, args))
        log(f"wrote {args.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
