"""The planner: from a model (or its config), a batch, a sequence length and a memory budget, the
per-layer recompute dials, the predicted memory, the recompute overhead and a verdict.

What is counted (the *scope*)
-----------------------------
For a model described by a :class:`~fused_ckpt.configs.ModelConfig` (Llama, Mistral, Qwen2 from a
``config.json``, a ``PretrainedConfig`` or a Hugging Face model; also the built-in Qwen3, Gemma2
and GPT-NeoX sizes), the prediction is for the model as
:func:`fused_ckpt.integrations.hf.patch_hf_model` makes it when it fuses every attention, MLP and
norm and makes each decoder layer a whole-layer block (a sliding window keeps what full attention
keeps: the fused kernels apply it at every length; its attention FLOPs are counted as full causal,
an over-estimate beyond the window, said in a note; where the fused kernels cannot run a part -- a
head_dim other than 32/64/128/256 -- the plan says so in a note and its rows are what the fused part
would keep), trained
with ``model(input_ids, labels=labels)`` in one dtype (no autocast). "Activations" are all the
bytes autograd keeps for backward during that forward, counted once per storage, parameters
excluded: exactly what ``torch.autograd.graph.saved_tensors_hooks`` see, deduplicated:

======================  ======================================================================
item                    bytes kept for backward (T = batch * seq tokens, e = dtype size)
======================  ======================================================================
token embedding         the token ids, 8 T (Gemma's sqrt(d) scale: + its 0-dim tensor, e)
each norm               (patched to FusedRMSNorm / FusedLayerNorm) its input e T d and the fp32
                        rstd 4 T (LayerNorm: and the mean, 4 T); 2 per layer, 4 for sandwich
                        norms (Gemma2); parallel residual (GPT-NeoX): both norms read x, kept once
attention (fused)       x e T d, lse 4 T H; + output e T H D ("qkv", False); + q, k, v (False)
MLP (fused)             x e T d; + pre-activation e T F1 (False, "none"; F1 = 2f gated, f
                        ungated); + activation e T f ("none")
residual adds           nothing
decoder layer, "full"   (whole-layer block) x e T d and the norms' fp32 statistics
                        (:func:`fused_ckpt.ops.block.full_saved_bytes`), instead of its norms',
                        attention's and MLP's items above
LM head + loss          a site of its own (kind "head", :func:`head_options`), one of
  "logits" (eager)      F.linear's input e T d; Gemma2's final softcap: + tanh's output e T V;
                        HF ForCausalLMLoss: fp32 log-softmax 4 T V, shifted targets 8 T, the
                        loss weight 4
  True                  :class:`fused_ckpt.FusedLinearCrossEntropy` recompute=True: x e T d,
                        fp32 lse 4 T, targets 8 T; recomputes the logits GEMM (2 T d V FLOPs)
  False                 recompute=False: dX e T d and dW e V d (no GEMM recomputed; the
                        backward GEMMs run in the forward)
LM head, no loss        (``include_loss=False``) its input e T d
======================  ======================================================================

The head's dial is free for a config or a name (the solver trades it against the layers' dials);
for a model instance it is pinned to what the model runs: the ``recompute`` of its
FusedLinearCrossEntropy (a submodule or an instance attribute, as
:func:`~fused_ckpt.integrations.hf.patch_hf_model` attaches it), or "logits" when it has none
(``head=`` overrides, see :func:`plan`).

Backward-time temporaries (gradients in flight, recompute buffers) and the logits themselves
(alive only during the forward) are not counted. Static memory, when ``optimizer`` is given:
weights, gradients (both in ``dtype``) and optimizer states as ``torch.optim`` keeps them, in the
parameters' dtype: AdamW 2 per parameter, SGD none ("sgd"), SGD with momentum 1
("sgd-momentum"). Without ``optimizer`` the budget is for activations alone. ``fused-ckpt plan``
counts AdamW by default (its budget is a device budget); ``--optimizer none`` counts activations
only. The plan's first lines say which.

FLOPs: the model's forward + backward = GEMMs (forward 2 T x parameters of each matrix, backward
twice that; biases and elementwise work not counted) plus attention (forward 4 B H S^2 D, half when causal; backward 2.5x forward); the
recompute overhead is the recompute FLOPs of the chosen dials as a percentage of that.

For any other ``nn.Module`` the scope is the dial-controlled sites of :mod:`fused_ckpt.policy`
(fused modules and checkpointed layer inputs) and the static memory of its parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from .configs import ModelConfig, load_config
from .functional_attention import HEAD_DIMS
from .policy import (ATTENTION_DIALS, FFN_DIALS, HEAD_DIALS, NONE, BudgetTooSmall, CheckpointPlan, LayerSpec, Option,
                     PerLayer, PlanRow, Site, attention_forward_flops, attention_recompute_flops,
                     attention_saved_bytes, block_full_option, build_layers, solve_budget)
from .policy.solver import _layer_frontier
from .units import format_bytes, parse_budget

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}

VERDICT_SKIP = "memory sufficient: skip checkpointing"
VERDICT_FULL = "near OOM: full recompute"
VERDICT_SELECTIVE = "between: selective (MemoryBudget)"


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32")


def _positive(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


# ============================================================================ config cost model
def rmsnorm_saved_bytes(tokens: int, d: int, elem: int) -> int:
    """A patched model's RMSNorm (:class:`fused_ckpt.FusedRMSNorm`): its input (e T d) and the
    fp32 per-row rstd (4 T). (Hugging Face's LlamaRMSNorm would keep an fp32 copy of its input,
    the rsqrt and the normalised input: (4 d + 4 + e d) T.)"""
    from .ops.norm import norm_saved_bytes

    return norm_saved_bytes(tokens, d, elem, layer_norm=False)


def _norm_bytes(cfg: ModelConfig, tokens: int, elem: int) -> int:
    """One patched norm of ``cfg`` (FusedRMSNorm or FusedLayerNorm): input + fp32 statistics."""
    from .ops.norm import norm_saved_bytes

    return norm_saved_bytes(tokens, cfg.hidden_size, elem, layer_norm=cfg.norm == "layernorm")


def _layer_norms_bytes(cfg: ModelConfig, tokens: int, elem: int) -> int:
    """What a layer's norms keep when the site dials govern: each its input and statistics; with
    a parallel residual both norms normalise the same x, which is kept once."""
    n = cfg.norms_per_layer * _norm_bytes(cfg, tokens, elem)
    return n - tokens * cfg.hidden_size * elem if cfg.placement == "parallel" else n


def loss_saved_bytes(tokens: int, vocab: int) -> int:
    """Hugging Face ForCausalLMLoss (mean reduction): fp32 log-softmax, int64 shifted targets,
    the fp32 total weight."""
    return 4 * tokens * vocab + 8 * tokens + 4


def head_options(tokens: int, d_model: int, vocab: int, elem: int, bias: bool = False,
                 softcap: Optional[float] = None) -> dict:
    """The LM head + loss site's dials -> :class:`Option` (saved bytes, recompute FLOPs, aux).

    "logits": eager ``lm_head`` + Hugging Face's ForCausalLMLoss (F.linear keeps its input, the
    loss its fp32 log-softmax, targets and weight: :func:`loss_saved_bytes`); True / False:
    :func:`fused_ckpt.fused_linear_cross_entropy` with that ``recompute``
    (:func:`fused_ckpt.ops.linear_ce.linear_ce_saved_bytes`, gradients of x, W and b when
    ``bias``). FLOPs: recompute=True adds one logits GEMM in backward; recompute=False runs the
    backward GEMMs in the forward instead (same total: 0 extra); aux (tie-break) is the
    softmax values recomputed. ``softcap`` (Gemma2's final logit softcap): the eager head's
    ``tanh`` keeps its output, e T V more; the fused op keeps nothing more."""
    from .ops.linear_ce import linear_ce_recompute_flops, linear_ce_saved_bytes

    T, d, V = tokens, d_model, vocab
    eager = elem * T * d + loss_saved_bytes(T, V) + (elem * T * V if softcap is not None else 0)
    return {
        True: Option(True, linear_ce_saved_bytes(T, d, V, True, elem),
                     linear_ce_recompute_flops(T, d, V, True), T * V),
        False: Option(False, linear_ce_saved_bytes(T, d, V, False, elem, needs_grad=(True, True, bias)),
                      linear_ce_recompute_flops(T, d, V, False), 0),
        "logits": Option("logits", eager, 0, 0),
    }


HEAD_LABELS = {True: "lm_head+loss: fused recompute=True",
               False: "lm_head+loss: fused recompute=False",
               "logits": "lm_head+loss: eager (fp32 log-softmax)"}


def _head_dials(model_or_config, head) -> tuple:
    """The head dials the solver may choose from (see :func:`plan`)."""
    if head is None:
        if not isinstance(model_or_config, nn.Module):
            return HEAD_DIALS
        from .modules.linear_ce import FusedLinearCrossEntropy

        # a submodule, or an instance attribute (patch_hf_model keeps its fused loss head unregistered)
        cands = list(model_or_config.modules()) + list(vars(model_or_config).values())
        fused = [m for m in cands if isinstance(m, FusedLinearCrossEntropy)]
        return (fused[0].recompute,) if fused else ("logits",)
    dials = head if isinstance(head, (tuple, list)) else (head,)
    out = []
    for dl in dials:
        match = [h for h in HEAD_DIALS if dl is h or (isinstance(dl, str) and dl == h)]
        if not match:
            raise ValueError(f"head dial must be one of {HEAD_DIALS} (or a tuple of them), got {dl!r}")
        out.append(match[0])
    if not out:
        raise ValueError("head: give at least one dial")
    return tuple(out)


def _config_layers(cfg: ModelConfig, batch: int, seq: int, e: int) -> list[LayerSpec]:
    T = batch * seq
    d, f, H, Hkv, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = cfg.gated
    fc1 = 2 * f if g else f
    from .ops.ffn import ffn_recompute_flops, ffn_saved_bytes
    from .functional import ffn_save_count

    ffn_opts = {dl: Option(dl, ffn_saved_bytes(T, d, f, g, ffn_save_count(dl), e),
                           ffn_recompute_flops(T, d, f, g, ffn_save_count(dl)),
                           0 if dl == "none" else T * fc1) for dl in FFN_DIALS}
    attn_opts = {dl: Option(dl, attention_saved_bytes(T, d, H, Hkv, D, dl, e),
                            attention_recompute_flops(batch, seq, d, H, Hkv, D, True, dl),
                            0 if dl is False else T * (H + Hkv) * cfg.rotated_dims) for dl in ATTENTION_DIALS}
    norms = _layer_norms_bytes(cfg, T, e)
    full = [block_full_option(batch, seq, d, H, Hkv, D, True, ffn_opts[True].recompute_flops, fc1, e,
                              cfg.norm == "layernorm", cfg.placement, 2 * T * d * (fc1 + f))]
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        sites = [Site(i, f"{p}.self_attn", "attention", "attention", attn_opts), Site(i, f"{p}.mlp", "ffn", "ffn", ffn_opts)]
        # patch_hf_model's layers are whole blocks (sliding-window layers too: the kernels apply the window)
        layers.append(LayerSpec(i, p, sites, alternatives=full, site_bytes=norms))
    return layers


def _config_globals(cfg: ModelConfig, T: int, e: int, include_loss: bool) -> list[tuple[str, int]]:
    """Rows outside the layers and the head site (the head's input counts here only without loss)."""
    d = cfg.hidden_size
    rows = [("model.embed_tokens (token ids)", 8 * T)]
    if cfg.embed_scale:
        rows.append(("model.embed_tokens (sqrt(d) scale)", e))
    rows.append(("model.norm", _norm_bytes(cfg, T, e)))
    if not include_loss:
        rows.append(("lm_head (input)", e * T * d))
    return rows


def model_flops(cfg: ModelConfig, batch: int, seq: int) -> int:
    """Forward + backward FLOPs of one step (GEMMs x3, attention x3.5, LM head included)."""
    T = batch * seq
    d, f, H, Hkv, D, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.vocab_size)
    gemm = 2 * T * (d * (H + 2 * Hkv) * D + H * D * d + (3 if cfg.gated else 2) * d * f)
    attn = attention_forward_flops(batch, seq, H, D, True)
    head = 2 * T * d * V
    return cfg.num_layers * (3 * gemm + attn + (5 * attn) // 2) + 3 * head


# ============================================================================ the plan
@dataclass
class Plan:
    """A planner result. ``checkpoint`` holds the rows (per layer: norms, attention, MLP; then the
    embedding, final norm, LM head and loss); ``policy`` re-applies the dials with
    :func:`fused_ckpt.apply_checkpointing`."""

    model: str
    batch: int
    seq: int
    dtype: torch.dtype
    budget: int
    optimizer: Optional[str]
    checkpoint: CheckpointPlan
    weight_bytes: int
    grad_bytes: Optional[int]
    optimizer_bytes: Optional[int]
    min_activation_bytes: int
    max_activation_bytes: int
    model_flops: Optional[int]
    verdict: str
    notes: list = field(default_factory=list)

    @property
    def activation_bytes(self) -> int:
        return self.checkpoint.total_saved_bytes

    @property
    def static_bytes(self) -> int:
        """Weights, gradients and optimizer states (0 when no optimizer was given)."""
        if self.optimizer is None:
            return 0
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.static_bytes + self.activation_bytes

    @property
    def minimum_bytes(self) -> int:
        return self.static_bytes + self.min_activation_bytes

    @property
    def recompute_flops(self) -> int:
        return self.checkpoint.total_recompute_flops

    @property
    def overhead_pct(self) -> Optional[float]:
        if not self.model_flops:
            return None
        return 100.0 * self.recompute_flops / self.model_flops

    @property
    def head_dial(self):
        """The LM head + loss dial (True / False: FusedLinearCrossEntropy's ``recompute``;
        "logits": eager), None when the loss is not counted or not modelled."""
        return next((r.dial for r in self.checkpoint.rows if r.kind == "head"), None)

    @property
    def policy(self) -> PerLayer:
        """The chosen dials, one dict per layer, for :func:`fused_ckpt.apply_checkpointing`: keyed
        by site kind ("attention", "ffn"), so that it applies to any patched model of the config,
        or by module name when a layer has two sites of one kind."""
        out = []
        for i in range(self.checkpoint.num_layers):
            rows = [r for r in self.checkpoint.layer_rows(i) if r.kind != "fixed"]
            by_kind = len({r.kind for r in rows}) == len(rows)
            out.append({(r.kind if by_kind else r.module): r.dial for r in rows})
        return PerLayer(out)

    def summary(self) -> dict:
        return {
            "model": self.model, "batch": self.batch, "seq": self.seq, "dtype": str(self.dtype).replace("torch.", ""),
            "budget_bytes": self.budget, "activation_bytes": self.activation_bytes,
            "weight_bytes": self.weight_bytes, "grad_bytes": self.grad_bytes, "optimizer_bytes": self.optimizer_bytes,
            "total_bytes": self.total_bytes, "recompute_flops": self.recompute_flops,
            "model_flops": self.model_flops, "overhead_pct": self.overhead_pct, "verdict": self.verdict,
            "head_dial": self.head_dial,
        }

    def counted(self) -> str:
        """What the budget has to hold, in words (printed under the header)."""
        dt = str(self.dtype).replace("torch.", "")
        if self.optimizer is None:
            return ("activations only (no optimizer given: weights, gradients and optimizer states are not "
                    "counted)")
        n = OPTIMIZER_STATES[self.optimizer]
        states = (f"{self.optimizer} states ({n} per parameter, {dt} like the parameters, as torch.optim keeps "
                  "them)") if n else f"no {self.optimizer} states"
        return f"weights and gradients ({dt}), {states}, and activations"

    def __str__(self) -> str:
        lines = [f"model {self.model}: batch {self.batch}, seq {self.seq}, {str(self.dtype).replace('torch.', '')}, "
                 f"budget {format_bytes(self.budget)}", f"counted against the budget: {self.counted()}",
                 str(self.checkpoint), "totals:"]

        def row(label, n, tail=""):
            lines.append(f"  {label:<22} {format_bytes(n):>12}{tail}")

        act = self.activation_bytes
        row("activations", act, f"  ({act} bytes; range {format_bytes(self.min_activation_bytes)} .. "
                                f"{format_bytes(self.max_activation_bytes)})")
        if self.optimizer is not None:
            row("weights", self.weight_bytes)
            row("gradients", self.grad_bytes)
            row(f"optimizer ({self.optimizer})", self.optimizer_bytes)
        else:
            row("weights", self.weight_bytes, "  (not counted: no optimizer given)")
        row("total", self.total_bytes, f"  ({self.total_bytes} bytes) of budget {format_bytes(self.budget)}")
        if self.model_flops:
            lines.append(f"  {'recompute':<22} {self.recompute_flops / 1e12:>8.3f} TFLOP = "
                         f"{self.overhead_pct:.2f}% of the step's {self.model_flops / 1e12:.3f} TFLOP (fwd+bwd)")
        lines.append(f"verdict: {self.verdict}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _same(a, b) -> bool:
    return a is b or (isinstance(a, str) and isinstance(b, str) and a == b)


def plan(model_or_config, batch: int, seq: int, dtype="bf16", budget: Union[int, str] = "80GiB",
         optimizer: Optional[str] = None, *, include_loss: bool = True, head=None) -> Plan:
    """Choose recompute dials for ``batch`` x ``seq`` tokens under ``budget`` (bytes or "24GiB").

    ``model_or_config``: a built-in name (:data:`fused_ckpt.configs.BUILTIN_CONFIGS`: "llama-7b",
    "llama3-8b", "mistral-7b", "qwen2-7b", "qwen3-8b", "gemma2-9b", "gpt-neox-20b"), a path to a Hugging
    Face ``config.json``, a dict / ``PretrainedConfig`` / :class:`ModelConfig`, a Hugging Face
    model (its config), or any ``nn.Module`` with fused modules. ``budget``: bytes (an int or an
    integral float such as 1.5e11) or a string ("24GiB", "80 GB", "1.5e11"), see
    :func:`fused_ckpt.units.parse_budget`. ``optimizer``: None or "none" (the budget is for
    activations only), or "adamw"/"adam", "sgd", "sgd-momentum": weights, gradients and those
    optimizer states count against the budget too (the ``fused-ckpt plan`` default is "adamw"). The dials are :class:`MemoryBudget`'s
    exact optimum for the bytes the budget leaves. Verdict: "memory sufficient: skip
    checkpointing" when nothing needs recomputing, "near OOM: full recompute" when only full
    recompute fits, "between: selective (MemoryBudget)" otherwise. Raises
    :class:`BudgetTooSmall` (a ValueError that names the minimum) when nothing fits.

    ``head``: the LM head + loss dials to choose from (:func:`head_options`), one of True,
    False, "logits" or a tuple of them; None: all three for a config or a name, the model's own
    (its FusedLinearCrossEntropy's ``recompute``, else "logits") for a model instance. The
    chosen one is :attr:`Plan.head_dial`. Ignored with ``include_loss=False``.
    """
    _positive("batch", batch)
    _positive("seq", seq)
    dt = parse_dtype(dtype)
    e = torch.empty((), dtype=dt).element_size()
    b = parse_budget(budget)
    if optimizer == "none":
        optimizer = None
    if optimizer is not None and optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(OPTIMIZER_STATES)} or None")
    T = batch * seq
    notes = []
    head_site = None
    if isinstance(model_or_config, nn.Module) and getattr(model_or_config, "config", None) is None:
        module = model_or_config
        name = type(module).__name__
        layers = build_layers(module, batch=batch, seq=seq, dtype=dt)
        globals_ = []
        n_params = sum(p.numel() for p in module.parameters())
        flops = None
        notes.append("scope: fused modules and checkpointed layer inputs of the block list (no embeddings, "
                     "norms or loss)")
    else:
        src = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
        cfg = load_config(src)
        name = cfg.name
        layers = _config_layers(cfg, batch, seq, e)
        globals_ = _config_globals(cfg, T, e, include_loss)
        if include_loss:
            opts = head_options(T, cfg.hidden_size, cfg.vocab_size, e, softcap=cfg.final_logit_softcap)
            allowed = _head_dials(model_or_config, head)
            head_site = Site(None, "lm_head + loss", "head", "head", {dl: opts[dl] for dl in allowed})
        n_params = cfg.num_parameters()
        flops = model_flops(cfg, batch, seq)
        if cfg.sliding_window is not None and seq > cfg.sliding_window:
            w = cfg.window_every
            which = "" if w == 1 else f" (layers 0, {w}, {2 * w}, ...)"
            notes.append(f"sliding window {cfg.sliding_window} < seq {seq}{which}: the fused kernels apply the "
                         "window (the same saved bytes as full attention); attention FLOPs are counted as full "
                         "causal (an over-estimate for those layers)")
        if cfg.head_dim not in HEAD_DIMS:
            notes.append(f"head_dim {cfg.head_dim}: the fused attention kernels take {HEAD_DIMS}, so a patched model "
                         "leaves the attention (and the whole-layer block) to Hugging Face; the attention and block "
                         "rows are what a fused attention would keep (the prediction does not hold)")
        if not include_loss:
            notes.append("loss not counted")
    weight = n_params * e
    states = OPTIMIZER_STATES.get(optimizer, 0) if optimizer else 0
    grads = n_params * e if optimizer else None
    opt_bytes = states * n_params * e if optimizer else None
    static = weight + grads + opt_bytes if optimizer else 0
    global_bytes = sum(v for _, v in globals_)

    # per layer (and the head), the Pareto frontier of its dial combinations, most recompute first
    items = layers + ([LayerSpec(-1, "lm_head + loss", [head_site])] if head_site else [])
    fronts = [_layer_frontier(L) for L in items]
    fixed = global_bytes + sum(v for L in layers for _, v in L.fixed)
    lo = fixed + sum(f[0][0] for f in fronts)
    hi = fixed + sum(f[-1][0] for f in fronts)
    try:
        picks = solve_budget(items, b - static - global_bytes)
    except BudgetTooSmall:
        raise BudgetTooSmall(b, static + lo, "memory (static + activations)" if optimizer else
                             "activation memory") from None
    rows = []
    for L, dials in zip(layers, picks):
        for label, v in L.fixed:
            rows.append(PlanRow(L.index, label, "fixed", "-", v, 0))
        if L.name in dials:  # the whole-layer option
            o = next(a for a in L.alternatives if a.dial == dials[L.name])
            rows.append(PlanRow(L.index, L.name, "block", o.dial, o.saved_bytes, o.recompute_flops))
            continue
        for s in L.sites:
            o = s.option(dials[s.name])
            rows.append(PlanRow(L.index, s.name, s.kind, o.dial, o.saved_bytes, o.recompute_flops))
        if L.site_bytes:
            rows.append(PlanRow(L.index, f"{L.name} (norms)", "fixed", "-", L.site_bytes, 0))
    for label, v in globals_:
        rows.append(PlanRow(None, label, "fixed", "-", v, 0))
    if head_site:
        o = head_site.option(picks[-1][head_site.name])
        rows.append(PlanRow(None, HEAD_LABELS[o.dial], "head", o.dial, o.saved_bytes, o.recompute_flops))
    cp = CheckpointPlan(rows, f"MemoryBudget({format_bytes(b - static)} for activations)", batch, seq)
    full_flops = sum(f[0][1][0] for f in fronts)
    chosen = [r for r in rows if r.kind != "fixed"]
    # a pinned head (one allowed dial) is how the model runs, not a choice: it does not set the verdict
    head_free = head_site is not None and len(head_site.options) > 1
    if all(r.kind != "block" and (_same(r.dial, NONE[r.kind]) or (r.kind == "head" and (not head_free or
                                                                                       not r.recompute_flops)))
           for r in chosen):
        verdict = VERDICT_SKIP
    elif cp.total_recompute_flops == full_flops:
        verdict = VERDICT_FULL
    else:
        verdict = VERDICT_SELECTIVE
    return Plan(name, batch, seq, dt, b, optimizer, cp, weight, grads, opt_bytes, lo, hi, flops, verdict, notes)


__all__ = ["plan", "Plan", "model_flops", "rmsnorm_saved_bytes", "loss_saved_bytes", "head_options", "parse_dtype",
           "OPTIMIZER_STATES", "VERDICT_SKIP", "VERDICT_FULL", "VERDICT_SELECTIVE"]
