"""Compile every Triton kernel config for a GPU target on a machine without a GPU.

    python tools/aot_compile.py [--arch 90] [--quick] [--only NAME] [--dtype DT] [--list]

Triton compiles ahead of time for a named target (``GPUTarget``) without a device, so each
kernel's autotune configs are lowered to PTX/cubin for Hopper (sm_90) here and in CI: a kernel
that stops compiling on the GPU toolchain, or a config whose shared memory exceeds the
target's, is caught without a GPU. Signatures are derived from the project's argument naming
(``*_ptr`` pointers, ``stride_*`` and sizes as integers, UPPERCASE constexprs).
Prints one JSON line per compiled (kernel, config): shared memory bytes, whether wgmma
(Hopper tensor-core MMA) instructions were emitted, and registers/spills from ptxas -v.

Coverage: every kernel x input dtype (bf16, fp16, fp32 with IEEE dots, fp32 with TF32 dots) x
variant that changes which configs a launch can select (FFN: GATED, RECOMPUTE; attention:
HEAD_DIM 32-256, ATOMIC_DQ), each with every config its pruning returns, fallbacks included
(the autotuner calls the same ``early_config_prune``). ``--quick`` (CI) compiles only the
first selected config (what FUSED_CKPT_AUTOTUNE=0 launches) of a smaller set of variants.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Hopper: 227 KiB of dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {90: 232448, 80: 166912}


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes, from ptxas -v on the kernel's PTX (Triton's own
    ptxas, so the PTX version always matches)."""
    import re
    import subprocess
    import tempfile

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # triton 3.9 emits PTX newer than its sm_90 ptxas reads; its Blackwell ptxas reads it and
    # still targets sm_90a. Whichever accepts the PTX is used.
    candidates = [os.path.join(bindir, n) for n in ("ptxas", "ptxas-blackwell")]
    candidates = [c for c in candidates if os.path.exists(c)]
    if not candidates:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for ptxas in candidates:
            out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=300)
            if out.returncode == 0:
                break
        else:
            return {}
    finally:
        os.unlink(f.name)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None}


class _Elem:
    """Stands in for a tensor argument where the pruner asks for ``element_size()``."""

    def __init__(self, size):
        self.size = size

    def element_size(self):
        return self.size


def _jit_and_configs(kernel):
    configs = getattr(kernel, "configs", None)
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn, configs


def selected_configs(kernel, dtype: str, constexprs: dict):
    """The configs the autotuner may launch ``kernel`` with: its own pruning for a launch with
    ``dtype`` inputs and these constexprs (None: a kernel without autotuning)."""
    fn, configs = _jit_and_configs(kernel)
    prune = getattr(kernel, "early_config_prune", None)
    if configs and prune is not None:
        elem = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
        named = {n: _Elem(elem) for n in fn.arg_names if n.endswith("_ptr")}
        configs = prune(configs, named, **constexprs)
    return configs


def smem_estimate(kernel, dtype: str, constexprs: dict, cfg) -> int | None:
    """The shared memory the pruning assumed for ``cfg`` (FFN and GEMM kernels), to compare
    with the build's."""
    from fused_ckpt.kernels._common import tile_smem_bytes
    from fused_ckpt.kernels.ffn_bwd import _bwd_stage_bytes
    from fused_ckpt.kernels.ffn_fwd import _up_stage_bytes
    from fused_ckpt.kernels.matmul import _gemm_stage_bytes

    stage = {"_gemm_kernel": _gemm_stage_bytes, "_ffn_up_kernel": _up_stage_bytes,
             "_ffn_bwd_hidden_kernel": _bwd_stage_bytes}.get(_jit_and_configs(kernel)[0].__name__)
    if stage is None or cfg is None:
        return None
    return tile_smem_bytes(cfg, stage, constexprs, {"bf16": 2, "fp16": 2, "fp32": 4}[dtype])


def compile_kernel(kernel, dtype: str, constexprs: dict, ints: dict, arch: int,
                   max_configs: int | None):
    """Compile ``kernel`` as the runtime would for a launch with integer arguments ``ints``:
    Triton specializes an integer equal to 1 into a constant and marks integers divisible by
    16 (and 16-byte-aligned pointers) with a divisibility hint, which is what lets it vectorize
    loads and pipeline them. Without those hints the compiled code is not what runs."""
    fn = _jit_and_configs(kernel)[0]
    configs = selected_configs(kernel, dtype, constexprs)  # the autotuner's own pruning
    results = []
    for cfg in (configs or [None])[:max_configs]:
        consts = dict(constexprs)
        opts = {}
        if cfg is not None:
            consts.update(cfg.kwargs)
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = ints.get(name, f"*{dtype}")  # another element type where ints names one
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                v = ints[name]
                if isinstance(v, float):
                    sig[name] = "fp32"
                    continue
                if v == 1:
                    consts[name] = 1
                    sig[name] = "constexpr"
                    continue
                sig[name] = "i64" if v >= 2**31 else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        t0 = time.time()
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options=opts)
        results.append({
            "kernel": fn.__name__, "dtype": dtype, "precision": constexprs.get("INPUT_PRECISION"),
            "variant": {k: v for k, v in constexprs.items() if k not in ("DOT_F32", "INPUT_PRECISION")},
            "config": cfg.kwargs if cfg is not None else None,
            "num_warps": opts.get("num_warps"), "num_stages": opts.get("num_stages"),
            "shared_bytes": k.metadata.shared, "fits": k.metadata.shared <= SMEM_LIMIT.get(arch, 1 << 30),
            "smem_estimate": smem_estimate(kernel, dtype, constexprs, cfg), "triton": triton.__version__,
            "wgmma": "wgmma" in k.asm.get("ptx", ""), "seconds": round(time.time() - t0, 2),
            **_ptxas_usage(k.asm["ptx"], arch),
        })
    return results


# A representative launch: T=8192 tokens, d_model=4096, d_ff=16384, contiguous tensors (gate and up
# weights as two [d_ff, d_model] tensors, as the kernels read them).
T, D, F = 8192, 4096, 16384
_GEMM_FC2 = dict(stride_am=F, stride_ak=1, stride_bk=1, stride_bn=F, stride_cm=D, stride_cn=1, M=T, N=D, K=F,
                 M_BUCKET=T, K_BUCKET=F)
_GEMM_DW = dict(stride_am=1, stride_ak=F, stride_bk=D, stride_bn=1, stride_cm=D, stride_cn=1, M=F, N=D, K=T,
                M_BUCKET=F, K_BUCKET=T)
_UP = dict(stride_xm=D, stride_xk=1, stride_wgn=D, stride_wgk=1, stride_wun=D, stride_wuk=1, stride_hm=F, stride_hn=1,
           stride_zm=F, stride_zn=1, M=T, N=F, K=D, M_BUCKET=T)
_BWD = dict(stride_xm=D, stride_xk=1, stride_wgn=D, stride_wgk=1, stride_wun=D, stride_wuk=1, stride_zm=F, stride_zn=1,
            stride_dym=D, stride_dyk=1, stride_w2k=F, stride_w2n=1, stride_dzm=F, stride_dzn=1,
            stride_hm=F, stride_hn=1, M=T, N=F, K=D, M_BUCKET=T)
# LoRA arguments (rank 16, PEFT's r=8 padded to the kernels' 16-wide r step; t [T, r] and B [out, r]
# contiguous, A_2 [r, F] read transposed); plain launches pass them too (unread).
R_LORA = 16
_GEMM_LORA = dict(stride_ltm=R_LORA, stride_ltr=1, stride_lbn=R_LORA, stride_lbr=1, R=R_LORA, lora_scale=2.0)
_UP_LORA = dict(stride_tgm=R_LORA, stride_tgr=1, stride_lgn=R_LORA, stride_lgr=1, stride_tum=R_LORA, stride_tur=1,
                stride_lun=R_LORA, stride_lur=1, R_G=R_LORA, R_U=R_LORA, scale_g=2.0, scale_u=2.0)
_BWD_LORA = dict(_UP_LORA, stride_g2m=R_LORA, stride_g2r=1, stride_a2n=1, stride_a2r=F, R_2=R_LORA, scale_2=2.0,
                 seed=2**62 + 12345, rng_offset=77, threshold=214748365, drop_scale=1 / 0.9, row0=4096)
_GEMM_FC2, _GEMM_DW = dict(_GEMM_FC2, **_GEMM_LORA), dict(_GEMM_DW, **_GEMM_LORA)
_UP, _BWD = dict(_UP, **_UP_LORA), dict(_BWD, **_BWD_LORA)
_NO_LORA = dict(HAS_LORA=False, LORA_F32=False, LORA_PRECISION=None)
_LORA_PTRS = {"_gemm_kernel": ("lt_ptr", "lb_ptr"), "_ffn_up_kernel": ("tg_ptr", "lg_ptr", "tu_ptr", "lu_ptr"),
              "_ffn_bwd_hidden_kernel": ("tg_ptr", "lg_ptr", "tu_ptr", "lu_ptr", "g2_ptr", "a2_ptr")}


def _lora_variant(kernel, constexprs: dict, ints: dict, dtype: str, dots: dict):
    """``kernel``'s LoRA build (HAS_LORA): factors in float32 (PEFT's default adapter dtype for a
    16-bit model; "tf32x3" dots over 16-bit inputs, ``matmul.lora_flags``, as with TF32 off);
    the fc2 adapter's dropout on in the backward."""
    fdt = "fp32"
    prec = dots["INPUT_PRECISION"] if dtype == "fp32" else "tf32x3"
    c = dict(constexprs, HAS_LORA=True, LORA_F32=False, LORA_PRECISION=prec)
    if "LORA_DROP" in constexprs:
        c["LORA_DROP"] = True
    ptrs = {n: f"*{fdt}" for n in _LORA_PTRS[_jit_and_configs(kernel)[0].__name__]}
    return kernel, c, dict(ints, **ptrs)

# (dtype, constexprs of dot_flags) of the launches: what dot_flags returns on CUDA for bf16 and
# fp16, and for fp32 with TF32 off (IEEE, torch's default) and on.
DTYPES = (("bf16", {"DOT_F32": False, "INPUT_PRECISION": None}),
          ("fp16", {"DOT_F32": False, "INPUT_PRECISION": None}),
          ("fp32", {"DOT_F32": False, "INPUT_PRECISION": "ieee"}),
          ("fp32", {"DOT_F32": False, "INPUT_PRECISION": "tf32"}))


def kernel_specs(quick: bool = False):
    """(kernel, dtype, constexprs, integer args) for every kernel the package launches on CUDA,
    for every input dtype and every variant that changes the configs the pruning selects (the
    activation, bias and store flags do not; the most expensive ones are compiled). quick: the
    variants whose selection differs most (CI)."""
    from fused_ckpt.kernels.ffn_bwd import _ffn_bwd_hidden_kernel
    from fused_ckpt.kernels.ffn_fwd import _ffn_up_kernel
    from fused_ckpt.kernels.matmul import _gemm_kernel

    specs = []
    for dtype, dots in DTYPES:
        ffn = [(_gemm_kernel, dict(HAS_BIAS=True, ACCUMULATE=False, **_NO_LORA), _GEMM_FC2),
               (_gemm_kernel, dict(HAS_BIAS=False, ACCUMULATE=True, **_NO_LORA), _GEMM_DW)]
        for gated in (False, True):
            act = 3 if gated else 2  # silu (swiglu) / tanh-GELU: the costlier epilogues
            ffn.append((_ffn_up_kernel, dict(ACT=act, GATED=gated, HAS_BIAS=True, STORE_Z=True, **_NO_LORA), _UP))
            for recompute in (True, False):
                ffn.append((_ffn_bwd_hidden_kernel, dict(ACT=act, GATED=gated, HAS_BIAS=True, RECOMPUTE=recompute,
                                                         STORE_H=True, LORA_DROP=False, **_NO_LORA), _BWD))
        # LoRA builds (ops/ffn_lora.py on the triton backend): the fc2 GEMM, the up-projection and
        # both backward modes (--quick keeps the gated ones, which hold the most accumulators)
        ffn += [_lora_variant(k, c, i, dtype, dots) for k, c, i in ffn if c["HAS_BIAS"] and not c.get("ACCUMULATE")]
        if quick:  # fp16 builds as bf16; the gated variants hold the most accumulators
            if dtype == "fp16":
                continue
            ffn = [s for s in ffn if s[0] is _gemm_kernel and (s[1]["ACCUMULATE"] or s[1]["HAS_LORA"])
                   or s[1].get("GATED")]
        specs += [(k, dtype, dict(c, **dots), ints) for k, c, ints in ffn]
    from fused_ckpt.kernels.ffn_fwd import LORA_DROP_BLOCK_M, LORA_DROP_BLOCK_N, _lora_dropout_kernel

    drop_ints = dict(stride_xm=D, stride_xn=1, stride_ym=D, stride_yn=1, M=T, N=D, row0=4096, seed=2**62 + 12345,
                     rng_offset=77, threshold=214748365, scale=1 / 0.9)  # LoRA input dropout (no autotuning)
    specs += [(_lora_dropout_kernel, dt, dict(BLOCK_M=LORA_DROP_BLOCK_M, BLOCK_N=LORA_DROP_BLOCK_N), drop_ints)
              for dt in ("bf16", "fp32")]
    for mod in ("norm", "rope", "linear_ce", "flash_attn_fwd", "flash_attn_bwd", "dropout"):  # other kernels list their own specs
        try:
            m = __import__(f"fused_ckpt.kernels.{mod}", fromlist=["x"])
        except ImportError:
            continue
        specs += getattr(m, "aot_specs", lambda **kw: [])(**({"quick": True} if quick and mod in ("linear_ce", "flash_attn_fwd", "flash_attn_bwd") else {}))
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--quick", action="store_true",
                   help="CI: fewer variants, and only the first selected config of each")
    p.add_argument("--only", default=None, help="only kernels whose name contains this")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="only this input dtype")
    p.add_argument("--list", action="store_true", help="print the selected configs without compiling")
    args = p.parse_args(argv)
    failures = 0
    for kernel, dtype, consts, ints in kernel_specs(args.quick):
        name = _jit_and_configs(kernel)[0].__name__
        if args.only and args.only not in name or args.dtype and args.dtype != dtype:
            continue
        if args.list:
            cfgs = selected_configs(kernel, dtype, consts) or [None]
            print(json.dumps({"kernel": name, "dtype": dtype, "variant": consts,
                              "configs": [str(c) for c in cfgs]}), flush=True)
            continue
        try:
            for r in compile_kernel(kernel, dtype, consts, ints, args.arch, 1 if args.quick else None):
                print(json.dumps(r), flush=True)
        except Exception as e:  # report and keep going: one line per failure
            failures += 1
            print(json.dumps({"kernel": name, "dtype": dtype, "variant": consts,
                              "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
