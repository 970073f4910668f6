"""Model hyperparameters, read from a Hugging Face `config.json` dict.

The one place that knows architecture names: it turns them into flags (biases, q/k norm), and
everything downstream branches on those flags only.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .errors import EdgerunError, UnsupportedModelError

# Architecture name -> how its attention differs from plain Llama.
#   qkv_bias: q/k/v projections have biases (Qwen2); o_bias: so does o_proj (Llama attention_bias)
#   qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3)
ARCHITECTURES = {
    "LlamaForCausalLM": dict(qkv_bias=None, o_bias=None, qk_norm=False),     # None: from attention_bias
    "MistralForCausalLM": dict(qkv_bias=False, o_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": dict(qkv_bias=True, o_bias=False, qk_norm=False),
    "Qwen3ForCausalLM": dict(qkv_bias=None, o_bias=None, qk_norm=True),
}
ROPE_TYPES = ("default", "linear", "llama3")
# what each rope type reads from its scaling dict (kernels.rope_tables)
ROPE_KEYS = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


class ConfigError(EdgerunError):
    """A checkpoint's config lacks a key the model needs, or holds a value of the wrong type."""


_REQUIRED = object()


def _get(cfg: dict, key: str, kind: str, default=_REQUIRED, within: str = ""):
    """cfg[key] checked: kind "int" (an integer > 0), "number" (finite, > 0) or "bool"; a missing
    or null key gives `default`, or a ConfigError naming the key (`within` the dict holding it,
    e.g. "rope_scaling.") when there is none."""
    value = cfg.get(key)
    key = within + key
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"model config: {key!r} is missing (it must be {_KINDS[kind]})")
        return default
    ok = not isinstance(value, bool) or kind == "bool"
    if kind == "int":
        # 4096.0 from a hand-written config is an integer too
        ok = ok and isinstance(value, numbers.Real) and math.isfinite(value) and value == int(value) and value > 0
    elif kind == "number":
        ok = ok and isinstance(value, numbers.Real) and math.isfinite(value) and value > 0
    elif kind == "bool":
        ok = isinstance(value, bool) or value in (0, 1)
    if not ok:
        raise ConfigError(f"model config: {key!r} must be {_KINDS[kind]}, got {value!r}"[:300])
    return int(value) if kind == "int" else float(value) if kind == "number" else bool(value)


_KINDS = {"int": "an integer > 0", "number": "a number > 0", "bool": "true or false"}


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        """Validate an HF config dict; unknown keys are ignored, unsupported features are errors."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(cfg).__name__}")
        archs = cfg.get("architectures") or []
        archs = [archs] if isinstance(archs, str) else archs
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"model config: 'architectures' must be a list of names, got {archs!r}"[:300])
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            name = archs[0] if archs else cfg.get("model_type", "unknown")
            raise UnsupportedModelError(
                f"architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
        flags = ARCHITECTURES[arch]
        attention_bias = _get(cfg, "attention_bias", "bool", False)
        hidden = _get(cfg, "hidden_size", "int")
        heads = _get(cfg, "num_attention_heads", "int")
        kv_heads = _get(cfg, "num_key_value_heads", "int", heads)
        if heads % kv_heads:
            raise ConfigError(f"model config: num_attention_heads ({heads}) must be a multiple of "
                              f"num_key_value_heads ({kv_heads})")
        head_dim = _get(cfg, "head_dim", "int", None)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"model config: hidden_size ({hidden}) is not a multiple of num_attention_heads "
                                  f"({heads}) and there is no 'head_dim'")
            head_dim = hidden // heads
        # transformers >= 5 writes `rope_parameters` (theta and scaling together); older, `rope_theta`
        # plus an optional `rope_scaling`.
        rope = cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"model config: 'rope_parameters' must be an object, got {rope!r}"[:300])
        rope = dict(rope)
        rope_theta = (_get(cfg, "rope_theta", "number", None)
                      or _get(rope, "rope_theta", "number", 10000.0, within="rope_parameters."))
        rope.pop("rope_theta", None)
        rope_scaling = cfg.get("rope_scaling") or rope or None
        if rope_scaling is not None and not isinstance(rope_scaling, dict):
            raise ConfigError(f"model config: 'rope_scaling' must be an object, got {rope_scaling!r}"[:300])
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope scaling {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
            for key in ROPE_KEYS.get(rope_type, ()):
                _get(rope_scaling, key, "number", within="rope_scaling.")
        window = cfg.get("sliding_window") or None         # 0 or null: no window
        if not _get(cfg, "use_sliding_window", "bool", True):
            window = None
        window = _get({"sliding_window": window}, "sliding_window", "int", None)
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=_get(cfg, "intermediate_size", "int"),
            num_layers=_get(cfg, "num_hidden_layers", "int"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_get(cfg, "vocab_size", "int"),
            rms_norm_eps=_get(cfg, "rms_norm_eps", "number", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=_get(cfg, "max_position_embeddings", "int", 4096),
            tie_word_embeddings=_get(cfg, "tie_word_embeddings", "bool", False),
            qkv_bias=attention_bias if flags["qkv_bias"] is None else flags["qkv_bias"],
            o_bias=attention_bias if flags["o_bias"] is None else flags["o_bias"],
            mlp_bias=_get(cfg, "mlp_bias", "bool", False),
            qk_norm=flags["qk_norm"],
            rope_scaling=rope_scaling,
            sliding_window=window,
            raw=dict(cfg),
        )

    @property
    def parameter_count(self) -> int:
        d, f, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        per_layer += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + 2 * self.head_dim * self.qk_norm
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def kv_cache_bytes(self, context: int, itemsize: int = 2) -> int:
        """K and V for every layer at `context` positions (float16: itemsize 2)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * context * itemsize


def tensor_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name the model needs, in forward order."""
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names.append(p + "input_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj"):
            names.append(p + f"self_attn.{proj}.weight")
            if cfg.qkv_bias:
                names.append(p + f"self_attn.{proj}.bias")
        if cfg.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names.append(p + "self_attn.o_proj.weight")
        if cfg.o_bias:
            names.append(p + "self_attn.o_proj.bias")
        names.append(p + "post_attention_layernorm.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append(p + f"mlp.{proj}.weight")
            if cfg.mlp_bias:
                names.append(p + f"mlp.{proj}.bias")
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names
