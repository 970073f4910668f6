"""The transformer forward pass (Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3).

Reads top-down like llama2.c's `forward`: one preallocated `RunState`, one KV cache, and per
layer a handful of kernel calls. It never looks at weight formats or architecture names: each
linear is a codec object with `matvec` (one token) and `matmul` (a prefill chunk), and the
architecture differences arrive as config flags (biases, q/k norm).

Placement is decided when the model is built, from the plan (edgerun/plan.py), as components the
one forward pass calls: each layer runs on a device's ops (`HostOps` here; edgerun/cuda's
`DeviceOps` offer the same operations on a GPU's arrays), and its feed-forward is a component
(`SwiGLU` on the layer's device, or streaming.FlashFFN reading neuron bundles from flash).
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .codecs import get_codec
from .config import ModelConfig
from .errors import Cancelled, EdgerunError
from .memory import lazy_zeros, trim_heap


# Layer field -> HF tensor name under `model.layers.{i}.`
LAYER_TENSORS = {
    "input_norm": "input_layernorm.weight", "post_norm": "post_attention_layernorm.weight",
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight", "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias", "o_bias": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
    "gate_bias": "mlp.gate_proj.bias", "up_bias": "mlp.up_proj.bias", "down_bias": "mlp.down_proj.bias",
}


# Linears that read the same input; placement may join each set into one StackedLinear
QKV, GATE_UP = ("q", "k", "v"), ("gate", "up")


class StackedLinear:
    """Linears of one input joined by rows (`Linear.stack`, e.g. q/k/v): one kernel call computes
    all their outputs into a shared buffer, which is then split. A one-token matvec prepares its
    input once and runs one parallel region instead of one per matrix — on a 135M model the
    per-call costs were ~0.6 ms of a 9 ms token (BENCHMARKS.md)."""

    def __init__(self, w, rows: list):
        self.w = w
        self.bounds = np.cumsum([0] + rows).tolist()

    @classmethod
    def of(cls, linears: list) -> "StackedLinear | None":
        """The linears joined, or None when one is absent or their codec cannot join them."""
        if any(w is None for w in linears):
            return None
        joined = type(linears[0]).stack(linears)          # codecs.base.Linear.stack: None by default
        return None if joined is None else cls(joined, [w.shape[0] for w in linears])

    def __call__(self, x, outs, buf) -> list:
        """x (T, n) @ W_j.T for each member j, computed into buf (>= T · sum of d_j floats)
        scratch: one token's results are returned as views of buf (contiguous), a chunk's are
        copied into outs[j] (T, d_j) and those returned."""
        T = x.shape[0]
        joined = buf[:T * self.bounds[-1]].reshape(T, -1)    # C-contiguous: the kernels' layout
        _linear(self.w, x, joined)
        parts = [joined[:, a:b] for a, b in zip(self.bounds, self.bounds[1:])]
        if T == 1:
            return parts
        for out, part in zip(outs, parts):
            out[...] = part
        return list(outs)


class SwiGLU:
    """The feed-forward on the layer's own device: h += down(silu(gate x) * up x). Stateless: it
    reads the layer's weights at each call (pack-time code swaps them)."""

    def __call__(self, ops, L, x, h) -> None:
        T = x.shape[0]
        gate, up = ops.linears(L, GATE_UP, x, (ops.st.gate[:T], ops.st.up[:T]))
        ops.silu_mul(gate, up, gate)
        ops.linear(L.down, gate, h, L.down_bias, accumulate=True)


SWIGLU = SwiGLU()


@dataclass
class Layer:
    """One transformer block's weights: linears are codec objects (matvec/matmul), vectors f32;
    optional ones (biases, q/k norms) are None when absent."""
    input_norm: np.ndarray
    post_norm: np.ndarray
    q: object
    k: object
    v: object
    o: object
    gate: object
    up: object
    down: object
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    gate_bias: np.ndarray | None = None
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None
    # The feed-forward component: ffn(ops, layer, x (T, d), h (T, d)) adds down(silu(gate x) * up x)
    # to h. SWIGLU computes it from gate/up/down above; streaming.FlashFFN from bundles on flash.
    ffn: object = SWIGLU
    # names (QKV or GATE_UP) -> the StackedLinear that replaced those fields (they are then None)
    stacked: dict = field(default_factory=dict)

    @classmethod
    def from_tensors(cls, get, i: int) -> "Layer":
        """`get(hf_name)` returns the loaded tensor or None."""
        return cls(**{field: get(f"model.layers.{i}.{name}") for field, name in LAYER_TENSORS.items()})


def load_tensor(entry: dict, parts: dict):
    """A manifest tensor entry + its part arrays -> a codec Linear (matrices) or float32 (vectors);
    a rotated matrix (entry "rotation") is its codec's Linear behind codecs.rotation's."""
    codec = get_codec(entry["codec"])
    if len(entry["shape"]) != 2:
        return np.ascontiguousarray(codec.decode(parts, entry["params"]), dtype=np.float32)
    if "rotation" not in entry:
        return codec.load(parts, entry["params"])
    from .codecs.rotation import SIGNS_PART, RotatedLinear
    parts = dict(parts)
    signs = parts.pop(SIGNS_PART)
    return RotatedLinear(codec.load(parts, entry["params"]), signs, entry["rotation"]["block"])


class MappedRows:
    """An embedding whose row parts are mapped from the file (plan.mapped_parts): a lookup reads
    its row's pages, and every MAPPED_LOOKUPS lookups the pages touched are handed back (clean
    file pages: they stay in the page cache), so the mapping holds a few rows' pages of RSS
    instead of the whole matrix. Reading the file while another program truncates it is the
    risk every mapping takes (SIGBUS): a loaded pack must not be rewritten in place (pack
    writes a new file and renames it)."""

    def __init__(self, linear, maps: list):
        from .plan import MAPPED_LOOKUPS
        self.linear, self.maps, self.every, self.lookups = linear, maps, MAPPED_LOOKUPS, 0
        self.shape = linear.shape
        self.release()              # what loading and checking the parts touched

    def row(self, i: int, out) -> None:
        """out (n,) = row i of the weight (as the codec's row)."""
        self.linear.row(i, out)
        self.lookups += 1
        if self.lookups >= self.every:
            self.release()

    def release(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):      # not on Windows: the OS trims the mapping itself
            for mm in self.maps:
                mm.madvise(mmap.MADV_DONTNEED)
        self.lookups = 0


class Weights:
    """Every tensor of the model by HF name."""

    def __init__(self, tensors: dict, cfg: ModelConfig, nbytes: int = 0):
        self.tensors = tensors
        self.nbytes = nbytes
        if cfg.tie_word_embeddings:
            self.tensors["lm_head.weight"] = self.tensors["model.embed_tokens.weight"]

    @classmethod
    def from_ebin(cls, ebin, cfg: ModelConfig, progress=None, read_parts=None, total: int | None = None,
                  mapped: dict | None = None) -> "Weights":
        """Read every tensor; `read_parts(name, entry) -> {part: array}` may read a subset (e.g. a
        BitStack prefix); `mapped` {tensor: parts} are left in the file (plan.mapped_parts,
        MappedRows); `progress(done_bytes, total_bytes)` after each tensor."""
        entries = ebin.manifest["tensors"]
        if total is None:
            total = sum(ebin.arrays[a].length for e in entries.values() for a in e["parts"].values())
        from .validate import check_linear, check_parts
        done = 0
        tensors = {}
        for name, entry in entries.items():
            # every array's crc32 is checked as it is read (EbinFile.read), the index parts'
            # contents before the codec builds its kernels' view, the result's shape after
            in_file = (mapped or {}).get(name, ())
            maps = {p: ebin.map(a) for p, a in entry["parts"].items() if p in in_file}
            if read_parts is not None and not maps:
                parts = read_parts(name, entry)
            else:
                parts = {p: maps[p][0] if p in maps else ebin.read(a) for p, a in entry["parts"].items()}
            check_parts(ebin.path, name, entry, parts)
            tensors[name] = load_tensor(entry, parts)
            check_linear(ebin.path, name, entry, tensors[name])
            if maps:
                tensors[name] = MappedRows(tensors[name], [mm for _, mm in maps.values() if mm is not None])
            done += sum(a.nbytes for p, a in parts.items() if p not in maps)
            if progress is not None:
                progress(min(done, total), total)
        return cls(tensors, cfg, nbytes=done)

    def __getitem__(self, name):
        return self.tensors[name]

    def layer(self, i: int) -> Layer:
        return Layer.from_tensors(self.tensors.get, i)


class NonFiniteError(EdgerunError):
    """The forward pass produced NaN or infinity: corrupted or overflowing weights."""

    def __init__(self):
        super().__init__("the model produced non-finite values (NaN or infinity) in the forward pass: its weights "
                         "are corrupted or overflow float32 (`edgerun verify` checks the file's checksums)")


KV_DTYPES = {"f16": np.float16, "f32": np.float32}


class RunState:
    """Activation buffers for up to `chunk` tokens at once, and the KV cache for `context` positions.
    Allocated once; the forward pass only writes into these."""

    def __init__(self, cfg: ModelConfig, context: int, chunk: int, kv_dtype: str = "f16"):
        d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
        z = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
        self.x, self.xb, self.xb2 = z(chunk, d), z(chunk, d), z(chunk, d)
        self.q, self.att = z(chunk, q), z(chunk, q)
        self.k, self.v = z(chunk, kv), z(chunk, kv)
        self.gate, self.up = z(chunk, f), z(chunk, f)
        # a StackedLinear's joined output before the split; touched (paged in) only when used
        self.stacked = lazy_zeros((chunk * max(q + 2 * kv, 2 * f),), np.float32)
        self.logits = z(cfg.vocab_size)
        self.scores = z(cfg.num_heads, context)          # attention scratch
        # f16 by default (llama.cpp's default too: half the bytes; SmolLM2's logits move by ~0.02
        # of ~±15), resident only as far as the conversation has written it. The kernels read
        # an f16 cache as its uint16 bits (np.float16 does not exist in Numba's nopython mode).
        dtype = KV_DTYPES[kv_dtype]
        self.key_cache = lazy_zeros((cfg.num_layers, cfg.num_kv_heads, context, hd), dtype)
        self.value_cache = lazy_zeros((cfg.num_layers, cfg.num_kv_heads, context, hd), dtype)
        bits = np.uint16 if dtype == np.float16 else dtype
        self.key_bits, self.value_bits = self.key_cache.view(bits), self.value_cache.view(bits)

    @staticmethod
    def nbytes(cfg: ModelConfig, context: int, chunk: int, kv_dtype: str = "f16") -> tuple[int, int]:
        """(activation scratch bytes, KV cache bytes) this state allocates."""
        d, f = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        stacked = chunk * max(q + 2 * kv, 2 * f)
        scratch = 4 * (chunk * (3 * d + 2 * q + 2 * kv + 2 * f) + stacked + cfg.vocab_size + cfg.num_heads * context)
        return scratch, cfg.kv_cache_bytes(context, np.dtype(KV_DTYPES[kv_dtype]).itemsize)


def _linear(w, x, out, bias=None):
    """out = x @ W.T (+ bias) for one token (matvec) or a chunk (matmul)."""
    if x.shape[0] == 1:
        w.matvec(x[0], out[0])
    else:
        w.matmul(x, out)
    if bias is not None:
        out += bias


class HostOps:
    """The CPU placement: the forward pass's operations as Numba kernels on host arrays (the
    RunState's buffers and KV cache). edgerun/cuda's DeviceOps has the same methods on a GPU."""
    name = "cpu"

    def __init__(self, cfg: ModelConfig, state: RunState, cos, sin):
        self.cfg, self.st, self.cos, self.sin = cfg, state, cos, sin

    def place(self, layer: Layer, i: int) -> Layer:
        """The layer as read into host memory, with the linears of each shared input joined
        where their codec can (q/k/v, gate/up)."""
        for names in (QKV, GATE_UP):
            stacked = StackedLinear.of([getattr(layer, n) for n in names])
            if stacked is not None:
                layer.stacked[names] = stacked
                for n in names:
                    setattr(layer, n, None)
        return layer

    def place_head(self, norm, lm_head):
        return norm, lm_head

    def enter(self, x, i: int):
        """Layer i's hidden states (T, d) as this device holds them."""
        return x

    def leave(self, h, x, i: int) -> None:
        """After layer i: the host's x holds what the next layer needs."""

    def hidden(self, x):
        """The rows `x` (T, d) of the last hidden states, for the output head."""
        return x

    def rmsnorm(self, x, w, eps, out):
        kernels.layer_ops().rmsnorm_rows(x, w, eps, out)

    def linear(self, w, x, out, bias=None, accumulate=False):
        """out (T, d) (+)= x (T, n) @ W.T (+ bias)."""
        if accumulate:
            tmp = self.st.xb2[:x.shape[0]]
            _linear(w, x, tmp, bias)
            out += tmp
        else:
            _linear(w, x, out, bias)

    def linears(self, L: Layer, names: tuple, x, outs) -> list:
        """x (T, n) @ W.T + bias for layer L's linears `names`, which share x: one call when
        placement stacked them. Returns the results: `outs` (T, d_j), or for one token views of
        the stacked output (no copy)."""
        stacked = L.stacked.get(names)
        if stacked is not None:
            outs = stacked(x, outs, self.st.stacked)
        for name, out in zip(names, outs):
            if stacked is None:
                _linear(getattr(L, name), x, out)
            bias = getattr(L, name + "_bias")
            if bias is not None:
                out += bias
        return outs

    def rope(self, x3, start: int):
        kernels.layer_ops().rope(x3, start, self.cos, self.sin)

    def attention(self, i: int, q3, k3, v3, start: int, att3):
        """Append k, v (T, Hkv, D) to layer i's cache at `start`; att = causal attention of q."""
        st, T = self.st, q3.shape[0]
        st.key_cache[i, :, start:start + T] = k3.transpose(1, 0, 2)          # rounded to f16
        st.value_cache[i, :, start:start + T] = v3.transpose(1, 0, 2)
        kernels.layer_ops().attention(q3, st.key_bits[i], st.value_bits[i], start, att3, st.scores)

    def silu_mul(self, gate, up, out):
        kernels.layer_ops().silu_mul(gate, up, out)

    def logits(self, lm_head, x, out):
        _linear(lm_head, x, out)


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: Weights, context: int, chunk: int = 64, layers=None,
                 kv_dtype: str = "f16", ffns=None, gpu=None):
        """`ffns`: each layer's feed-forward component (default SWIGLU); `gpu`: a plan.GpuPlan, the
        first `gpu.layers` layers (and the head when `gpu.head`) on a CUDA device (edgerun/cuda).
        The weights of layers placed on a device are dropped from host memory."""
        self.cfg, self.w, self.context, self.chunk = cfg, weights, context, chunk
        self.state = RunState(cfg, context, chunk, kv_dtype)
        self.cos, self.sin = kernels.rope_tables(cfg.head_dim, context, cfg.rope_theta, cfg.rope_scaling)
        host = HostOps(cfg, self.state, self.cos, self.sin)
        self.ops = [host] * cfg.num_layers
        head_ops = host
        if gpu is not None and gpu.layers:
            from .cuda.layer import DeviceOps
            dev = DeviceOps(cfg, context, chunk, self.cos, self.sin, range(gpu.layers))
            self.ops[:gpu.layers] = [dev] * gpu.layers
            head_ops = dev if gpu.head else host
        self.head_ops = head_ops
        if layers is not None:               # given as they are, on the host (pack-time calibration)
            self.layers = layers
            self.norm, self.lm_head = weights.tensors.get("model.norm.weight"), weights.tensors.get("lm_head.weight")
            return
        self.layers = []
        for i in range(cfg.num_layers):
            layer = weights.layer(i)
            if ffns is not None:
                layer.ffn = ffns[i]
            self.layers.append(self.ops[i].place(layer, i))
            if self.ops[i] is not host:
                for key in [k for k in weights.tensors if k.startswith(f"model.layers.{i}.")]:
                    del weights.tensors[key]
            for names in layer.stacked:          # the joined copy replaces the separate ones
                for n in names:
                    del weights.tensors[f"model.layers.{i}.{LAYER_TENSORS[n]}"]
            if layer.stacked:
                trim_heap()                      # their pages now, so the next layer's copy does not add up
        self.norm, self.lm_head = head_ops.place_head(weights["model.norm.weight"], weights["lm_head.weight"])

    def release(self) -> None:
        """Drop every weight, buffer and device array now (a stream left open still holds this object;
        it ends at its next step)."""
        self.w.tensors.clear()
        self.layers, self.ops, self.state, self.head_ops, self.norm, self.lm_head = [], [], None, None, None, None

    def forward(self, tokens, start: int, all_logits: bool = False, cancel=None):
        """Run `tokens` (positions start..start+len-1) through the model, filling the KV cache.
        Returns the last position's logits (V,), or every position's (len, V) with `all_logits`.
        `cancel` (a threading.Event) is checked between chunks and layers."""
        tokens = np.asarray(tokens, dtype=np.int64)
        V = self.cfg.vocab_size
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= V):
            bad = int(tokens[(tokens < 0) | (tokens >= V)][0])
            raise EdgerunError(f"token id {bad} is outside the model's vocabulary (0..{V - 1}): the "
                               "tokenizer and the model's vocab_size disagree")
        out = np.empty((len(tokens), V), np.float32) if all_logits else None
        try:
            for s in range(0, len(tokens), self.chunk):
                part = tokens[s:s + self.chunk]
                hidden = self._layers(part, start + s, cancel)
                if all_logits:
                    self._logits(hidden, out[s:s + len(part)])
            if not all_logits:
                out = self.state.logits
                self._logits(hidden[-1:], out.reshape(1, -1))
        except ZeroDivisionError:
            # a kernel divided by a zero that NaN/inf activations produced (fastmath assumes none)
            raise NonFiniteError() from None
        if not np.isfinite(out).all():
            raise NonFiniteError()
        return out

    def _logits(self, hidden, out):
        """out (T, V) = the output head of the final norm of `hidden` (T, d)."""
        ops = self.head_ops
        normed = ops.st.xb[:len(hidden)]
        ops.rmsnorm(ops.hidden(hidden), self.norm, self.cfg.rms_norm_eps, normed)
        ops.logits(self.lm_head, normed, out)

    def _layers(self, tokens, start, cancel):
        """Embed `tokens` and run every layer; returns the hidden states (T, d) (a state view)."""
        T = len(tokens)
        if start + T > self.context:
            raise ValueError(f"position {start + T} is past the context length {self.context}")
        x = self.state.x[:T]
        embed = self.w["model.embed_tokens.weight"]
        for t, token in enumerate(tokens):
            embed.row(int(token), x[t])
        for i in range(self.cfg.num_layers):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            self.block(i, x, start)
        return x

    def block(self, i: int, x, start: int) -> None:
        """Layer i on hidden states x (T, d) at positions start..start+T-1, in place; fills the
        layer's KV cache. Runs on the layer's device (`self.ops[i]`)."""
        cfg, L, ops = self.cfg, self.layers[i], self.ops[i]
        T, H, Hkv, D, eps = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        st = ops.st
        xb, att = st.xb[:T], st.att[:T]
        h = ops.enter(x, i)
        # attention
        ops.rmsnorm(h, L.input_norm, eps, xb)
        q, k, v = ops.linears(L, QKV, xb, (st.q[:T], st.k[:T], st.v[:T]))
        if cfg.qk_norm:
            ops.rmsnorm(q.reshape(T * H, D), L.q_norm, eps, q.reshape(T * H, D))
            ops.rmsnorm(k.reshape(T * Hkv, D), L.k_norm, eps, k.reshape(T * Hkv, D))
        q3, k3 = q.reshape(T, H, D), k.reshape(T, Hkv, D)
        ops.rope(q3, start)
        ops.rope(k3, start)
        ops.attention(i, q3, k3, v.reshape(T, Hkv, D), start, att.reshape(T, H, D))
        ops.linear(L.o, att, h, L.o_bias, accumulate=True)       # h += o(att)
        # feed-forward (SwiGLU): h += ffn(norm(h))
        ops.rmsnorm(h, L.post_norm, eps, xb)
        L.ffn(ops, L, xb, h)
        ops.leave(h, x, i)
