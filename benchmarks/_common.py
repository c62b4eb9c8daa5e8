"""Helpers of the standalone benchmark scripts: the package's own timing and report code
(:mod:`fused_ckpt.bench._timing`, :mod:`fused_ckpt.bench._report`), re-exported, so that the
scripts here and ``fused-ckpt bench`` measure everything the same way.

=====================  =======================================================================
helper                 what it measures / does
=====================  =======================================================================
``time_cuda``          ``triton.testing.do_bench`` (L2 flushed, CUDA events), median and the
                       20% / 80% quantiles over ``rep_ms`` of repetitions
``time_cpu``           wall clock after warmup, callables run round-robin (one rep of each per
                       round) so slow drifts of a shared machine hit every variant alike
``count_flops``        ``FlopCounterMode``: the FLOPs the program really dispatches
``saved_bytes``        ``saved_tensors_hooks`` accounting of a forward: distinct storages kept
                       for backward, parameters excluded
``cuda_peak_bytes``    ``torch.cuda.max_memory_allocated`` of one call, minus what was allocated
                       before it (weights, inputs)
``machine_info``       date, host, CPU/GPU names, torch/triton/CUDA versions
``markdown_table``     a GitHub-flavoured markdown table
=====================  =======================================================================

This folder is not installed: the scripts put the repository root on ``sys.path`` (here) and
import the package from the checkout.
"""
from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from fused_ckpt.bench._report import (  # noqa: E402,F401
    Target, exit_cleanly_on_sigterm, fmt, markdown_table, short_error, versions, write_results,
)
from fused_ckpt.bench._report import machine_info as _machine_info  # noqa: E402
from fused_ckpt.bench._timing import (  # noqa: E402,F401
    MiB, QUANTILES, SavedTensors, Timing, clear_grads, count_flops, cuda_peak_bytes, dtype_name, quantile,
    saved_bytes, sync, tflops, time_cpu, time_cuda,
)
from fused_ckpt.bench._timing import dtype_from_name as _dtype_from_name  # noqa: E402


def machine_info(device) -> dict:
    """Machine facts plus package versions in one flat dict (``info["torch"]``, ``info["gpu"]``)."""
    info = _machine_info(device)
    info.update(versions())
    return info


def dtype_from_name(name: str):
    """torch dtype for ``bf16`` / ``fp16`` / ``fp32``; a bad name exits with a message."""
    try:
        return _dtype_from_name(name)
    except ValueError as e:
        raise SystemExit(str(e)) from None
