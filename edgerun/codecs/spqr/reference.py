"""SpQR codec, the reference: plain NumPy decode and matvec (the oracle for the kernels;
formats/codec-spqr.md)."""
from __future__ import annotations

import numpy as np

from .format import _check_shapes, _unpack_codes, params_of as _params


def decode(parts: dict, params: dict | None = None) -> np.ndarray:
    """Reference NumPy decode -> float32 (d, n) in the original column order (tests only)."""
    p = _params(params)
    bits, sb, sg = p["bits"], p["stat_bits"], p["stat_group"]
    d, G = _check_shapes(parts, bits)
    perm = parts["perm"].astype(np.int64)
    n = perm.shape[0]
    q = _unpack_codes(parts["codes"], bits).astype(np.float32)
    f = parts["stat_codes"].astype(np.int64)
    qs, qz = f & ((1 << sb) - 1), f >> sb
    st = parts["stats"].view(np.float16).astype(np.float32)[np.arange(d) // sg]     # (d, 4, G)
    s = st[:, 0] * qs + st[:, 1]
    z = st[:, 2] * qz + st[:, 3]
    Wp = (np.repeat(s, 16, axis=1) * q - np.repeat(s * z, 16, axis=1)).astype(np.float32)
    rows = np.repeat(np.arange(d), np.diff(parts["outlier_rowptr"]))
    Wp[rows, parts["outlier_col"].astype(np.int64)] += parts["outlier_val"].view(np.float16).astype(np.float32)
    W = np.empty((d, n), np.float32)
    W[:, perm] = Wp[:, :n]
    return W


def quantize_activations(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """x (n,) as the matvec kernels see it: per group of 16 storage columns (x[perm[16g + t]],
    t < 16, zero past n) symmetric int8 with dx = max|x| / 127, rounded half away from zero in
    float32 (formats/codec-spqr.md § Matvec); returns dx·x8 in the original column order."""
    x = np.asarray(x, np.float32)
    n = perm.shape[0]
    xs = np.zeros(-(-n // 16) * 16, np.float32)
    xs[:n] = x[perm.astype(np.int64)]
    xs = xs.reshape(-1, 16)
    m = np.abs(xs).max(axis=1, keepdims=True)
    inv = np.where(m > 0, np.float32(127) / np.where(m > 0, m, 1), 0).astype(np.float32)
    half = np.where(xs < 0, np.float32(-0.5), np.float32(0.5))
    q = np.trunc(xs * inv + half)
    xq = np.empty(n, np.float32)
    xq[perm.astype(np.int64)] = ((m / np.float32(127)) * q).reshape(-1)[:n]
    return xq


def matvec(parts: dict, params: dict | None, x: np.ndarray) -> np.ndarray:
    """W @ x (n,) -> (d,) float32 as the kernels compute it: the decoded W times the quantized x."""
    return decode(parts, params) @ quantize_activations(x, parts["perm"])


def matmul(parts: dict, params: dict | None, X: np.ndarray) -> np.ndarray:
    """X (T, n) @ Wᵀ -> (T, d) float32 as the kernels compute it: every token's x quantized as
    for the matvec (the batched kernel is T matvecs sharing each weight unpack)."""
    return np.stack([quantize_activations(x, parts["perm"]) for x in X]) @ decode(parts, params).T
