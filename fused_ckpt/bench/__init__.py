"""Benchmark suites of fused_ckpt: ``fused-ckpt bench`` (= ``python -m fused_ckpt.bench``).

========  ==========================================================================
suite     what runs side by side
========  ==========================================================================
ffn       one MLP fwd+bwd: eager, torch.utils.checkpoint (non-reentrant, reentrant),
          torch.compile with activation_memory_budget, FusedCheckpointedFFN at each
          recompute dial (Triton and aten paths), the bare-GEMM floor
attention flash attention vs PyTorch SDPA backends; the attention block: eager SDPA,
          checkpointed, compiled, FusedCheckpointedAttention at each dial
block     one Hugging Face LlamaDecoderLayer: unpatched, checkpointed, compiled,
          patched with patch_hf_model under several policies, FusedCheckpointedBlock
step      one optimizer step of a LlamaForCausalLM per policy and per Hugging Face
          gradient-checkpointing baseline: tokens/s, memory, the largest batch under
          --memory-cap, and the Pareto plot of step time vs activation memory
loss      the LM head + cross-entropy: eager, torch.compile, fused_linear_cross_entropy
          with recompute True / False (Triton and aten paths), the 3-GEMM floor
========  ==========================================================================

Every run writes ``results.json`` (machine, versions, every measurement), ``results.md`` (the
tables and the issue's targets, met / not met / not measured) and PNG plots into ``--out``;
``--compare A.json B.json`` prints the ratios between two runs. Importing this package queries
no device; the suites import what they need when they run.
"""
from ._main import SUITES, add_arguments, build_parser, main, run_from_args

__all__ = ["SUITES", "add_arguments", "build_parser", "main", "run_from_args"]
