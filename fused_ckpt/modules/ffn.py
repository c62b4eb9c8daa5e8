"""``FusedCheckpointedFFN``: a drop-in MLP whose backward recomputes its hidden layer."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..activations import ACTIVATIONS, GELU, Activation, GELU_TANH, RELU, SILU, get_activation
from ..functional import ffn_save_count, fused_ffn
from ._swap import record_children, swapped_child, swapped_lora, warn_unfused

_BASE_NAMES = {RELU: "relu", GELU: "gelu", GELU_TANH: "gelu_tanh", SILU: "silu"}
_GATED_NAMES = {SILU: "swiglu", GELU: "geglu", GELU_TANH: "geglu_tanh"}


class FusedCheckpointedFFN(nn.Module):
    """``fc2(act(fc1(x)))`` with fused Triton kernels and a recomputing backward.

    ==========  =================================  ==================================
    recompute   kept for backward (besides params)  recomputed in backward
    ==========  =================================  ==================================
    True        x                                  fc1 GEMM + activation, fused
    False       x, pre-activation                  activation only (elementwise)
    "none"      x, pre-activation, activation      nothing (eager memory, fused backward)
    ==========  =================================  ==================================

    Parameters are ``nn.Linear`` modules ``fc1`` (``[d_ff, d_model]``; gated activations
    ``[2*d_ff, d_model]``, gate rows first, then up rows) and ``fc2`` (``[d_model, d_ff]``), so a
    timm-style ``Mlp`` state dict loads as is.

    ``dropout``: dropout on the output in training mode (GPT-2's MLP ``dropout(c_proj(...))``),
    its mask replayed in backward from a Philox seed (nothing saved; :mod:`fused_ckpt.ops.dropout`).

    Equivalent PyTorch::

        h = act(fc1(x))            # gated: act(g) * u with g, u = fc1(x).chunk(2, -1)
        y = fc2(h)
        y = F.dropout(y, dropout, self.training)
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True,
                 recompute: bool = True, device=None, dtype=None, *, chunk_tokens: int = 0,
                 backend: str = "auto", dropout: float = 0.0):
        super().__init__()
        act = get_activation(activation)
        for name, v in (("d_model", d_model), ("d_ff", d_ff)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        ffn_save_count(recompute)  # validates the dial
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.out_dropout = float(dropout)
        self.d_model, self.d_ff = d_model, d_ff
        self.activation = act.name
        self.recompute = recompute
        self.chunk_tokens = chunk_tokens
        self.backend = backend
        self.fc1 = nn.Linear(d_model, act.fc1_rows(d_ff), bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)
        record_children(self, ("fc1", "fc2"))

    def _ffn_tensors(self) -> tuple:
        """(w1, b1, w2, b2, w_up, b_up) as :func:`fused_ffn` takes them, read from the parameters
        where they live (views, no copies); ``w_up`` / ``b_up`` None for a packed or ungated fc1."""
        return self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = lora_p = None
        why = swapped_child(self)
        if why is not None:  # e.g. a PEFT LoRA wrapper around a projection: its weight alone is not the math
            found, why_not = self._peft_lora(x)
            if found is None:
                warn_unfused(self, why_not or why)
                return self._unfused_forward(x)
            lora, lora_p = found
        w1, b1, w2, b2, w_up, b_up = self._ffn_tensors()
        return fused_ffn(x, w1, b1, w2, b2, self.activation, self.recompute, chunk_tokens=self.chunk_tokens,
                         backend=self.backend, w_up=w_up, b_up=b_up, lora=lora or None, lora_dropout=lora_p or 0.0,
                         dropout_p=self._output_dropout() if self.training else 0.0)

    def _output_dropout(self) -> float:
        """The output dropout's p (applied in training mode)."""
        return self.out_dropout

    @property
    def dropout_p(self) -> float:
        """The output dropout's p now (the name the whole-layer block reads, in training mode)."""
        return self._output_dropout()

    def _peft_lora(self, x: torch.Tensor) -> tuple:
        """``((lora dict for fused_ffn, lora dropout p), None)`` when every replaced projection is
        a PEFT ``lora.Linear`` around the module this FFN was built from, computing vanilla LoRA
        (or its base alone: merged or disabled adapters) on frozen base weights in x's dtype;
        else ``(None, reason)`` and the unfused path runs."""
        roles = {getattr(self, "_fc1_name", "fc1"): "fc1", getattr(self, "_up_name", None): "up",
                 getattr(self, "_fc2_name", "fc2"): "fc2"}
        return swapped_lora(self, roles, x, "the base")

    def _unfused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The exact unfused path, calling the current submodules (a PEFT LoRA wrapper adds its
        low-rank terms, a quantized linear its own matmul): the source MLP's own forward when the
        module shares a non-Sequential MLP's submodules, else ``fc2(act(fc1(x)))`` (gated:
        ``fc2(act(gate(x)) * up(x))``) through the children."""
        src = self.__dict__.get("_source_forward")
        if src is not None:
            return src(self, x)
        m, act = self._modules, get_activation(self.activation)
        fc1, fc2 = m[getattr(self, "_fc1_name", "fc1")], m[getattr(self, "_fc2_name", "fc2")]
        up_name = getattr(self, "_up_name", None)
        y = fc2(act.base_fn(fc1(x)) * m[up_name](x)) if up_name is not None else fc2(act.hidden(fc1(x)))
        p = self._output_dropout() if self.training else 0.0
        return F.dropout(y, p) if p else y  # the output dropout (torch's own mask on this path)

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the FFN's weights."""
        return self._ffn_tensors()[2].dtype

    @property
    def fc1_rows(self) -> int:
        """Rows of the up-projection: d_ff, or 2*d_ff for gated activations (gate and up)."""
        return get_activation(self.activation).fc1_rows(self.d_ff)

    def saved_bytes(self, tokens: int, recompute=None, dtype: torch.dtype | None = None) -> int:
        """Activation bytes this module keeps for backward for ``tokens`` tokens (parameters
        excluded), at its ``recompute`` setting or the one given."""
        from ..ops.ffn import ffn_saved_bytes

        dtype = dtype or self.param_dtype
        save = ffn_save_count(self.recompute if recompute is None else recompute)
        elem = torch.empty((), dtype=dtype).element_size()
        if swapped_child(self) is not None:  # PEFT LoRA in the op: x and the [tokens, r] products
            found, _ = self._peft_lora(torch.empty((), dtype=dtype, device="meta"))
            if found is not None and found[0]:
                from ..ops.ffn_lora import ffn_lora_saved_bytes

                factors = list(found[0].values())
                return ffn_lora_saved_bytes(tokens, self.d_model, tuple(f[0].shape[0] for f in factors), min(save, 1),
                                            self.fc1_rows, elem, factors[0][0].element_size())
        return ffn_saved_bytes(tokens, self.d_model, self.d_ff, get_activation(self.activation).gated, save, elem)

    def recompute_flops(self, tokens: int, recompute=None) -> int:
        """Extra GEMM FLOPs its backward spends recomputing, at its setting or the one given."""
        from ..ops.ffn import ffn_recompute_flops

        save = ffn_save_count(self.recompute if recompute is None else recompute)
        flops = ffn_recompute_flops(tokens, self.d_model, self.d_ff, get_activation(self.activation).gated, save)
        if save == 0 and swapped_child(self) is not None:  # PEFT LoRA in the op: z also gets scaling * t B^T
            found, _ = self._peft_lora(torch.empty((), dtype=self.param_dtype, device="meta"))
            if found is not None:
                flops += sum(2 * tokens * a.shape[0] * b.shape[0]
                             for key, (a, b, _) in found[0].items() if key != "fc2")
        return flops

    def extra_repr(self) -> str:
        p = self._output_dropout()
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}, "
                f"recompute={self.recompute}" + (f", dropout={p}" if p else ""))

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_module(cls, mlp: nn.Module, recompute: bool = True, *, share_parameters: bool = False,
                    **kwargs) -> "FusedCheckpointedFFN":
        """Build a fused FFN with ``mlp``'s weights (same device and dtype).

        ``share_parameters=False`` copies the weights into a new module (``fc1``/``fc2``;
        gated weights concatenated into one ``fc1``). ``share_parameters=True`` returns a
        :class:`FusedSharedFFN` that holds ``mlp``'s own submodules under their own names: the
        same ``nn.Parameter`` objects, state-dict keys, layout and module names as ``mlp`` (an
        optimizer built on ``mlp`` keeps training it; its state dict loads into ``mlp``'s class);
        the fused op reads the weights where they live (separate gate/up weights as two
        tensors, a packed ``gate_up_proj`` as two views, Conv1D weights transposed by strides).

        Accepted: ``nn.Sequential(Linear, activation, Linear)``; timm-style ``Mlp``
        (``fc1``/``act``/``fc2``, identity norm, zero dropout); Hugging Face gated MLPs
        (``gate_proj``/``up_proj``/``down_proj``/``act_fn``: Llama, Mistral, Qwen2, Gemma);
        packed gated MLPs (``gate_up_proj``/``down_proj``: Phi-3); GPT-2 MLPs
        (``c_fc``/``c_proj`` Conv1D with transposed weights; its ``dropout`` becomes the output
        dropout, replayed: a copy takes its p, a shared module reads the child's p); GPT-NeoX MLPs
        (``dense_h_to_4h``/``act``/``dense_4h_to_h``). The activation is identified by
        evaluating the module's activation on probe values, not by its class name.
        """
        kind, parts = _match_mlp(mlp)
        if share_parameters:
            return FusedSharedFFN(mlp, kind, parts, recompute=recompute, **kwargs)
        if kind == "sequential":
            fc1, act_mod, fc2 = parts
            w1, b1, w2, b2 = fc1.weight, fc1.bias, fc2.weight, fc2.bias
            if isinstance(act_mod, Activation):  # fused_ckpt.reference.EagerMLP
                name = act_mod.name
            else:
                name = _BASE_NAMES[_identify_activation(act_mod)]
        elif kind == "gated":
            gate, up, down, act_mod = parts
            base = _identify_activation(act_mod)
            name = _gated_name(base, act_mod)
            w1 = torch.cat([gate.weight, up.weight], 0)
            b1 = None if gate.bias is None else torch.cat([gate.bias, up.bias], 0)
            w2, b2 = down.weight, down.bias
        elif kind == "packed_gated":
            gate_up, down, act_mod = parts
            base = _identify_activation(act_mod)
            name = _gated_name(base, act_mod)
            w1, b1, w2, b2 = gate_up.weight, gate_up.bias, down.weight, down.bias
        else:  # gpt2: Conv1D stores weight as [in, out]
            c_fc, act_mod, c_proj = parts
            name = _BASE_NAMES[_identify_activation(act_mod)]
            w1, b1, w2, b2 = c_fc.weight.t(), c_fc.bias, c_proj.weight.t(), c_proj.bias
        if (b1 is None) != (b2 is None):
            raise ValueError(f"cannot convert {type(mlp).__name__}: fc1 and fc2 must both have a bias "
                             "or both have none")
        d_ff, d_model = w2.shape[1], w2.shape[0]
        if kind == "gpt2" and isinstance(getattr(mlp, "dropout", None), nn.Dropout):
            kwargs.setdefault("dropout", mlp.dropout.p)
        new = cls(d_model, d_ff, activation=name, bias=b1 is not None, recompute=recompute,
                  device=w1.device, dtype=w1.dtype, **kwargs)
        with torch.no_grad():
            new.fc1.weight.copy_(w1)
            new.fc2.weight.copy_(w2)
            if b1 is not None:
                new.fc1.bias.copy_(b1)
                new.fc2.bias.copy_(b2)
        new.train(mlp.training)
        return new


class FusedSharedFFN(FusedCheckpointedFFN):
    """A :class:`FusedCheckpointedFFN` over an existing MLP's own submodules, kept under their
    own names (``gate_proj``/``up_proj``/``down_proj``/``act_fn``; ``gate_up_proj``; ``c_fc``/
    ``c_proj``; ``fc1``/``fc2``; ``0``/``2`` of a Sequential): parameters, state-dict keys and
    module names are the source MLP's. Built by
    ``FusedCheckpointedFFN.from_module(mlp, share_parameters=True)``.

    ``layout``: "gated" (separate gate and up weights: two tensors for the op), "packed_gated"
    (one ``[2f, d]`` weight, read as two views), "gpt2" (Conv1D ``[in, out]`` weights, read
    transposed through strides), "sequential" (``nn.Linear`` fc1/fc2).
    """

    def __init__(self, mlp: nn.Module, kind: str, parts, recompute=True, *, chunk_tokens: int = 0,
                 backend: str = "auto"):
        nn.Module.__init__(self)
        ffn_save_count(recompute)
        if mlp._parameters or mlp._buffers:
            raise ValueError(f"from_module(share_parameters=True): {type(mlp).__name__} holds parameters or "
                             f"buffers of its own ({sorted(list(mlp._parameters) + list(mlp._buffers))}); only "
                             "its submodules can be shared")
        names = {id(c): n for n, c in mlp.named_children()}
        if kind == "gated":
            fc1, up, fc2, act_mod = parts
        elif kind == "packed_gated":
            (fc1, fc2, act_mod), up = parts, None
        else:
            (fc1, act_mod, fc2), up = parts, None
        if any(id(m) not in names for m in (fc1, fc2) + ((up,) if up is not None else ())):
            raise ValueError(f"from_module(share_parameters=True): the projections of {type(mlp).__name__} are "
                             "not its direct submodules")
        name = _activation_name(kind, act_mod)
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError(f"cannot convert {type(mlp).__name__}: fc1 and fc2 must both have a bias "
                             "or both have none")
        for n, child in mlp.named_children():
            self.add_module(n, child)
        self.layout = kind
        self.out_dropout = 0.0  # GPT-2: the shared ``dropout`` child's p (``_output_dropout``)
        self._fc1_name, self._fc2_name = names[id(fc1)], names[id(fc2)]
        self._up_name = names[id(up)] if up is not None else None
        w2 = self._ffn_tensors()[2]
        self.d_model, self.d_ff = w2.shape[0], w2.shape[1]
        self.activation = name
        self.recompute = recompute
        self.chunk_tokens = chunk_tokens
        self.backend = backend
        self.train(mlp.training)
        # forward-time guard: the projections read by the fused op (modules/_swap.py); a swapped
        # one runs the source MLP's own forward (non-Sequential sources) on the current children
        record_children(self, [n for n in (self._fc1_name, self._up_name, self._fc2_name) if n is not None])
        if not isinstance(mlp, nn.Sequential):
            self.__dict__["_source_forward"] = type(mlp).forward
            for k, v in mlp.__dict__.items():  # config, hidden_size, ... (read by that forward)
                if not k.startswith("_") and k != "training" and k not in self.__dict__ \
                        and not isinstance(v, (nn.Module, torch.Tensor)):
                    self.__dict__[k] = v

    def _ffn_tensors(self) -> tuple:
        m = self._modules
        fc1, fc2 = m[self._fc1_name], m[self._fc2_name]
        w1, w2 = fc1.weight, fc2.weight
        if self.layout == "gpt2":  # Conv1D: weight [in, out]
            w1, w2 = w1.t(), w2.t()
        up = m[self._up_name] if self._up_name is not None else None
        return (w1, fc1.bias, w2, fc2.bias, up.weight if up is not None else None,
                up.bias if up is not None else None)

    def _output_dropout(self) -> float:
        drop = self._modules.get("dropout") if self.layout == "gpt2" else None
        return drop.p if isinstance(drop, nn.Dropout) else self.out_dropout

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layout={self.layout!r}"


def _activation_name(kind: str, act_mod) -> str:
    if kind in ("gated", "packed_gated"):
        return _gated_name(_identify_activation(act_mod), act_mod)
    if isinstance(act_mod, Activation):  # fused_ckpt.reference.EagerMLP
        return act_mod.name
    return _BASE_NAMES[_identify_activation(act_mod)]


def _gated_name(base: int, act_mod) -> str:
    if base not in _GATED_NAMES:
        raise ValueError(f"gated MLP with activation {type(act_mod).__name__} ({_BASE_NAMES[base]}) "
                         f"is not supported; gated activations: {sorted(_GATED_NAMES.values())}")
    return _GATED_NAMES[base]


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv1d(m) -> bool:  # transformers.pytorch_utils.Conv1D, matched by structure
    return (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor)
            and getattr(m, "nf", None) == m.weight.shape[1])


def _is_noop(m) -> bool:
    if m is None or isinstance(m, nn.Identity):
        return True
    if isinstance(m, nn.Dropout):
        return m.p == 0.0 or not m.training
    return False


def _match_mlp(mlp: nn.Module):
    if isinstance(mlp, nn.Sequential):
        layers = [m for m in mlp if not _is_noop(m)]
        if len(layers) == 3 and _is_linear(layers[0]) and _is_linear(layers[2]):
            return "sequential", layers
        raise ValueError("from_module: nn.Sequential must be (Linear, activation, Linear) "
                         f"(dropout p=0 allowed), got {[type(m).__name__ for m in mlp]}")
    has = lambda *names: all(hasattr(mlp, n) for n in names)  # noqa: E731
    if has("gate_proj", "up_proj", "down_proj", "act_fn") and all(
            _is_linear(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")):
        if (mlp.gate_proj.bias is None) != (mlp.up_proj.bias is None):
            raise ValueError("from_module: gate_proj and up_proj must both have a bias or neither")
        return "gated", (mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
    if has("gate_up_proj", "down_proj") and _is_linear(mlp.gate_up_proj) and _is_linear(mlp.down_proj):
        act = getattr(mlp, "activation_fn", None) or getattr(mlp, "act_fn", None)
        if act is None:
            raise ValueError("from_module: packed gated MLP without activation_fn/act_fn")
        return "packed_gated", (mlp.gate_up_proj, mlp.down_proj, act)
    if has("c_fc", "c_proj", "act") and _is_conv1d(mlp.c_fc) and _is_conv1d(mlp.c_proj):
        drop = getattr(mlp, "dropout", None)
        if not (_is_noop(drop) or isinstance(drop, nn.Dropout)):  # nn.Dropout: the output dropout
            raise ValueError(f"from_module: GPT-2 MLP dropout {type(drop).__name__} is not supported")
        return "gpt2", (mlp.c_fc, mlp.act, mlp.c_proj)
    if has("dense_h_to_4h", "act", "dense_4h_to_h") and _is_linear(mlp.dense_h_to_4h) and \
            _is_linear(mlp.dense_4h_to_h):  # GPT-NeoX
        return "sequential", (mlp.dense_h_to_4h, mlp.act, mlp.dense_4h_to_h)
    if has("fc1", "act", "fc2") and _is_linear(mlp.fc1) and _is_linear(mlp.fc2):
        for extra in ("drop", "drop1", "drop2", "norm"):
            if not _is_noop(getattr(mlp, extra, None)):
                raise ValueError(f"from_module: Mlp.{extra} ({type(getattr(mlp, extra)).__name__}) "
                                 "is not supported; only identity norms and zero dropout convert")
        return "sequential", (mlp.fc1, mlp.act, mlp.fc2)
    raise ValueError(
        f"from_module: cannot convert {type(mlp).__name__}; supported: nn.Sequential(Linear, act, Linear), "
        "timm Mlp (fc1/act/fc2), Hugging Face gated MLP (gate_proj/up_proj/down_proj/act_fn), "
        "packed gated MLP (gate_up_proj/down_proj), GPT-2 MLP (c_fc/c_proj Conv1D)"
    )


_PROBE = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)


def _identify_activation(act_mod) -> int:
    """Which base function ``act_mod`` computes, by evaluating it on probe values in float64."""
    if not callable(act_mod):
        raise ValueError(f"activation {act_mod!r} is not callable")
    try:
        with torch.no_grad():
            got = act_mod(_PROBE.clone())
    except Exception as e:  # pragma: no cover - exotic activation modules
        raise ValueError(f"could not evaluate activation {type(act_mod).__name__}: {e}") from e
    got = torch.as_tensor(got, dtype=torch.float64)
    candidates = {
        RELU: F.relu(_PROBE), GELU: F.gelu(_PROBE), GELU_TANH: F.gelu(_PROBE, approximate="tanh"),
        SILU: F.silu(_PROBE),
    }
    for base, ref in candidates.items():
        if got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-6, atol=1e-7):
            return base
    raise ValueError(f"unsupported activation {type(act_mod).__name__}: it matches none of "
                     f"{sorted(n for n in ACTIVATIONS if not get_activation(n).gated)}")


