"""VQ codec, the kernels: LUT matvec (T-MAC style), decode-tile matmul, row decode, and
`VQLinear` (formats/codec-vq.md § Matvec).

Matvec: per codebook group g and pair p, a table T[p, k] = c_gk · (x_a, x_b) of the K centroids
times the pair's two inputs (K multiply-adds per pair, shared by the group's rows), then
row r = scale_r · Σ_p T[p, code_rp]: one table load per two weights instead of two lookups, two
multiplies and a dequantization. Plain Numba loops (the table build vectorizes over k; the row
sum is scalar loads), so one source serves x86-64 baseline, AVX2, AVX-512 and arm64.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..base import Linear
from ..dense.kernels import _mm_rows as _dense_mm     # X (T, n) @ A[a0:a1].T, 4x4 register blocks
from .format import DIM, GROUP, check_meta, layout, pair_columns

_JIT = dict(cache=True, nogil=True, fastmath=True, no_cfunc_wrapper=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True, no_cfunc_wrapper=True)

PAR_MIN_WEIGHTS = 1 << 18  # matvecs this large use both threads
MATMUL_MIN_T = 2           # below this many tokens a matmul is a loop of matvecs
TILE_ROWS = 4              # rows decoded to f32 per matmul tile (register block of 4 rows)
TABLE_FLOATS = 4096        # matvec table chunk: 16 KiB, half of a typical L1 data cache


@njit(inline="always", **_JIT)
def _group_word(codes, i, off, c):
    # the c bytes at codes[i, off:] as a little-endian integer: 8 c-bit codes
    v = np.uint64(0)
    for t in range(c):
        v |= np.uint64(codes[i, off + t]) << np.uint64(8 * t)
    return v


@njit(**_JIT)
def _gather_x(x, cols, xp):
    # x (n,) -> xp (ngrp·16,) f32: the inputs in pair order, 0 for padding (cols >= n)
    n = x.shape[0]
    for q in range(xp.shape[0]):
        j = cols[q]
        xp[q] = x[j] if j < n else np.float32(0.0)


@njit(inline="always", **_JIT)
def _build_table(cbx, cby, g, xp, p0, p1, tab):
    # tab[(p − p0)·K + k] = cbx[g, k]·xp[2p] + cby[g, k]·xp[2p + 1] for pairs p0:p1
    K = cbx.shape[1]
    cx = cbx[g]
    cy = cby[g]
    for p in range(p0, p1):
        a = xp[2 * p]
        b = xp[2 * p + 1]
        t = tab[(p - p0) * K:(p - p0 + 1) * K]
        for k in range(K):                    # contiguous: vectorized
            t[k] = cx[k] * a + cy[k] * b


@njit(inline="always", **_JIT)
def _lut_rows_c(codes, c, tab, q0, q1, r0, r1, out):
    # out[r] += Σ_p tab[(p − 8·q0)·K + code[r, p]] over the pairs of code groups q0:q1, rows
    # r0:r1 (K = 2^c); inlined with a constant c (_lut_rows) so the byte loops unroll
    K = 1 << c
    mask = np.uint64(K - 1)
    cc = np.uint64(c)
    for i in range(r0, r1):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for q in range(q0, q1):
            v = _group_word(codes, i, q * c, c)
            base = (q - q0) * GROUP * K
            for k in range(0, GROUP, 4):      # four chains hide the add latency
                a0 += tab[base + k * K + np.int64(v & mask)]
                a1 += tab[base + (k + 1) * K + np.int64((v >> cc) & mask)]
                a2 += tab[base + (k + 2) * K + np.int64((v >> (2 * cc)) & mask)]
                a3 += tab[base + (k + 3) * K + np.int64((v >> (3 * cc)) & mask)]
                v >>= 4 * cc
        out[i] += (a0 + a1) + (a2 + a3)


@njit(inline="always", **_JIT)
def _lut_rows(codes, c, tab, q0, q1, r0, r1, out):
    # _lut_rows_c specialized for each code width
    if c == 4:
        _lut_rows_c(codes, 4, tab, q0, q1, r0, r1, out)
    elif c == 5:
        _lut_rows_c(codes, 5, tab, q0, q1, r0, r1, out)
    elif c == 6:
        _lut_rows_c(codes, 6, tab, q0, q1, r0, r1, out)
    elif c == 7:
        _lut_rows_c(codes, 7, tab, q0, q1, r0, r1, out)
    else:
        _lut_rows_c(codes, 8, tab, q0, q1, r0, r1, out)


@njit(**_JIT)
def _mv_rows(codes, cbx, cby, scale, meta, xp, out, r0, r1, tab):
    # rows r0:r1 -> out[r0:r1]; per codebook group, column chunks whose table (tab, TABLE_BYTES)
    # stays in L1 while every row of the group reads it
    c, gr = meta[2], meta[3]
    K = cbx.shape[1]
    ngrp = codes.shape[1] // c
    qstep = max(1, tab.shape[0] // (GROUP * K))
    for i in range(r0, r1):
        out[i] = np.float32(0.0)
    g = r0 // gr
    while g * gr < r1:
        a = max(r0, g * gr)
        b = min(r1, (g + 1) * gr)
        for q0 in range(0, ngrp, qstep):
            q1 = min(ngrp, q0 + qstep)
            _build_table(cbx, cby, g, xp, q0 * GROUP, q1 * GROUP, tab)
            _lut_rows(codes, c, tab, q0, q1, a, b, out)
        g += 1
    for i in range(r0, r1):
        out[i] *= np.float32(scale[i])


@njit(**_JIT)
def matvec_vq(codes, cbx, cby, scale, cols, meta, x, out, xp, tabs):
    # parts @ x (n,) -> out (d,); xp (npad·2,) f32, tabs (1, TABLE_FLOATS) f32 scratch
    _gather_x(x, cols, xp)
    _mv_rows(codes, cbx, cby, scale, meta, xp, out, 0, meta[0], tabs[0])


@njit(**_JIT_PAR)
def matvec_vq_par(codes, cbx, cby, scale, cols, meta, x, out, xp, tabs):
    # as matvec_vq, prange over tabs.shape[0] row blocks, each with its own table
    _gather_x(x, cols, xp)
    d = meta[0]
    nb = tabs.shape[0]
    step = (d + nb - 1) // nb
    for b in prange(nb):
        _mv_rows(codes, cbx, cby, scale, meta, xp, out, min(d, b * step), min(d, (b + 1) * step), tabs[b])


@njit(inline="always", **_JIT)
def _decode_row(codes, cbx, cby, scale, cols, meta, i, out):
    # row i -> out[:n] f32 (columns in natural order; padding dropped)
    n, c, gr = meta[1], meta[2], meta[3]
    g = i // gr
    s = np.float32(scale[i])
    mask = np.uint64((1 << c) - 1)
    ngrp = codes.shape[1] // c
    for q in range(ngrp):
        v = _group_word(codes, i, q * c, c)
        for k in range(GROUP):
            code = np.int64(v & mask)
            v >>= np.uint64(c)
            p = q * GROUP + k
            ja = cols[2 * p]
            jb = cols[2 * p + 1]
            if ja < n:
                out[ja] = s * cbx[g, code]
            if jb < n:
                out[jb] = s * cby[g, code]


@njit(**_JIT)
def row_vq(codes, cbx, cby, scale, cols, meta, i, out):
    # row i of the parts -> out (n,) f32
    _decode_row(codes, cbx, cby, scale, cols, meta, i, out)


@njit(**_JIT)
def _mm_rows(codes, cbx, cby, scale, cols, meta, X, out, r0, r1, tile):
    # X (T, n) @ W[r0:r1].T -> out[:, r0:r1]; tile (TILE_ROWS, n) f32 scratch: rows decoded
    # TILE_ROWS at a time, multiplied with the dense codec's register-blocked kernel
    tr = tile.shape[0]
    for i0 in range(r0, r1, tr):
        nr = min(tr, r1 - i0)
        for r in range(nr):
            _decode_row(codes, cbx, cby, scale, cols, meta, i0 + r, tile[r])
        _dense_mm(X, tile, 0, nr, out, i0)


@njit(**_JIT)
def matmul_vq(codes, cbx, cby, scale, cols, meta, X, out, tiles):
    # X (T, n) @ W.T -> out (T, d); tiles (1, 4, n) f32
    _mm_rows(codes, cbx, cby, scale, cols, meta, X, out, 0, meta[0], tiles[0])


@njit(**_JIT_PAR)
def matmul_vq_par(codes, cbx, cby, scale, cols, meta, X, out, tiles):
    # X (T, n) @ W.T -> out (T, d); prange over tiles.shape[0] row blocks (multiples of 4 rows)
    d = meta[0]
    nb = tiles.shape[0]
    step = ((d + nb - 1) // nb + 3) // 4 * 4
    for b in prange(nb):
        _mm_rows(codes, cbx, cby, scale, cols, meta, X, out, min(d, b * step), min(d, (b + 1) * step), tiles[b])


class VQLinear(Linear):
    """A loaded vq weight W (d, n): matvec / matmul / row on the stored codes (zero-copy); the
    codebooks, scales and column order widened at load (G·K·8 + 4·d + 8·npad bytes beside)."""

    codec = "vq"
    matmul_min_t = MATMUL_MIN_T

    def __init__(self, parts: dict):
        d, n, c, g = check_meta(parts)
        super().__init__((d, n), sum(p.nbytes for p in parts.values()), PAR_MIN_WEIGHTS)
        self.c, self.group_rows = c, g
        self.codes = np.ascontiguousarray(parts["codes"])
        cb = parts["codebook"].view(np.float16).astype(np.float32)
        self.cbx, self.cby = np.ascontiguousarray(cb[:, :, 0]), np.ascontiguousarray(cb[:, :, 1])
        self.scale = parts["scale"].view(np.float16).astype(np.float32)
        self.meta = np.array([d, n, c, g], np.int64)
        ngrp = layout(n, c)[1]
        self.cols = pair_columns(parts["perm"].astype(np.int64), ngrp * GROUP).reshape(-1).astype(np.int32)
        self.xp = np.zeros(ngrp * GROUP * DIM, np.float32)
        self._tabs = np.zeros((1, max(TABLE_FLOATS, GROUP << c)), np.float32)
        self._tiles = None

    def _tables(self, nb: int) -> np.ndarray:
        # per-thread tables, grown once, never per call
        if self._tabs.shape[0] < nb:
            self._tabs = np.zeros((nb, self._tabs.shape[1]), np.float32)
        return self._tabs[:nb]

    def _matvec(self, x: np.ndarray, out: np.ndarray, threads: int) -> None:
        # out (d,) = W (d, n) @ x (n,)
        args = (self.codes, self.cbx, self.cby, self.scale, self.cols, self.meta, x, out, self.xp)
        if threads > 1:
            matvec_vq_par(*args, self._tables(threads))
        else:
            matvec_vq(*args, self._tabs)

    def _matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        # out (T, d) = X (T, n) @ W.T: rows decoded 4 at a time into L1, register-blocked dots
        T = X.shape[0]
        nb = self.threads_for(self.shape[0] * T * self.shape[1] >= PAR_MIN_WEIGHTS)
        if self._tiles is None or self._tiles.shape[0] < nb:
            self._tiles = np.zeros((nb, TILE_ROWS, self.shape[1]), np.float32)
        args = (self.codes, self.cbx, self.cby, self.scale, self.cols, self.meta, X, out)
        if nb > 1:
            matmul_vq_par(*args, self._tiles[:nb])
        else:
            matmul_vq(*args, self._tiles)

    def row(self, i: int, out: np.ndarray) -> None:
        """out (n,) = W[i] as float32 (embedding lookup)."""
        row_vq(self.codes, self.cbx, self.cby, self.scale, self.cols, self.meta, int(i), out)
