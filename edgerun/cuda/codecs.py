"""CUDA linears for every codec, on the same stored parts as the CPU (uploaded once, compressed).

`to_device(linear)` takes a loaded CPU Linear and uploads its parts as they are stored (16-bit
floats as float16 views of the same bytes) through its codec: `DeviceLinear` of the codec
package's cuda.py (edgerun/codecs/<name>/cuda.py), looked up by the codec's registered name.
`.matmul(X, out, bias, accumulate)` computes out (T, d) (+)= X (T, n) @ W.T (+ bias) with device
arrays. Byte layouts: formats/codec-*.md. All kernels: a row group of LANES threads (a warp) per
output row, ROWS rows per block, TT tokens per row group (each weight is fetched and decoded
once per TT tokens). This module holds what the codecs' CUDA linears share.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..errors import UnsupportedModelError
from .kernels import ACCUMULATE, HAS_BIAS, LANES, ROWS, TT

F16 = np.float16


def launch_dims(d: int, T: int):
    """(grid, block) of a row-group kernel over d rows and T tokens."""
    return ((d + ROWS - 1) // ROWS, (T + TT - 1) // TT), ROWS * LANES


def where():
    # (row group w, lane, row r, first token t0) of this thread
    w = cuda.threadIdx.x // LANES
    lane = cuda.threadIdx.x % LANES
    return w, lane, cuda.blockIdx.x * ROWS + w, cuda.blockIdx.y * TT


where = cuda.jit(device=True)(where)

_NO_BIAS = None


def no_bias():
    global _NO_BIAS
    if _NO_BIAS is None:
        _NO_BIAS = cuda.to_device(np.zeros(1, np.float32))
    return _NO_BIAS


def flags_of(bias, accumulate):
    return (HAS_BIAS if bias is not None else 0) | (ACCUMULATE if accumulate else 0)


class CudaLinear:
    """Base: `shape` (d, n), `nbytes` (device bytes of the uploaded parts), `matmul`."""

    shape: tuple
    nbytes: int

    def matmul(self, X, out, bias=None, accumulate: bool = False) -> None:
        """out (T, d) (+)= X (T, n) @ W.T (+ bias (d,)); all device arrays."""
        raise NotImplementedError

    def matvec(self, x, out, bias=None, accumulate: bool = False) -> None:
        """out (d,) (+)= W @ x (n,) (+ bias): the T = 1 matmul (device arrays)."""
        self.matmul(x.reshape(1, x.shape[0]), out.reshape(1, out.shape[0]), bias, accumulate)

    def _up(self, *arrays):
        dev = [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]
        self.nbytes = getattr(self, "nbytes", 0) + sum(int(a.nbytes) for a in arrays)
        return dev



def to_device(lin) -> CudaLinear:
    """Upload a loaded CPU Linear as its CUDA twin, through the codec it was loaded by."""
    from ..codecs import codec_class
    name = getattr(lin, "codec", "")
    if not name:
        why = getattr(lin, "no_cuda", f"{type(lin).__name__} (not a codec's Linear)")
        raise UnsupportedModelError(f"no CUDA kernel for {why}")
    return codec_class(name).to_device(lin)
