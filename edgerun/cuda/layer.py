"""A whole transformer block on the device (the CUDA twin of `Transformer.block`, model.py).

Every op of the block is a device kernel; the KV cache of an offloaded layer lives on the
device. Across a run of consecutive CUDA layers the hidden states stay on the device: the
first layer of the run uploads x (T, d), the last one downloads it — T·d·4 bytes each way per
run of layers, never per layer. `DeviceRun` holds the scratch buffers all CUDA layers share.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from . import CudaError
from . import kernels as K
from ..plan import device_scratch_bytes as scratch_bytes, kv_bytes
from .codecs import to_device


class DeviceRun:
    """Device activations for up to `chunk` tokens, attention scores, RoPE tables."""

    def __init__(self, cfg, context: int, chunk: int, cos: np.ndarray, sin: np.ndarray):
        d, f, H, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
        Hkv = cfg.num_kv_heads
        z = lambda *s: cuda.device_array(s, np.float32)  # noqa: E731
        self.cfg, self.context, self.chunk = cfg, context, chunk
        self.x, self.xb, self.xb2, self.h = z(chunk, d), z(chunk, d), z(chunk, d), z(chunk, d)
        self.q, self.att = z(chunk, H, D), z(chunk, H, D)
        self.k, self.v = z(chunk, Hkv, D), z(chunk, Hkv, D)
        self.gate, self.up = z(chunk, f), z(chunk, f)
        self.scores = z(chunk * H, context)
        self.cos, self.sin = cuda.to_device(cos[:context]), cuda.to_device(sin[:context])
        self.T = 0               # tokens in x
        self.current = False     # x on the device is newer than the host copy
        self.nbytes = scratch_bytes(cfg, context, chunk)


def _vec(a):
    return None if a is None else cuda.to_device(np.ascontiguousarray(a, dtype=np.float32))


class CudaLayer:
    """Layer i's weights uploaded once (compressed, as stored) and its KV cache on the device.
    `block(x, start)` runs the block in place on host x (T, d), like Transformer.block."""

    VECTORS = ("input_norm", "post_norm", "q_bias", "k_bias", "v_bias", "o_bias", "q_norm",
               "k_norm", "gate_bias", "up_bias", "down_bias")
    LINEARS = ("q", "k", "v", "o", "gate", "up", "down")

    def __init__(self, layer, cfg, run: DeviceRun, index: int = 0):
        if getattr(layer, "ffn", None) is not None:
            raise CudaError(f"layer {index} streams its feed-forward from flash; it cannot go on the GPU")
        self.cfg, self.run, self.index = cfg, run, index
        self.first = self.last = True    # offload() clears these inside a run of CUDA layers
        self.nbytes = 0
        for name in self.VECTORS:
            a = getattr(layer, name)
            setattr(self, name, _vec(a))
            self.nbytes += 0 if a is None else 4 * int(np.size(a))
        for name in self.LINEARS:
            lin = to_device(getattr(layer, name))
            setattr(self, name, lin)
            self.nbytes += lin.nbytes
        Hkv, D = cfg.num_kv_heads, cfg.head_dim
        self.key_cache = cuda.device_array((Hkv, run.context, D), np.float32)
        self.value_cache = cuda.device_array((Hkv, run.context, D), np.float32)
        self.kv_nbytes = kv_bytes(cfg, run.context)

    def block(self, x: np.ndarray, start: int) -> None:
        """Hidden states x (T, d) at positions start..start+T-1, in place; fills this layer's
        device KV cache. x moves only at the ends of a run of CUDA layers."""
        cfg, r = self.cfg, self.run
        T = x.shape[0]
        if T > r.chunk or start + T > r.context:
            raise ValueError(f"{T} tokens at {start} exceed the device buffers ({r.chunk} tokens, "
                             f"context {r.context})")
        H, Hkv, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        xd, xb = r.x[:T], r.xb[:T]
        q, k, v, att = r.q[:T], r.k[:T], r.v[:T], r.att[:T]
        if self.first or not r.current:
            xd.copy_to_device(np.ascontiguousarray(x))
        # attention
        K.launch_rmsnorm(xd, self.input_norm, eps, xb)
        self.q.matmul(xb, q.reshape(T, H * D), self.q_bias)
        self.k.matmul(xb, k.reshape(T, Hkv * D), self.k_bias)
        self.v.matmul(xb, v.reshape(T, Hkv * D), self.v_bias)
        if cfg.qk_norm:
            K.launch_rmsnorm(q.reshape(T * H, D), self.q_norm, eps, q.reshape(T * H, D))
            K.launch_rmsnorm(k.reshape(T * Hkv, D), self.k_norm, eps, k.reshape(T * Hkv, D))
        K.launch_rope(q, start, r.cos, r.sin)
        K.launch_rope(k, start, r.cos, r.sin)
        K.launch_kv_write(k, v, self.key_cache, self.value_cache, start)
        K.launch_attention(q, self.key_cache, self.value_cache, start, att, r.scores)
        self.o.matmul(att.reshape(T, H * D), xd, self.o_bias, accumulate=True)   # x += o(att)
        # feed-forward (SwiGLU), residual fused into down_proj
        K.launch_rmsnorm(xd, self.post_norm, eps, xb)
        gate, up = r.gate[:T], r.up[:T]
        self.gate.matmul(xb, gate, self.gate_bias)
        self.up.matmul(xb, up, self.up_bias)
        K.launch_silu_mul(gate, up, gate)
        self.down.matmul(gate, xd, self.down_bias, accumulate=True)
        r.T, r.current = T, True
        if self.last:
            xd.copy_to_host(x)


class CudaHead:
    """Final RMSNorm + lm_head on the device: `__call__(hidden (T, d), out (T, V))` like
    Transformer._logits. When the last layer ran on the device, the hidden rows are taken from
    the device (hidden must then be the last T rows of that block's x, as Transformer passes)."""

    def __init__(self, norm, lm_head, cfg, run: DeviceRun):
        self.cfg, self.run = cfg, run
        self.norm = _vec(norm)
        self.lm_head = to_device(lm_head)
        self.nbytes = 4 * int(np.size(norm)) + self.lm_head.nbytes
        self._logits = None

    def __call__(self, hidden: np.ndarray, out: np.ndarray) -> None:
        r, T = self.run, hidden.shape[0]
        V = self.lm_head.shape[0]
        if self._logits is None or self._logits.shape[0] < T:
            self._logits = cuda.device_array((max(T, 1), V), np.float32)
        if r.current and T <= r.T:
            h = r.x[r.T - T:r.T]
        else:
            h = r.h[:T]
            h.copy_to_device(np.ascontiguousarray(hidden))
        K.launch_rmsnorm(h, self.norm, self.cfg.rms_norm_eps, r.xb[:T])
        logits = self._logits[:T]
        self.lm_head.matmul(r.xb[:T], logits)
        logits.copy_to_host(out)
        self.nbytes_moved = int(out.nbytes)


def offload(model, n_layers=None, head=True, release_host=False) -> dict:
    """Swap model.layers[:n_layers] for CudaLayers sharing one DeviceRun (model.cuda_run), and
    set model.cuda_head (a CudaHead) when `head`. The caller's forward pass must call
    `layers[i].block(x, start)` for CudaLayers and `cuda_head(hidden, out)` for the logits."""
    cfg = model.cfg
    n = cfg.num_layers if n_layers is None else int(n_layers)
    run = getattr(model, "cuda_run", None)
    if run is None:
        run = model.cuda_run = DeviceRun(cfg, model.context, model.chunk, model.cos, model.sin)
    total = run.nbytes
    for i in range(n):
        if not isinstance(model.layers[i], CudaLayer):
            model.layers[i] = CudaLayer(model.layers[i], cfg, run, i)
    for i in range(cfg.num_layers):
        L = model.layers[i]
        if isinstance(L, CudaLayer):
            L.first = i == 0 or not isinstance(model.layers[i - 1], CudaLayer)
            L.last = i == cfg.num_layers - 1 or not isinstance(model.layers[i + 1], CudaLayer)
            total += L.nbytes + L.kv_nbytes
    model.cuda_head = None
    if head:
        model.cuda_head = CudaHead(model.w["model.norm.weight"], model.w["lm_head.weight"], cfg, run)
        total += model.cuda_head.nbytes
    if release_host:
        for i in range(n):
            for key in [k for k in model.w.tensors if k.startswith(f"model.layers.{i}.")]:
                del model.w.tensors[key]
    return {"device_bytes": total, "layers": n, "head": bool(head)}
