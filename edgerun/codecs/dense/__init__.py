"""Dense codec: weights stored as float32, float16 or bfloat16 (DESIGN §4 "dense").

format.py: dtypes and the bf16 bit conversions · encode.py · reference.py: NumPy decode ·
kernels.py: Numba matvec / matmul and DenseLinear · cuda.py: numba-cuda.
"""
from __future__ import annotations

import numpy as np

from ..base import Codec
from . import encode as _encode, kernels, reference
from .format import DTYPES, bf16_bits_to_f32, dtype_of, f32_to_bf16_bits  # noqa: F401
from .kernels import MATMUL_MIN_T, PAR_MIN_MACS, PAR_MIN_WEIGHTS, TILE_ROWS, DenseLinear  # noqa: F401


class DenseCodec(Codec, name="dense"):
    """f32 / f16 / bf16 weights; params {"dtype": "f32"|"f16"|"bf16"} (default f32). Recipe rules
    `dense:DTYPE` or the bare dtype (`f16`)."""

    arg, default_arg, arg_range = "dtype", "f16", DTYPES
    shorthands = DTYPES
    row_parts = ("weight",)
    calibrated = False
    example_params = ({"dtype": "f32"}, {"dtype": "f16"}, {"dtype": "bf16"})

    @classmethod
    def part_nbytes(cls, shape: tuple, params: dict) -> dict[str, int]:
        return {"weight": int(np.prod(shape)) * (4 if dtype_of(params) == "f32" else 2)}

    @classmethod
    def candidates(cls) -> tuple[dict, ...]:
        return ({"dtype": "f16"},)

    @staticmethod
    def encode(w: np.ndarray, params: dict, hessian: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """float32 (d, n) or (n,) -> {"weight": float32 | uint16 bits} of the same shape
        (`hessian`, the calibration statistics other codecs use, changes nothing here)."""
        return _encode.encode(w, params, hessian)

    @staticmethod
    def decode(parts: dict, params: dict) -> np.ndarray:
        """Reference NumPy decode to float32 (tests only)."""
        return reference.decode(parts, params)

    @staticmethod
    def as_f32(parts: dict, params: dict) -> np.ndarray:
        """Whole weight as float32 (norm weights, biases): zero-copy for f32, widened otherwise."""
        return kernels.as_f32(parts, params)

    @staticmethod
    def load(parts: dict, params: dict) -> DenseLinear:
        """A DenseLinear over parts["weight"] (d, n), without copying C-contiguous arrays."""
        return kernels.load_linear(parts, params)
