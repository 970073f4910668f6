"""edgerun: on-device LLM inference for memory-limited hardware.

    import edgerun
    with edgerun.load("model.ebin", ram="1GB") as m:
        for piece in m.stream("The capital of France is", max_tokens=32):
            print(piece, end="", flush=True)
"""
import os

# The dense/cluster/spqr kernels never call BLAS, but calibration, BitStack's prefill and the
# streamed FFN's prefill do, while Numba runs its own kernel threads; OpenBLAS's spinning worker
# threads then fight Numba's for the same cores (measured: a 14-token prefill went from 0.06 s to
# 1 s). One BLAS thread unless the user chose otherwise; set before NumPy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"

from .errors import BudgetError, Cancelled, EdgerunError, FormatError, UnsupportedModelError  # noqa: E402

__all__ = ["load", "Model", "EdgerunError", "FormatError", "UnsupportedModelError", "BudgetError", "Cancelled"]


def __getattr__(name):
    # Importing numba and the kernels takes a moment: only when the API is used.
    if name in ("load", "Model"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
