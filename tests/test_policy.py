"""Checkpointing policies: which dials each policy sets, the predicted saved bytes against
saved_tensors_hooks, FLOPs against FlopCounterMode, and MemoryBudget's exactness (brute force),
budget and monotonicity."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

from fused_ckpt import FusedCheckpointedFFN
from fused_ckpt.modules.attention import FusedCheckpointedAttention
from fused_ckpt.policy import (BudgetTooSmall, EveryN, LayerSpec, MemoryBudget, Option, PerLayer, Selective, Site,
                               Sqrt, apply_checkpointing, build_layers, find_layers, is_checkpointed, parse_bytes,
                               solve_budget)



# ----------------------------------------------------------------------------- measuring
class SavedByModule:
    """Attributes every tensor autograd saves to the innermost tracked module running when it
    was saved; ``bytes(m)`` = distinct storages (parameters excluded) first saved under ``m``."""

    def __init__(self, modules, params):
        self.modules = list(modules)
        self.params = list(params)
        self.stack = []
        self.saved = []  # (module or None, tensor)

    def __enter__(self):
        self.handles = []
        def enter(mod, args):
            self.stack.append(mod)

        def leave(mod, args, out):
            self.stack.pop()

        for m in self.modules:
            self.handles.append(m.register_forward_pre_hook(enter))
            self.handles.append(m.register_forward_hook(leave))

        def pack(t):
            self.saved.append((self.stack[-1] if self.stack else None, t))
            return t

        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def by_module(self) -> dict:
        ptrs = {p.untyped_storage().data_ptr() for p in self.params}
        first = {}
        for m, t in self.saved:
            st = t.untyped_storage()
            if st.data_ptr() not in ptrs and st.data_ptr() not in first:
                first[st.data_ptr()] = (m, st.nbytes())
        out = {}
        for m, b in first.values():
            out[id(m)] = out.get(id(m), 0) + b
        return out

    def bytes(self, m) -> int:
        return self.by_module().get(id(m), 0)


# ----------------------------------------------------------------------------- models
class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Block(nn.Module):
    def __init__(self, d, f, attention: bool, backend="aten", heads=2):
        super().__init__()
        self.norm1 = RMSNorm(d)
        self.attn = FusedCheckpointedAttention(d, heads, 1, rope_theta=10000.0, backend=backend) if attention else None
        self.norm2 = RMSNorm(d)
        self.mlp = FusedCheckpointedFFN(d, f, "swiglu", bias=False, backend=backend)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EagerBlock(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.norm = RMSNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, n_layers=4, d=64, f=96, attention=True, backend="aten", eager_layers=()):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList(
            EagerBlock(d, f) if i in eager_layers else Block(d, f, attention, backend) for i in range(n_layers))
        self.out = nn.Linear(d, d)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def _site_modules(model):
    return [m for m in model.modules() if isinstance(m, (FusedCheckpointedFFN, FusedCheckpointedAttention))]


def _run_and_check(model, plan, x):
    """Forward under per-module accounting; every predicted row equals the measured bytes."""
    mods = {name: m for name, m in model.named_modules()}
    tracked = [mods[r.module] for r in plan.rows]
    with SavedByModule(tracked, model.parameters()) as s:
        y = model(x)
    for r in plan.rows:
        if r.saved_bytes is not None:
            assert s.bytes(mods[r.module]) == r.saved_bytes, (r, s.bytes(mods[r.module]))
    return y


def _grads(model, x, g):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


B, S, D = 2, 8, 64


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def _x(d=D):
    return torch.randn(B, S, d)


# ----------------------------------------------------------------------------- layers
def test_find_layers_picks_the_block_list(net):
    name, layers = find_layers(net)
    assert name == "layers" and len(layers) == 4


def test_find_layers_prefers_the_list_with_fused_modules():
    model = nn.Module()
    model.other = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
    model.blocks = nn.ModuleList(Block(64, 96, False) for _ in range(2))
    name, layers = find_layers(model)
    assert name == "blocks"


def test_find_layers_error_without_a_block_list():
    with pytest.raises(ValueError, match="no repeated block list"):
        find_layers(nn.Linear(4, 4))


# ----------------------------------------------------------------------------- each policy's dials
L4 = ["layers.0", "layers.1", "layers.2", "layers.3"]


def _dials(model):
    return [(layer.attn.recompute if layer.attn is not None else None, layer.mlp.recompute) for layer in model.layers]


@pytest.mark.parametrize("policy,expected", [
    ("none", [(False, "none")] * 4),
    ("full", [("all", True)] * 4),
    (EveryN(2), [("all", True), (False, "none")] * 2),
    (EveryN(3, offset=1), [(False, "none"), ("all", True), (False, "none"), (False, "none")]),
    (Selective(), [(False, True)] * 4),
    (Selective(ffn="activation", attention="qkv", skip_first=1, skip_last=1),
     [(False, "none"), ("qkv", False), ("qkv", False), (False, "none")]),
    (Selective(ffn=False, attention=True), [("all", "none")] * 4),
    ("sqrt", [(False, "none"), ("all", True), (False, "none"), ("all", True)]),
    (PerLayer([{"attention": "qkv", "ffn": False}] * 2 + [{"layers.2.attn": "all", "layers.2.mlp": True},
                                                          {"ffn": "none", "attention": False}]),
     [("qkv", False)] * 2 + [("all", True), (False, "none")]),
])
def test_policy_sets_dials_and_measured_bytes_equal_predicted(net, policy, expected):
    x = _x()
    g = torch.randn(B, S, D)
    ref = _grads(net, x, g)  # default dials
    plan = apply_checkpointing(net, policy, batch=B, seq=S)
    assert _dials(net) == expected
    for r in plan.rows:  # the plan reports the dials set on the modules
        mod = net.get_submodule(r.module)
        assert mod.recompute is r.dial or mod.recompute == r.dial
    y = _run_and_check(net, plan, x)
    got = _grads(net, x, g)  # same numbers whatever the dials
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-5, atol=1e-6, msg=n)
    del y


def test_plan_rows_and_table(net):
    plan = apply_checkpointing(net, EveryN(2), batch=B, seq=S)
    assert [(r.layer, r.module, r.kind) for r in plan.rows[:2]] == [(0, "layers.0.attn", "attention"),
                                                                    (0, "layers.0.mlp", "ffn")]
    assert plan.total_saved_bytes == sum(r.saved_bytes for r in plan.rows)
    assert plan.total_recompute_flops == sum(r.recompute_flops for r in plan.rows)
    text = str(plan)
    lines = text.splitlines()
    assert lines[0].startswith("checkpoint plan: EveryN(n=2, offset=0)")
    assert sum(1 for ln in lines if ln.split() and ln.split()[0].isdigit()) == 4
    assert lines[-1].split()[0] == "total"
    # the plan re-applies as a policy
    apply_checkpointing(net, "none")
    again = apply_checkpointing(net, plan.policy, batch=B, seq=S)
    assert [r.dial for r in again.rows] == [r.dial for r in plan.rows]


def test_predictions_in_bf16_and_with_the_dtype_override():
    torch.manual_seed(0)
    net = Net(n_layers=2).to(torch.bfloat16)
    plan = apply_checkpointing(net, Selective(ffn="activation", attention="qkv"), batch=B, seq=S)
    _run_and_check(net, plan, _x().bfloat16())
    fp32 = apply_checkpointing(Net(n_layers=2), "full", batch=B, seq=S, dtype=torch.bfloat16)
    assert fp32.total_saved_bytes == apply_checkpointing(net, "full", batch=B, seq=S).total_saved_bytes


def test_sqrt_definition():
    assert Sqrt.layers_for(1) == [0]
    assert Sqrt.layers_for(4) == [0, 2] or Sqrt.layers_for(4) == [1, 3]
    for L in (2, 7, 16, 32, 80):
        idx = Sqrt.layers_for(L)
        k = max(1, math.floor(math.sqrt(L) + 0.5))
        assert len(idx) == len(set(idx)) == k
        gaps = [b - a for a, b in zip(idx, idx[1:])]
        assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spaced
        assert idx[0] <= L // (2 * k) + 1 and L - 1 - idx[-1] <= L // (2 * k) + 1  # centred


def test_recompute_flops_match_flop_counter():
    """fwd+bwd FLOPs under a policy minus under "none" = the plan's recompute FLOPs
    (FFN-only model: the attention FLOP convention halves causal attention, which the aten
    math path does not)."""
    from .test_ffn_contract import _SeeThroughCustomOps

    torch.manual_seed(0)
    net = Net(n_layers=3, attention=False)
    x = _x().requires_grad_(True)

    def flops():
        counter = FlopCounterMode(display=False)
        with counter, _SeeThroughCustomOps():
            net(x).sum().backward()
        return counter.get_total_flops()

    apply_checkpointing(net, "none")
    base = flops()
    for pol in ("full", EveryN(2), Selective(ffn="activation")):
        plan = apply_checkpointing(net, pol, batch=B, seq=S)
        assert flops() - base == plan.total_recompute_flops, pol


class _SeeThroughAttention(TorchDispatchMode):
    """Runs the attention custom ops' Python implementations so FlopCounterMode counts the
    aten path's GEMMs (the ops register no FLOP formula)."""

    def __init__(self):
        super().__init__()
        from fused_ckpt.ops import attention as A
        ops = torch.ops.fused_ckpt
        self.impls = {ops.attn_block_forward.default: A.attn_block_forward._init_fn,
                      ops.attn_block_backward.default: A.attn_block_backward._init_fn}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = self.impls.get(func)
        return (impl or func)(*args, **(kwargs or {}))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_recompute_flops_match_flop_counter(causal):
    """"qkv" recomputes exactly the q/k/v projections; "all" also the attention forward, which
    the aten path (and FlopCounterMode's count of PyTorch's flash kernels) counts in full even
    when causal (the prediction halves it, as FlashAttention's convention and the Triton
    kernels' tile skipping do)."""
    from fused_ckpt.policy import attention_forward_flops, attention_recompute_flops

    torch.manual_seed(0)
    attn = FusedCheckpointedAttention(64, 2, 1, causal=causal, rope_theta=10000.0, backend="aten")
    x = _x().requires_grad_(True)

    def flops(dial):
        attn.recompute = dial
        counter = FlopCounterMode(display=False)
        with counter, _SeeThroughAttention():
            attn(x).sum().backward()
        return counter.get_total_flops()

    base = flops(False)
    assert flops("qkv") - base == attention_recompute_flops(B, S, 64, 2, 1, 32, causal, "qkv")
    full_core = attention_forward_flops(B, S, 2, 32, False)
    extra_all = attention_recompute_flops(B, S, 64, 2, 1, 32, causal, "all")
    assert flops("all") - base == extra_all - attention_forward_flops(B, S, 2, 32, causal) + full_core


# ----------------------------------------------------------------------------- unfused layers
def test_unfused_layers_fall_back_to_torch_checkpoint():
    torch.manual_seed(0)
    net = Net(n_layers=4, eager_layers=(1, 2))
    x, g = _x(), torch.randn(B, S, D)
    ref = _grads(net, x, g)
    plan = apply_checkpointing(net, EveryN(2), batch=B, seq=S)  # layer 2 (eager) checkpointed, 1 not
    assert [is_checkpointed(layer) for layer in net.layers] == [False, False, True, False]
    rows = {r.module: r for r in plan.rows}
    assert rows["layers.2"].kind == "checkpoint" and rows["layers.2"].dial is True
    assert rows["layers.1"].dial is False and rows["layers.1"].saved_bytes is None  # eager: not modelled
    assert rows["layers.2"].saved_bytes is None  # no config.hidden_size: input size unknown
    # what the checkpoint keeps: only the layer input
    with SavedByModule([net.layers[2]], net.parameters()) as s:
        net(x)
    assert s.bytes(net.layers[2]) == B * S * D * 4
    got = _grads(net, x, g)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-5, atol=1e-6, msg=n)
    # a fused module is never inside a checkpoint; "none" removes the wrappers
    assert not any(is_checkpointed(m) for m in _site_modules(net))
    apply_checkpointing(net, "none")
    assert not any(is_checkpointed(layer) for layer in net.layers)
    assert "forward" not in net.layers[2].__dict__


def test_checkpoint_site_bytes_known_with_a_config():
    torch.manual_seed(0)
    net = Net(n_layers=2, eager_layers=(0, 1))
    net.config = type("Cfg", (), {"hidden_size": D})()
    plan = apply_checkpointing(net, "full", batch=B, seq=S)
    assert [r.saved_bytes for r in plan.rows] == [B * S * D * 4] * 2
    _run_and_check(net, plan, _x())


@pytest.mark.triton
def test_triton_backend_follows_the_dials():
    """The dials reach the Triton kernels (interpreter on CPU): measured bytes equal predicted."""
    torch.manual_seed(0)
    net = Net(n_layers=2, d=32, f=48, attention=False, backend="triton")
    plan = apply_checkpointing(net, PerLayer([{"ffn": True}, {"ffn": False}]), batch=1, seq=4)
    _run_and_check(net, plan, torch.randn(1, 4, 32))


# ----------------------------------------------------------------------------- MemoryBudget
def _random_layers(rng, n_layers, identical):
    def site(i, j):
        kind = rng.choice(["ffn", "attention"])
        dials = {"ffn": (True, False, "none"), "attention": ("all", "qkv", False)}[kind]
        opts = {}
        b, f = rng.randint(1, 5) * 8, rng.randint(5, 40) * 3
        for k, d in enumerate(dials):  # more bytes, less recompute along the dials
            opts[d] = Option(d, b, f, rng.randint(0, 3))
            b += rng.randint(0, 4) * 8
            f = max(0, f - rng.randint(0, 30))
        return Site(i, f"l{i}.s{j}", kind, kind, opts)

    proto = [site(0, j) for j in range(2)]
    layers = []
    for i in range(n_layers):
        sites = ([Site(i, f"l{i}.s{j}", s.kind, s.role, s.options) for j, s in enumerate(proto)]
                 if identical else [site(i, j) for j in range(rng.randint(1, 2))])
        layers.append(LayerSpec(i, f"l{i}", sites, fixed=[("norm", rng.randint(0, 2) * 4)]))
    return layers


def _cost(layers, picks):
    b = sum(v for L in layers for _, v in L.fixed)
    c0 = c1 = 0
    for L, p in zip(layers, picks):
        for s in L.sites:
            o = s.option(p[s.name])
            b, c0, c1 = b + o.saved_bytes, c0 + o.recompute_flops, c1 + o.aux
    return b, (c0, c1)


def _brute(layers, budget):
    sites = [s for L in layers for s in L.sites]
    best = None
    for combo in itertools.product(*[list(s.options) for s in sites]):
        picks = [{} for _ in layers]
        for s, d in zip(sites, combo):
            picks[s.layer][s.name] = d
        b, c = _cost(layers, picks)
        if b <= budget and (best is None or (c, b) < best):
            best = (c, b)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_memory_budget_matches_brute_force(seed):
    rng = random.Random(seed)
    layers = _random_layers(rng, rng.randint(1, 4), identical=seed % 2 == 0)
    lo = _cost(layers, [{s.name: next(iter(s.options)) for s in L.sites} for L in layers])[0]
    hi = _cost(layers, [{s.name: list(s.options)[-1] for s in L.sites} for L in layers])[0]
    for budget in sorted({lo, hi, *(rng.randint(lo, hi) for _ in range(6))}):
        picks = solve_budget(layers, budget)
        b, c = _cost(layers, picks)
        assert b <= budget
        assert (c, b) == _brute(layers, budget), (seed, budget)
    with pytest.raises(BudgetTooSmall) as e:
        solve_budget(layers, lo - 1)
    assert e.value.minimum == lo


def test_memory_budget_on_a_model_fits_is_monotone_and_measured(net):
    x = _x()
    full = apply_checkpointing(net, "full", batch=B, seq=S).total_saved_bytes
    none = apply_checkpointing(net, "none", batch=B, seq=S).total_saved_bytes
    budgets = [full, full + 1] + [full + (none - full) * k // 7 for k in range(1, 8)] + [none * 2]
    prev = None
    for budget in budgets:
        plan = apply_checkpointing(net, MemoryBudget(budget, batch=B, seq=S))
        assert plan.total_saved_bytes <= budget
        if prev is not None:  # a larger budget never keeps fewer bytes nor costs more
            assert plan.total_saved_bytes >= prev.total_saved_bytes
            assert plan.total_recompute_flops <= prev.total_recompute_flops
        prev = plan
    assert prev.total_recompute_flops == 0 and all(r.dial in ("none", False) for r in prev.rows)
    mid = apply_checkpointing(net, MemoryBudget(budgets[4]), batch=B, seq=S)
    _run_and_check(net, mid, x)
    full_flops = apply_checkpointing(net, "full", batch=B, seq=S).total_recompute_flops
    assert 0 < mid.total_recompute_flops < full_flops  # a genuinely selective plan
    with pytest.raises(BudgetTooSmall, match=f"minimum possible.*\\({full} bytes\\)"):
        apply_checkpointing(net, MemoryBudget(full - 1), batch=B, seq=S)


def test_memory_budget_real_layers_match_brute_force():
    torch.manual_seed(0)
    net = Net(n_layers=3)
    layers = build_layers(net, batch=B, seq=S)
    lo = sum(s.options[d].saved_bytes for L in layers for s in L.sites for d in [next(iter(s.options))])
    for budget in range(lo, lo + 60000, 2500):
        b, c = _cost(layers, solve_budget(layers, budget))
        assert (c, b) == _brute(layers, budget)


# ----------------------------------------------------------------------------- bad input
def test_bad_policies_and_arguments(net):
    with pytest.raises(ValueError, match="unknown policy"):
        apply_checkpointing(net, "most")
    with pytest.raises(ValueError, match="positive int"):
        EveryN(0)
    with pytest.raises(ValueError, match="ffn must be"):
        Selective(ffn="gate")
    with pytest.raises(ValueError, match="needs the token count"):
        apply_checkpointing(net, MemoryBudget("1MiB"))
    with pytest.raises(ValueError, match="layer entries"):
        apply_checkpointing(net, PerLayer([{"ffn": True}]))
    with pytest.raises(ValueError, match="positive int"):
        apply_checkpointing(net, "full", batch=0, seq=4)


@pytest.mark.parametrize("text,value", [("24GiB", 24 * 2**30), ("1.5 GB", 1_500_000_000), ("512MiB", 2**29),
                                        ("1000", 1000), ("2k", 2048), ("3TB", 3 * 10**12)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "24XB", "-1GiB", "1e400GB", "nan", "twelve"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


@pytest.mark.parametrize("budget", [24 * 2**30, float(24 * 2**30), "24GiB", "24 GiB", "25769803776", "2.5769803776e10"])
def test_memory_budget_accepts_ints_integral_floats_and_strings(budget):
    """One parser (parse_budget) for MemoryBudget, plan() and the command line."""
    assert MemoryBudget(budget).budget == 24 * 2**30
    assert MemoryBudget(1.5e11).budget == 150_000_000_000


@pytest.mark.parametrize("budget,match", [
    (0, "must be positive"), (-1, "must be positive"), ("-1GiB", "must be"), ("0GiB", "must be positive"),
    (1.5, "not a whole number of bytes"), ("1.5", "not a whole number of bytes"), (float("nan"), "finite"),
    (float("inf"), "finite"), ("lots", "malformed byte size 'lots'"), (None, "malformed byte size None"),
    (True, "malformed byte size True"), ([24], "malformed byte size"),
])
def test_memory_budget_rejects_bad_budgets(budget, match):
    with pytest.raises(ValueError, match=f"MemoryBudget budget.*{match}"):
        MemoryBudget(budget)
    from fused_ckpt.planner import plan

    with pytest.raises(ValueError, match=match):
        plan("llama-7b", 1, 16, "bf16", budget)


def test_parse_budget_requires_a_unit_when_asked():
    from fused_ckpt.policy import parse_budget

    assert parse_budget("24") == 24
    with pytest.raises(ValueError, match="'24' has no unit .*24 bytes.*24GiB"):
        parse_budget("24", None, require_unit=True)
    assert parse_budget("24B", None, require_unit=True) == 24
    assert parse_budget("1.5e11B", None, require_unit=True) == 150_000_000_000
