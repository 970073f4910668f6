"""BitStack codec, the reference: plain NumPy decode and matvec (the oracle for the kernels)."""
from __future__ import annotations

import numpy as np

from .format import _available, _block_views, _from_f16, _meta


def _dense_block(signs, u, v, n):
    """S ⊙ (u vᵀ) as float32 (d, n) from one block's views."""
    neg = np.unpackbits(signs, axis=1, count=n, bitorder="little").astype(bool)
    w = _from_f16(u) @ _from_f16(v).T
    return np.where(neg, -w, w)


def decode_block(parts: dict, i: int) -> np.ndarray:
    """Block i alone, S_i ⊙ (u_i v_iᵀ) · diag(1/s), as float32 (d, n)."""
    d, n, k, _ = _meta(parts)
    return _dense_block(*_block_views(parts[f"block.{i}"], d, n, k), n) * parts["inv_scale"]


def decode(parts: dict, params: dict | None = None, blocks: int | None = None) -> np.ndarray:
    """Reference NumPy decode of the first `blocks` blocks (default all) to float32 (d, n)."""
    d, n, k, K = _meta(parts)
    m = _available(parts, K, blocks)
    W = np.zeros((d, n), np.float32)
    for i in range(m):
        W += _dense_block(*_block_views(parts[f"block.{i}"], d, n, k), n)
    return W * parts["inv_scale"][None, :]


def matvec(parts: dict, params: dict | None, x: np.ndarray, blocks: int | None = None) -> np.ndarray:
    """W @ x (n,) -> (d,) float32 over the first `blocks` blocks, through the decoded W."""
    return decode(parts, params, blocks) @ np.asarray(x, np.float32)
