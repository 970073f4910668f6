"""Dense codec, pack time: float32 -> f32 / f16 / bf16 bits."""
from __future__ import annotations

import numpy as np

from .format import dtype_of, f32_to_bf16_bits


def encode(w: np.ndarray, params: dict, hessian: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """float32 (d, n) or (n,) -> {"weight": float32 | uint16 bits} of the same shape
    (`hessian`, the calibration statistics other codecs use, changes nothing here)."""
    dt = dtype_of(params)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if dt == "f32":
        return {"weight": w.copy()}
    if dt == "f16":
        return {"weight": w.astype(np.float16).view(np.uint16)}
    return {"weight": f32_to_bf16_bits(w)}

