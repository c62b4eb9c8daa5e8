"""Compile every Triton kernel config for a GPU target on a machine without a GPU.

    python tools/aot_compile.py [--arch 90] [--quick]

Triton compiles ahead of time for a named target (``GPUTarget``) without a device, so each
kernel's autotune configs are lowered to PTX/cubin for Hopper (sm_90) here and in CI: a kernel
that stops compiling on the GPU toolchain, or a config whose shared memory exceeds the
target's, is caught without a GPU. Signatures are derived from the project's argument naming
(``*_ptr`` pointers, ``stride_*`` and sizes as integers, UPPERCASE constexprs).
Prints one JSON line per compiled (kernel, config): shared memory bytes, whether wgmma
(Hopper tensor-core MMA) instructions were emitted, and registers/spills from ptxas -v.
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


def compile_kernel(kernel, dtype: str, constexprs: dict, ints: dict, arch: int,
                   max_configs: int | None):
    """Compile ``kernel`` as the runtime would for a launch with integer arguments ``ints``:
    Triton specializes an integer equal to 1 into a constant and marks integers divisible by
    16 (and 16-byte-aligned pointers) with a divisibility hint, which is what lets it vectorize
    loads and pipeline them. Without those hints the compiled code is not what runs."""
    fn, configs = _jit_and_configs(kernel)
    prune = getattr(kernel, "early_config_prune", None)
    if configs and prune is not None:  # the same pruning the autotuner applies at launch
        elem = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
        named = {n: _Elem(elem) for n in fn.arg_names if n.endswith("_ptr")}
        configs = prune(configs, named, **constexprs)
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
                sig[name] = f"*{dtype}"
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
            "kernel": fn.__name__, "dtype": dtype,
            "config": cfg.kwargs if cfg is not None else None,
            "num_warps": opts.get("num_warps"), "num_stages": opts.get("num_stages"),
            "shared_bytes": k.metadata.shared, "fits": k.metadata.shared <= SMEM_LIMIT.get(arch, 1 << 30),
            "wgmma": "wgmma" in k.asm.get("ptx", ""), "seconds": round(time.time() - t0, 2),
            **_ptxas_usage(k.asm["ptx"], arch),
        })
    return results


# A representative launch: T=8192 tokens, d_model=4096, d_ff=16384, contiguous tensors.
T, D, F = 8192, 4096, 16384
_GEMM_FC2 = dict(stride_am=F, stride_ak=1, stride_bk=1, stride_bn=F, stride_cm=D, stride_cn=1, M=T, N=D, K=F)
_GEMM_DW = dict(stride_am=1, stride_ak=F, stride_bk=D, stride_bn=1, stride_cm=D, stride_cn=1, M=F, N=D, K=T)
_UP = dict(stride_xm=D, stride_xk=1, stride_wn=D, stride_wk=1, stride_hm=F, stride_hn=1,
           stride_zm=F, stride_zn=1, M=T, N=F, K=D)
_BWD = dict(stride_xm=D, stride_xk=1, stride_w1n=D, stride_w1k=1, stride_zm=F, stride_zn=1,
            stride_dym=D, stride_dyk=1, stride_w2k=F, stride_w2n=1, stride_dzm=F, stride_dzn=1,
            stride_hm=F, stride_hn=1, M=T, N=F, K=D)


def kernel_specs():
    """(kernel, dtype, constexprs, integer args) for every kernel the package launches on CUDA."""
    from fused_ckpt.kernels.ffn_bwd import _ffn_bwd_hidden_kernel
    from fused_ckpt.kernels.ffn_fwd import _ffn_up_kernel
    from fused_ckpt.kernels.matmul import _gemm_kernel

    dots = {"DOT_F32": False, "INPUT_PRECISION": None}
    specs = [
        (_gemm_kernel, "bf16", dict(HAS_BIAS=True, ACCUMULATE=False, **dots), _GEMM_FC2),
        (_gemm_kernel, "bf16", dict(HAS_BIAS=False, ACCUMULATE=False, **dots), _GEMM_DW),
        (_gemm_kernel, "fp32", dict(HAS_BIAS=False, ACCUMULATE=True, DOT_F32=False, INPUT_PRECISION="ieee"), _GEMM_DW),
        (_ffn_up_kernel, "bf16", dict(ACT=1, GATED=False, HAS_BIAS=True, STORE_Z=False, **dots), _UP),
        (_ffn_up_kernel, "bf16", dict(ACT=3, GATED=True, HAS_BIAS=False, STORE_Z=True, **dots), _UP),
        (_ffn_bwd_hidden_kernel, "bf16", dict(ACT=1, GATED=False, HAS_BIAS=True, RECOMPUTE=True, STORE_H=True, **dots), _BWD),
        (_ffn_bwd_hidden_kernel, "bf16", dict(ACT=3, GATED=True, HAS_BIAS=False, RECOMPUTE=True, STORE_H=True, **dots), _BWD),
        (_ffn_bwd_hidden_kernel, "fp16", dict(ACT=2, GATED=True, HAS_BIAS=True, RECOMPUTE=False, STORE_H=False, **dots), _BWD),
    ]
    for mod in ("norm", "rope", "flash_attn_fwd", "flash_attn_bwd"):  # other kernels list their own specs
        try:
            m = __import__(f"fused_ckpt.kernels.{mod}", fromlist=["x"])
        except ImportError:
            continue
        specs += getattr(m, "aot_specs", lambda: [])()
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--quick", action="store_true", help="only the first autotune config of each kernel")
    args = p.parse_args(argv)
    failures = 0
    for kernel, dtype, consts, ints in kernel_specs():
        try:
            for r in compile_kernel(kernel, dtype, consts, ints, args.arch, 1 if args.quick else None):
                print(json.dumps(r), flush=True)
        except Exception as e:  # report and keep going: one line per failure
            failures += 1
            print(json.dumps({"kernel": getattr(kernel, "__name__", str(kernel)), "dtype": dtype,
                              "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
