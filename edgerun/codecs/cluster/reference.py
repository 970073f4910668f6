"""Cluster codec, the reference: plain NumPy decode and matvec (the oracle the kernels are
tested against; formats/codec-cluster.md)."""
from __future__ import annotations

import numpy as np

from .format import _check_meta, _outliers, unpack_indices


def decode(parts: dict, params: dict | None = None) -> np.ndarray:
    """Reference NumPy decode to float32 (tests only)."""
    d, n, bits, g = _check_meta(parts)
    idx = unpack_indices(parts["codes"], bits, n)
    cb = parts["codebook"].view(np.float16).astype(np.float32)
    W = np.take_along_axis(np.repeat(cb, g, axis=0)[:d], idx, axis=1)
    rp, oc, ov = _outliers(parts, d)
    rows = np.repeat(np.arange(d), np.diff(rp))
    W[rows, oc.astype(np.int64)] += ov.view(np.float16).astype(np.float32)
    return W


def matvec(parts: dict, params: dict | None, x: np.ndarray) -> np.ndarray:
    """W @ x (n,) -> (d,) float32, through the decoded W."""
    return decode(parts, params) @ np.asarray(x, np.float32)
