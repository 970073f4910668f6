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


def matvec(parts: dict, params: dict | None, x: np.ndarray) -> np.ndarray:
    """W @ x (n,) -> (d,) float32, through the decoded W."""
    return decode(parts, params) @ np.asarray(x, np.float32)
