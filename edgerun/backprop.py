"""The transformer's reverse pass in NumPy, for pack-time sensitivity: the gradient of the
calibration NLL with respect to every linear's output, beside that linear's input.

BitStack's global order needs each matrix's error in loss units (BitStack §3.2 measures
perplexity per block). A forward from each matrix's layer to the logits, per matrix, took ~22 min
on a 1.5B model (196 matrices); one reverse pass gives every linear y = W x its inputs x_t and
output gradients g_t = ∂NLL/∂y_t, and the loss of an error ΔW is then estimated by the empirical
Fisher, ½ Σ_t (g_tᵀ ΔW x_t)² (OBD's second-order term, LeCun et al. 1990, with the Fisher for
the Hessian; GuidedQuant, Kim et al. 2025, weights layer-wise objectives with the same output
gradients).

The forward is model.Transformer.block's arithmetic on dense float32 weights, each calibration
window one causal sequence from position 0 (the KV cache's float16 rounding left out);
tests/test_backprop.py checks it against Transformer.forward and the gradients against finite
differences.
"""
from __future__ import annotations

import math

import numpy as np

from .kernels import NumpyLayerOps, rope_tables, threaded_matmul as mm
from .model import LAYER_TENSORS

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
HEAD_ROWS = 8192           # output-head rows decoded at a time (50 MB of float32 at 1536 wide)


def dense_rows(linear, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """Rows r0..r1 of a loaded Linear (any codec, through its `row`) as float32."""
    r1 = linear.shape[0] if r1 is None else r1
    out = np.empty((r1 - r0, linear.shape[1]), np.float32)
    for i in range(r0, r1):
        linear.row(i, out[i - r0])
    return out


def _rmsnorm(x, w, eps):
    """(x · r · w, r) with r = 1/sqrt(mean(x²) + eps) over the last axis."""
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * r * w, r


def _rmsnorm_back(x, r, w, dy):
    """∂/∂x of y = x · r(x) · w, applied to dy: r·g − x·r³·mean(g·x), g = dy·w."""
    g = dy * w
    return r * g - x * (r ** 3) * np.mean(g * x, axis=-1, keepdims=True)


def _rope(x, cos, sin, inverse=False):
    """x (B, T, H, D) rotated by the angles of positions 0..T-1 (a copy; the model's rotation,
    kernels.NumpyLayerOps.rope); `inverse` rotates back, which is also its transpose (backward)."""
    out = x.copy()
    for window in out:
        NumpyLayerOps.rope(window, 0, cos, -sin if inverse else sin)
    return out


def _sigmoid(x):
    with np.errstate(over="ignore"):                  # exp(-x) = inf for x < -88: sigmoid -> 0
        return 1.0 / (1.0 + np.exp(-x))


class DenseLayer:
    """One layer's weights for this pass: `dense[field]` (d, n) float32 for the seven linears,
    the norms and biases as the model holds them (None when absent)."""

    def __init__(self, dense: dict, vectors: dict):
        self.w, self.vec = dense, vectors

    def linear(self, field, x):
        y = mm(x, self.w[field].T)
        bias = self.vec.get(field + "_bias")
        return y if bias is None else y + bias


def layer_forward(cfg, L: DenseLayer, x, cos, sin, keep=False):
    """Transformer.block on x (B, T, d) float32 (B causal windows): (output, saved state)."""
    B, T, d = x.shape
    H, Hkv, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    n1, r1 = _rmsnorm(x, L.vec["input_norm"], eps)
    q = L.linear("q", n1).reshape(B, T, H, D)
    k = L.linear("k", n1).reshape(B, T, Hkv, D)
    v = L.linear("v", n1).reshape(B, T, Hkv, D)
    q0, k0 = q, k
    rq = rk = None
    if cfg.qk_norm:
        q, rq = _rmsnorm(q, L.vec["q_norm"], eps)
        k, rk = _rmsnorm(k, L.vec["k_norm"], eps)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    g = H // Hkv
    # (B, Hkv, g, T, D) queries against (B, Hkv, 1, T, D) keys: query head h reads kv head h // g
    qh = q.reshape(B, T, Hkv, g, D).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3)[:, :, None], v.transpose(0, 2, 1, 3)[:, :, None]
    scores = qh @ kh.swapaxes(-1, -2) * np.float32(1.0 / math.sqrt(D))
    scores += np.triu(np.full((T, T), -np.inf, np.float32), 1)
    scores -= scores.max(axis=-1, keepdims=True)
    P = np.exp(scores)
    P /= P.sum(axis=-1, keepdims=True)
    att = (P @ vh).transpose(0, 3, 1, 2, 4).reshape(B, T, H * D)
    xm = x + L.linear("o", att)
    n2, r2 = _rmsnorm(xm, L.vec["post_norm"], eps)
    gate, up = L.linear("gate", n2), L.linear("up", n2)
    sg = _sigmoid(gate)
    act = gate * sg * up
    y = xm + L.linear("down", act)
    state = dict(x=x, n1=n1, r1=r1, q0=q0, k0=k0, rq=rq, rk=rk, qh=qh, kh=kh, vh=vh, P=P, att=att,
                 xm=xm, n2=n2, r2=r2, gate=gate, up=up, sg=sg, act=act) if keep else None
    return y, state


def layer_backward(cfg, L: DenseLayer, s: dict, dy, cos, sin, visit):
    """The gradient at the layer's input from dy = ∂NLL/∂output (B, T, d); `visit(field, X, G)`
    gets each linear's input X and output gradient G as (B·T, n) and (B·T, d)."""
    B, T, d = dy.shape
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = H // Hkv
    flat = lambda a: a.reshape(B * T, -1)          # noqa: E731
    visit("down", flat(s["act"]), flat(dy))
    dact = mm(dy, L.w["down"])
    sg, gate = s["sg"], s["gate"]
    dgate = dact * s["up"] * sg * (1.0 + gate * (1.0 - sg))       # silu' = σ (1 + x (1 - σ))
    dup = dact * gate * sg
    visit("gate", flat(s["n2"]), flat(dgate))
    visit("up", flat(s["n2"]), flat(dup))
    dn2 = mm(dgate, L.w["gate"]) + mm(dup, L.w["up"])
    dxm = dy + _rmsnorm_back(s["xm"], s["r2"], L.vec["post_norm"], dn2)
    visit("o", flat(s["att"]), flat(dxm))
    datt = mm(dxm, L.w["o"]).reshape(B, T, Hkv, g, D).transpose(0, 2, 3, 1, 4)
    P, qh, kh, vh = s["P"], s["qh"], s["kh"], s["vh"]
    scale = np.float32(1.0 / math.sqrt(D))
    dv = (P.swapaxes(-1, -2) @ datt).sum(axis=2)                   # (B, Hkv, T, D)
    dP = datt @ vh.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    dq = (dS @ kh) * scale                                          # (B, Hkv, g, T, D)
    dk = (dS.swapaxes(-1, -2) @ qh).sum(axis=2) * scale             # (B, Hkv, T, D)
    dq = _rope(dq.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D), cos, sin, inverse=True)
    dk = _rope(dk.transpose(0, 2, 1, 3), cos, sin, inverse=True)
    dv = dv.transpose(0, 2, 1, 3)
    if cfg.qk_norm:
        dq = _rmsnorm_back(s["q0"], s["rq"], L.vec["q_norm"], dq)
        dk = _rmsnorm_back(s["k0"], s["rk"], L.vec["k_norm"], dk)
    dq, dk, dv = flat(dq), flat(dk), flat(dv)
    n1 = flat(s["n1"])
    visit("q", n1, dq)
    visit("k", n1, dk)
    visit("v", n1, dv)
    dn1 = (mm(dq, L.w["q"]) + mm(dk, L.w["k"]) + mm(dv, L.w["v"])).reshape(B, T, d)
    return dxm + _rmsnorm_back(s["x"], s["r1"], L.vec["input_norm"], dn1)


def head_backward(cfg, norm, head, x, windows):
    """(summed NLL of windows[:, 1:], ∂NLL/∂x) for the last hidden states x (B, T, d): the final
    norm and the output head, whose rows are decoded HEAD_ROWS at a time. One pass over the
    vocabulary with a running max (as online softmax): ∂NLL/∂h = Σ_v p_v W_v − W_label."""
    B, T, d = x.shape
    hn, r = _rmsnorm(x, norm, cfg.rms_norm_eps)
    h = hn[:, :-1].reshape(-1, d)                    # the last position predicts nothing here
    labels = windows[:, 1:].reshape(-1)
    top = np.full((h.shape[0], 1), -np.inf, h.dtype)
    total = np.zeros((h.shape[0], 1), np.float64)
    acc = np.zeros_like(h)
    picked = np.empty(h.shape[0], h.dtype)
    V = head.shape[0]
    for v0 in range(0, V, HEAD_ROWS):
        W = dense_rows(head, v0, min(V, v0 + HEAD_ROWS))
        logits = mm(h, W.T)
        new_top = np.maximum(top, logits.max(axis=1, keepdims=True))
        shrink = np.exp(top - new_top)
        e = np.exp(logits - new_top)
        total = total * shrink + e.sum(axis=1, keepdims=True)
        acc = acc * shrink + mm(e, W)
        top = new_top
        here = (labels >= v0) & (labels < v0 + W.shape[0])
        picked[here] = logits[here, labels[here] - v0]
    nll = float(np.sum(np.log(total[:, 0]) + top[:, 0] - picked))
    label_rows = np.stack([dense_rows(head, int(t), int(t) + 1)[0] for t in labels])
    dh = np.zeros_like(hn)
    dh[:, :-1] = (acc / total.astype(h.dtype) - label_rows).reshape(B, T - 1, d)
    return nll, _rmsnorm_back(x, r, norm, dh)


def layer_dense(layer, field: str) -> np.ndarray:
    """A model.Layer's linear `field` as float32 (d, n), also where placement joined it with the
    linears sharing its input (model.StackedLinear: its rows of the joined linear)."""
    for names, joined in layer.stacked.items():
        if field in names:
            j = names.index(field)
            return dense_rows(joined.w, joined.bounds[j], joined.bounds[j + 1])
    return dense_rows(getattr(layer, field))


def linear_gradients(transformer, windows, visit, dense=None):
    """Run the calibration windows (B, T) token ids forward and back through a host
    model.Transformer; for each layer i from the last, `visit(i, field, X, G)` with each linear's
    inputs and output gradients over all B·T positions. `dense(i, field)` may give layer i's
    linear as float32 (d, n) in place of the model's own (e.g. a BitStack prefix), or None.
    Each layer's weights are decoded twice (forward, then backward), one layer at a time.
    Returns the summed NLL."""
    cfg, windows = transformer.cfg, np.asarray(windows)
    B, T = windows.shape
    cos, sin = rope_tables(cfg.head_dim, T, cfg.rope_theta, cfg.rope_scaling)
    embed = transformer.w["model.embed_tokens.weight"]
    x = np.empty((B, T, cfg.hidden_size), np.float32)
    for b in range(B):
        for t in range(T):
            embed.row(int(windows[b, t]), x[b, t])

    def layer(i):
        L = transformer.layers[i]
        weights = {}
        for f in LINEARS:
            w = None if dense is None else dense(i, f)
            weights[f] = layer_dense(L, f) if w is None else w
        return DenseLayer(weights, {f: getattr(L, f) for f in LAYER_TENSORS if f not in LINEARS})

    inputs = []
    for i in range(cfg.num_layers):
        inputs.append(x)
        x, _ = layer_forward(cfg, layer(i), x, cos, sin)
    nll, dx = head_backward(cfg, transformer.norm, transformer.lm_head, x, windows)
    for i in range(cfg.num_layers - 1, -1, -1):
        L = layer(i)
        _, state = layer_forward(cfg, L, inputs.pop(), cos, sin, keep=True)
        dx = layer_backward(cfg, L, state, dx, cos, sin, lambda f, X, G: visit(i, f, X, G))
    return nll
