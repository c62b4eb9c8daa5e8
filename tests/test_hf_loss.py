"""patch_hf_model(fused_loss=True): a causal LM called with labels computes Hugging Face's
ForCausalLMLoss through the fused linear cross-entropy (no [tokens, vocab] logits), with the same
loss and every parameter gradient as the unpatched model (fp32): padding labels, tied embeddings,
Gemma-2's final-logit softcapping, gradient accumulation with num_items_in_batch, logits_to_keep;
calls without labels and generate() unchanged; heads computing something else left alone; and
the same for every causal-LM family this project patches (Mistral, Qwen2, Qwen3, Gemma, Gemma-3,
Phi-3, OLMo-2, GPT-2, GPT-NeoX), tiny configs built in place."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_ckpt.accounting import SavedTensors  # noqa: E402
from fused_ckpt.integrations.hf import fused_loss_head, patch_hf_model  # noqa: E402
from fused_ckpt.modules.linear_ce import FusedLinearCrossEntropy  # noqa: E402

from .helpers import assert_close_by_rule  # noqa: E402

V, B, S, D = 96, 2, 8, 64
COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, attn_implementation="eager")


def _config(kind, **kw):
    if kind == "llama":
        return transformers.LlamaConfig(**{**COMMON, **kw})
    if kind == "gemma2":  # softcap 0.5: the tanh bends these tiny random logits for real
        return transformers.Gemma2Config(**{**COMMON, "head_dim": 32, "final_logit_softcapping": 0.5, **kw})
    if kind == "granite":
        return transformers.GraniteConfig(**{**COMMON, **kw})
    raise KeyError(kind)


def _pair(kind, **kw):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(_config(kind, **kw)).train()
    return ref, copy.deepcopy(ref)


def _close(a, b, name):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


def _grads_equal(model, ref):
    pairs = list(zip(model.named_parameters(), ref.named_parameters()))
    assert pairs and all(n == nr for (n, _), (nr, _) in pairs)
    for (n, p), (_, pr) in pairs:
        assert p.grad is not None and pr.grad is not None, n
        _close(p.grad, pr.grad, n)


def _labels(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100  # prompt tokens
    labels[1, 5:] = -100  # padding
    return ids, labels


CASES = [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("gemma2", {}),
         ("gemma2", {"tie_word_embeddings": True})]


@pytest.mark.parametrize("kind,kw", CASES, ids=["llama", "llama-tied", "gemma2-softcap", "gemma2-softcap-tied"])
def test_fused_loss_and_gradients_match_unpatched(kind, kw):
    ref, model = _pair(kind, **kw)
    report = patch_hf_model(model, "full", backend="aten")
    name, fused, detail = report.loss_head
    assert (name, fused) == ("lm_head", True), detail
    assert "fused linear cross-entropy" in str(report)
    head = fused_loss_head(model)
    assert isinstance(head, FusedLinearCrossEntropy) and head.weight is model.lm_head.weight
    if kw.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.get_input_embeddings().weight and "tied" in detail
    ids, labels = _labels()
    out_ref = ref(ids, labels=labels, use_cache=False)
    out = model(ids, labels=labels, use_cache=False)
    assert out.logits is None and type(out) is type(out_ref)
    _close(out.loss, out_ref.loss, "loss")
    out.loss.backward()
    out_ref.loss.backward()
    _grads_equal(model, ref)
    if kind == "gemma2":  # non-vacuous: without the softcap the loss is another number
        with torch.no_grad():
            raw = torch.nn.functional.cross_entropy(
                torch.nn.functional.linear(ref.model(ids).last_hidden_state, ref.lm_head.weight)[:, :-1].reshape(-1, V),
                labels[:, 1:].reshape(-1))
        assert abs(raw.item() - out_ref.loss.item()) > 1e-2


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_grad_accumulation_with_num_items_in_batch(kind):
    """Two micro-batches, each loss = sum / num_items_in_batch (the Trainer's normalisation), a
    tensor as the Trainer passes it; gradients accumulate over both."""
    ref, model = _pair(kind)
    patch_hf_model(model, None, backend="aten")
    batches = [_labels(1), _labels(2)]
    n = sum(int((lab[:, 1:] != -100).sum()) for _, lab in batches)
    for m in (ref, model):
        for ids, labels in batches:
            m(ids, labels=labels, use_cache=False, num_items_in_batch=torch.tensor(n)).loss.backward()
    ids, labels = batches[0]
    loss = model(ids, labels=labels, use_cache=False, num_items_in_batch=n).loss  # an int works too
    _close(loss, ref(ids, labels=labels, use_cache=False, num_items_in_batch=n).loss, "loss")
    _grads_equal(model, ref)


def test_shift_labels_and_logits_to_keep():
    ref, model = _pair("llama")
    patch_hf_model(model, None, backend="aten")
    ids, labels = _labels()
    k = 5
    for kw in (dict(logits_to_keep=k, labels=labels[:, -k:]), dict(labels=labels, shift_labels=labels)):
        out = model(ids, use_cache=False, **kw)
        assert out.logits is None
        _close(out.loss, ref(ids, use_cache=False, **kw).loss, str(list(kw)))


def test_without_labels_logits_and_generation_are_unchanged():
    ref, model = _pair("gemma2", tie_word_embeddings=True)
    patch_hf_model(model, None, mlp=False, attention=False, norm=False, blocks=False, backend="aten")
    assert fused_loss_head(model) is not None
    ids, labels = _labels()
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, ref(ids, use_cache=False).logits)
        # the documented ways to get logits with labels: Hugging Face's own head and loss
        out, out_ref = model(ids, labels=labels, return_logits=True), ref(ids, labels=labels)
        assert torch.equal(out.logits, out_ref.logits) and torch.equal(out.loss, out_ref.loss)
        model.fused_ckpt_return_logits = True
        assert torch.equal(model(ids, labels=labels).logits, out_ref.logits)
        del model.fused_ckpt_return_logits
        assert model(ids, labels=labels).logits is None
    ref.eval(), model.eval()
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:, :4], **gen), ref.generate(ids[:, :4], **gen))
    # return_dict=False: (loss, ...) as Hugging Face's tuple without the logits
    assert model(ids, labels=labels, return_dict=False, use_cache=False)[0].dim() == 0


def test_saved_bytes_of_the_head_are_x_lse_targets():
    """What the fused head keeps for backward: the last hidden state, one fp32 log-sum-exp per
    token and the (shifted) labels, int64 -- measured as the whole model minus its base model."""
    _, model = _pair("llama")
    patch_hf_model(model, None, mlp=False, attention=False, norm=False, blocks=False, backend="aten")
    ids, labels = _labels()
    params = list(model.parameters())
    with SavedTensors() as base:
        model.model(ids, use_cache=False)
    with SavedTensors() as whole:
        out = model(ids, labels=labels, use_cache=False)
    head = whole.total_bytes(params) - base.total_bytes(params)
    T = B * S
    assert head == T * D * 4 + T * 4 + T * 8 == fused_loss_head(model).saved_bytes(T)
    out.loss.backward()
    with SavedTensors() as eager:  # Hugging Face's head keeps [tokens, vocab] fp32 tensors
        model(ids, labels=labels, use_cache=False, return_logits=True)
    assert eager.total_bytes(params) - base.total_bytes(params) > T * V * 4


def test_heads_computing_something_else_are_left_alone():
    ref, model = _pair("granite", logits_scaling=4.0)
    report = patch_hf_model(model, None, backend="aten")
    assert report.loss_head[1] is False and "logits_scaling=4.0" in report.loss_head[2]
    assert fused_loss_head(model) is None and "forward" not in model.__dict__
    assert "not fused" in str(report)
    ids, labels = _labels()
    out = model(ids, labels=labels, use_cache=False)
    assert out.logits is not None
    _close(out.loss, ref(ids, labels=labels, use_cache=False).loss, "loss")

    class QuantizedLinear(torch.nn.Linear):
        pass

    _, model = _pair("llama")
    model.lm_head.__class__ = QuantizedLinear
    report = patch_hf_model(model, None, backend="aten")
    assert report.loss_head[1] is False and "QuantizedLinear, not an nn.Linear" in report.loss_head[2]
    assert patch_hf_model(_pair("llama")[1], None, fused_loss=False, backend="aten").loss_head is None


def test_deepcopy_of_a_patched_model_computes_its_own_loss():
    _, model = _pair("llama")
    patch_hf_model(model, None, backend="aten")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(2)
    assert fused_loss_head(other).weight is other.lm_head.weight
    ids, labels = _labels()
    assert model(ids, labels=labels, use_cache=False).loss.item() != other(ids, labels=labels, use_cache=False).loss.item()


# ---------------------------------------------------------------- every causal-LM family patched here
# Tiny configs built in place (no download): 2 layers, width 64, vocab 96, eager attention, no
# dropout. Gemma, Gemma-3 and GPT-2 tie the head to the input embedding by default; Gemma-3 also
# gets a final-logit softcap (0.5: the tanh bends these small logits for real).
FAMILIES = {
    "mistral": ("MistralConfig", dict(COMMON)),
    "qwen2": ("Qwen2Config", dict(COMMON)),
    "qwen3": ("Qwen3Config", dict(COMMON, head_dim=32)),
    "gemma": ("GemmaConfig", dict(COMMON, head_dim=32)),
    "gemma3": ("Gemma3TextConfig", dict(COMMON, head_dim=32, final_logit_softcapping=0.5)),
    "phi3": ("Phi3Config", dict(COMMON, pad_token_id=0)),
    "olmo2": ("Olmo2Config", dict(COMMON)),
    "gpt2": ("GPT2Config", dict(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=32,
                                attn_implementation="eager", bos_token_id=0, eos_token_id=0,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt-neox": ("GPTNeoXConfig", dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=2, attn_implementation="eager", bos_token_id=0,
                                       eos_token_id=0, hidden_dropout=0.0, attention_dropout=0.0)),
}


def _family(name):
    cls_name, kw = FAMILIES[name]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cls(**kw)).train()
    return ref, copy.deepcopy(ref), copy.deepcopy(ref).double()


def _micro_batches_then_grads(model, batches, n):
    """Trainer-style gradient accumulation: each micro-batch's loss is its sum over non-ignored
    tokens / num_items_in_batch (``n``, over both), backward per micro-batch. Returns the losses
    and the accumulated gradients by parameter name."""
    losses = [model(ids, labels=labels, use_cache=False, num_items_in_batch=torch.tensor(n)).loss
              for ids, labels in batches[:1]]
    losses[0].backward()
    for ids, labels in batches[1:]:
        losses.append(model(ids, labels=labels, use_cache=False, num_items_in_batch=torch.tensor(n)).loss)
        losses[-1].backward()
    return [x.detach() for x in losses], {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("family,backend", [(f, "aten") for f in FAMILIES] + [("qwen2", "triton")],
                         ids=list(FAMILIES) + ["qwen2-triton"])
def test_every_family_loss_and_gradients_match_unpatched(family, backend):
    """patch_hf_model(fused_loss=True) on each causal-LM family (the loss head only): it is fused (tied or not,
    as the family builds it); the loss (plain mean, and two accumulated micro-batches with
    num_items_in_batch) equals the unpatched model's in float32 as the other tests here compare
    losses; every parameter gradient meets the tolerance rule against the unpatched model in
    float64, next to the unpatched model in float32. -100 labels: a prompt and padding. (A scalar
    loss is not held to the rule: both float32 losses are a few ulps off float64, and PyTorch's
    own error at one seed is often 0 ulps, which would make the bound one ulp.)"""
    ref, model, ref64 = _family(family)
    # only the loss head, so the comparison measures it alone (the fused layers of each family
    # are compared with Hugging Face's in tests/test_hf_families.py)
    report = patch_hf_model(model, None, mlp=False, attention=False, norm=False, blocks=False, backend=backend)
    name, fused, detail = report.loss_head
    assert fused is True, f"{family}: loss head not fused: {detail}"
    head = model.get_output_embeddings()
    assert name == "lm_head" and fused_loss_head(model).weight is head.weight
    tied = head.weight is model.get_input_embeddings().weight
    assert tied == bool(ref.config.tie_word_embeddings) and (("tied" in detail) == tied)
    batches = [_labels(1), _labels(2)]
    n = sum(int((lab[:, 1:] != -100).sum()) for _, lab in batches)
    ids, labels = batches[0]
    with torch.no_grad():  # the plain mean over non-ignored tokens
        out, out_ref = (m(ids, labels=labels, use_cache=False) for m in (model, ref))
    assert out.logits is None and out_ref.logits is not None
    _close(out.loss, out_ref.loss, f"{family} mean loss")
    got, grads = _micro_batches_then_grads(model, batches, n)
    pt, pt_grads = _micro_batches_then_grads(ref, batches, n)
    want, grads64 = _micro_batches_then_grads(ref64, batches, n)
    for k in range(len(batches)):
        _close(got[k], pt[k], f"{family} micro-batch {k} loss")
        _close(want[k].float(), pt[k], f"{family} micro-batch {k} loss, float64 model")  # same model
    assert list(grads) == list(grads64)
    for k in grads64:
        assert grads[k] is not None, f"{family}: no gradient for {k}"
        assert_close_by_rule(grads[k], grads64[k], pt_grads[k], f"{family} grad {k}")
