"""Model hyperparameters, read from a Hugging Face `config.json` dict.

The one place that knows architecture names: it turns them into flags (biases, q/k norm), and
everything downstream branches on those flags only.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .errors import FormatError, UnsupportedModelError

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

# Ranges a config value must lie in (ConfigError otherwise). Generous for real models (the largest
# open ones: hidden 16384-25600, FFN 53248-131072, 126 layers, 128 heads, vocab 256000, 1M context);
# what bounds memory is that every dimension must also match the arrays stored in the file.
MAX_HIDDEN = 1 << 17
MAX_INTERMEDIATE = 1 << 20
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 30


def _short(value, limit: int = 60) -> str:
    """A value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def is_int(v) -> bool:
    """An integer, not a bool (JSON true/false are ints to Python)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def is_number(v) -> bool:
    """A finite real number, not a bool."""
    return (isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"
            and math.isfinite(v))


class ConfigError(FormatError):
    """A config (a checkpoint's config.json or an .ebin's manifest) lacks a key the model needs, or
    holds a value of the wrong type or range; the message names the key."""


class _Reader:
    """Typed, ranged reads of config keys; ConfigError names the key and the value."""

    def __init__(self, cfg: dict, prefix: str = ""):
        self.cfg, self.prefix = cfg, prefix

    def int(self, key: str, lo: int, hi: int, default=...) -> int:
        v = self.cfg.get(key)
        if v is None:
            if default is ...:
                raise ConfigError(f"config: '{self.prefix}{key}' is missing")
            if default is None:
                return None
            v = default
        if not is_int(v) or not lo <= v <= hi:
            raise ConfigError(f"config: '{self.prefix}{key}' must be an integer in {lo}..{hi}, got {_short(v)}")
        return int(v)

    def float(self, key: str, lo: float, hi: float, default=..., low_open: bool = False) -> float:
        v = self.cfg.get(key)
        if v is None:
            if default is ...:
                raise ConfigError(f"config: '{self.prefix}{key}' is missing")
            v = default
        if not is_number(v) or not (lo < v if low_open else lo <= v) or v > hi:
            interval = f"{'(' if low_open else '['}{lo:g}, {hi:g}]"
            raise ConfigError(f"config: '{self.prefix}{key}' must be a number in {interval}, got {_short(v)}")
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self.cfg.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(f"config: '{self.prefix}{key}' must be true or false, got {_short(v)}")
        return v


def _rope_scaling(scaling):
    """The rope scaling dict, checked: None (default), linear (factor) or llama3."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"config: rope_scaling must be an object, got {_short(scaling)}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling {_short(rope_type)} is not supported; supported: {', '.join(ROPE_TYPES)}")
    get = _Reader(scaling, "rope_scaling.")
    get.float("factor", 0.0, 1e6, low_open=True)
    if rope_type == "llama3":
        low = get.float("low_freq_factor", 0.0, 1e6, low_open=True)
        high = get.float("high_freq_factor", 0.0, 1e6, low_open=True)
        get.float("original_max_position_embeddings", 0.0, MAX_POSITIONS, low_open=True)
        if high <= low:
            raise ConfigError(f"config: rope_scaling high_freq_factor {high:g} must exceed "
                              f"low_freq_factor {low:g}")
    return scaling


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
        """Validate an HF config dict; unknown keys are ignored, unsupported features are errors.

        Every value the forward pass uses is typed and ranged here (ConfigError otherwise), so
        a crafted config cannot reach the kernels with a zero, negative or absurd dimension."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"config is not an object: {_short(cfg)}")
        archs = cfg.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"config: 'architectures' must be a list of names, got {_short(archs)}")
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if not archs:
            raise UnsupportedModelError(f"config names no architecture (model_type {_short(cfg.get('model_type'))}); "
                                        f"supported: {', '.join(sorted(ARCHITECTURES))}")
        if arch is None:
            name = archs[0]
            raise UnsupportedModelError(
                f"architecture {_short(name)} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
        flags = ARCHITECTURES[arch]
        get = _Reader(cfg)
        attention_bias = get.flag("attention_bias", False)
        hidden = get.int("hidden_size", 1, MAX_HIDDEN)
        heads = get.int("num_attention_heads", 1, MAX_HEADS)
        kv_heads = get.int("num_key_value_heads", 1, heads, default=heads)
        if heads % kv_heads:
            raise ConfigError(f"config: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
        head_dim = get.int("head_dim", 2, MAX_HEAD_DIM, default=hidden // heads)
        if head_dim % 2:
            raise ConfigError(f"config: head_dim {head_dim} must be even (RoPE rotates pairs)")
        # transformers >= 5 writes `rope_parameters` (theta and scaling together); older, `rope_theta`
        # plus an optional `rope_scaling`.
        rope = cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"config: rope_parameters must be an object, got {_short(rope)}")
        rope = dict(rope)
        theta = rope.pop("rope_theta", None)
        if cfg.get("rope_theta") is not None:
            theta = cfg["rope_theta"]
        rope_theta = _Reader({"rope_theta": theta}).float("rope_theta", 0.0, 1e30, default=10000.0, low_open=True)
        rope_scaling = _rope_scaling(cfg.get("rope_scaling") or rope or None)
        window = get.int("sliding_window", 1, MAX_POSITIONS, default=None)
        if not get.flag("use_sliding_window", True):
            window = None
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=get.int("intermediate_size", 1, MAX_INTERMEDIATE),
            num_layers=get.int("num_hidden_layers", 1, MAX_LAYERS),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=get.int("vocab_size", 1, MAX_VOCAB),
            rms_norm_eps=get.float("rms_norm_eps", 0.0, 1.0, default=1e-6, low_open=True),
            rope_theta=rope_theta,
            max_position_embeddings=get.int("max_position_embeddings", 1, MAX_POSITIONS, default=4096),
            tie_word_embeddings=get.flag("tie_word_embeddings", False),
            qkv_bias=attention_bias if flags["qkv_bias"] is None else flags["qkv_bias"],
            o_bias=attention_bias if flags["o_bias"] is None else flags["o_bias"],
            mlp_bias=get.flag("mlp_bias", False),
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


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the model needs and its (logical) shape, in forward order."""
    d, f, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    shapes = {"model.embed_tokens.weight": (V, d)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{proj}.weight"] = (rows, d)
            if cfg.qkv_bias:
                shapes[p + f"self_attn.{proj}.bias"] = (rows,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = shapes[p + "self_attn.k_norm.weight"] = (D,)
        shapes[p + "self_attn.o_proj.weight"] = (d, q)
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        for proj, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            shapes[p + f"mlp.{proj}.weight"] = shape
            if cfg.mlp_bias:
                shapes[p + f"mlp.{proj}.bias"] = shape[:1]
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def tensor_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name the model needs, in forward order."""
    return list(tensor_shapes(cfg))
