"""Model hyperparameters, read from a Hugging Face `config.json` dict.

The one place that knows architecture names: it turns them into flags (biases, q/k norm), and
everything downstream branches on those flags only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UnsupportedModelError

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
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            name = archs[0] if archs else cfg.get("model_type", "unknown")
            raise UnsupportedModelError(
                f"architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
        flags = ARCHITECTURES[arch]
        attention_bias = bool(cfg.get("attention_bias", False))
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        # transformers >= 5 writes `rope_parameters` (theta and scaling together); older, `rope_theta`
        # plus an optional `rope_scaling`.
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = float(cfg.get("rope_theta") or rope.pop("rope_theta", None) or 10000.0)
        rope_scaling = cfg.get("rope_scaling") or rope or None
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope scaling {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        window = cfg.get("sliding_window")
        if not cfg.get("use_sliding_window", True):
            window = None
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if flags["qkv_bias"] is None else flags["qkv_bias"],
            o_bias=attention_bias if flags["o_bias"] is None else flags["o_bias"],
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=flags["qk_norm"],
            rope_scaling=rope_scaling,
            sliding_window=int(window) if window else None,
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
