"""Dense codec, the reference: plain NumPy decode and matvec (the oracle for the kernels)."""
from __future__ import annotations

import numpy as np

from .format import bf16_bits_to_f32, dtype_of


def decode(parts: dict, params: dict) -> np.ndarray:
    """Reference NumPy decode to float32 (tests only)."""
    dt = dtype_of(params)
    w = parts["weight"]
    if dt == "f32":
        return np.asarray(w, np.float32).copy()
    if dt == "f16":
        return w.view(np.float16).astype(np.float32)
    return bf16_bits_to_f32(w)


def matvec(parts: dict, params: dict | None, x: np.ndarray) -> np.ndarray:
    """W @ x (n,) -> (d,) float32, through the decoded W."""
    return decode(parts, params) @ np.asarray(x, np.float32)
