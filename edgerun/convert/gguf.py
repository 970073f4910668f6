"""Read a llama.cpp GGUF checkpoint as a `Source`: HF config, HF tokenizer.json, HF tensors.

GGUF layout (ggml docs/gguf.md): a key/value metadata header (`llama.embedding_length`,
`tokenizer.ggml.tokens`, ...) then tensors named `blk.N.attn_q.weight` with their shape listed
innermost-first and stored in ggml block types (Q4_1, Q6_K, ...). We memory-map the file with
`gguf.GGUFReader` and dequantize one tensor per `read()` with `gguf.quants.dequantize`.

Undone here, so that tensors look like the HF checkpoint they came from:
- names: llama.cpp's `blk.N.ffn_up` -> HF `model.layers.N.mlp.up_proj` (table below);
- layout: GGUF shape [in, out] lists reverse to NumPy [out, in];
- llama only: convert_hf_to_gguf.py permutes q/k rows so that ggml's interleaved (GPT-J) rope
  matches HF's rotate-half rope; we apply the inverse, exactly as transformers'
  `LlamaTensorProcessor._reverse_permute_weights` does. Qwen2/Qwen3 GGUFs are not permuted.
"""
from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np

from ..errors import EdgerunError, FormatError, UnsupportedModelError
from .source import Source, SourceMeta

# general.architecture -> (HF architectures[0], HF model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# Only llama.cpp's LlamaModel converter permutes q/k (transformers un-permutes only "llama" too).
PERMUTED_ARCHITECTURES = {"llama"}

TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {  # blk.N.<key>.{weight,bias} -> model.layers.N.<value>.{weight,bias}
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling factors; HF keeps them in the config instead

DEQUANTIZABLE = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                 "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

# tokenizer.ggml.token_type values (llama.cpp llama_token_type)
TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 2, 3, 4


class GGUFSource(Source):
    """A GGUF file (llama / mistral / qwen2 / qwen3) seen through HF names and layout."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        self._kv = {name: field for name, field in self._reader.fields.items()}
        arch = self._get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path.name}: architecture {arch!r} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)}")
        self.arch = arch
        self._tensors = {}       # HF name -> ReaderTensor, in file order
        rope_freqs = None
        for t in self._reader.tensors:
            if t.name == ROPE_FREQS:
                rope_freqs = t
                continue
            if t.tensor_type.name not in DEQUANTIZABLE:
                raise UnsupportedModelError(
                    f"{self.path.name}: tensor {t.name} has ggml type {t.tensor_type.name}; "
                    f"supported: {', '.join(sorted(DEQUANTIZABLE))}")
            self._tensors[_hf_name(t.name, self.path)] = t
        if "model.embed_tokens.weight" not in self._tensors:
            raise FormatError(f"{self.path.name}: no token_embd.weight tensor")
        self.config = self._build_config(rope_freqs)
        self._permute_heads = None
        if arch in PERMUTED_ARCHITECTURES:
            self._permute_heads = {"q_proj": self.config["num_attention_heads"],
                                   "k_proj": self.config["num_key_value_heads"]}
        self.meta = self._build_meta()
        # GGUFReader keeps ~3 Python objects per vocabulary entry (160 MiB for a 49k vocab);
        # everything we need from the metadata is in self.meta now.
        self._kv = {}
        self._reader.fields = {}

    # --- Source interface -------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def tensor_nbytes(self, name: str) -> int:
        return int(self._tensor(name).n_bytes)

    def read(self, name: str) -> np.ndarray:
        """Dequantize one tensor into a new float32 array in HF layout."""
        t = self._tensor(name)
        w = np.empty(self.tensor_shape(name), dtype=np.float32)
        _dequantize_into(t, w.reshape(-1, w.shape[-1]), self.path)
        if self._permute_heads is not None:
            proj = name.split(".")[-2]
            if proj in self._permute_heads:
                w = _unpermute_rows(w, self._permute_heads[proj])
        self._release(t)
        return w

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Only `rows` of a 2-D tensor decoded (the 1.5B's embedding for the default calibration:
        2,825 distinct rows of 151,936, 0.06 s instead of 4.7 CPU s). Rows of q/k, which the GGUF
        stores permuted, come from `read`."""
        shape = self.tensor_shape(name)
        if len(shape) != 2 or (self._permute_heads is not None and name.split(".")[-2] in self._permute_heads):
            return super().read_rows(name, rows)
        t = self._tensor(name)
        out = np.empty((len(rows), shape[1]), dtype=np.float32)
        _dequantize_into(t, out, self.path, rows=np.asarray(rows, dtype=np.int64))
        self._release(t)
        return out

    def close(self) -> None:
        self._tensors = {}
        self._reader = None

    # --- helpers ------------------------------------------------------------------------------
    def _tensor(self, name):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path.name} has no tensor {name!r}") from None

    def _release(self, t) -> None:
        """Drop the tensor's pages from our RSS (they stay in the page cache): reading a model
        tensor by tensor should cost one tensor of memory, not the whole mapped file."""
        mm = getattr(self._reader.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + int(t.n_bytes) - start)
        except (OSError, ValueError, AttributeError):
            pass

    def _get(self, key, default=None):
        field = self._kv.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # a malformed field: say which
            raise FormatError(f"{self.path.name}: cannot read metadata {key}: {e}") from e

    def _arch(self, key, default=None, required=False):
        value = self._get(f"{self.arch}.{key}", default)
        if value is None and required:
            raise FormatError(f"{self.path.name}: metadata {self.arch}.{key} is missing")
        return value

    def _build_config(self, rope_freqs) -> dict:
        """config.json keys from `{arch}.*` metadata (transformers' GGUF_CONFIG_MAPPING)."""
        hf_arch, model_type = ARCHITECTURES[self.arch]
        hidden = int(self._arch("embedding_length", required=True))
        heads = _uniform(self._arch("attention.head_count", required=True), "head_count", self.path)
        kv_heads = _uniform(self._arch("attention.head_count_kv", heads), "head_count_kv", self.path)
        key_length = self._arch("attention.key_length")
        rope_dim = self._arch("rope.dimension_count")
        head_dim = int(key_length or rope_dim or hidden // heads)
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise UnsupportedModelError(
                f"{self.path.name}: partial rotary embedding (rope dims {rope_dim} of head_dim {head_dim})")
        tokens = self._kv.get("tokenizer.ggml.tokens")
        vocab = self._arch("vocab_size") or (len(tokens.data) if tokens is not None else None)
        vocab = int(vocab or self._tensors["model.embed_tokens.weight"].shape[1])
        theta = float(self._arch("rope.freq_base", 10000.0))
        bias = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        config = {
            "architectures": [hf_arch],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": int(_uniform(self._arch("feed_forward_length", required=True),
                                              "feed_forward_length", self.path)),
            "num_hidden_layers": int(self._arch("block_count", required=True)),
            "num_attention_heads": int(heads),
            "num_key_value_heads": int(kv_heads),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": float(self._arch("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
            "max_position_embeddings": int(self._arch("context_length", 2048)),
            "vocab_size": vocab,
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": True if self.arch == "qwen2" else bias,
            "mlp_bias": False,
            "rope_scaling": self._rope_scaling(rope_freqs, theta, head_dim),
        }
        for key in ("bos_token_id", "eos_token_id"):
            value = self._get(f"tokenizer.ggml.{key}")
            if value is not None:
                config[key] = int(value)
        return config

    def _rope_scaling(self, rope_freqs, theta, head_dim):
        kind = self._arch("rope.scaling.type")
        factor = self._arch("rope.scaling.factor")
        if rope_freqs is not None:
            if kind not in (None, "none"):
                raise UnsupportedModelError(
                    f"{self.path.name}: both rope_freqs and rope scaling {kind!r}")
            from gguf.quants import dequantize
            factors = dequantize(rope_freqs.data, rope_freqs.tensor_type).astype(np.float64).ravel()
            return llama3_rope_scaling(factors, theta, head_dim, self.path.name)
        if kind in (None, "none") or factor in (None, 0.0, 1.0):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            scaling = {"rope_type": "yarn", "factor": float(factor)}
            original = self._arch("rope.scaling.original_context_length")
            if original is not None:
                scaling["original_max_position_embeddings"] = int(original)
            for gguf_key, hf_key in (("rope.scaling.yarn_beta_fast", "beta_fast"),
                                     ("rope.scaling.yarn_beta_slow", "beta_slow"),
                                     ("rope.scaling.attn_factor", "attention_factor")):
                value = self._arch(gguf_key)
                if value is not None:
                    scaling[hf_key] = float(value)
            return scaling
        raise UnsupportedModelError(f"{self.path.name}: rope scaling {kind!r} is not supported")

    def _build_meta(self) -> SourceMeta:
        tok = build_tokenizer(self._get, self.path.name)
        generation = {}
        for gguf_key, hf_key in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                                 ("min_p", "min_p"), ("penalty_repeat", "repetition_penalty")):
            value = self._get(f"general.sampling.{gguf_key}")
            if value is not None:
                generation[hf_key] = value
        name = self._get("general.name", "") or ""
        types = sorted({t.tensor_type.name for t in self._tensors.values()})
        return SourceMeta(
            config=self.config,
            tokenizer_json=tok["json"],
            chat_template=self._get("tokenizer.chat_template"),
            bos_token_id=tok["bos_token_id"],
            eos_token_ids=tok["eos_token_ids"],
            add_bos_token=tok["add_bos_token"],
            generation=generation,
            special_tokens=tok["special_tokens"],
            description=f"GGUF {self.path.name}: {name} ({self.arch}, {'/'.join(types)})".strip(),
        )


# --- file and tensor helpers ------------------------------------------------------------------
def _open_reader(path: Path):
    import gguf

    if not path.is_file():
        raise EdgerunError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/KeyError/IndexError on bad or short files
        raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


CHUNK_BYTES = 16 << 20   # dequantize at most this much float32 at a time


def _dequantize_into(t, out: np.ndarray, path: Path, rows: np.ndarray | None = None) -> None:
    """Decode tensor `t` (or only its `rows`) into `out` (rows, cols) a few MiB at a time:
    gguf.quants builds several temporaries the size of its output, so whole-tensor calls would
    multiply peak memory."""
    from gguf.quants import dequantize

    data = t.data.reshape(int(np.prod(t.shape[1:])), -1)   # one row of blocks (or values) per tensor row
    step = max(1, CHUNK_BYTES // (4 * out.shape[1]))
    try:
        for r in range(0, out.shape[0], step):
            out[r:r + step] = dequantize(data[r:r + step] if rows is None else data[rows[r:r + step]], t.tensor_type)
    except (ValueError, NotImplementedError) as e:
        raise FormatError(f"{path.name}: cannot decode tensor {t.name}: {e}") from e


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise UnsupportedModelError(f"{path.name}: tensor {gguf_name!r} has no Hugging Face counterpart")


def _uniform(value, what, path):
    """Some GGUFs store per-layer lists (head counts, FFN widths); we need one value."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{path.name}: per-layer {what} {sorted(set(value))}")
        value = value[0]
    return int(value)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py `LlamaModel.permute`: within each head, rows were
    reordered (half, pair) -> (pair, half); swap back to HF's rotate-half order."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def llama3_rope_scaling(factors, theta, head_dim, where="GGUF", original_context=8192):
    """Rebuild HF's llama3 `rope_scaling` from llama.cpp's per-frequency `rope_freqs` divisors.

    convert_hf_to_gguf.py writes, per inverse frequency with wavelength λ: 1 if λ < L/hf,
    `factor` if λ > L/lf, else 1/((1-s)/factor + s) with s = (L/λ - lf)/(hf - lf). The result
    depends on L only through L/lf and L/hf, so any L gives the same rope; we take Llama 3's
    8192, fit lf and hf on the smooth band (s is linear in 1/λ), and check every value.
    """
    factors = np.asarray(factors, dtype=np.float64)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise UnsupportedModelError(f"{where}: rope_freqs has {factors.size} values, expected {inv_freq.size}")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    wavelen = 2 * math.pi / inv_freq
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if band.sum() < 2:
        raise UnsupportedModelError(f"{where}: cannot reconstruct llama3 rope scaling from rope_freqs")
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[band], smooth, 1)   # s = slope/λ + intercept
    low = -intercept * original_context / slope
    high = low + original_context / slope
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
               "high_freq_factor": float(high), "original_max_position_embeddings": original_context}
    if not np.allclose(llama3_rope_factors(scaling, wavelen), factors, rtol=1e-4, atol=1e-5):
        raise UnsupportedModelError(f"{where}: rope_freqs do not follow llama3 rope scaling")
    return scaling


def llama3_rope_factors(scaling, wavelen):
    """The divisors llama.cpp stores for HF llama3 rope scaling (convert_hf_to_gguf.py)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


# --- tokenizer ----------------------------------------------------------------------------------
# tokenizer.ggml.pre -> how llama.cpp (llama-vocab.cpp) splits text before byte-level BPE, as
# the Hugging Face pre-tokenizer of the original tokenizer.json.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {   # name -> (style, llama.cpp's default add_bos)
    "default": ("gpt2", False), "gpt-2": ("gpt2", False),
    "smollm": ("smollm", False),
    "llama3": ("llama3", True), "llama-v3": ("llama3", True), "llama-bpe": ("llama3", True),
    "qwen2": ("qwen2", False), "deepseek-r1-qwen": ("qwen2", False),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE tokens)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(get, where="GGUF") -> dict:
    """tokenizer.json text plus special ids from `tokenizer.ggml.*` metadata (`get(key, default)`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = get("tokenizer.ggml.model")
    tokens = get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise FormatError(f"{where}: no tokenizer.ggml.model / tokenizer.ggml.tokens metadata")
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    bos_id, eos_id = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
    unk_id, pad_id = get("tokenizer.ggml.unknown_token_id"), get("tokenizer.ggml.padding_token_id")
    merges = get("tokenizer.ggml.merges")

    if kind == "gpt2":
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedModelError(
                f"{where}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}")
        style, default_bos = PRE_TOKENIZERS[pre]
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # A token outside the byte alphabet is stored raw; respell it (transformers does the same).
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
                   for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        tok = Tokenizer(models.BPE(vocab, [_split_merge(m) for m in merges or []],
                                   ignore_merges=(style == "llama3")))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style in ("gpt2", "smollm"))
        if style == "smollm":    # llama.cpp: "\p{N}" first, then GPT-2's regex
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         byte_level])
        elif style in ("llama3", "qwen2"):
            from tokenizers import Regex
            split = _LLAMA3_SPLIT if style == "llama3" else _QWEN2_SPLIT
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        if style == "qwen2":
            tok.normalizer = normalizers.NFC()    # as in Qwen2's own tokenizer.json
        tok.decoder = decoders.ByteLevel()
        special = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL and set(t) <= alphabet]
        user = [t for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED and t in vocab]
        add_space_prefix = False
    elif kind == "llama":
        default_bos = True
        add_space_prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
        vocab = {t: i for i, t in enumerate(tokens)}
        scores = get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        pairs = [_split_merge(m) for m in merges] if merges else _merges_from_scores(tokens, scores, vocab)
        unk = tokens[unk_id] if unk_id is not None else None
        tok = Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
        special = [t for t, ty in zip(tokens, types) if ty in (TOKEN_UNKNOWN, TOKEN_CONTROL)]
        user = [t for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    else:
        raise UnsupportedModelError(
            f"{where}: tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece)")

    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    add_bos = bool(get("tokenizer.ggml.add_bos_token", default_bos)) and bos_id is not None
    add_eos = bool(get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    tok.post_processor = _post_processor(processors, tokens, bos_id if add_bos else None,
                                         eos_id if add_eos else None, byte_level=(kind == "gpt2"))

    eos_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    names = {"bos_token": bos_id, "eos_token": eos_id, "unk_token": unk_id, "pad_token": pad_id}
    return {
        "json": tok.to_str(),
        "bos_token_id": None if bos_id is None else int(bos_id),
        "eos_token_ids": eos_ids,
        "add_bos_token": add_bos,
        "add_space_prefix": add_space_prefix,
        "special_tokens": {k: tokens[int(v)] for k, v in names.items() if v is not None and int(v) < len(tokens)},
    }


def _split_merge(merge: str) -> tuple[str, str]:
    """'a b' -> ('a', 'b'); llama.cpp splits at the first space after the first character."""
    pos = merge.find(" ", 1)
    return merge[:pos], merge[pos + 1:]


def _merges_from_scores(tokens, scores, vocab):
    """SentencePiece BPE has no merge list: every split of a token into two vocabulary tokens is
    a merge, ranked by the merged token's score (transformers' `generate_merges`, same order)."""
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _post_processor(processors, tokens, bos_id, eos_id, byte_level):
    """BOS/EOS added by `encode(..., add_special_tokens=True)` as llama.cpp's add_bos/add_eos say."""
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    if bos_id is not None or eos_id is not None:
        ids = [i for i in (bos_id, eos_id) if i is not None]
        pre = f"{tokens[bos_id]}:0 " if bos_id is not None else ""
        post = f" {tokens[eos_id]}:0" if eos_id is not None else ""
        pre_b = f"{tokens[bos_id]}:1 " if bos_id is not None else ""
        post_b = f" {tokens[eos_id]}:1" if eos_id is not None else ""
        steps.append(processors.TemplateProcessing(
            single=f"{pre}$A:0{post}", pair=f"{pre}$A:0{post} {pre_b}$B:1{post_b}",
            special_tokens=sorted({(tokens[i], int(i)) for i in ids})))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)
