"""Model shapes the planner knows: built-in decoder configs and Hugging Face ``config.json`` files.

Only what the planner needs (sizes, heads, vocabulary, activation, biases) is kept; nothing is
downloaded. The built-in values are the published shapes of these models.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: RMSNorm pre-norm blocks of attention and a gated MLP."""

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
        if self.activation != "swiglu":
            raise ValueError(f"config {self.name!r}: activation {self.activation!r} is not supported (swiglu only)")

    def num_parameters(self) -> int:
        d, f, H, Hkv, D, V = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                              self.head_dim, self.vocab_size)
        attn = d * H * D + 2 * d * Hkv * D + H * D * d
        attn += (H * D + 2 * Hkv * D) if self.qkv_bias else 0
        attn += d if self.o_bias else 0
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else V * d
        return V * d + self.num_layers * layer + d + head


BUILTIN_CONFIGS = {
    "llama-7b": ModelConfig("llama-7b", 4096, 11008, 32, 32, 32, 32000, rope_theta=10000.0),
    "llama3-8b": ModelConfig("llama3-8b", 4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0),
    "mistral-7b": ModelConfig("mistral-7b", 4096, 14336, 32, 32, 8, 32000, rope_theta=10000.0,
                              sliding_window=4096, model_type="mistral"),
    "qwen2-7b": ModelConfig("qwen2-7b", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True, rope_theta=1000000.0,
                            model_type="qwen2"),
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


def config_from_dict(d: Mapping[str, Any], source: str = "config") -> ModelConfig:
    """A :class:`ModelConfig` from a Hugging Face config dict (llama, mistral or qwen2). Every
    value the planner uses is checked; errors name ``source`` (e.g. the file) and the key."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {mt!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (the planner models SwiGLU MLPs)")
    heads = _get(d, "num_attention_heads", source)
    rope = d.get("rope_parameters")
    if isinstance(rope, Mapping) and rope.get("rope_theta") is not None:
        theta = _get(rope, "rope_theta", f"{source}: rope_parameters", kind=float)
    else:
        theta = _get(d, "rope_theta", source, 10000.0, float)
    window = _get(d, "sliding_window", source, None)  # checked whenever given, used when enabled
    if not (mt == "mistral" or _get(d, "use_sliding_window", source, False, bool)):
        window = None
    cfg = ModelConfig(
        name=source,
        hidden_size=_get(d, "hidden_size", source),
        intermediate_size=_get(d, "intermediate_size", source),
        num_layers=_get(d, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=_get(d, "num_key_value_heads", source, heads),
        vocab_size=_get(d, "vocab_size", source),
        head_dim=_get(d, "head_dim", source, None),
        qkv_bias=True if mt == "qwen2" else _get(d, "attention_bias", source, False, bool),
        o_bias=False if mt == "qwen2" else _get(d, "attention_bias", source, False, bool),
        mlp_bias=_get(d, "mlp_bias", source, False, bool),
        tie_word_embeddings=_get(d, "tie_word_embeddings", source, False, bool),
        rope_theta=float(theta),
        sliding_window=window,
        model_type=mt,
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
