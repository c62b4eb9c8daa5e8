"""Compile every Triton kernel config for a GPU target on a machine without a GPU.

    python tools/aot_compile.py [--arch 90] [--quick]

Triton compiles ahead of time for a named target (``GPUTarget``) without a device, so each
kernel's autotune configs are lowered to PTX/cubin for Hopper (sm_90) here and in CI: a kernel
that stops compiling on the GPU toolchain, or a config whose shared memory exceeds the
target's, is caught without a GPU. Signatures are derived from the project's argument naming
(``*_ptr`` pointers, ``stride_*`` and sizes as integers, UPPERCASE constexprs).
Prints one JSON line per compiled (kernel, config): shared memory bytes and whether wgmma
(Hopper tensor-core MMA) instructions were emitted.
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


def _jit_and_configs(kernel):
    configs = getattr(kernel, "configs", None)
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn, configs


def compile_kernel(kernel, dtype: str, constexprs: dict, arch: int, max_configs: int | None):
    fn, configs = _jit_and_configs(kernel)
    results = []
    for cfg in (configs or [None])[:max_configs]:
        consts = dict(constexprs)
        opts = {}
        if cfg is not None:
            consts.update(cfg.kwargs)
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = f"*{dtype}"
            else:
                sig[name] = "i32"
        t0 = time.time()
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options=opts)
        results.append({
            "kernel": fn.__name__, "dtype": dtype,
            "config": cfg.kwargs if cfg is not None else None,
            "num_warps": opts.get("num_warps"), "num_stages": opts.get("num_stages"),
            "shared_bytes": k.metadata.shared, "fits": k.metadata.shared <= SMEM_LIMIT.get(arch, 1 << 30),
            "wgmma": "wgmma" in k.asm.get("ptx", ""), "seconds": round(time.time() - t0, 2),
        })
    return results


def kernel_specs():
    """(kernel, dtype, constexprs) for every kernel the package launches on CUDA."""
    from fused_ckpt.kernels.ffn_bwd import _ffn_bwd_hidden_kernel
    from fused_ckpt.kernels.ffn_fwd import _ffn_up_kernel
    from fused_ckpt.kernels.matmul import _gemm_kernel

    dots = {"DOT_F32": False, "INPUT_PRECISION": None}
    specs = [
        (_gemm_kernel, "bf16", dict(HAS_BIAS=True, ACCUMULATE=False, **dots)),
        (_gemm_kernel, "fp32", dict(HAS_BIAS=False, ACCUMULATE=True, DOT_F32=False, INPUT_PRECISION="ieee")),
        (_ffn_up_kernel, "bf16", dict(ACT=1, GATED=False, HAS_BIAS=True, STORE_Z=False, **dots)),
        (_ffn_up_kernel, "bf16", dict(ACT=3, GATED=True, HAS_BIAS=False, STORE_Z=True, **dots)),
        (_ffn_bwd_hidden_kernel, "bf16", dict(ACT=1, GATED=False, HAS_BIAS=True, RECOMPUTE=True, STORE_H=True, **dots)),
        (_ffn_bwd_hidden_kernel, "bf16", dict(ACT=3, GATED=True, HAS_BIAS=False, RECOMPUTE=True, STORE_H=True, **dots)),
        (_ffn_bwd_hidden_kernel, "fp16", dict(ACT=2, GATED=True, HAS_BIAS=True, RECOMPUTE=False, STORE_H=False, **dots)),
    ]
    try:  # attention kernels register their own specs when present
        from fused_ckpt.kernels import flash_attn_fwd

        specs += getattr(flash_attn_fwd, "aot_specs", lambda: [])()
    except ImportError:
        pass
    try:
        from fused_ckpt.kernels import flash_attn_bwd

        specs += getattr(flash_attn_bwd, "aot_specs", lambda: [])()
    except ImportError:
        pass
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--quick", action="store_true", help="only the first autotune config of each kernel")
    args = p.parse_args(argv)
    failures = 0
    for kernel, dtype, consts in kernel_specs():
        try:
            for r in compile_kernel(kernel, dtype, consts, args.arch, 1 if args.quick else None):
                print(json.dumps(r), flush=True)
        except Exception as e:  # report and keep going: one line per failure
            failures += 1
            print(json.dumps({"kernel": getattr(kernel, "__name__", str(kernel)), "dtype": dtype,
                              "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
