"""Dense codec, the format: weights stored as float32, float16 or bfloat16 (DESIGN §4 "dense").

Parts: {"weight": array of the weight's shape}, float32 for "f32", uint16 bits for "f16"
(IEEE half, round-to-nearest-even as np.float16) and "bf16" (high half of the float32, rounded
to nearest even). Kernels widen 16-bit values in registers (`kernels.f16_to_f32`,
`kernels.bf16_to_f32`), so decode streams 2 bytes per weight.
"""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedModelError

DTYPES = ("f32", "f16", "bf16")


def f32_to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(w)
    out = rounded.astype(np.uint16)
    out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32 (exact)."""
    return (b.astype(np.uint32) << 16).view(np.float32)


def dtype_of(params: dict) -> str:
    dt = (params or {}).get("dtype", "f32")
    if dt not in DTYPES:
        raise UnsupportedModelError(f"dense codec: dtype {dt!r} is not supported (use one of {DTYPES})")
    return dt


_dtype = dtype_of
