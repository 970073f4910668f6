"""Dense codec on CUDA (numba-cuda): the kernel and `DeviceLinear` (formats/codec-dense.md;
shared helpers in edgerun/cuda/codecs.py). Imported only by `Codec.to_device`."""
from __future__ import annotations

import math

from numba import cuda, float32, int32

from ...cuda.codecs import F16, CudaLinear, flags_of, launch_dims, no_bias, where
from ...cuda.kernels import LANES, MAX_WARPS, TT, store_rows


@cuda.jit(device=True)
def _bf16(b):
    # bfloat16 bits (uint16) -> float32 by arithmetic: (1.m) 2^(e-127), exact (no bit casts in numba-cuda)
    e = (int32(b) >> 7) & 0xFF
    m = int32(b) & 0x7F
    if e == 0:
        v = float32(m) * math.pow(float32(2.0), float32(-133.0))
    elif e == 255:
        v = float32(3.0e38) if m == 0 else float32(math.nan)
    else:
        v = float32(m | 0x80) * math.pow(float32(2.0), float32(e - 134))
    return -v if int32(b) & 0x8000 else v


# --- dense ---------------------------------------------------------------------------------

@cuda.jit(fastmath=True)
def mm_dense(W, X, out, bias, flags):
    # W (d, n) f32|f16, X (T, n) -> out (T, d) (+)= X W^T (+ bias); lanes read consecutive columns
    red = cuda.shared.array((MAX_WARPS, 32), float32)
    w, lane, r, t0 = where()
    d, n = W.shape
    T = X.shape[0]
    acc = cuda.local.array(TT, float32)
    for t in range(TT):
        acc[t] = 0.0
    if r < d:
        for j in range(lane, n, LANES):
            wv = float32(W[r, j])
            for t in range(TT):
                if t0 + t < T:
                    acc[t] += wv * X[t0 + t, j]
    store_rows(acc, out, bias, flags, r, t0, red, w, lane)


@cuda.jit(fastmath=True)
def mm_bf16(W, X, out, bias, flags):
    # W (d, n) bf16 bits u16, X (T, n) -> out (T, d) (+)= X W^T (+ bias)
    red = cuda.shared.array((MAX_WARPS, 32), float32)
    w, lane, r, t0 = where()
    d, n = W.shape
    T = X.shape[0]
    acc = cuda.local.array(TT, float32)
    for t in range(TT):
        acc[t] = 0.0
    if r < d:
        for j in range(lane, n, LANES):
            wv = _bf16(W[r, j])
            for t in range(TT):
                if t0 + t < T:
                    acc[t] += wv * X[t0 + t, j]
    store_rows(acc, out, bias, flags, r, t0, red, w, lane)


class CudaDense(CudaLinear):
    def __init__(self, lin):
        self.shape = lin.shape
        self.dtype = lin.dtype
        W = lin.W.view(F16) if lin.dtype == "f16" else lin.W     # same bytes, typed for the GPU
        (self.W,) = self._up(W)
        self._kernel = mm_bf16 if lin.dtype == "bf16" else mm_dense

    def matmul(self, X, out, bias=None, accumulate=False):
        grid, block = launch_dims(self.shape[0], X.shape[0])
        self._kernel[grid, block](self.W, X, out, bias if bias is not None else no_bias(),
                                  flags_of(bias, accumulate))


DeviceLinear = CudaDense
