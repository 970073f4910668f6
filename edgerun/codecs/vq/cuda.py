"""VQ codec on CUDA (numba-cuda): the kernel and `DeviceLinear` (formats/codec-vq.md; shared
helpers in edgerun/cuda/codecs.py). Imported only by `Codec.to_device`."""
from __future__ import annotations

from numba import cuda, float32, int32

from ...cuda.codecs import CudaLinear, flags_of, launch_dims, no_bias, where
from ...cuda.kernels import LANES, MAX_WARPS, TT, store_rows


@cuda.jit(device=True)
def _vq_code(codes, r, p, c):
    # code of pair p of row r: bits c·(p % 8) .. of group p // 8's c bytes (little-endian); a code
    # spans at most two bytes (c ≤ 8)
    bit = (p & 7) * c
    off = (p >> 3) * c + (bit >> 3)
    v = int32(codes[r, off])
    if (bit & 7) + c > 8:
        v |= int32(codes[r, off + 1]) << 8
    return (v >> (bit & 7)) & ((1 << c) - 1)


@cuda.jit(fastmath=True)
def mm_vq(codes, cbx, cby, scale, cols, X, out, bias, flags, n, c, group_rows):
    # codes (d, ngrp*c) u8, cbx/cby (G, K) f32 centroid coordinates, scale (d,) f32, cols
    # (ngrp*16,) i32 pair columns (>= n: padding), X (T, n) -> out (T, d); lane l of a row
    # decodes pairs l, l + LANES, ...
    red = cuda.shared.array((MAX_WARPS, 32), float32)
    w, lane, r, t0 = where()
    d = codes.shape[0]
    T = X.shape[0]
    acc = cuda.local.array(TT, float32)
    for t in range(TT):
        acc[t] = 0.0
    if r < d:
        g = r // group_rows
        s = scale[r]
        for p in range(lane, (n + 1) // 2, LANES):
            k = _vq_code(codes, r, p, c)
            ja = cols[2 * p]
            jb = cols[2 * p + 1]
            wa = s * cbx[g, k]
            wb = s * cby[g, k]
            for t in range(TT):
                if t0 + t < T:
                    v = wa * X[t0 + t, ja]
                    if jb < n:
                        v += wb * X[t0 + t, jb]
                    acc[t] += v
    store_rows(acc, out, bias, flags, r, t0, red, w, lane)


class CudaVQ(CudaLinear):
    def __init__(self, lin):
        self.shape = lin.shape
        self.c, self.group_rows = int(lin.c), int(lin.group_rows)
        self.codes, self.cbx, self.cby, self.scale, self.cols = self._up(
            lin.codes, lin.cbx, lin.cby, lin.scale, lin.cols)
        self.nbytes += 16          # meta: kept on the host as scalars

    def matmul(self, X, out, bias=None, accumulate=False):
        grid, block = launch_dims(self.shape[0], X.shape[0])
        mm_vq[grid, block](self.codes, self.cbx, self.cby, self.scale, self.cols, X, out,
                           bias if bias is not None else no_bias(), flags_of(bias, accumulate),
                           int32(self.shape[1]), int32(self.c), int32(self.group_rows))


DeviceLinear = CudaVQ
