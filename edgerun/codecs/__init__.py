"""Weight codecs (DESIGN §4): one module per storage format, registered by name.

A codec has `name`, `encode(w, params, hessian=None) -> parts`, `decode(parts, params) -> float32`
(reference, tests only), `load(parts, params) -> Linear` (with `matvec(x, out)`, `matmul(X, out)`,
`row(i, out)`, `shape`, `nbytes`, `bits_per_weight`) and `nbytes(parts)`.

`hessian` is the calibration statistic of the weight's input: H = mean of x xᵀ over calibration
tokens, float64 (n, n) (see edgerun/calibrate.py). Codecs that need no calibration ignore it.
"""
from __future__ import annotations

import importlib

from ..errors import UnsupportedModelError

# name -> "module:Class", imported on first use so a codec's kernels compile only when needed
CODECS = {
    "dense": "edgerun.codecs.dense:DenseCodec",
    "cluster": "edgerun.codecs.cluster:ClusterCodec",
    "spqr": "edgerun.codecs.spqr:SpQRCodec",
    "bitstack": "edgerun.codecs.bitstack:BitStackCodec",
}


def get_codec(name: str):
    """The codec registered as `name` (an instance); UnsupportedModelError if unknown."""
    if name not in CODECS:
        raise UnsupportedModelError(
            f"weight codec {name!r} is not supported (known: {', '.join(sorted(CODECS))})")
    module, cls = CODECS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except (ImportError, AttributeError):
        raise UnsupportedModelError(f"weight codec {name!r} is not available in this edgerun build") from None
