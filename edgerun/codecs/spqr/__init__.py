"""SpQR codec (Dettmers et al. 2023, "SpQR: A Sparse-Quantized Representation"; DESIGN §4 "spqr";
spec formats/codec-spqr.md).

format.py: parts, params, the code sections · encode.py: the GPTQ-style procedure ·
reference.py: NumPy decode · kernels.py: LLVM IR kernels and SpQRLinear · cuda.py: numba-cuda.
"""
from __future__ import annotations

import numpy as np

from ..base import Codec
from . import kernels, reference
from .encode import encode
from .format import DEFAULTS, _pack_codes, _unpack_codes, params_of  # noqa: F401
from .kernels import MATMUL_MIN_T, PAR_MIN_WEIGHTS, SpQRLinear  # noqa: F401
from .reference import decode  # noqa: F401


class SpQRCodec(Codec, name="spqr"):
    """SpQR weights; params {"bits": 2..4 (3), "group": 16, "stat_bits": 3, "stat_group": 16,
    "outlier_threshold": 0.2 (relative, paper's τ; inf or None = no outliers),
    "permute": "act_order" | None, "percdamp": 0.01, "blocksize": 128}. Recipe rule `spqr:BITS`."""

    arg, default_arg, arg_range = "bits", 4, (2, 4)
    row_parts = ("codes", "stat_codes")
    example_params = ({"bits": 2}, {"bits": 3}, {"bits": 4, "outlier_threshold": 0.05},
                      {"bits": 3, "permute": None, "stat_group": 8})

    @classmethod
    def part_nbytes(cls, shape: tuple, params: dict) -> dict[str, int] | None:
        """formats/codec-spqr.md; None with outliers (how many pass the threshold depends on W)."""
        d, n = shape
        p = params_of(params)
        if p["outlier_threshold"] not in (None, float("inf")):
            return None
        G = -(-n // p["group"])
        return {"codes": d * 2 * p["bits"] * G, "stat_codes": d * G, "stats": -(-d // p["stat_group"]) * 4 * G * 2,
                "perm": n * (2 if n <= 65536 else 4), "outlier_rowptr": 4 * (d + 1), "outlier_col": 0,
                "outlier_val": 0}

    @classmethod
    def candidates(cls) -> tuple[dict, ...]:
        # without outliers: the only SpQR whose size is known before encoding
        return tuple({"bits": b, "outlier_threshold": None} for b in range(cls.arg_range[0], cls.arg_range[1] + 1))

    @staticmethod
    def encode(w: np.ndarray, params: dict | None = None, hessian: np.ndarray | None = None) -> dict:
        """float32 W (d, n) -> parts (formats/codec-spqr.md). `hessian` is H = E[x xᵀ] (n, n) of
        the input; the procedure needs it. Without it H = I: no error feedback between columns
        (GPTQ degenerates to round-to-nearest) and act_order keeps the identity order."""
        return encode(w, params, hessian)

    @staticmethod
    def decode(parts: dict, params: dict | None = None) -> np.ndarray:
        """Reference NumPy decode to float32 (d, n), original column order (tests only)."""
        return reference.decode(parts, params)

    @staticmethod
    def load(parts: dict, params: dict | None = None) -> SpQRLinear:
        """A SpQRLinear over the parts (zero-copy for C-contiguous arrays)."""
        return kernels.load_linear(parts, params)

    # the flash layout: edgerun/codecs/spqr/flash.py
    @classmethod
    def flash_cut(cls, gate, up, down, params, perm):
        from . import flash
        return flash.cut(gate, up, down, params, perm)

    @classmethod
    def flash_bundle_parts(cls, params, d):
        from . import flash
        return flash.bundle_parts(params, d)

    @classmethod
    def flash_kernels(cls, shared, nid, params, d, f, scratch):
        from . import flash
        return flash.SpQRBundles(shared, nid, params, d, f, scratch)

    @classmethod
    def flash_scratch_bytes(cls, d, f):
        from . import flash
        return flash.SpQRBundles.scratch_bytes(d, f)
