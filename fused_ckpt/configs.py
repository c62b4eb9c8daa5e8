"""Model shapes the planner knows: built-in decoder configs and Hugging Face ``config.json`` files.

Only what the planner needs (sizes, heads, vocabulary, activation, biases, norm kind and
placement) is kept; nothing is downloaded. The built-in values are the published shapes of these
models (``config.json`` of meta-llama/Llama-2-7b-hf, Meta-Llama-3-8B, Mistral-7B-v0.1, Qwen2-7B,
Qwen3-8B, google/gemma-2-9b, EleutherAI/gpt-neox-20b); tests/test_planner_configs.py checks each
one's parameter count against the Hugging Face model class built on the meta device.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional

from .activations import ACTIVATIONS
from .ops.block import PLACEMENT_NORMS, PLACEMENTS

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt_neox")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder of repeated attention + MLP blocks. The defaults are the Llama layout (RMSNorm
    pre-norm blocks, SwiGLU MLP, full rotary); the other fields describe the families' differences:

    ==========================  ===============================================================
    ``activation``              a :data:`fused_ckpt.activations.ACTIVATIONS` name: gated
                                (``swiglu``, ``geglu_tanh``: Gemma2) or not (``gelu``: GPT-NeoX,
                                ``dense_h_to_4h`` -> gelu -> ``dense_4h_to_h``)
    ``norm``                    ``"rmsnorm"`` or ``"layernorm"`` (with bias, GPT-NeoX): LayerNorm
                                keeps the per-row mean as well as the rstd
    ``placement``               where the norms sit (:data:`fused_ckpt.ops.block.PLACEMENTS`):
                                ``"pre"`` (2 per layer), ``"sandwich"`` (Gemma2: 4 per layer),
                                ``"post"`` (2, OLMo2), ``"parallel"`` (GPT-NeoX: both norms read x)
    ``qk_norm``                 a per-head RMSNorm of q and of k (Qwen3): 2 x head_dim weights
    ``rotary_dim``              rotated dims per head (GPT-NeoX ``rotary_pct`` 0.25); None: all
    ``embed_scale``             embeddings multiplied by sqrt(hidden) (Gemma), a 0-dim tensor
                                that autograd keeps
    ``final_logit_softcap``     Gemma2's ``cap * tanh(logits / cap)`` before the loss
    ``window_every``            with ``sliding_window``: layer i is windowed when
                                ``i % window_every == 0`` (Gemma2: 2, every other layer)
    ==========================  ===============================================================
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    activation: str = "swiglu"
    head_dim: Optional[int] = None
    qkv_bias: bool = False            # q/k/v projection biases (Qwen2: True)
    o_bias: bool = False              # o_proj bias (Llama attention_bias)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None
    model_type: str = "llama"
    norm: str = "rmsnorm"
    placement: str = "pre"
    qk_norm: bool = False
    rotary_dim: Optional[int] = None
    embed_scale: bool = False
    final_logit_softcap: Optional[float] = None
    window_every: int = 1

    def __post_init__(self):
        for n in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config {self.name!r}: {n} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config {self.name!r}: num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"config {self.name!r}: hidden_size={self.hidden_size} is not divisible by "
                                 f"num_heads={self.num_heads} and no head_dim is given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        elif not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim <= 0:
            raise ValueError(f"config {self.name!r}: head_dim must be a positive int, got {self.head_dim!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or isinstance(self.sliding_window, bool) or self.sliding_window <= 0):
            raise ValueError(f"config {self.name!r}: sliding_window must be a positive int or None, "
                             f"got {self.sliding_window!r}")
        if (not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool)
                or not math.isfinite(self.rope_theta) or self.rope_theta <= 0):
            raise ValueError(f"config {self.name!r}: rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"config {self.name!r}: activation {self.activation!r} is not one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"config {self.name!r}: norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"config {self.name!r}: placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.rotary_dim is not None and (not isinstance(self.rotary_dim, int) or isinstance(self.rotary_dim, bool)
                                            or self.rotary_dim <= 0 or self.rotary_dim % 2
                                            or self.rotary_dim > self.head_dim):
            raise ValueError(f"config {self.name!r}: rotary_dim must be an even int in (0, head_dim={self.head_dim}], "
                             f"got {self.rotary_dim!r}")
        if self.final_logit_softcap is not None and (
                not isinstance(self.final_logit_softcap, (int, float)) or isinstance(self.final_logit_softcap, bool)
                or not math.isfinite(self.final_logit_softcap) or self.final_logit_softcap <= 0):
            raise ValueError(f"config {self.name!r}: final_logit_softcap must be a positive number or None, "
                             f"got {self.final_logit_softcap!r}")
        if not isinstance(self.window_every, int) or isinstance(self.window_every, bool) or self.window_every <= 0:
            raise ValueError(f"config {self.name!r}: window_every must be a positive int, got {self.window_every!r}")

    @property
    def gated(self) -> bool:
        return ACTIVATIONS[self.activation].gated

    @property
    def norms_per_layer(self) -> int:
        return len(PLACEMENT_NORMS[self.placement])

    @property
    def rotated_dims(self) -> int:
        """Dims per head that rotary embeddings rotate."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def windowed(self, layer: int) -> bool:
        """Whether layer ``layer`` has a sliding window."""
        return self.sliding_window is not None and layer % self.window_every == 0

    def num_parameters(self) -> int:
        d, f, H, Hkv, D, V = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                              self.head_dim, self.vocab_size)
        attn = d * H * D + 2 * d * Hkv * D + H * D * d
        attn += (H * D + 2 * Hkv * D) if self.qkv_bias else 0
        attn += d if self.o_bias else 0
        attn += 2 * D if self.qk_norm else 0
        fc1 = 2 * f if self.gated else f
        mlp = (fc1 + f) * d + ((fc1 + d) if self.mlp_bias else 0)
        norm = 2 * d if self.norm == "layernorm" else d  # LayerNorm: weight and bias
        layer = attn + mlp + self.norms_per_layer * norm
        head = 0 if self.tie_word_embeddings else V * d
        return V * d + self.num_layers * layer + norm + head


BUILTIN_CONFIGS = {
    "llama-7b": ModelConfig("llama-7b", 4096, 11008, 32, 32, 32, 32000, rope_theta=10000.0),
    "llama3-8b": ModelConfig("llama3-8b", 4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0),
    "mistral-7b": ModelConfig("mistral-7b", 4096, 14336, 32, 32, 8, 32000, rope_theta=10000.0,
                              sliding_window=4096, model_type="mistral"),
    "qwen2-7b": ModelConfig("qwen2-7b", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True, rope_theta=1000000.0,
                            model_type="qwen2"),
    "qwen3-8b": ModelConfig("qwen3-8b", 4096, 12288, 36, 32, 8, 151936, head_dim=128, qk_norm=True,
                            rope_theta=1000000.0, model_type="qwen3"),
    # query_pre_attn_scalar 256 and the attention logit softcap 50 change neither bytes nor GEMM FLOPs
    "gemma2-9b": ModelConfig("gemma2-9b", 3584, 14336, 42, 16, 8, 256000, activation="geglu_tanh", head_dim=256,
                             tie_word_embeddings=True, placement="sandwich", embed_scale=True,
                             final_logit_softcap=30.0, sliding_window=4096, window_every=2, model_type="gemma2"),
    "gpt-neox-20b": ModelConfig("gpt-neox-20b", 6144, 24576, 44, 64, 64, 50432, activation="gelu", qkv_bias=True,
                                o_bias=True, mlp_bias=True, norm="layernorm", placement="parallel", rotary_dim=24,
                                rope_theta=10000.0, model_type="gpt_neox"),
}


def _get(d: Mapping[str, Any], key: str, source: str, default=..., kind=int):
    """``d[key]`` checked: ``kind`` int (a positive integer), bool, or float (a positive finite
    number); a missing or null key is ``default`` (required when not given)."""
    if key not in d or d[key] is None:
        if default is ...:
            raise ValueError(f"{source}: missing required key {key!r}")
        return default
    v = d[key]
    if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
        raise ValueError(f"{source}: {key} must be a positive integer, got {v!r}")
    if kind is bool and not isinstance(v, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {v!r}")
    if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0):
        raise ValueError(f"{source}: {key} must be a positive number, got {v!r}")
    return v


def _family_fields(d: Mapping[str, Any], source: str, mt: str, heads: int) -> dict:
    """The :class:`ModelConfig` fields in which the supported families differ, read from ``d``."""
    if mt == "gemma2":
        act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"{source}: hidden_activation {act!r} is not supported for gemma2 (gelu_pytorch_tanh: "
                             "GeGLU with the tanh GELU)")
        window = _get(d, "sliding_window", source, None)
        types = d.get("layer_types")
        if window is not None and types is not None and list(types) != [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(len(types))]:
            raise ValueError(f"{source}: layer_types {list(types)!r} are not supported (the planner models Gemma2's "
                             "alternating sliding / full layers, starting with sliding)")
        bias = _get(d, "attention_bias", source, False, bool)
        cap = d.get("final_logit_softcapping")
        return dict(activation="geglu_tanh", num_kv_heads=_get(d, "num_key_value_heads", source, heads),
                    head_dim=_get(d, "head_dim", source, 256), qkv_bias=bias, o_bias=bias,
                    tie_word_embeddings=_get(d, "tie_word_embeddings", source, True, bool), placement="sandwich",
                    embed_scale=True, sliding_window=window, window_every=2,
                    final_logit_softcap=None if cap is None else _get(d, "final_logit_softcapping", source, kind=float))
    if mt == "gpt_neox":
        acts = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
        act = d.get("hidden_act", "gelu")
        if act not in acts:
            raise ValueError(f"{source}: hidden_act {act!r} is not supported for gpt_neox ({', '.join(acts)})")
        for key in ("hidden_dropout", "attention_dropout"):
            v = d.get(key) or 0.0
            if v != 0.0:
                raise ValueError(f"{source}: {key}={v!r}: dropout masks are not modelled by the planner (0 only)")
        rope = d.get("rope_parameters")
        pct = rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None
        pct = pct if pct is not None else d.get("rotary_pct", 1.0)
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 1:
            raise ValueError(f"{source}: partial_rotary_factor / rotary_pct must be in (0, 1], got {pct!r}")
        hidden = _get(d, "hidden_size", source)
        head_dim = hidden // heads  # GPTNeoXAttention: hidden_size // num_attention_heads
        rotary = int(head_dim * pct)  # as Hugging Face's rotary embedding rounds it
        bias = _get(d, "attention_bias", source, True, bool)
        return dict(activation=acts[act], num_kv_heads=heads, head_dim=head_dim, qkv_bias=bias, o_bias=bias,
                    mlp_bias=True, tie_word_embeddings=_get(d, "tie_word_embeddings", source, False, bool),
                    norm="layernorm",
                    placement="parallel" if _get(d, "use_parallel_residual", source, True, bool) else "pre",
                    rotary_dim=None if rotary == head_dim else rotary)
    # llama, mistral, qwen2, qwen3: RMSNorm pre-norm layers with a SwiGLU MLP
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (the planner models SwiGLU MLPs)")
    window = _get(d, "sliding_window", source, None)  # checked whenever given, used when enabled
    use_window = _get(d, "use_sliding_window", source, False, bool)
    if mt == "qwen3" and use_window:
        raise ValueError(f"{source}: use_sliding_window=true is not supported for qwen3 (its windowed layers, from "
                         "max_window_layers on, are not modelled)")
    if not (mt == "mistral" or use_window):
        window = None
    bias = _get(d, "attention_bias", source, False, bool)
    return dict(num_kv_heads=_get(d, "num_key_value_heads", source, heads), head_dim=_get(d, "head_dim", source, None),
                qkv_bias=True if mt == "qwen2" else bias, o_bias=False if mt == "qwen2" else bias,
                mlp_bias=_get(d, "mlp_bias", source, False, bool),
                tie_word_embeddings=_get(d, "tie_word_embeddings", source, False, bool), sliding_window=window,
                qk_norm=mt == "qwen3")


def config_from_dict(d: Mapping[str, Any], source: str = "config") -> ModelConfig:
    """A :class:`ModelConfig` from a Hugging Face config dict (llama, mistral, qwen2, qwen3, gemma2
    or gpt_neox). Every value the planner uses is checked; errors name ``source`` (e.g. the file)
    and the key; a setting the planner does not model (another activation, dropout, an unusual
    window pattern) is refused by name."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {mt!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    heads = _get(d, "num_attention_heads", source)
    rope = d.get("rope_parameters")
    if isinstance(rope, Mapping) and rope.get("rope_theta") is not None:
        theta = _get(rope, "rope_theta", f"{source}: rope_parameters", kind=float)
    elif mt == "gpt_neox" and d.get("rotary_emb_base") is not None:  # older GPT-NeoX config.json files
        theta = _get(d, "rotary_emb_base", source, kind=float)
    else:
        theta = _get(d, "rope_theta", source, 10000.0, float)
    cfg = ModelConfig(
        name=source,
        hidden_size=_get(d, "hidden_size", source),
        intermediate_size=_get(d, "intermediate_size", source),
        num_layers=_get(d, "num_hidden_layers", source),
        num_heads=heads,
        vocab_size=_get(d, "vocab_size", source),
        rope_theta=float(theta),
        model_type=mt,
        **_family_fields(d, source, mt, heads),
    )
    name = d.get("_name_or_path")
    return replace(cfg, name=name) if isinstance(name, str) and name else cfg


def load_config(spec) -> ModelConfig:
    """A built-in name (:data:`BUILTIN_CONFIGS`), a path to a ``config.json`` (or a folder that
    holds one), a dict, a Hugging Face ``PretrainedConfig`` or a :class:`ModelConfig`."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, Mapping):
        return config_from_dict(spec)
    if hasattr(spec, "to_dict") and hasattr(spec, "model_type"):  # transformers PretrainedConfig
        d = spec.to_dict()
        d.setdefault("model_type", spec.model_type)
        return config_from_dict(d, type(spec).__name__)
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s in BUILTIN_CONFIGS:
            return BUILTIN_CONFIGS[s]
        path = os.path.join(s, "config.json") if os.path.isdir(s) else s
        if not os.path.isfile(path):
            raise ValueError(f"unknown model {s!r}: not a built-in config ({', '.join(BUILTIN_CONFIGS)}) "
                             "and no such config.json file")
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: malformed JSON ({e})") from None
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
        cfg = config_from_dict(d, path)
        return cfg if d.get("_name_or_path") else replace(cfg, name=path)
    raise ValueError(f"cannot read a model config from {type(spec).__name__}")


__all__ = ["ModelConfig", "BUILTIN_CONFIGS", "load_config", "config_from_dict", "SUPPORTED_MODEL_TYPES"]
