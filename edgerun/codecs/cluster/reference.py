"""Cluster codec, the reference: plain NumPy decode and matvec (the oracle the kernels are
tested against; formats/codec-cluster.md)."""
from __future__ import annotations

import numpy as np

from .format import (BLOCK, INT8_MAX_BITS, _check_meta, _outliers, block_scales, codes_of,
                     quantize_activations, unpack_indices, unsigned_codebook)


def decode(parts: dict, params: dict | None = None, int8: bool = False) -> np.ndarray:
    """Reference NumPy decode to float32 (tests only); `int8`: with the matvec's 7-bit codebooks."""
    d, n, bits, g = _check_meta(parts)
    idx = unpack_indices(codes_of(parts), bits, n)
    cb = parts["codebook"].view(np.float16).astype(np.float32)
    if int8:
        u8, s, lo = unsigned_codebook(parts["codebook"])
        cb = lo[:, None] + u8[:, :cb.shape[1]].astype(np.float32) * s[:, None]
    W = np.take_along_axis(np.repeat(cb, g, axis=0)[:d], idx, axis=1)
    rp, oc, ov = _outliers(parts, d)
    rows = np.repeat(np.arange(d), np.diff(rp))
    W[rows, oc.astype(np.int64)] += ov.view(np.float16).astype(np.float32)
    return W


def matvec(parts: dict, params: dict | None, x: np.ndarray) -> np.ndarray:
    """W @ x (n,) -> (d,) float32 as the kernels compute it: for K ≤ 32 the 7-bit codebooks times
    the int8 activations at integer block scales (formats/codec-cluster.md § Matvec), else the
    decoded W times x."""
    d, n, bits, g = _check_meta(parts)
    if bits > INT8_MAX_BITS:
        return decode(parts, params) @ np.asarray(x, np.float32)
    x8, dx = quantize_activations(x, -(-n // BLOCK))
    e, D = block_scales(dx)
    xq = (x8.reshape(-1, BLOCK) * (D * e.astype(np.float32))[:, None]).reshape(-1)[:n]
    return decode(parts, params, int8=True) @ xq


def matmul(parts: dict, params: dict | None, X: np.ndarray) -> np.ndarray:
    """X (T, n) @ W.T -> (T, d) float32 as the kernels compute it: every token as `matvec`
    (formats/codec-cluster.md § Matvec: the prompt's tokens get the decode's arithmetic)."""
    return np.stack([matvec(parts, params, x) for x in np.asarray(X, np.float32)])
