"""The CUDA placement: the forward pass's operations on a GPU's arrays (`DeviceOps`).

`Transformer.block` (model.py) is the one forward pass; a layer placed here runs it with these
ops instead of model.HostOps: every op is a device kernel, the layer's weights are uploaded once
(compressed, as stored) and its KV cache lives on the device. Across a run of consecutive device
layers the hidden states stay on the device: the first layer of the run uploads x (T, d), the
last one downloads it — T·d·4 bytes each way per run of layers, never per layer.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numba import cuda

from . import CudaError
from . import kernels as K
from ..plan import device_scratch_bytes, kv_bytes
from .codecs import to_device

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


class DeviceRun:
    """Device activations for up to `chunk` tokens (the names and shapes of model.RunState's),
    attention scores, RoPE tables."""

    def __init__(self, cfg, context: int, chunk: int, cos: np.ndarray, sin: np.ndarray):
        d, f, H, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
        q, kv = H * D, cfg.num_kv_heads * D
        z = lambda *s: cuda.device_array(s, np.float32)  # noqa: E731
        self.context, self.chunk = context, chunk
        self.x, self.xb, self.xb2, self.h = z(chunk, d), z(chunk, d), z(chunk, d), z(chunk, d)
        self.q, self.att = z(chunk, q), z(chunk, q)
        self.k, self.v = z(chunk, kv), z(chunk, kv)
        self.gate, self.up = z(chunk, f), z(chunk, f)
        self.scores = z(chunk * H, context)
        self.cos, self.sin = cuda.to_device(cos[:context]), cuda.to_device(sin[:context])
        self.T = 0               # tokens in x
        self.nbytes = device_scratch_bytes(cfg, context, chunk)


def _vec(a):
    return None if a is None else cuda.to_device(np.ascontiguousarray(a, dtype=np.float32))


class DeviceOps:
    """Layers `layers` (indices) on the CUDA device: model.HostOps's methods on device arrays."""
    name = "cuda"

    def __init__(self, cfg, context: int, chunk: int, cos, sin, layers):
        self.cfg, self.layers = cfg, set(layers)
        self.st = DeviceRun(cfg, context, chunk, cos, sin)
        self.caches: dict[int, tuple] = {}
        self.nbytes = self.st.nbytes
        self._logits = None

    # -- placement (once, when the model is built)
    def place(self, layer, i: int):
        """Layer i with its weights uploaded, and its KV cache allocated on the device."""
        from ..model import SWIGLU
        if layer.ffn is not SWIGLU:
            raise CudaError(f"layer {i} streams its feed-forward from flash; it cannot go on the GPU")
        up = {}
        for f in dataclasses.fields(layer):
            a = getattr(layer, f.name)
            if f.name in ("ffn", "stacked") or a is None:
                up[f.name] = a
            elif f.name in LINEARS:
                up[f.name] = to_device(a)
                self.nbytes += up[f.name].nbytes
            else:
                up[f.name] = _vec(a)
                self.nbytes += 4 * int(np.size(a))
        cfg, r = self.cfg, self.st
        shape = (cfg.num_kv_heads, r.context, cfg.head_dim)
        self.caches[i] = (cuda.device_array(shape, np.float32), cuda.device_array(shape, np.float32))
        self.nbytes += kv_bytes(cfg, r.context)
        return dataclasses.replace(layer, **up)

    def place_head(self, norm, lm_head):
        head = to_device(lm_head)
        self.nbytes += 4 * int(np.size(norm)) + head.nbytes
        return _vec(norm), head

    # -- the forward pass's operations
    def enter(self, x, i: int):
        T, r = x.shape[0], self.st
        if T > r.chunk:
            raise ValueError(f"{T} tokens exceed the device buffers ({r.chunk} tokens)")
        h = r.x[:T]
        if i - 1 not in self.layers:         # the first layer of a run: x comes from the host
            h.copy_to_device(np.ascontiguousarray(x))
        return h

    def leave(self, h, x, i: int) -> None:
        self.st.T = x.shape[0]
        if i + 1 not in self.layers:         # the last layer of a run: x goes back to the host
            h.copy_to_host(x)

    def hidden(self, x):
        """The rows x (T, d) of the last hidden states: still on the device when the last layer ran here."""
        r, T = self.st, x.shape[0]
        if self.cfg.num_layers - 1 in self.layers and T <= r.T:
            return r.x[r.T - T:r.T]
        h = r.h[:T]
        h.copy_to_device(np.ascontiguousarray(x))
        return h

    def rmsnorm(self, x, w, eps, out):
        K.launch_rmsnorm(x, w, eps, out)

    def linear(self, w, x, out, bias=None, accumulate=False):
        w.matmul(x, out, bias, accumulate=accumulate)

    def linears(self, L, names: tuple, x, outs) -> list:
        for name, out in zip(names, outs):
            self.linear(getattr(L, name), x, out, getattr(L, name + "_bias"))
        return outs

    def rope(self, x3, start: int):
        K.launch_rope(x3, start, self.st.cos, self.st.sin)

    def attention(self, i: int, q3, k3, v3, start: int, att3):
        T, r = q3.shape[0], self.st
        if start + T > r.context:
            raise ValueError(f"{T} tokens at {start} exceed the device's context {r.context}")
        kc, vc = self.caches[i]
        K.launch_kv_write(k3, v3, kc, vc, start)
        K.launch_attention(q3, kc, vc, start, att3, r.scores)

    def silu_mul(self, gate, up, out):
        K.launch_silu_mul(gate, up, out)

    def logits(self, lm_head, x, out):
        """out (T, V) host = x (T, d) device @ lm_head.T, computed on the device."""
        T = x.shape[0]
        if self._logits is None or self._logits.shape[0] < T:
            self._logits = cuda.device_array((max(T, 1), lm_head.shape[0]), np.float32)
        lm_head.matmul(x, self._logits[:T])
        self._logits[:T].copy_to_host(out)
