"""Cluster codec: k-means palettization (DESIGN §4 "cluster"; spec formats/codec-cluster.md).

format.py: parts, params, the bit-plane layout · encode.py: weighted k-means and GPTQ rounding ·
reference.py: NumPy decode · kernels.py: LLVM IR kernels and ClusterLinear · cuda.py: numba-cuda.
"""
from __future__ import annotations

import numpy as np

from ..base import Codec
from . import encode as _encode, reference
from .format import (BLOCK, FILE_FEATURE, OUTLIER_PARTS, PLANE_ORDER, default_group_rows,  # noqa: F401
                     meta_array, pack_indices, params_of, unpack_indices)
from .kernels import MATMUL_MIN_T, PAR_MIN_WEIGHTS, TILE_ROWS, ClusterLinear  # noqa: F401

# SqueezeLLM's dense-and-sparse: 0.3% of the most sensitive weights kept exact in fp16 (measured on
# SmolLM2 FFN at 4 bits: perplexity 41.3 -> 38.0 for +0.14 bits/weight); what `cluster:BITS` packs
OUTLIERS = 0.003


class ClusterCodec(Codec, name="cluster"):
    """k-means palettized weights; params {"bits": 2..8, "group_rows": g, "outliers": fraction,
    "gptq": True, "percdamp": 0.01}. Recipe rule `cluster:BITS` (outliers 0.3%)."""

    arg, default_arg, arg_range = "bits", 4, (2, 8)
    row_parts = ("codes",)
    file_features = (FILE_FEATURE,)
    example_params = ({"bits": 3}, {"bits": 4, "outliers": 0.01}, {"bits": 5, "group_rows": 2},
                      {"bits": 8})

    @classmethod
    def params_from_arg(cls, arg=None) -> dict:
        return {**super().params_from_arg(arg), "outliers": OUTLIERS}

    @classmethod
    def part_nbytes(cls, shape: tuple, params: dict) -> dict[str, int]:
        """formats/codec-cluster.md: codes, codebooks, meta, and the CSR outliers (their count is
        round(outliers · d · n), fixed before encoding)."""
        d, n = shape
        bits, g, frac = params_of(params, n)
        sizes = {"codes": d * -(-n // BLOCK) * 4 * bits, "codebook": -(-d // min(g, d)) * (1 << bits) * 2,
                 "meta": 20}
        if frac:
            k = int(round(frac * d * n))
            sizes.update(outlier_rowptr=4 * (d + 1), outlier_col=2 * k, outlier_val=2 * k)
        return sizes

    @classmethod
    def candidates(cls) -> tuple[dict, ...]:
        # with and without the fp16 outliers: on rotated inputs they buy little (SmolLM2
        # attention+FFN cluster:3 rotated: 3.331 -> 3.188 bits/weight, perplexity 48.37 -> 48.68)
        with_outliers = tuple(cls.params_from_arg(b) for b in range(cls.arg_range[0], cls.arg_range[1] + 1))
        return with_outliers + tuple({**p, "outliers": 0} for p in with_outliers)

    @staticmethod
    def encode(w: np.ndarray, params: dict, hessian: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """float32 (d, n) -> {"codes", "codebook", "meta"} + outlier parts (encode.encode)."""
        return _encode.encode(w, params, hessian)

    @staticmethod
    def decode(parts: dict, params: dict | None = None) -> np.ndarray:
        """Reference NumPy decode to float32 (tests only)."""
        return reference.decode(parts, params)

    @staticmethod
    def load(parts: dict, params: dict | None = None) -> ClusterLinear:
        """A ClusterLinear over the parts (zero-copy for C-contiguous arrays)."""
        return ClusterLinear(parts)
