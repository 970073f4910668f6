"""CUDA linears for every codec, on the same stored parts as the CPU (uploaded once, compressed).

`to_device(linear)` takes a loaded CPU Linear (edgerun/codecs/*.py) and uploads its parts as
they are stored (16-bit floats as float16 views of the same bytes); `.matmul(X, out, bias,
accumulate)` computes out (T, d) (+)= X (T, n) @ W.T (+ bias) with device arrays. Byte layouts:
formats/codec-*.md. All kernels: a row group of LANES threads (a warp) per output row, ROWS rows
per block, TT tokens per row group (each weight is fetched and decoded once per TT tokens).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32

from ..errors import UnsupportedModelError
from .kernels import ACCUMULATE, HAS_BIAS, LANES, MAX_WARPS, ROWS, TT, store_rows, warp_barrier, warp_sum

_F16 = np.float16


def _grid(d: int, T: int):
    return ((d + ROWS - 1) // ROWS, (T + TT - 1) // TT), ROWS * LANES


def _where():
    # (row group w, lane, row r, first token t0) of this thread
    w = cuda.threadIdx.x // LANES
    lane = cuda.threadIdx.x % LANES
    return w, lane, cuda.blockIdx.x * ROWS + w, cuda.blockIdx.y * TT


_where = cuda.jit(device=True)(_where)


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
    w, lane, r, t0 = _where()
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
    w, lane, r, t0 = _where()
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
    if bits & 1:                      # little-endian uint32, bit c
        q |= ((int32(codes[r, off + (c >> 3)]) >> (c & 7)) & 1) << sh
    return q


@cuda.jit(fastmath=True)
def mm_cluster(codes, cb, rp, oc, ov, X, out, bias, flags, n, bits, group_rows):
    # codes (d, nblk*4*bits) u8, cb (G, K) f16, CSR outliers (rp i32, oc u16, ov f16), X (T, n)
    # -> out (T, d). The row's codebook is widened into shared memory once; lane l of a block
    # decodes column l (its byte of each plane: a warp reads the block's 4*bits bytes together)
    red = cuda.shared.array((MAX_WARPS, 32), float32)
    tab = cuda.shared.array((ROWS, 256), float32)
    w, lane, r, t0 = _where()
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


# --- spqr (formats/codec-spqr.md) ------------------------------------------------------------

@cuda.jit
def spqr_prep(X, perm, Xp):
    # X (T, n) -> Xp (T, 16, G): Xp[t, j & 15, j >> 4] = X[t, perm[j]] (0 past n), so lane g of a
    # row group reads Xp[t, pos, g]: consecutive groups, coalesced
    e = cuda.grid(1)
    T = X.shape[0]
    G = Xp.shape[2]
    n = perm.shape[0]
    if e < T * 16 * G:
        t = e // (16 * G)
        j = e - t * 16 * G
        Xp[t, j & 15, j >> 4] = X[t, int32(perm[j])] if j < n else float32(0.0)


@cuda.jit(device=True)
def _spqr_code(codes, r, base, wdt, pos, bits):
    # code of position pos (0..15) of the group whose byte in section u is codes[r, base + u*wdt]
    if bits == 4:
        return (int32(codes[r, base + (pos >> 1) * wdt]) >> (4 * (pos & 1))) & 15
    q = (int32(codes[r, base + (pos >> 2) * wdt]) >> (2 * (pos & 3))) & 3
    if bits == 3:
        q |= ((int32(codes[r, base + (4 + (pos >> 3)) * wdt]) >> (pos & 7)) & 1) << 2
    return q


@cuda.jit(fastmath=True)
def mm_spqr(codes, stq, st2, rp, oc, ov, Xp, out, bias, flags, bits, sbits, sg):
    # codes (d, 2*bits*G) u8 in 16-group chunks of byte sections, stq (d, G) u8, st2 (R, 4, G) f16,
    # CSR outliers in storage columns, Xp (T, 16, G) -> out (T, d). A lane takes a group: its
    # byte of each section (consecutive groups are consecutive bytes: coalesced), its stats,
    # then w = s (q - z) over 16 positions as s (sum q x - z sum x)
    red = cuda.shared.array((MAX_WARPS, 32), float32)
    w, lane, r, t0 = _where()
    d, G = stq.shape
    T = Xp.shape[0]
    acc = cuda.local.array(TT, float32)
    dot = cuda.local.array(TT, float32)
    sx = cuda.local.array(TT, float32)
    for t in range(TT):
        acc[t] = 0.0
    if r < d:
        rb = r // sg
        smask = (1 << sbits) - 1
        for g in range(lane, G, LANES):
            c0 = (g >> 4) << 4
            wdt = min(16, G - c0)
            base = c0 * 2 * bits + (g - c0)
            sc = int32(stq[r, g])
            s = float32(st2[rb, 0, g]) * float32(sc & smask) + float32(st2[rb, 1, g])
            z = float32(st2[rb, 2, g]) * float32(sc >> sbits) + float32(st2[rb, 3, g])
            for t in range(TT):
                dot[t] = 0.0
                sx[t] = 0.0
            for pos in range(16):
                qv = float32(_spqr_code(codes, r, base, wdt, pos, bits))
                for t in range(TT):
                    if t0 + t < T:
                        xv = Xp[t0 + t, pos, g]
                        dot[t] += qv * xv
                        sx[t] += xv
            for t in range(TT):
                acc[t] += s * (dot[t] - z * sx[t])
        for p in range(rp[r] + lane, rp[r + 1], LANES):
            wv = float32(ov[p])
            j = int32(oc[p])
            for t in range(TT):
                if t0 + t < T:
                    acc[t] += wv * Xp[t0 + t, j & 15, j >> 4]
    store_rows(acc, out, bias, flags, r, t0, red, w, lane)


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
    w, lane, r, _ = _where()
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


# --- device linears -------------------------------------------------------------------------

_NO_BIAS = None


def _no_bias():
    global _NO_BIAS
    if _NO_BIAS is None:
        _NO_BIAS = cuda.to_device(np.zeros(1, np.float32))
    return _NO_BIAS


def _flags(bias, accumulate):
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


class CudaDense(CudaLinear):
    def __init__(self, lin):
        self.shape = lin.shape
        self.dtype = lin.dtype
        W = lin.W.view(_F16) if lin.dtype == "f16" else lin.W     # same bytes, typed for the GPU
        (self.W,) = self._up(W)
        self._kernel = mm_bf16 if lin.dtype == "bf16" else mm_dense

    def matmul(self, X, out, bias=None, accumulate=False):
        grid, block = _grid(self.shape[0], X.shape[0])
        self._kernel[grid, block](self.W, X, out, bias if bias is not None else _no_bias(),
                                  _flags(bias, accumulate))


class CudaCluster(CudaLinear):
    def __init__(self, lin):
        self.shape = lin.shape
        self.bits, self.group_rows = int(lin.bits), int(lin.group_rows)
        self.codes, self.cb, self.rp, self.oc, self.ov = self._up(
            lin.codes, lin.codebook.view(_F16), lin.rp, lin.oc, lin.ov.view(_F16))
        self.nbytes += 16          # meta: kept on the host as scalars

    def matmul(self, X, out, bias=None, accumulate=False):
        grid, block = _grid(self.shape[0], X.shape[0])
        mm_cluster[grid, block](self.codes, self.cb, self.rp, self.oc, self.ov, X, out,
                                bias if bias is not None else _no_bias(), _flags(bias, accumulate),
                                int32(self.shape[1]), int32(self.bits), int32(self.group_rows))


class CudaSpQR(CudaLinear):
    def __init__(self, lin):
        self.shape = lin.shape
        self.bits, self.sbits, self.sg, self.G = int(lin.bits), int(lin.sbits), int(lin.sg), int(lin.G)
        perm = lin.perm.astype(np.uint16) if lin.shape[1] <= 65536 else lin.perm   # as stored
        self.codes, self.stq, self.st2, self.perm, self.rp, self.oc, self.ov = self._up(
            lin.codes, lin.stq, lin.st2.view(_F16), perm, lin.rp, lin.oc, lin.ov.view(_F16))
        self._Xp = None            # permuted activations (T, 16, G), grown once

    def matmul(self, X, out, bias=None, accumulate=False):
        T = X.shape[0]
        if self._Xp is None or self._Xp.shape[0] < T:
            self._Xp = cuda.device_array((T, 16, self.G), np.float32)
        Xp = self._Xp[:T]
        spqr_prep[max(1, (T * 16 * self.G + 127) // 128), 128](X, self.perm, Xp)
        grid, block = _grid(self.shape[0], T)
        mm_spqr[grid, block](self.codes, self.stq, self.st2, self.rp, self.oc, self.ov, Xp, out,
                             bias if bias is not None else _no_bias(), _flags(bias, accumulate),
                             int32(self.bits), int32(self.sbits), int32(self.sg))


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
        u = np.zeros((mm, lin.d, k), _F16)
        v = np.zeros((mm, lin.n, k), _F16)
        for i, (s, ui, vi) in enumerate(views):
            signs[i], u[i], v[i] = s, ui[:, :k].view(_F16), vi[:, :k].view(_F16)
        self.signs, self.u, self.v, self.inv = self._up(signs, u, v, lin.inv_scale)
        self.nbytes = m * lin.block_bytes + lin._meta_bytes     # the honest stored size
        self.blocks = m

    def matmul(self, X, out, bias=None, accumulate=False):
        self.sync()
        T = X.shape[0]
        grid = ((self.shape[0] + ROWS - 1) // ROWS, T)
        mm_bitstack[grid, ROWS * LANES](self.signs, self.u, self.v, self.inv, X, out,
                                         bias if bias is not None else _no_bias(), _flags(bias, accumulate),
                                         int32(self.blocks), int32(self.k), int32(self.kl))


def to_device(lin) -> CudaLinear:
    """Upload a loaded CPU Linear (dense, cluster, spqr, bitstack) as its CUDA twin."""
    kind = type(lin).__name__
    table = {"DenseLinear": CudaDense, "ClusterLinear": CudaCluster, "SpQRLinear": CudaSpQR,
             "BitStackLinear": CudaBitStack}
    if kind not in table:
        raise UnsupportedModelError(f"no CUDA kernel for {kind} (CUDA supports dense, cluster, spqr, bitstack)")
    return table[kind](lin)
