"""Cluster codec on CUDA (numba-cuda): the kernel and `DeviceLinear` (formats/codec-cluster.md;
shared helpers in edgerun/cuda/codecs.py). Imported only by `Codec.to_device`."""
from __future__ import annotations

from numba import cuda, float32, int32

from ...cuda.codecs import F16, CudaLinear, flags_of, launch_dims, no_bias, where
from ...cuda.kernels import LANES, MAX_WARPS, ROWS, TT, store_rows, warp_barrier


# --- cluster (palettized; formats/codec-cluster.md) -----------------------------------------

@cuda.jit(device=True)
def _cluster_index(codes, r, base, c, bits):
    # index of column c (0..31) of the 32-column block at codes[r, base:]: planes 4,4 | 2 | 1
    q = 0
    sh = 0
    off = base
    for _ in range(bits // 4):        # byte k = f[k] | f[k+16] << 4
        q |= ((int32(codes[r, off + (c & 15)]) >> (4 * (c >> 4))) & 15) << sh
        sh += 4
        off += 16
    if bits & 2:                      # byte k = f[k] | f[k+8] << 2 | f[k+16] << 4 | f[k+24] << 6
        q |= ((int32(codes[r, off + (c & 7)]) >> (2 * (c >> 3))) & 3) << sh
        sh += 2
        off += 8
    if bits & 1:                      # byte k = f[k] | f[k+4] << 1 | ... | f[k+28] << 7
        q |= ((int32(codes[r, off + (c & 3)]) >> (c >> 2)) & 1) << sh
    return q


@cuda.jit(fastmath=True)
def mm_cluster(codes, cb, rp, oc, ov, X, out, bias, flags, n, bits, group_rows):
    # codes (d, nblk*4*bits) u8, cb (G, K) f16, CSR outliers (rp i32, oc u16, ov f16), X (T, n)
    # -> out (T, d). The row's codebook is widened into shared memory once; lane l of a block
    # decodes column l (its byte of each plane: a warp reads the block's 4*bits bytes together)
    red = cuda.shared.array((MAX_WARPS, 32), float32)
    tab = cuda.shared.array((ROWS, 256), float32)
    w, lane, r, t0 = where()
    d = codes.shape[0]
    T = X.shape[0]
    K = cb.shape[1]
    if r < d:
        g = r // group_rows
        for k in range(lane, K, LANES):
            tab[w, k] = float32(cb[g, k])
    warp_barrier()
    acc = cuda.local.array(TT, float32)
    for t in range(TT):
        acc[t] = 0.0
    if r < d:
        nblk = (n + 31) // 32
        for b in range(nblk):
            base = b * 4 * bits
            for c in range(lane, 32, LANES):
                j = b * 32 + c
                if j < n:
                    wv = tab[w, _cluster_index(codes, r, base, c, bits)]
                    for t in range(TT):
                        if t0 + t < T:
                            acc[t] += wv * X[t0 + t, j]
        for p in range(rp[r] + lane, rp[r + 1], LANES):
            wv = float32(ov[p])
            j = int32(oc[p])
            for t in range(TT):
                if t0 + t < T:
                    acc[t] += wv * X[t0 + t, j]
    store_rows(acc, out, bias, flags, r, t0, red, w, lane)


class CudaCluster(CudaLinear):
    def __init__(self, lin):
        self.shape = lin.shape
        self.bits, self.group_rows = int(lin.bits), int(lin.group_rows)
        self.codes, self.cb, self.rp, self.oc, self.ov = self._up(
            lin.codes, lin.codebook.view(F16), lin.rp, lin.oc, lin.ov.view(F16))
        self.nbytes += 16          # meta: kept on the host as scalars

    def matmul(self, X, out, bias=None, accumulate=False):
        grid, block = launch_dims(self.shape[0], X.shape[0])
        mm_cluster[grid, block](self.codes, self.cb, self.rp, self.oc, self.ov, X, out,
                                bias if bias is not None else no_bias(), flags_of(bias, accumulate),
                                int32(self.shape[1]), int32(self.bits), int32(self.group_rows))


DeviceLinear = CudaCluster
