"""Weight codecs (DESIGN §4): one package per storage format, registered by name.

    edgerun/codecs/<name>/__init__.py   the Codec subclass (`class XCodec(Codec, name="x")`)
                         format.py      parts, params parsing and checks, bits accounting
                         encode.py      pack time only (GPTQ, k-means, ...)
                         reference.py   plain NumPy decode and matvec: the oracle for tests
                         kernels.py     the Numba / LLVM IR kernels and the `Linear`
                         cuda.py        the numba-cuda kernels and `DeviceLinear`

A codec has `name`, `encode(w, params, hessian=None) -> parts`, `decode(parts, params) -> float32`
(reference, tests only), `load(parts, params) -> Linear` (with `matvec(x, out)`, `matmul(X, out)`,
`row(i, out)`, `shape`, `nbytes`, `bits_per_weight`), `nbytes(parts)` and `to_device(linear)`,
plus what recipes and the CLI need (`arg`, `default_arg`, `arg_range`, `params_from_arg`); see
edgerun/codecs/base.py.

`hessian` is the calibration statistic of the weight's input: H = mean of x xᵀ over calibration
tokens, float64 (n, n) (see edgerun/calibrate.py). Codecs that need no calibration ignore it.

A codec package is imported on first use (`get_codec`), so its kernels are defined and compiled
only when a model needs them; `codec_names()` lists the packages without importing them.
"""
from __future__ import annotations

import importlib
import os
import sys

from ..errors import EdgerunError, UnsupportedModelError

_NOT_CODECS = ("base", "llvm_ir", "gptq")


def _packages() -> list[str]:
    """The codec packages shipped in edgerun/codecs/ (a directory listing, no import)."""
    here = __path__[0]
    return sorted(e.name for e in os.scandir(here) if e.is_dir() and e.name.isidentifier()
                  and e.name not in _NOT_CODECS and os.path.exists(os.path.join(here, e.name, "__init__.py")))


def _registry() -> dict:
    from .base import REGISTRY
    return REGISTRY


def codec_names() -> list[str]:
    """Every codec: the shipped packages and any other registered Codec subclass."""
    names = set(_packages())
    if f"{__name__}.base" in sys.modules:          # registered by a package of its own
        names |= set(_registry())
    return sorted(names)


def codec_class(name: str) -> type:
    """The Codec subclass registered as `name`, importing its package on first use;
    UnsupportedModelError if unknown."""
    registry = _registry()
    if name not in registry and name in _packages():
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError as e:     # say why: a missing dependency, or a broken install
            raise UnsupportedModelError(f"weight codec {name!r} is not available in this edgerun build ({e})") from e
    if name not in registry:
        raise UnsupportedModelError(
            f"weight codec {name!r} is not supported (known: {', '.join(codec_names())})")
    return registry[name]


def get_codec(name: str):
    """The codec registered as `name` (an instance); UnsupportedModelError if unknown."""
    return codec_class(name)()


def all_codecs() -> dict[str, type]:
    """name -> Codec subclass for every codec (imports every package: tests, help, recipes)."""
    return {name: codec_class(name) for name in codec_names()}


def __getattr__(attr):
    # CODECS: name -> "edgerun.codecs.<name>" of the shipped codecs (the old table's callers)
    if attr == "CODECS":
        return {name: f"{__name__}.{name}" for name in _packages()}
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def parse_rule(text: str) -> dict:
    """A recipe rule -> {"codec", "params"}: `CODEC:ARG` (`spqr:3`, `cluster:4`, `bitstack:16`,
    `dense:bf16`), `CODEC` alone (its default ARG), or a codec's shorthand (`f16` = dense:f16)."""
    name, _, arg = text.strip().partition(":")
    if name not in codec_names():
        owners = [c for c in all_codecs().values() if text.strip() in c.shorthands]
        if not owners:
            raise EdgerunError(f"recipe rule {text!r}: unknown codec {name!r}; rules: "
                               + ", ".join(c.syntax() for c in all_codecs().values()))
        name, arg = owners[0].name, text.strip()
    cls = codec_class(name)
    return {"codec": name, "params": cls.params_from_arg(arg)}


def describe_rule(rule: dict) -> str:
    """`{"codec": "spqr", "params": {"bits": 3}}` -> `spqr:3`."""
    return codec_class(rule["codec"]).describe(rule["params"])
