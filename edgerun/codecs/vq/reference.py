"""VQ codec, the reference: plain NumPy decode and matvec (the oracle the kernels are tested
against; formats/codec-vq.md)."""
from __future__ import annotations

import numpy as np

from .format import check_meta, layout, pair_columns, unpack_codes


def decode(parts: dict, params: dict | None = None) -> np.ndarray:
    """Reference NumPy decode to float32: W[r, perm[2p + t]] = scale[r] · codebook[r // g, code[r, p], t]."""
    d, n, c, g = check_meta(parts)
    npairs = layout(n, c)[0]
    idx = unpack_codes(parts["codes"], c, npairs)
    cb = parts["codebook"].view(np.float16).astype(np.float32)
    s = parts["scale"].view(np.float16).astype(np.float32)
    pairs = cb[np.arange(d)[:, None] // g, idx] * s[:, None, None]          # (d, npairs, 2)
    W = np.zeros((d, n + 1), np.float32)
    W[:, pair_columns(parts["perm"].astype(np.int64), npairs).reshape(-1)] = pairs.reshape(d, -1)
    return W[:, :n]


def matvec(parts: dict, params: dict | None, x: np.ndarray) -> np.ndarray:
    """W @ x (n,) -> (d,) float32, as the kernels compute it (float32 tables of centroid · x)."""
    return decode(parts, params) @ np.asarray(x, np.float32)
