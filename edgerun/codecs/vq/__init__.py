"""VQ codec: 2-D vector-quantized weights (issue #18; spec formats/codec-vq.md).

format.py: parts, params, the code layout · encode.py: Hessian-weighted k-means and GPTQ code
choice · reference.py: NumPy decode · kernels.py: LUT matvec, VQLinear · cuda.py: numba-cuda.
"""
from __future__ import annotations

import numpy as np

from ..base import Codec
from . import encode as _encode, reference
from .format import check_meta, default_group_rows, pack_codes, unpack_codes  # noqa: F401
from .kernels import MATMUL_MIN_T, PAR_MIN_WEIGHTS, VQLinear  # noqa: F401


class VQCodec(Codec, name="vq"):
    """Pairs of weights as c-bit codes into 2-D codebooks (K = 2^c centroids) with per-row
    scales; params {"bits": 2..4 per weight (c = 2·bits) or "code_bits": 4..8, "group_rows": g,
    "gptq": True, "percdamp": 0.01}. Recipe rule `vq:BITS`."""

    arg, default_arg, arg_range = "bits", 3, (2, 4)
    example_params = ({"bits": 3}, {"bits": 2, "group_rows": 8}, {"code_bits": 5}, {"bits": 4})

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
