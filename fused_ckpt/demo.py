"""``make demo`` / ``python -m fused_ckpt.demo``: the memory/compute trade-off on your machine.

Trains a stack of residual MLP blocks for a few steps four ways -- eager, torch.utils.checkpoint
(non-reentrant and reentrant) and FusedCheckpointedFFN -- from the same initial weights, and
prints one table: activation bytes saved for backward (saved_tensors_hooks), peak CUDA memory
(GPU only), median step time, fwd+bwd FLOPs (FlopCounterMode) and the largest loss and gradient
differences against eager.

Then the LM head + loss of a small Hugging Face causal LM (a 2-layer ``LlamaForCausalLM`` built
from a config, no download) trained two ways from the same weights on the same batch: Hugging
Face's ``lm_head`` logits + cross-entropy, and ``patch_hf_model(model, None, fused_loss=True)``
with nothing else patched (the loss through the fused linear cross-entropy, no ``[tokens, vocab]``
logits). Same columns, plus what the planner predicts the head keeps (``head_options``).
"""
from __future__ import annotations

import copy
import importlib.util
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .accounting import SavedTensors
from .modules import FusedCheckpointedFFN
from .reference import EagerMLP


class ResidualStack(nn.Module):
    """in_proj -> n x (x + mlp(x)) -> head. ``in_proj`` makes every block input require grad,
    which reentrant checkpointing needs to produce parameter gradients."""

    def __init__(self, mlps: list[nn.Module], d_in: int, d_model: int):
        super().__init__()
        self.in_proj = nn.Linear(d_in, d_model)
        self.blocks = nn.ModuleList(mlps)
        self.head = nn.Linear(d_model, d_in)

    def forward(self, x):
        h = self.in_proj(x)
        for mlp in self.blocks:
            h = h + mlp(h)
        return self.head(h)


def build_variants(layers, d_model, d_ff, activation, device, dtype):
    torch.manual_seed(0)
    eager_mlps = [EagerMLP(d_model, d_ff, activation, device=device, dtype=dtype) for _ in range(layers)]
    base = ResidualStack(eager_mlps, d_model, d_model).to(device=device, dtype=dtype)
    variants = {"eager": base}
    for mode in ("non_reentrant", "reentrant"):
        m = copy.deepcopy(base)
        for blk in m.blocks:
            blk.checkpoint = mode
        variants[f"checkpoint ({mode.replace('_', '-')})"] = m
    fused = copy.deepcopy(base)
    fused.blocks = nn.ModuleList(FusedCheckpointedFFN.from_module(b) for b in base.blocks)
    variants["FusedCheckpointedFFN"] = fused
    return variants


def _say(log, msg: str) -> None:
    if log is not None:
        log(msg)


def run(layers=8, tokens=512, d_model=256, d_ff=1024, activation="gelu", steps=6, device=None,
        dtype=torch.float32, lr=1e-2, log=None):
    """Train the four variants; returns (device, rows). ``log``: called with one progress line
    as each variant starts and finishes (``main`` prints them on stderr)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = build_variants(layers, d_model, d_ff, activation, device, dtype)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(tokens, d_model, generator=g).to(device, dtype),
                torch.randn(tokens, d_model, generator=g).to(device, dtype)) for _ in range(steps)]
    rows, ref = [], None
    for k, (name, model) in enumerate(variants.items(), 1):
        _say(log, f"[{k}/{len(variants)}] {name}: warm-up, one counted pass, {steps} training steps ...")
        t_variant = time.perf_counter()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        params = list(model.parameters())
        x0, y0 = batches[0]
        # warm-up (kernel compilation, lazy op registration), then one counted pass:
        # saved bytes during the forward only (reentrant checkpointing saves again inside its
        # backward), FLOPs over forward and backward.
        nn.functional.mse_loss(model(x0), y0).backward()
        opt.zero_grad(set_to_none=True)
        counter = FlopCounterMode(display=False)
        with counter:
            with SavedTensors() as acc:
                loss = nn.functional.mse_loss(model(x0), y0)
            loss.backward()
        saved, flops = acc.total_bytes(params), counter.get_total_flops()
        opt.zero_grad(set_to_none=True)

        losses, times, first_grads, peak = _train_steps(
            batches, lambda x, y: nn.functional.mse_loss(model(x), y), opt, params, device)
        if ref is None:
            ref = (losses, first_grads)
        loss_diff = max(abs(a - b) for a, b in zip(losses, ref[0]))
        grad_diff = max((a - b).abs().max().item() for a, b in zip(first_grads, ref[1]))
        rows.append(dict(variant=name, saved_bytes=saved, peak_bytes=peak,
                         step_ms=1e3 * statistics.median(times), gflops=flops / 1e9,
                         loss_diff=loss_diff, grad_diff=grad_diff, final_loss=losses[-1]))
        _say(log, f"[{k}/{len(variants)}] {name}: done in {time.perf_counter() - t_variant:.1f} s "
                  f"(median step {rows[-1]['step_ms']:.1f} ms)")
    return device, rows


def _train_steps(batches, loss_of, opt, params, device):
    """One optimizer step per batch: ``loss_of(*batch).backward()`` then ``opt.step()``. Returns
    (losses, fwd+bwd seconds per step, the first step's gradients as fp32 copies, the CUDA peak of
    fwd+bwd above what was allocated before each step (None off CUDA))."""
    losses, times, first_grads, peak = [], [], None, None
    for step, batch in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = loss_of(*batch)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak or 0, torch.cuda.max_memory_allocated() - base_mem)
        times.append(time.perf_counter() - t0)
        if step == 0:
            first_grads = [p.grad.detach().float().clone() for p in params]
        losses.append(loss.item())
        opt.step()
    return losses, times, first_grads, peak


def lm_config(vocab: int, d_model: int, seq: int):
    """The demo's small causal LM: 2 Llama layers, head dim 64 (or d_model when smaller), untied head."""
    import transformers

    heads = max(1, d_model // 64)
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                                    num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads,
                                    max_position_embeddings=seq, tie_word_embeddings=False,
                                    attn_implementation="sdpa")


def run_lm_head(vocab=32000, d_model=128, batch=2, seq=128, steps=3, device=None, dtype=torch.float32, lr=1e-3,
                log=None):
    """Train the small causal LM with Hugging Face's head and with the fused loss head; returns
    (device, rows, prediction). Rows: bytes of the distinct storages the forward saves for
    backward (``saved_tensors_hooks``, parameters excluded), CUDA peak of fwd+bwd above what was allocated before (None on CPU),
    median fwd+bwd time, loss/gradient differences against Hugging Face's head. ``prediction``:
    the planner's saved bytes of each head (``head_options``)."""
    import transformers

    from .integrations.hf import patch_hf_model
    from .planner import head_options

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(lm_config(vocab, d_model, seq)).to(device, dtype).train()
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 8] = -100   # a prompt without loss
        labels[-1, seq - seq // 4:] = -100   # padding
        batches.append((ids.to(device), labels.to(device)))
    variants = {"HF logits + cross-entropy": None, "fused loss head": "fused"}
    rows, ref = [], None
    for k, (name, kind) in enumerate(variants.items(), 1):
        _say(log, f"[LM {k}/{len(variants)}] {name}: warm-up, one counted pass, {steps} training steps ...")
        t_variant = time.perf_counter()
        model = copy.deepcopy(base)
        if kind == "fused":
            report = patch_hf_model(model, None, mlp=False, attention=False, norm=False, blocks=False)
            if not report.loss_head or not report.loss_head[1]:
                raise RuntimeError(f"the loss head was not fused: {report.loss_head}")
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        params = list(model.parameters())

        def loss_of(ids, labels):
            return model(input_ids=ids, labels=labels, use_cache=False).loss

        loss_of(*batches[0]).backward()   # warm-up (lazy registration, the extension's first load)
        opt.zero_grad(set_to_none=True)
        with SavedTensors() as acc:
            loss = loss_of(*batches[0])
        saved = acc.unique_bytes(params)   # the log-softmax is saved twice (log_softmax, nll_loss), held once
        loss.backward()
        opt.zero_grad(set_to_none=True)
        losses, times, first_grads, peak = _train_steps(batches, loss_of, opt, params, device)
        if ref is None:
            ref = (losses, first_grads)
        rows.append(dict(variant=name, saved_bytes=saved, peak_bytes=peak, step_ms=1e3 * statistics.median(times),
                         loss_diff=max(abs(a - b) for a, b in zip(losses, ref[0])),
                         grad_diff=max((a - b).abs().max().item() for a, b in zip(first_grads, ref[1])),
                         final_loss=losses[-1]))
        model = opt = None   # free this variant before the next one is built
        _say(log, f"[LM {k}/{len(variants)}] {name}: done in {time.perf_counter() - t_variant:.1f} s "
                  f"(median step {rows[-1]['step_ms']:.1f} ms)")
    opts = head_options(batch * seq, d_model, vocab, torch.tensor([], dtype=dtype).element_size())
    prediction = {"HF logits + cross-entropy": opts["logits"].saved_bytes, "fused loss head": opts[True].saved_bytes}
    return device, rows, prediction


def format_lm_table(device, rows, prediction, vocab, d_model, batch, seq, dtype) -> str:
    hf = rows[0]
    lines = [f"LM head + loss: 2-layer LlamaForCausalLM, d_model={d_model}, vocab={vocab}, batch {batch} x seq {seq}, "
             f"{str(dtype).replace('torch.', '')}, device={device}", ""]
    lines += ["| head | saved activations | vs HF head | planner: head keeps | peak CUDA mem | step time "
              "| max loss diff | max grad diff |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.1f} MiB" if r["peak_bytes"] is not None else "n/a (CPU)"
        lines.append(f"| {r['variant']} | {r['saved_bytes'] / 2**20:.2f} MiB | "
                     f"{r['saved_bytes'] / hf['saved_bytes']:.3f}x | {prediction[r['variant']] / 2**20:.2f} MiB "
                     f"| {peak} | {r['step_ms']:.1f} ms | {r['loss_diff']:.2e} | {r['grad_diff']:.2e} |")
    fused = rows[-1]
    lines += ["", f"the fused head keeps {(hf['saved_bytes'] - fused['saved_bytes']) / 2**20:.2f} MiB less "
              f"(planner: {(prediction[hf['variant']] - prediction[fused['variant']]) / 2**20:.2f} MiB)"
              + (f"; CUDA peak {(hf['peak_bytes'] - fused['peak_bytes']) / 2**20:.1f} MiB lower"
                 if hf["peak_bytes"] is not None and fused["peak_bytes"] is not None else "")
              + ". The rest of the model is the same in both (only the loss head is patched)."]
    return "\n".join(lines)


def format_table(device, rows, layers, tokens, d_model, d_ff, activation, dtype) -> str:
    eager = rows[0]
    lines = [f"fused_ckpt demo: {layers} residual MLP blocks, {tokens} tokens, d_model={d_model}, "
             f"d_ff={d_ff}, {activation}, {str(dtype).replace('torch.', '')}, device={device}"
             + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), ""]
    hdr = "| variant | saved activations | vs eager | peak CUDA mem | step time | fwd+bwd GFLOP | vs eager | max loss diff | max grad diff |"
    lines += [hdr, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.1f} MiB" if r["peak_bytes"] is not None else "n/a (CPU)"
        lines.append(
            f"| {r['variant']} | {r['saved_bytes'] / 2**20:.2f} MiB | {r['saved_bytes'] / eager['saved_bytes']:.3f}x "
            f"| {peak} | {r['step_ms']:.1f} ms | {r['gflops']:.2f} | {r['gflops'] / eager['gflops']:.3f}x "
            f"| {r['loss_diff']:.2e} | {r['grad_diff']:.2e} |")
    lines.append("")
    lines.append("saved activations: bytes autograd keeps for backward (saved_tensors_hooks), parameters excluded; "
                 "step time: median fwd+bwd time over the training steps (after one warm-up pass); "
                 "peak CUDA mem: max_memory_allocated during fwd+bwd minus what was allocated before.")
    return "\n".join(lines)


def _resolve_device(text):
    """The --device value as a torch.device, or an argparse-style error message."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"argument --device: unknown device {text!r} (use cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"argument --device: {text!r} is not supported (use cpu or cuda)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"argument --device: {text!r} but CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"argument --device: {text!r} but only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def build_parser():
    from .activations import ACTIVATIONS
    from .cli import _Parser, _positive_int

    p = _Parser(prog="python -m fused_ckpt.demo", description="The memory/compute trade-off on this machine: a stack of residual MLP "
                            "blocks trained eagerly, with torch.utils.checkpoint (non-reentrant, reentrant) and "
                            "with FusedCheckpointedFFN; one table of saved bytes, memory, time, FLOPs and "
                            "differences against eager. Then a small causal LM's head + loss with Hugging "
                            "Face's logits and with the fused loss head (transformers needed).",
                epilog="Progress lines go to stderr, the table to stdout. Defaults: on CUDA 8192 tokens, "
                       "d_model 2048, bf16; on CPU 512 tokens, d_model 256, fp32.")
    p.add_argument("--layers", type=_positive_int, default=8, help="residual MLP blocks in the stack (default 8)")
    p.add_argument("--tokens", type=_positive_int, default=None,
                   help="tokens per batch (default 8192 on CUDA, 512 on CPU)")
    p.add_argument("--d-model", type=_positive_int, default=None,
                   help="model width (default 2048 on CUDA, 256 on CPU)")
    p.add_argument("--d-ff", type=_positive_int, default=None, help="MLP hidden width (default 4 x d-model)")
    p.add_argument("--activation", default="gelu", choices=sorted(ACTIVATIONS),
                   help="MLP activation (default gelu)")
    p.add_argument("--steps", type=_positive_int, default=6,
                   help="training steps per variant; the step time is their median (default 6)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--lm-vocab", type=_positive_int, default=None,
                   help="vocabulary of the LM-head demo's causal LM (default 128256 on CUDA, 32000 on CPU)")
    p.add_argument("--lm-d-model", type=_positive_int, default=None,
                   help="width of the LM-head demo's causal LM (default 2048 on CUDA, 128 on CPU)")
    p.add_argument("--lm-seq", type=_positive_int, default=None,
                   help="sequence length of the LM-head demo, batch 2 (default 2048 on CUDA, 128 on CPU)")
    p.add_argument("--no-lm-head", action="store_true",
                   help="skip the LM-head demo (Hugging Face logits vs the fused loss head)")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        device = _resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    big = device.type == "cuda"
    tokens = args.tokens or (8192 if big else 512)
    d_model = args.d_model or (2048 if big else 256)
    d_ff = args.d_ff or (4 * d_model)
    dtype = torch.bfloat16 if big else torch.float32
    log = None if args.quiet else (lambda msg: print(f"demo: {msg}", file=sys.stderr, flush=True))
    if log is not None:
        log(f"{args.layers} residual MLP blocks, {tokens} tokens, d_model={d_model}, d_ff={d_ff}, "
            f"{args.activation}, {str(dtype).replace('torch.', '')} on {device}; 4 variants")
    dev, rows = run(args.layers, tokens, d_model, d_ff, args.activation, args.steps, device, dtype, log=log)
    print(format_table(dev, rows, args.layers, tokens, d_model, d_ff, args.activation, dtype))
    if args.no_lm_head:
        return 0
    if importlib.util.find_spec("transformers") is None:
        print("\nLM head + loss: skipped (transformers is not installed; pip install transformers)")
        return 0
    vocab = args.lm_vocab or (128256 if big else 32000)
    lm_d = args.lm_d_model or (2048 if big else 128)
    seq = args.lm_seq or (2048 if big else 128)
    if log is not None:
        log(f"LM head + loss: 2-layer LlamaForCausalLM, d_model={lm_d}, vocab={vocab}, batch 2 x seq {seq}; 2 variants")
    dev, lm_rows, pred = run_lm_head(vocab, lm_d, 2, seq, min(args.steps, 3), device, dtype, log=log)
    print()
    print(format_lm_table(dev, lm_rows, pred, vocab, lm_d, 2, seq, dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
