"""patch_hf_model(fused_loss=True): a causal LM called with labels computes Hugging Face's
ForCausalLMLoss through the fused linear cross-entropy (no [tokens, vocab] logits), with the same
loss and every parameter gradient as the unpatched model (fp32): padding labels, tied embeddings,
Gemma-2's final-logit softcapping, gradient accumulation with num_items_in_batch, logits_to_keep;
calls without labels and generate() unchanged; heads computing something else left alone."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_ckpt.accounting import SavedTensors  # noqa: E402
from fused_ckpt.integrations.hf import fused_loss_head, patch_hf_model  # noqa: E402
from fused_ckpt.modules.linear_ce import FusedLinearCrossEntropy  # noqa: E402

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
