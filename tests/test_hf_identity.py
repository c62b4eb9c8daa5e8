"""patch_hf_model keeps the model's identity (issue 11 item 1): the same nn.Parameter objects,
state-dict keys and layout, and module names as before patching, for every family it patches;
so an optimizer built before patching trains every parameter, and save_pretrained() / a stock
from_pretrained() round-trip exactly."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_ckpt import FusedCheckpointedFFN  # noqa: E402
from fused_ckpt.integrations.hf import FusedHFAttention, FusedHFDecoderLayer, hf_state_dict, patch_hf_model  # noqa: E402
from fused_ckpt.modules.norm import FusedRMSNorm  # noqa: E402

from .test_hf_patch import B, S, V, _config, _pair  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"]


def _layout(model):
    return [(k, tuple(v.shape), v.stride(), v.dtype, v.data_ptr()) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("kind", FAMILIES)
def test_patching_keeps_parameters_keys_and_module_names(kind):
    _, model = _pair(kind)
    params = [(n, id(p)) for n, p in model.named_parameters()]
    layout = _layout(model)
    names = [n for n, _ in model.named_modules()]
    report = patch_hf_model(model, "full", backend="aten")
    assert report.replaced
    assert [(n, id(p)) for n, p in model.named_parameters()] == params
    assert _layout(model) == layout
    assert [n for n, _ in model.named_modules()] == names
    assert hf_state_dict(model).keys() == model.state_dict().keys()
    # the fused modules are really in place, holding the original submodules
    ffns = [m for m in model.modules() if isinstance(m, FusedCheckpointedFFN)]
    assert len(ffns) == 2
    if kind in ("llama", "mistral", "qwen2", "gemma"):
        assert all(isinstance(m.gate_proj, torch.nn.Linear) and isinstance(m.up_proj, torch.nn.Linear) for m in ffns)
        assert all(isinstance(m, FusedHFAttention) for m in (layer.self_attn for layer in model.model.layers))
    if kind in ("llama", "mistral", "qwen2"):
        assert all(isinstance(layer, FusedHFDecoderLayer) for layer in model.model.layers)
        assert isinstance(model.model.layers[0].input_layernorm, FusedRMSNorm)


@pytest.mark.parametrize("kind", ["llama", "phi3", "gpt2"])
def test_optimizer_built_before_patching_trains_every_parameter(kind):
    """One AdamW step with the optimizer built before patching: every parameter moves, and the
    patched model's loss and gradients equal the unpatched model's."""
    ref, model = _pair(kind)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    patch_hf_model(model, "full", backend="aten")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    losses = []
    for m, opt in zip((ref, model), opts):
        loss = m(ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-5, atol=2e-6)
    g_ref = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n].grad, rtol=2e-5, atol=2e-6, msg=lambda m: f"grad {n}: {m}")
    for opt in opts:
        opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"not trained by the optimizer built before patching: {unchanged}"


@pytest.mark.parametrize("kind", ["llama", "phi3", "gpt2"])
def test_save_pretrained_round_trips_through_stock_from_pretrained(kind, tmp_path):
    """save_pretrained() of the patched model, then a stock from_pretrained(): nothing missing,
    unexpected or re-initialised, and the reloaded logits equal the unpatched model's bitwise."""
    ref, model = _pair(kind)
    ref.eval()
    patch_hf_model(model, "full", backend="aten")
    model.save_pretrained(tmp_path)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                     attn_implementation="eager")
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    want_sd, got_sd = ref.state_dict(), loaded.state_dict()
    assert want_sd.keys() == got_sd.keys()
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
    loaded.eval()
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids, use_cache=False).logits
        got = loaded(ids, use_cache=False).logits
    assert torch.equal(got, want), (got - want).abs().max()


def test_patched_weights_are_the_models_after_load_state_dict():
    """Loading a state dict into the patched model reaches the fused path (the fused modules
    read the same parameters): a stock Llama's weights loaded into a patched one give its logits."""
    ref, model = _pair("llama")
    patch_hf_model(model, "full", backend="aten")
    torch.manual_seed(5)
    other = transformers.AutoModelForCausalLM.from_config(_config("llama")).train()
    model.load_state_dict(other.state_dict())
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(ids, use_cache=False).logits, other(ids, use_cache=False).logits,
                               rtol=2e-5, atol=2e-6)
    assert not torch.equal(other(ids, use_cache=False).logits, ref(ids, use_cache=False).logits)


def test_copy_of_a_patched_model_is_independent():
    _, model = _pair("llama")
    patch_hf_model(model, "full", backend="aten")
    twin = copy.deepcopy(model)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert not {id(p) for p in twin.parameters()} & {id(p) for p in model.parameters()}
