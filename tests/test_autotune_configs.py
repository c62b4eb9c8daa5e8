"""Autotune configs, pruning and tuning keys of the GEMM / FFN kernels (pure functions, CPU).

The pruners are called as the autotuner calls them, on the GPU config lists (the interpreter
shortcut switched off), with stand-in tensors that only answer ``element_size()``.
tools/aot_compile.py checks the same selections against real sm_90 builds.
"""
import pytest
import torch
import triton
import triton.language as tl

from fused_ckpt.activations import get_activation
from fused_ckpt.kernels import _common, matmul
from fused_ckpt.kernels._common import SMEM_BYTES, autotune, select_tile_configs, size_bucket, tile_smem_bytes
from fused_ckpt.kernels.ffn_bwd import _bwd_stage_bytes, _ffn_bwd_hidden_kernel, ffn_bwd_hidden
from fused_ckpt.kernels.ffn_fwd import _ffn_up_kernel, _up_stage_bytes, ffn_up
from fused_ckpt.kernels.matmul import _gemm_kernel, _gemm_stage_bytes, gemm


class _Elem:
    def __init__(self, size):
        self.size = size

    def element_size(self):
        return self.size


DTYPES = [("bf16", 2, None), ("fp16", 2, None), ("fp32-ieee", 4, "ieee"), ("fp32-tf32", 4, "tf32")]


@pytest.fixture
def gpu_configs(monkeypatch):
    """The config lists and pruners as on a GPU (no interpreter shortcut)."""
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(matmul, "INTERPRET", False)
    return {"fused": _common.fused_tile_configs(), "gemm": matmul.gemm_configs()}


def _variants():
    for name, elem, prec in DTYPES:
        dots = {"DOT_F32": False, "INPUT_PRECISION": prec}
        for lora in (False, True):  # HAS_LORA: ops/ffn_lora.py on the triton backend
            for gated in (False, True):
                yield (name, elem, _ffn_up_kernel, "x_ptr", _up_stage_bytes,
                       dict(GATED=gated, STORE_Z=True, HAS_LORA=lora, **dots))
                for recompute in (False, True):
                    yield (name, elem, _ffn_bwd_hidden_kernel, "dy_ptr", _bwd_stage_bytes,
                           dict(GATED=gated, RECOMPUTE=recompute, STORE_H=True, HAS_LORA=lora, LORA_DROP=lora,
                                **dots))
            for acc in (False, True):
                yield (name, elem, _gemm_kernel, "a_ptr", _gemm_stage_bytes,
                       dict(HAS_BIAS=False, ACCUMULATE=acc, HAS_LORA=lora, **dots))


def test_every_selectable_config_fits_shared_memory(gpu_configs):
    """Issue 9 item 1: fp32 FFN backward (gated + recompute, and tf32 non-gated) fell back to a
    tile needing 245-328 KB of shared memory (232,448 B on H100/H200)."""
    seen = set()
    for name, elem, kernel, ptr, stage_bytes, kw in _variants():
        configs = gpu_configs["gemm" if kernel is _gemm_kernel else "fused"]
        kept = kernel.early_config_prune(configs, {ptr: _Elem(elem)}, **kw)
        assert kept, (name, kernel, kw)
        for c in kept:
            smem = tile_smem_bytes(c, stage_bytes, kw, elem)
            assert smem <= SMEM_BYTES, f"{kernel.fn.__name__} {name} {kw}: {c} needs {smem} B"
            # IEEE fp32 dots keep the operand tiles in registers: only BLOCK_K = 16 builds clean
            assert (c.kwargs["BLOCK_K"] == _common.IEEE_BLOCK_K) == (kw["INPUT_PRECISION"] == "ieee"), (name, c)
            seen.add((kernel.fn.__name__, name, str(c)))
    assert len(seen) > 20


def test_backward_without_recompute_keeps_128x128_tiles(gpu_configs, monkeypatch):
    """Issue 9 item 4d: without RECOMPUTE only dH is accumulated in the k-loop and Z is loaded
    in the epilogue, so the ungated 128x128 tiles stay where they build clean (triton 3.6: 156-158
    registers); triton 3.9 holds the loaded tile (80 B of spills), so there they go. Gated, the
    loaded G and U count as one more tile (the bf16 128x128 build spills 1 KB with triton 3.9)."""
    from fused_ckpt.kernels import ffn_bwd

    assert ffn_bwd._LOADED_Z_COUNTS == (_common.TRITON_VERSION != (3, 6))
    kw = dict(GATED=False, RECOMPUTE=False, STORE_H=True, DOT_F32=False, INPUT_PRECISION=None)
    for counts in (False, True):
        monkeypatch.setattr(ffn_bwd, "_LOADED_Z_COUNTS", counts)
        kept = _ffn_bwd_hidden_kernel.early_config_prune(gpu_configs["fused"], {"dy_ptr": _Elem(2)}, **kw)
        big = [c for c in kept if c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 128]
        assert kept and bool(big) != counts, (counts, kept)
    for gated in (False, True):  # recomputing G (and U) in the loop: the 128x128 tiles go
        kw.update(GATED=gated, RECOMPUTE=True)
        kept = _ffn_bwd_hidden_kernel.early_config_prune(gpu_configs["fused"], {"dy_ptr": _Elem(2)}, **kw)
        assert kept and not any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128 for c in kept)
    kw.update(GATED=True, RECOMPUTE=False)
    kept = _ffn_bwd_hidden_kernel.early_config_prune(gpu_configs["fused"], {"dy_ptr": _Elem(2)}, **kw)
    assert kept and not any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128 for c in kept)


def test_no_config_fitting_is_a_clear_error():
    big = [triton.Config({"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=8)]
    with pytest.raises(ValueError, match="shared memory"):
        select_tile_configs(big, lambda kw: 1, _gemm_stage_bytes, 4, {"INPUT_PRECISION": "ieee"}, 128, "gemm")


def test_size_bucket():
    assert [size_bucket(n) for n in (1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 2, 4, 4, 8, 1024, 1024, 2048]


def _recorded_keys(kernel, monkeypatch, launches):
    """The autotune key (values of ``kernel.keys``) of each launch in ``launches``."""
    keys = []
    run = kernel.fn.run

    def recording_run(*args, **kwargs):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        keys.append(tuple(named[k] for k in kernel.keys))
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel.fn, "run", recording_run)
    for f in launches:
        f()
    return keys


@pytest.mark.triton
@pytest.mark.parametrize("which", ["gemm_fc2", "gemm_dw", "ffn_up", "ffn_bwd"])
def test_tuning_key_buckets_the_token_count(which, monkeypatch):
    """Issue 9 item 4a: a new token count within the same power-of-two octave reuses the tuning
    result (the key holds its bucket, not the count); another octave is a new key."""
    torch.manual_seed(0)
    d, f = 16, 24
    act = get_activation("swiglu")
    w1, w2 = torch.randn(2 * f, d), torch.randn(d, f)

    def launch(T):
        x, dy = torch.randn(T, d), torch.randn(T, d)
        if which == "gemm_fc2":  # Y = H W2^T: tokens are M
            return lambda: gemm(torch.randn(T, f), w2.t())
        if which == "gemm_dw":  # dW2 = dY^T H: tokens are K
            return lambda: gemm(dy.t(), torch.randn(T, f))
        if which == "ffn_up":
            return lambda: ffn_up(x, w1, None, act, False)
        return lambda: ffn_bwd_hidden(x, None, dy, w1, None, w2, act, True)

    kernel = {"gemm_fc2": _gemm_kernel, "gemm_dw": _gemm_kernel, "ffn_up": _ffn_up_kernel,
              "ffn_bwd": _ffn_bwd_hidden_kernel}[which]
    keys = _recorded_keys(kernel, monkeypatch, [launch(T) for T in (33, 40, 70)])
    assert len(keys) == 3
    assert keys[0] == keys[1], keys
    assert keys[0] != keys[2], keys


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)


def _tuned_add_one(keep: int, calls: list):
    """_add_one_kernel under our ``autotune`` with two configs, a pruner keeping ``keep`` of them
    and a do_bench that records its calls."""

    def fake_bench(kernel_call, quantiles=None, **kw):
        kernel_call()
        calls.append(1)
        return [float(len(calls))] * 3

    configs = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=1)]
    return autotune(configs=configs, key=["n"], do_bench=fake_bench, reset_to_zero=["x_ptr"],
                    prune_configs_by={"early_config_prune": lambda cfgs, nargs, **kw: cfgs[:keep]})(_add_one_kernel)


@pytest.mark.triton
def test_single_surviving_config_is_launched_without_benchmarking():
    """Issue 9 item 4b: triton 3.6 benchmarks a lone surviving config (do_bench, L2-flush buffer)
    for every new key; it is launched directly instead (triton 3.9 does the same natively)."""
    for keep, benched in ((1, False), (2, True)):
        calls = []
        tuner = _tuned_add_one(keep, calls)
        x = torch.zeros(40)
        tuner[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, 40)
        assert bool(calls) == benched, (keep, calls)
        expected = torch.ones(40)  # one launch after tuning (the benchmark runs are zeroed away)
        torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_lora_gemm_counts_a_second_tile(gpu_configs):
    """The fc2 GEMM with a LoRA term (fp32 factors over bf16: an IEEE dot whose operand tiles sit
    in registers next to the accumulator): the sm_90 build of 128x256 on 8 warps spills 380 B
    (triton 3.9), so the LoRA build counts two accumulator tiles and drops it; plain keeps it."""
    kw = dict(HAS_BIAS=True, ACCUMULATE=False, DOT_F32=False, INPUT_PRECISION=None)
    tiles = lambda lora: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in  # noqa: E731
                          _gemm_kernel.early_config_prune(gpu_configs["gemm"], {"a_ptr": _Elem(2)},
                                                          HAS_LORA=lora, **kw)}
    plain, lora = tiles(False), tiles(True)
    assert (128, 256, 8) in plain and (128, 256, 8) not in lora
    assert lora and all(bm * bn * 2 // (32 * w) <= _common.ACC_REGS_GEMM for bm, bn, w in lora)


def test_lora_dropout_in_the_backward_counts_a_tile(gpu_configs):
    """The fc2 adapter's dropout mask (Philox over the dH tile, LORA_DROP): the sm_90 bf16 build of
    the gated recomputing backward's 64x64x64 tile on 4 warps spills 72-180 B with it, none
    without; with it only tiles within one more accumulator's budget are kept."""
    kw = dict(GATED=True, RECOMPUTE=True, STORE_H=True, HAS_LORA=True, DOT_F32=False, INPUT_PRECISION=None)
    tiles = lambda drop: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)  # noqa: E731
                          for c in _ffn_bwd_hidden_kernel.early_config_prune(
                              gpu_configs["fused"], {"dy_ptr": _Elem(2)}, LORA_DROP=drop, **kw)}
    plain, drop = tiles(False), tiles(True)
    assert (64, 64, 64, 4) in plain and (64, 64, 64, 4) not in drop
    assert drop and all(4 * bm * bn // (32 * w) <= _common.ACC_REGS_FUSED for bm, bn, _, w in drop)


def test_fp32_gated_backward_without_recompute_counts_loaded_tiles(gpu_configs):
    """sm_90 TF32 build of the 128x64 tile on 8 warps: 255 registers and a 24 B spill."""
    kw = dict(GATED=True, RECOMPUTE=False, STORE_H=True, DOT_F32=False, INPUT_PRECISION="tf32")
    kept = _ffn_bwd_hidden_kernel.early_config_prune(gpu_configs["fused"], {"dy_ptr": _Elem(4)}, **kw)
    assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // c.num_warps <= 64 * 64 // 8 for c in kept), kept


def test_attention_selects_spill_free_tiles_that_fit(monkeypatch):
    """Issue 9 item 8: at head_dim 256 (bf16, sm_90) the forward's 128x32 tile spilled 3.3 KB,
    64x64 spilled and with 4 stages overflowed shared memory; the deterministic dK/dV 16x128 tile
    spilled 3 KB and 32x64 264 B; with triton 3.6 the 64-row forward and dQ tiles spill 4-48 B.
    The spill-free ones are selected (tools/aot_compile.py, triton 3.6 and 3.9)."""
    from fused_ckpt.kernels import flash_attn_bwd as fb
    from fused_ckpt.kernels import flash_attn_fwd as ff

    monkeypatch.setattr(ff, "INTERPRET", False)
    monkeypatch.setattr(fb, "INTERPRET", False)
    tiles = lambda cfgs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.num_warps) for c in cfgs}
    q = {"q_ptr": _Elem(2)}
    masks = dict(CAUSAL=True, HAS_KPM=False, DOT_F32=False, INPUT_PRECISION=None)
    fwd = ff._flash_fwd_kernel.early_config_prune(ff.fwd_configs(), q, HEAD_DIM=256, **masks)
    # 64-row tiles only where measured spill-free (triton >= 3.9; 3.6 spills 4-48 B in them)
    assert tiles(fwd) == {(32, 32, 2, 4)} | ({(64, 32, 2, 4)} if ff.MAX_ROWS_256 >= 64 else set())
    assert tiles(ff.tiles_within(ff.fwd_configs(), q, 128 * 128, 64 * 32, ff.fwd_smem_bytes, 32,
                                 HEAD_DIM=256)) == {(32, 32, 2, 4)}
    dq = fb._flash_bwd_dq_kernel.early_config_prune(fb.dq_configs(), q, HEAD_DIM=256, **masks)
    assert dq and all(c.kwargs["BLOCK_M"] <= ff.MAX_ROWS_256 for c in dq)
    for atomic in (False, True):
        dkdv = fb._flash_bwd_dkdv_kernel.early_config_prune(fb.dkdv_configs(), q, HEAD_DIM=256, ATOMIC_DQ=atomic, **masks)
        assert tiles(dkdv) == {(32, 32, 3, 8)}, atomic
    for elem in (2, 4):  # every head dim and dtype: the forward fits shared memory
        for hd in ff.HEAD_DIMS:
            fwd = ff._flash_fwd_kernel.early_config_prune(ff.fwd_configs(), {"q_ptr": _Elem(elem)}, HEAD_DIM=hd, **masks)
            assert fwd and all(ff.fwd_smem_bytes(c, hd, elem) <= SMEM_BYTES for c in fwd), (elem, hd)
    # head dims up to 128 keep their larger tiles
    fwd = ff._flash_fwd_kernel.early_config_prune(ff.fwd_configs(), q, HEAD_DIM=128, **masks)
    assert (128, 64, 3, 8) in tiles(fwd)
