"""Weight codecs (DESIGN §4): one module per storage format, registered by name.

A codec has `name`, `encode(w, params) -> parts`, `decode(parts, params) -> float32` (reference,
tests only), `load(parts, params) -> Linear` (with `matvec(x, out)`, `matmul(X, out)`,
`row(i, out)`, `shape`, `nbytes`, `bits_per_weight`) and `nbytes(parts)`.
"""
from __future__ import annotations

from ..errors import UnsupportedModelError
from .dense import DenseCodec

CODECS = {"dense": DenseCodec}


def get_codec(name: str):
    """The codec registered as `name` (an instance); UnsupportedModelError if unknown."""
    try:
        return CODECS[name]()
    except KeyError:
        raise UnsupportedModelError(
            f"weight codec {name!r} is not supported (known: {', '.join(sorted(CODECS))})") from None
