"""BitStack codec on CUDA (numba-cuda): the kernel and `DeviceLinear` (formats/codec-bitstack.md;
shared helpers in edgerun/cuda/codecs.py). Imported only by `Codec.to_device`."""
from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32

from ...cuda.codecs import F16, CudaLinear, flags_of, no_bias, where
from ...cuda.kernels import ACCUMULATE, HAS_BIAS, LANES, MAX_WARPS, ROWS, warp_sum


# --- bitstack (formats/codec-bitstack.md) ------------------------------------------------------

CT = 32                          # columns per LUT tile: 8 chunks of 4 columns


@cuda.jit(fastmath=True)
def mm_bitstack(signs, u, v, inv, X, out, bias, flags, m, k, kl):
    # signs (M, d, nb) u8, u (M, d, k) f16, v (M, n, k) f16, inv (n,), X (T, n) -> out (T, d) over
    # the first m blocks; grid (row blocks, T). Per 32-column tile the block builds the LUT
    # tab[c, p, q] = sum_t (bit t of p ? -1 : 1) v[4c+t, q] z[4c+t] (z = x * inv_scale) in shared
    # memory; a row then adds tab[c, nibble(r, c), q] * u[r, q]: one shared load per 4 weights per
    # rank lane (LUT-GEMM / T-MAC), the signs read as bytes shared by the warp
    red = cuda.shared.array((MAX_WARPS, 32), float32)
    tab = cuda.shared.array((8, 16, 16), float32)
    w, lane, r, _ = where()
    tok = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    nthreads = ROWS * LANES
    d = signs.shape[1]
    n = v.shape[1]
    acc = float32(0.0)
    for i in range(m):
        for c0 in range(0, n, CT):
            cuda.syncthreads()                    # previous tile fully consumed
            for e in range(tid, 8 * 16 * kl, nthreads):
                c = e // (16 * kl)
                p = (e // kl) % 16
                q = e % kl
                val = float32(0.0)
                if q < k:
                    for tt in range(4):
                        j = c0 + 4 * c + tt
                        if j < n:
                            term = float32(v[i, j, q]) * X[tok, j] * inv[j]
                            val += -term if (p >> tt) & 1 else term
                tab[c, p, q] = val
            cuda.syncthreads()
            if r < d:
                for e in range(lane, 8 * kl, LANES):
                    c = e // kl
                    q = e % kl
                    cg = c0 // 4 + c
                    if cg * 4 < n and q < k:
                        nib = (int32(signs[i, r, cg >> 1]) >> (4 * (cg & 1))) & 15
                        acc += tab[c, nib, q] * float32(u[i, r, q])
    s = warp_sum(acc, red, w, lane)
    if lane == 0 and r < d:
        if flags & HAS_BIAS:
            s += bias[r]
        if flags & ACCUMULATE:
            s += out[tok, r]
        out[tok, r] = s


class CudaBitStack(CudaLinear):
    """The host BitStackLinear's active prefix; `sync()` follows a host resize (set_blocks)."""

    def __init__(self, lin):
        self.host = lin
        self.shape = lin.shape
        self.k = int(lin.k)
        self.kl = 4 if self.k <= 4 else 8 if self.k <= 8 else 16
        self.blocks = -1
        self.sync()

    def sync(self) -> None:
        """Re-upload when the host prefix changed size (a resize is rare; a matmul is not)."""
        lin = self.host
        if lin.blocks == self.blocks:
            return
        m, k = lin.blocks, self.k
        views = lin._views
        self.nbytes = 0
        mm = max(m, 1)    # a zero-block matrix keeps 1-block placeholders (never read: m = 0)
        signs = np.zeros((mm,) + (views[0][0].shape if m else (lin.d, (lin.n + 7) // 8)), np.uint8)
        u = np.zeros((mm, lin.d, k), F16)
        v = np.zeros((mm, lin.n, k), F16)
        for i, (s, ui, vi) in enumerate(views):
            signs[i], u[i], v[i] = s, ui[:, :k].view(F16), vi[:, :k].view(F16)
        self.signs, self.u, self.v, self.inv = self._up(signs, u, v, lin.inv_scale)
        self.nbytes = m * lin.block_bytes + lin._meta_bytes     # the honest stored size
        self.blocks = m

    def matmul(self, X, out, bias=None, accumulate=False):
        self.sync()
        T = X.shape[0]
        grid = ((self.shape[0] + ROWS - 1) // ROWS, T)
        mm_bitstack[grid, ROWS * LANES](self.signs, self.u, self.v, self.inv, X, out,
                                         bias if bias is not None else no_bias(), flags_of(bias, accumulate),
                                         int32(self.blocks), int32(self.k), int32(self.kl))


DeviceLinear = CudaBitStack
