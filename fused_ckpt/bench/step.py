"""Step suite: one optimizer step (AdamW) of a Llama-style decoder per checkpointing choice.

The model is a Hugging Face ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no download):
on CUDA 7B-like layer shapes (hidden 4096, intermediate 11008, 32 heads) with few layers, on
CPU a small model. One measurement = ``zero_grad(set_to_none) + model(ids, labels=ids).loss +
backward + optimizer.step()``; every variant starts from the same weights and sees the same
batch.

==================================  ===========================================================
hf eager                            the unpatched model, nothing recomputed
hf ckpt-nonreentrant / -reentrant   Hugging Face activation checkpointing of every decoder layer
                                    (``torch.utils.checkpoint`` per layer), and every 2nd layer
compile (budget=b)                  ``torch.compile`` of the unpatched model's forward with
                                    activation_memory_budget b (CUDA by default)
fused-<be> <policy>                 ``patch_hf_model(model, policy)`` (decoder layers become
                                    whole blocks): none, full, EveryN(2), Selective(ffn=True),
                                    sqrt, MemoryBudget at 25% and 50% of the way from full to
                                    none, and MemoryBudget(=hf ckpt): the budget whose saved
                                    bytes match Hugging Face's full non-reentrant checkpointing
fused-<be> full, modules only       ``patch_hf_model(model, "full", blocks=False)``: per-module
                                    dials only (no whole-layer recompute)
==================================  ===========================================================

Every row runs with the LM head + loss both ways (the ``head`` field): Hugging Face's own head
(``lm_head`` logits, fp32 cross-entropy over ``[tokens, vocab]``) or the fused linear
cross-entropy (``patch_hf_model(..., fused_loss=True)``, no logits). The Hugging Face rows use
HF's head and get a twin ``<name> +fused head`` (only the loss head patched in:
``patch_hf_model(model, None, mlp/attention/norm/blocks=False)``); the fused rows use the fused
head and get a twin ``<name> +hf head`` (``fused_loss=False``). Each pair's saved-bytes (and, on
CUDA, peak) difference is on both rows, next to the planner's prediction of it (``head_options``).
The ``torch.compile`` rows run Hugging Face's head only (the instance-level fused-loss forward is
not what they compile).

Reported: step time, tokens/s, saved-activation bytes (``saved_tensors_hooks``), the CUDA peak
(``max_memory_allocated`` above weights and optimizer states, so it includes gradients), the
gradient error of the embedding and LM-head weights against the unpatched model in float64
(CPU) / float32 (CUDA), and the largest batch that fits ``--memory-cap``:

* CUDA: ``cap >= weights + optimizer states + gradients + batch * per_sequence`` with
  ``per_sequence = (peak - gradients) / batch`` measured at this batch (a linear model; it also
  scales the backward temporaries with the batch, so it errs small);
* CPU (simulated): the same with ``per_sequence = saved bytes / batch`` and the static bytes
  counted from the parameters and the optimizer's states.

The Pareto plot (``step_pareto.png``) puts every variant at (activation memory, step time):
the CUDA peak on CUDA, the saved bytes on CPU.
"""
from __future__ import annotations

import copy
import inspect
import math
import os

import torch

from . import _timing as T
from ._harness import Prepared, Variant, measure_variants
from ._report import Target, fmt, fmt_bytes, grad_text, ms, plot_tradeoff, rows_table, short_error
from .block import llama_config
from .ffn import CompiledBudget, compile_variant_name

NAME = "step"
DESCRIPTION = "one AdamW step of a LlamaForCausalLM per policy and per Hugging Face checkpointing baseline"

# hidden, intermediate, heads, kv heads, layers, vocab, batch, seq
SHAPES = {"cpu": (512, 1408, 8, 2, 4, 8192, 4, 256), "cuda": (4096, 11008, 32, 32, 2, 32000, 2, 2048)}
QUICK = {"cpu": (64, 176, 2, 1, 2, 128, 2, 32), "cuda": (2048, 5504, 16, 16, 2, 32000, 2, 1024)}
HF_NR = "hf ckpt-nonreentrant"
MB_HF = "MemoryBudget(=hf ckpt)"
MB_HF_PEAK = "MemoryBudget(=hf ckpt peak)"   # CUDA only
STEP_TARGET = 1.15
PEAK_MATCH = 1.02   # "the same peak memory": within 2% of Hugging Face checkpointing's


def _hf_checkpointing(model, reentrant: bool, every: int = 1) -> None:
    fn = getattr(model, "activation_checkpointing_enable", None)
    if fn is not None:
        kw = {"every_n_layers": every} if every != 1 else {}
        fn(activation_checkpointing_kwargs={"use_reentrant": reentrant}, **kw)
    else:
        if every != 1:
            raise RuntimeError("this transformers version has no every_n_layers checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _supports_every_n() -> bool:
    import transformers

    fn = getattr(transformers.PreTrainedModel, "activation_checkpointing_enable", None)
    return fn is not None and "every_n_layers" in inspect.signature(fn).parameters


def _policies(B: int, S: int, budgets: dict) -> list:
    """(label, policy or None, budget bytes or the reason it has none) per fused row."""
    from ..policy import EveryN, MemoryBudget, Selective

    out = [(label, pol, None) for label, pol in (
        ("none", "none"), ("full", "full"), ("EveryN(2)", EveryN(2)), ("Selective(ffn)", Selective(ffn=True)),
        ("sqrt", "sqrt"))]
    for label, b in budgets.items():
        out.append((label, MemoryBudget(b, batch=B, seq=S) if isinstance(b, int) else None, b))
    return out


def _static_bytes(model, opt) -> dict:
    w = sum(p.numel() * p.element_size() for p in model.parameters())
    st = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"weight_bytes": w, "grad_bytes": w, "optimizer_bytes": st}


HF_HEAD, FUSED_HEAD = "hf", "fused"
TWIN = {HF_HEAD: " +fused head", FUSED_HEAD: " +hf head"}   # suffix of a row's twin with the other head


def _head_pairs(variants: list, heads: dict) -> dict:
    """``{variant name: twin name}`` both ways, for the variants whose twin is in the list."""
    names = {v.name for v in variants}
    out = {}
    for v in variants:
        twin = v.name + TWIN[heads[v.name]]
        if twin in names:
            out[v.name], out[twin] = twin, v.name
    return out


def _head_deltas(rows: list, pairs: dict) -> None:
    """On both rows of each (HF head, fused head) pair: what the fused head saves,
    ``head_saved_delta_bytes`` (saved bytes with HF's head - with the fused head) and, when both
    rows have a CUDA peak, ``head_peak_delta_bytes``."""
    by = {r["variant"]: r for r in rows}
    for name, twin in pairs.items():
        r, t = by.get(name), by.get(twin)
        if r is None or t is None or r.get("status") != "ok" or t.get("status") != "ok":
            continue
        hf_row, fused_row = (r, t) if r["head"] == HF_HEAD else (t, r)
        for key, out in (("saved_bytes", "head_saved_delta_bytes"), ("peak_bytes", "head_peak_delta_bytes")):
            if hf_row.get(key) is not None and fused_row.get(key) is not None:
                r[out] = hf_row[key] - fused_row[key]


def run(ctx) -> None:
    import transformers

    from ..integrations.hf import patch_hf_model
    from ..planner import head_options
    from ..policy import apply_checkpointing

    hidden, inter, heads, kv, layers, vocab, B, S = (QUICK if ctx.quick else SHAPES)[ctx.dev]
    layers = ctx.options.get("step_layers") or layers
    B = ctx.options.get("step_batch") or B
    S = ctx.options.get("step_seq") or S
    cfg = llama_config(hidden, inter, heads, kv, layers=layers, vocab=vocab, max_pos=S, tie_word_embeddings=False)
    D = hidden // heads
    tokens = B * S
    info = ctx.suites.setdefault(NAME, {})
    shape = f"Llama L={layers} d={hidden} f={inter} H={heads}/{kv} V={vocab} B={B} S={S}"
    info.update(description=DESCRIPTION, shape=shape, memory_cap=ctx.memory_cap,
                config=dict(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                            num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=vocab),
                batch=B, seq=S, notes=[
                    "one measurement = zero_grad + forward with labels + backward + AdamW step",
                    "max batch: " + ("cap >= weights + optimizer states + gradients + batch x (peak - gradients)"
                                     "/batch, from the peak at this batch" if ctx.dev == "cuda" else
                                     "simulated: cap >= weights + gradients + AdamW states + batch x saved bytes "
                                     "per sequence"),
                    f"memory cap: {fmt_bytes(ctx.memory_cap)}"])
    ctx.log(f"[step] {shape}")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(ctx.device, ctx.dtype).train()
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (B, S), generator=gen).to(ctx.device)
    grad_names = ["model.embed_tokens.weight", "lm_head.weight"]
    with T.no_tf32():
        ref_model = copy.deepcopy(base).to(ctx.ref_dtype)
        ref_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        ref = [ref_model.get_parameter(n).grad for n in grad_names]
        del ref_model

    backends = ctx.fused_backends()
    main_be = next((be for be, why in backends if why is None), None)

    # ---- pre-pass: the MemoryBudget budgets (predicted site bytes of full / none, and the
    #      bytes Hugging Face's full checkpointing saves) on the first available backend
    budgets: dict = {}
    pre = {}
    if main_be is not None:
        try:
            m = copy.deepcopy(base)
            rep = patch_hf_model(m, "full", backend=main_be, batch=B, seq=S)
            lo = rep.plan.total_saved_bytes
            hi = apply_checkpointing(m, "none", batch=B, seq=S).total_saved_bytes
            apply_checkpointing(m, "full", batch=B, seq=S)
            full_saved, out = T.saved_bytes(lambda: m(input_ids=ids, labels=ids, use_cache=False).loss,
                                            m.parameters())
            del out, m
            h = copy.deepcopy(base)
            _hf_checkpointing(h, reentrant=False)
            hf_saved, out = T.saved_bytes(lambda: h(input_ids=ids, labels=ids, use_cache=False).loss, h.parameters())
            del out, h
            nonsite = full_saved - lo
            pre = {"site_bytes_full": lo, "site_bytes_none": hi, "measured_full": full_saved,
                   "non_site_bytes": nonsite, "hf_ckpt_saved": hf_saved}
            budgets["MemoryBudget(25%)"] = int(lo + 0.25 * (hi - lo))
            budgets["MemoryBudget(50%)"] = int(lo + 0.50 * (hi - lo))
            want = hf_saved - nonsite
            if want >= lo:
                budgets[MB_HF] = int(want)
            else:
                budgets[MB_HF] = (f"unreachable: Hugging Face checkpointing saves {fmt_bytes(hf_saved)}; the patched "
                                  f"model saves {fmt_bytes(nonsite)} outside the dial-controlled sites (norms, "
                                  f"embedding, loss) plus at least {fmt_bytes(lo)} in them")
            if ctx.dev == "cuda":
                # the target compares at the same *peak*: the fused backward's temporaries are
                # smaller than a replayed layer's, and that slack can keep saved activations
                pf, ph = _step_peak(base, ids, lambda m: patch_hf_model(m, "full", backend=main_be, batch=B, seq=S)), \
                    _step_peak(base, ids, lambda m: _hf_checkpointing(m, reentrant=False))
                pre.update(peak_fused_full=pf, peak_hf_ckpt=ph)
                budgets[MB_HF_PEAK] = int(lo + (ph - pf)) if ph > pf else (
                    f"unreachable: the fused full step peaks at {fmt_bytes(pf)}, Hugging Face checkpointing at "
                    f"{fmt_bytes(ph)}")
        except Exception as e:  # noqa: BLE001
            pre["error"] = short_error(e)
            ctx.log(f"  [step] budget pre-pass failed: {pre['error']}")
            budgets = {k: f"budget pre-pass failed: {pre['error']}"
                       for k in ("MemoryBudget(25%)", "MemoryBudget(50%)", MB_HF)
                       + ((MB_HF_PEAK,) if ctx.dev == "cuda" else ())}
    info["budget_prepass"] = pre
    info["budgets"] = {k: v for k, v in budgets.items()}

    def step_variant(setup, compiled=False):
        """``setup(model, extra) -> forward`` (the callable returning the loss)."""
        def make():
            model = copy.deepcopy(base)
            extra = {}
            fwd = setup(model, extra)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=ctx.dev == "cuda")
            params = list(model.parameters())

            def step():
                opt.zero_grad(set_to_none=True)
                fwd().backward()
                opt.step()

            def after_first(row):
                row.update(_static_bytes(model, opt))

            return Prepared(run=step, forward=fwd, grads=lambda: [model.get_parameter(n).grad for n in grad_names],
                            clear=params, params=params, extra=extra, after_first=after_first,
                            count_flops=not compiled)
        return make

    def loss_of(model, compiled=None):
        call = compiled or model
        return lambda: call(input_ids=ids, labels=ids, use_cache=False).loss

    def hf(ck, every=1, fused_head=False):
        def setup(model, extra):
            if fused_head:  # only the loss head: the layers stay Hugging Face's
                rep = patch_hf_model(model, None, mlp=False, attention=False, norm=False, blocks=False,
                                     backend=main_be)
                _check_head(rep, True)
            if ck is not None:
                _hf_checkpointing(model, ck == "reentrant", every)
            return loss_of(model)
        return setup

    def compiled(b):
        def setup(model, extra):
            return loss_of(model, CompiledBudget(model, b))
        return setup

    def patched(be, pol, blocks=True, fused_head=True):
        def setup(model, extra):
            rep = patch_hf_model(model, pol, backend=be, batch=B, seq=S, blocks=blocks, fused_loss=fused_head)
            if fused_head:
                _check_head(rep, True)
            extra["predicted_site_bytes"] = rep.plan.total_saved_bytes
            extra["policy"] = rep.plan.policy_name
            return loss_of(model)
        return setup

    head_of: dict = {}   # variant name -> the head it runs

    def both_heads(name, group, ck=None, every=1, description=""):
        """A Hugging Face row (HF's head) and its twin with the fused loss head."""
        head_of[name], head_of[name + TWIN[HF_HEAD]] = HF_HEAD, FUSED_HEAD
        skip = None if main_be is not None else "no fused backend on this device"
        return [Variant(name, group, step_variant(hf(ck, every)), description=description),
                Variant(name + TWIN[HF_HEAD], group, None if skip else step_variant(hf(ck, every, fused_head=True)),
                        skip=skip, description=f"{description}; loss through the fused head ({main_be})")]

    variants = (both_heads("hf eager", "hf", description="unpatched, no checkpointing")
                + both_heads(HF_NR, "hf checkpoint", "non_reentrant",
                             description="activation_checkpointing_enable(use_reentrant=False)")
                + both_heads("hf ckpt-reentrant", "hf checkpoint", "reentrant",
                             description="activation_checkpointing_enable(use_reentrant=True)"))
    if _supports_every_n():
        variants += both_heads("hf ckpt-nonreentrant every2", "hf checkpoint", "non_reentrant", 2,
                               description="activation_checkpointing_enable(every_n_layers=2)")
    why = ctx.compile_skip_reason()
    for b in ctx.compile_budgets:
        head_of[compile_variant_name(b)] = HF_HEAD
        variants.append(Variant(compile_variant_name(b), "compile",
                                None if why else step_variant(compiled(b), compiled=True), skip=why))
    for be, why in backends:
        for label, pol, budget in _policies(B, S, budgets):
            if ctx.dev == "cuda" and be == "aten" and label != "full":
                continue  # the aten path once (full), the Triton path for every policy
            skip = why
            if skip is None and isinstance(budget, str):
                skip = budget
            desc = f"patch_hf_model(policy={label}, backend={be!r})" + (
                f", budget {fmt_bytes(budget)} for the sites" if isinstance(budget, int) else "")
            name = f"fused-{be} {label}"
            head_of[name], head_of[name + TWIN[FUSED_HEAD]] = FUSED_HEAD, HF_HEAD
            variants.append(Variant(name, "fused", None if skip else step_variant(patched(be, pol)),
                                    skip=skip, description=desc))
            variants.append(Variant(name + TWIN[FUSED_HEAD], "fused",
                                    None if skip else step_variant(patched(be, pol, fused_head=False)),
                                    skip=skip, description=desc + ", fused_loss=False (Hugging Face's head)"))
        if be == main_be:  # what whole-layer blocks bring: the same policy with per-module dials only
            name = f"fused-{be} full, modules only"
            head_of[name], head_of[name + TWIN[FUSED_HEAD]] = FUSED_HEAD, HF_HEAD
            for fh in (True, False):
                variants.append(Variant(name + ("" if fh else TWIN[FUSED_HEAD]), "fused",
                                        step_variant(patched(be, "full", blocks=False, fused_head=fh)),
                                        description=f"patch_hf_model(policy=full, blocks=False, backend={be!r}"
                                                    f"{'' if fh else ', fused_loss=False'})"))
    pairs = _head_pairs(variants, head_of)
    opts = head_options(tokens, hidden, vocab, torch.tensor([], dtype=ctx.dtype).element_size())
    info["head_prediction"] = {"hf_head_bytes": opts["logits"].saved_bytes, "fused_head_bytes": opts[True].saved_bytes,
                               "delta_bytes": opts["logits"].saved_bytes - opts[True].saved_bytes}

    gemm = 2.0 * tokens * (layers * (hidden * (heads + 2 * kv) * D + heads * D * hidden + 3 * hidden * inter)
                           + hidden * vocab)
    attn = layers * 4.0 * B * heads * S * S * D / 2
    model_flops = 3.0 * (gemm + attn)

    def extra(row):
        t = ms(row)
        row["tokens_per_s"] = tokens / (t * 1e-3) if t else None

    rows = measure_variants(ctx, NAME, shape, {"hidden_size": hidden, "intermediate_size": inter, "heads": heads,
                                               "kv_heads": kv, "layers": layers, "vocab": vocab, "batch": B,
                                               "seq": S, "tokens": tokens},
                            variants, ref_grads=ref, model_flops=model_flops, err_reference="hf eager",
                            ratio_refs={"vs_hf_eager": "hf eager", "vs_hf_ckpt": HF_NR}, extra_per_row=extra)
    for r in rows:
        r["head"] = head_of.get(r["variant"])
        if r["variant"] in pairs:
            r["head_twin"] = pairs[r["variant"]]
    _head_deltas(rows, pairs)
    by = {r["variant"]: r for r in rows}
    hf_tps = by.get(HF_NR, {}).get("tokens_per_s")
    for r in rows:
        if r.get("tokens_per_s") and hf_tps:
            r["tokens_per_s_vs_hf_ckpt"] = r["tokens_per_s"] / hf_tps
        r["max_batch"] = _max_batch(ctx, r, B)
        r["memory_cap"] = ctx.memory_cap
    ctx.targets.append(_target(ctx, by, main_be).to_json())
    mem_key = "peak_bytes" if ctx.dev == "cuda" else "saved_bytes"
    pts = [(r[mem_key] / T.MiB, ms(r), r["variant"], r["group"]) for r in rows if r.get(mem_key) is not None and ms(r)]
    path = plot_tradeoff(
        os.path.join(ctx.out_dir or ".", "step_pareto.png"), pts,
        title=f"one AdamW step, {shape}, {T.dtype_name(ctx.dtype)} on {ctx.dev}",
        xlabel=("peak memory above weights + optimizer states (MiB; includes gradients)" if ctx.dev == "cuda"
                else "saved activations (MiB, saved_tensors_hooks)"),
        ylabel="step time (ms, median)",
        note="lower-left is better; dashed: Pareto front")
    if path:
        ctx.plots.append(path)
    ctx.snapshot()


def _check_head(rep, fused: bool) -> None:
    """A row labelled with the fused head must run it (patch_hf_model may leave a head alone)."""
    if rep.loss_head is None or rep.loss_head[1] is not fused:
        raise RuntimeError(f"the loss head is not fused: {rep.loss_head}")


def _step_peak(base, ids, setup) -> int:
    """CUDA peak of one AdamW step (after a warm-up step that creates the optimizer states) of a
    copy of ``base`` prepared by ``setup(model)``, above what was allocated before the step."""
    model = copy.deepcopy(base)
    setup(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()

    step()
    peak = T.cuda_peak_bytes(step, before=lambda: opt.zero_grad(set_to_none=True))
    del model, opt
    torch.cuda.empty_cache()
    return peak


def _max_batch(ctx, r: dict, B: int):
    if r.get("status") != "ok" or "weight_bytes" not in r:
        return None
    static = r["weight_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
    if ctx.dev == "cuda":
        if r.get("peak_bytes") is None:
            return None
        per_seq = (r["peak_bytes"] - r["grad_bytes"]) / B
    else:
        if not r.get("saved_bytes"):
            return None
        per_seq = r["saved_bytes"] / B
    if per_seq <= 0:
        return None
    r["bytes_per_sequence"] = per_seq
    r["static_bytes"] = static
    return max(0, int(math.floor((ctx.memory_cap - static) / per_seq)))


def _target(ctx, by: dict, be) -> Target:
    """MemoryBudget at Hugging Face full checkpointing's memory against that checkpointing. On
    CUDA "the same memory" is the peak (within PEAK_MATCH); the better of the two MemoryBudget
    rows that qualify counts. Elsewhere the value is informational (saved bytes matched)."""
    from ._report import NOT_MET

    hf = by.get(HF_NR, {})
    what = "step tokens/s, MemoryBudget at Hugging Face full checkpointing's memory / that checkpointing's"
    on = ctx.dev == "cuda" and ctx.dtype == torch.bfloat16
    mem = "peak_bytes" if ctx.dev == "cuda" else "saved_bytes"
    names = ([MB_HF_PEAK] if ctx.dev == "cuda" else []) + [MB_HF]
    rows = [(n, by.get(f"fused-{be} {n}", {})) for n in names]
    ok = [(n, r) for n, r in rows if r.get("status") == "ok"]

    def mratio(r):
        return (r[mem] / hf[mem]) if (r.get(mem) is not None and hf.get(mem)) else None

    def mtxt(n, r):
        return f"{n}: {mem.replace('_', ' ')} ratio {fmt(mratio(r))}"

    if not ok:
        reason = "; ".join(f"{n}: {r.get('reason') or r.get('error') or 'no row'}" for n, r in rows)
        unreachable = all(str(r.get("reason") or "").startswith("unreachable") for _, r in rows)
        return Target("step.mb_vs_hf_ckpt", NAME, what, ">=", STEP_TARGET, value=None, measured=False,
                      detail=reason + ("" if on else f" (CUDA bf16 target; this run: {ctx.dev})"),
                      force_status=NOT_MET if (on and unreachable) else None)
    if not on:
        n, r = ok[-1]
        return Target("step.mb_vs_hf_ckpt", NAME, what, ">=", STEP_TARGET, value=None, measured=False,
                      detail=f"CUDA bf16 target; this run: {ctx.dev} {T.dtype_name(ctx.dtype)}, {mtxt(n, r)}",
                      info_value=r.get("tokens_per_s_vs_hf_ckpt"))
    fair = [(n, r) for n, r in ok if mratio(r) is not None and mratio(r) <= PEAK_MATCH]
    if not fair:
        n, r = ok[0]
        return Target("step.mb_vs_hf_ckpt", NAME, what, ">=", STEP_TARGET, value=r.get("tokens_per_s_vs_hf_ckpt"),
                      measured=r.get("tokens_per_s_vs_hf_ckpt") is not None,
                      detail=f"NOT at the same memory: {'; '.join(mtxt(n, r) for n, r in ok)} > {PEAK_MATCH}; "
                             "counts as not met", force_status=NOT_MET)
    n, r = max(fair, key=lambda nr: nr[1].get("tokens_per_s_vs_hf_ckpt") or 0.0)
    val = r.get("tokens_per_s_vs_hf_ckpt")
    return Target("step.mb_vs_hf_ckpt", NAME, what, ">=", STEP_TARGET, value=val, measured=val is not None,
                  detail=mtxt(n, r))


def markdown(rows: list, suite_info: dict, device: str) -> str:
    rows = [r for r in rows if r["suite"] == NAME]
    mem = "peak" if device == "cuda" else "saved"
    def mib(key, spec):
        return lambda r: fmt(r[key] / T.MiB if r.get(key) is not None else None, spec)

    cols = [
        ("variant", lambda r: r["variant"]),
        ("head", lambda r: r.get("head") or "—"),
        ("step ms", lambda r: fmt(ms(r), ".1f")),
        ("q20–q80 ms", lambda r: f"{r['time_ms']['q20_ms']:.1f}–{r['time_ms']['q80_ms']:.1f}"),
        ("tokens/s", lambda r: fmt(r.get("tokens_per_s"), ",.0f")),
        ("tokens/s / hf ckpt", lambda r: fmt(r.get("tokens_per_s_vs_hf_ckpt"))),
        ("model TFLOP/s", lambda r: fmt(r.get("tflops_model"), ".3f")),
        ("HW TFLOP/s", lambda r: fmt(r.get("tflops_hw"), ".3f")),
        ("saved MiB", lambda r: fmt(r["saved_bytes"] / T.MiB if r.get("saved_bytes") is not None else None, ".2f")),
        ("predicted sites MiB", lambda r: fmt(r["predicted_site_bytes"] / T.MiB
                                              if r.get("predicted_site_bytes") is not None else None, ".2f")),
        ("fused head saves MiB", mib("head_saved_delta_bytes", ".2f")),
    ]
    if device == "cuda":
        cols.append(("peak MiB", mib("peak_bytes", ".0f")))
        cols.append(("fused head: peak -MiB", mib("head_peak_delta_bytes", ".0f")))
    cols += [(f"max batch ({fmt_bytes(suite_info.get('memory_cap'))}, {mem})",
              lambda r: fmt(r.get("max_batch"), "d")),
             ("grad max err", grad_text)]
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = [r for r in rows if r["shape"] == shape]
        out += [f"### {shape}, {sel[0]['dtype']}", "", rows_table(sel, cols), ""]
    hp = suite_info.get("head_prediction")
    if hp:
        out += ["head: `hf` = Hugging Face's lm_head logits + fp32 cross-entropy, `fused` = the fused linear "
                "cross-entropy (patch_hf_model fused_loss=True); every row's twin with the other head is `+hf head` "
                "/ `+fused head`. \"fused head saves\": saved bytes with HF's head minus with the fused head, on "
                f"both rows of a pair; the planner predicts {fmt_bytes(hp['delta_bytes'])} (HF head "
                f"{fmt_bytes(hp['hf_head_bytes'])}, fused {fmt_bytes(hp['fused_head_bytes'])}).", ""]
    pre = suite_info.get("budget_prepass") or {}
    if pre and "error" not in pre:
        out += [f"MemoryBudget budgets (sites only): full {fmt_bytes(pre['site_bytes_full'])}, none "
                f"{fmt_bytes(pre['site_bytes_none'])}; outside the sites the patched model saves "
                f"{fmt_bytes(pre['non_site_bytes'])}; Hugging Face full checkpointing saves "
                f"{fmt_bytes(pre['hf_ckpt_saved'])} in all."
                + (f" One-step CUDA peaks: fused full {fmt_bytes(pre['peak_fused_full'])}, Hugging Face "
                   f"checkpointing {fmt_bytes(pre['peak_hf_ckpt'])} (the difference is the peak-matched "
                   "MemoryBudget's extra budget)." if "peak_hf_ckpt" in pre else ""), ""]
    return "\n".join(out)
