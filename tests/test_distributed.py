"""Distributed training with fused FFNs and with a Hugging Face Llama whose decoder layers
``patch_hf_model`` turned into whole-layer-recompute blocks: two CPU processes over
torch.distributed (gloo).

DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) give the single-process losses and
gradients, and gradient accumulation over micro-batches (``no_sync`` / FSDP2's
``set_requires_gradient_sync(False)``) gives the gradients of one large batch. The model mixes
all three FFN dials (True, False, "none"), set by ``apply_checkpointing``. One spawn (two
processes) runs every scenario; each rank records "ok" or the error per scenario.
"""
from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 3
BATCH, SEQ, D_IN, D, F, D_OUT = 8, 5, 16, 32, 48, 8


class Block(nn.Module):
    def __init__(self, activation):
        super().__init__()
        from fused_ckpt import FusedCheckpointedFFN

        self.norm = nn.LayerNorm(D)
        self.ffn = FusedCheckpointedFFN(D, F, activation, backend="aten")

    def forward(self, x):
        return x + self.ffn(self.norm(x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.layers = nn.ModuleList(Block(a) for a in ("swiglu", "gelu", "geglu"))
        self.head = nn.Linear(D, D_OUT)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _model():
    from fused_ckpt.policy import PerLayer, apply_checkpointing

    torch.manual_seed(0)
    m = Tiny()
    apply_checkpointing(m, PerLayer([{"ffn": True}, {"ffn": False}, {"ffn": "none"}]))
    return m


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, SEQ, D_IN, generator=g), torch.randn(BATCH, SEQ, D_OUT, generator=g))
            for _ in range(STEPS)]


def _loss(model, x, y):
    return (model(x) - y).square().mean()


# A tiny Hugging Face Llama patched by patch_hf_model: its decoder layers become
# FusedHFDecoderLayer blocks recomputed whole ("full"), the case FSDP2 shards layer by layer.
HF_VOCAB = 64


def _hf_model():
    import transformers

    from fused_ckpt.integrations.hf import FusedHFDecoderLayer, patch_hf_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, attn_implementation="eager")
    m = transformers.LlamaForCausalLM(cfg).train()
    patch_hf_model(m, "full", backend="aten")
    assert all(isinstance(layer, FusedHFDecoderLayer) and layer.recompute == "full" for layer in m.model.layers)
    return m


def _hf_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, HF_VOCAB, (BATCH, SEQ), generator=g), None) for _ in range(STEPS)]


def _hf_loss(model, ids, _):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


TASKS = {"ffn": (_model, _data, _loss), "hf": (_hf_model, _hf_data, _hf_loss)}


def _reference(task):
    """Single process, whole batch: per step (loss, {name: grad}); SGD steps in between."""
    make, data, loss_fn = TASKS[task]
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for x, y in data():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return out


def _shard(t, rank):
    if t is None:
        return None
    n = t.shape[0] // WORLD
    return t[rank * n:(rank + 1) * n]


def _chunks(t, micro):
    return [None] * micro if t is None else t.chunk(micro)


def _check(step, loss, grads, ref):
    ref_loss, ref_grads = ref[step]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7, msg=lambda m: f"step {step} loss: {m}")
    assert set(grads) == set(ref_grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"step {step} {n}: {m}")


def _global_loss(local):
    t = local.detach().clone()
    dist.all_reduce(t)
    return t / WORLD


def _ddp(rank, ref, micro, task):
    from torch.nn.parallel import DistributedDataParallel as DDP

    make, data, loss_fn = TASKS[task]
    model = DDP(make())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(data()):
        x, y = _shard(x, rank), _shard(y, rank)
        opt.zero_grad()
        total = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(micro), _chunks(y, micro))):
            last = i == micro - 1
            ctx = model.no_sync() if not last else _null()
            with ctx:
                loss = loss_fn(model, xm, ym) / micro
                loss.backward()
            total = total + loss.detach()
        grads = {n.removeprefix("module."): p.grad for n, p in model.named_parameters()}
        _check(step, _global_loss(total), grads, ref)
        opt.step()


def _fsdp2(rank, ref, micro, task):
    from torch.distributed.fsdp import fully_shard

    make, data, loss_fn = TASKS[task]
    from fused_ckpt.policy import find_layers

    model = make()
    for layer in find_layers(model)[1]:  # Tiny.layers / LlamaForCausalLM.model.layers
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(data()):
        x, y = _shard(x, rank), _shard(y, rank)
        opt.zero_grad()
        total = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(micro), _chunks(y, micro))):
            model.set_requires_gradient_sync(i == micro - 1)
            loss = loss_fn(model, xm, ym) / micro
            loss.backward()
            total = total + loss.detach()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        _check(step, _global_loss(total), grads, ref)
        opt.step()


def _accumulation_single_process(rank, ref, micro, task):
    make, data, loss_fn = TASKS[task]
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(data()):
        opt.zero_grad()
        total = 0.0
        for xm, ym in zip(x.chunk(micro), _chunks(y, micro)):
            loss = loss_fn(model, xm, ym) / micro
            loss.backward()
            total = total + loss.detach()
        _check(step, total, {n: p.grad for n, p in model.named_parameters()}, ref)
        opt.step()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


SCENARIOS = {
    "ddp": (_ddp, 1, "ffn"),
    "ddp_accumulation": (_ddp, 2, "ffn"),
    "fsdp2": (_fsdp2, 1, "ffn"),
    "fsdp2_accumulation": (_fsdp2, 2, "ffn"),
    "accumulation": (_accumulation_single_process, 4, "ffn"),
    "hf_blocks_ddp": (_ddp, 1, "hf"),
    "hf_blocks_fsdp2": (_fsdp2, 1, "hf"),
    "hf_blocks_fsdp2_accumulation": (_fsdp2, 2, "hf"),
}


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    try:
        refs = {task: _reference(task) for task in TASKS}
        for name, (fn, micro, task) in SCENARIOS.items():
            try:
                fn(rank, refs[task], micro, task)
                results[name] = "ok"
            except Exception as e:  # recorded for the test to report exactly
                results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_single_process(results, scenario):
    for rank, res in enumerate(results):
        assert res.get(scenario) == "ok", f"rank {rank}: {res.get(scenario)}"
