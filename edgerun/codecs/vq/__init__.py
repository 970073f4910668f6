"""VQ codec: 2-D vector-quantized weights (issue #18; spec formats/codec-vq.md).

format.py: parts, params, the code layout · encode.py: Hessian-weighted k-means and GPTQ code
choice · reference.py: NumPy decode · kernels.py: LUT matvec, VQLinear · cuda.py: numba-cuda.
"""
from __future__ import annotations

import numpy as np

from ...errors import EdgerunError
from ..base import Codec
from . import encode as _encode, reference
from .format import check_meta, default_group_rows, pack_codes, unpack_codes  # noqa: F401
from .kernels import MATMUL_MIN_T, PAR_MIN_WEIGHTS, VQLinear  # noqa: F401


class VQCodec(Codec, name="vq"):
    """Pairs of weights as c-bit codes into 2-D codebooks (K = 2^c centroids) with per-row
    scales; params {"bits": 2..4 per weight (c = 2·bits) or "code_bits": 4..8, "group_rows": g,
    "gptq": True, "percdamp": 0.01}. Recipe rule `vq:BITS`, BITS in 2, 2.5, 3, 3.5, 4 (half bits:
odd code widths)."""

    arg, default_arg, arg_range = "bits", 3, (2, 4)
    example_params = ({"bits": 3}, {"bits": 2, "group_rows": 8}, {"code_bits": 5}, {"bits": 4})

    @classmethod
    def syntax(cls) -> str:
        return f"{cls.name}:BITS (2, 2.5, 3, 3.5 or 4, default {cls.default_arg})"

    @classmethod
    def check_arg(cls, arg):
        """BITS per weight: 2..4 in steps of 1/2 -> int, or float for a half."""
        try:
            v = float(arg)
        except (TypeError, ValueError):
            v = None
        if v is None or not 2 <= v <= 4 or not (2 * v).is_integer():
            raise EdgerunError(f"codec rule {cls.name}:{arg}: expected {cls.syntax()}")
        return int(v) if v.is_integer() else v

    @classmethod
    def params_from_arg(cls, arg=None) -> dict:
        v = cls.check_arg(cls.default_arg if arg in (None, "") else arg)
        return {"bits": v} if isinstance(v, int) else {"code_bits": int(2 * v)}

    @classmethod
    def describe(cls, params: dict) -> str:
        params = params or {}
        if params.get("code_bits") is not None:
            return f"{cls.name}:{params['code_bits'] / 2:g}"
        return f"{cls.name}:{params.get('bits', cls.default_arg)}"

    @staticmethod
    def encode(w: np.ndarray, params: dict, hessian: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """float32 (d, n) -> {"meta", "codes", "codebook", "scale", "perm"} (encode.encode)."""
        return _encode.encode(w, params, hessian)

    @staticmethod
    def decode(parts: dict, params: dict | None = None) -> np.ndarray:
        """Reference NumPy decode to float32 (tests only)."""
        return reference.decode(parts, params)

    @staticmethod
    def load(parts: dict, params: dict | None = None) -> VQLinear:
        """A VQLinear over the parts (zero-copy codes)."""
        return VQLinear(parts)
