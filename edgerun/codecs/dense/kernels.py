"""Dense codec, the kernels: f32 / f16 / bf16 matvec, the register-blocked prefill matmul (no
BLAS) and `DenseLinear`. Kernels widen 16-bit values in registers (`edgerun.kernels.f16_to_f32`,
`bf16_to_f32`), so decode streams 2 bytes per weight."""
from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange

from ...errors import UnsupportedModelError
from ...kernels import bf16_to_f32, f16_to_f32
from ..base import Linear
from .format import dtype_of

_JIT = dict(cache=True, nogil=True, fastmath=True, no_cfunc_wrapper=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True, no_cfunc_wrapper=True)

# A matvec with at least this many weights uses the prange kernel when threads > 1. A 2-thread
# region costs ~10 µs (DESIGN §6); measured in tools/bench_kernels.py, only the FFN-sized
# (1536x576, ~1.8 MB f16) and larger matrices gain.
PAR_MIN_WEIGHTS = 1 << 19
# Weight rows per block of the prefill matmul: a 64 x 1536 f32 tile is 384 KB, within Zen's L2,
# while every token of the chunk passes over it (measured best of 32/64/128 in bench_kernels).
TILE_ROWS = 64
# Below this many tokens a matmul is a loop of matvecs (streams W once per token, no tile).
MATMUL_MIN_T = 4
# A matmul with at least this many multiply-adds (T * d * n) uses the prange kernel when
# threads > 1: below it the ~10 µs of a 2-thread region (DESIGN §6) outweighs the gain.
PAR_MIN_MACS = 1 << 22


# --- kernels -----------------------------------------------------------------------------

@njit(**_JIT)
def _mv_f32(W, x, out, r0, r1):
    # W (d, n) f32 @ x (n,) -> out[r0:r1]
    n = W.shape[1]
    for i in range(r0, r1):
        acc = np.float32(0.0)
        for j in range(n):
            acc += W[i, j] * x[j]
        out[i] = acc


@njit(**_JIT)
def _mv_f16(W, x, out, r0, r1):
    # W (d, n) f16 bits (uint16) @ x (n,) -> out[r0:r1]
    n = W.shape[1]
    for i in range(r0, r1):
        acc = np.float32(0.0)
        for j in range(n):
            acc += f16_to_f32(W[i, j]) * x[j]
        out[i] = acc


@njit(**_JIT)
def _mv_bf16(W, x, out, r0, r1):
    # W (d, n) bf16 bits (uint16) @ x (n,) -> out[r0:r1]
    n = W.shape[1]
    for i in range(r0, r1):
        acc = np.float32(0.0)
        for j in range(n):
            acc += bf16_to_f32(W[i, j]) * x[j]
        out[i] = acc


@njit(**_JIT_PAR)
def matvec_f32_par(W, x, out, nblocks):
    # W (d, n) f32 @ x (n,) -> out (d,); prange over nblocks row blocks
    d = W.shape[0]
    step = (d + nblocks - 1) // nblocks
    for b in prange(nblocks):
        _mv_f32(W, x, out, b * step, min(d, (b + 1) * step))


@njit(**_JIT_PAR)
def matvec_f16_par(W, x, out, nblocks):
    # W (d, n) f16 bits @ x (n,) -> out (d,); prange over nblocks row blocks
    d = W.shape[0]
    step = (d + nblocks - 1) // nblocks
    for b in prange(nblocks):
        _mv_f16(W, x, out, b * step, min(d, (b + 1) * step))


@njit(**_JIT_PAR)
def matvec_bf16_par(W, x, out, nblocks):
    # W (d, n) bf16 bits @ x (n,) -> out (d,); prange over nblocks row blocks
    d = W.shape[0]
    step = (d + nblocks - 1) // nblocks
    for b in prange(nblocks):
        _mv_bf16(W, x, out, b * step, min(d, (b + 1) * step))


@njit(**_JIT)
def widen_f16(W, r0, r1, out):
    # W (d, n) f16 bits, rows r0:r1 -> out (>= r1-r0, n) float32
    n = W.shape[1]
    for i in range(r0, r1):
        for j in range(n):
            out[i - r0, j] = f16_to_f32(W[i, j])


@njit(**_JIT)
def widen_bf16(W, r0, r1, out):
    # W (d, n) bf16 bits, rows r0:r1 -> out (>= r1-r0, n) float32
    n = W.shape[1]
    for i in range(r0, r1):
        for j in range(n):
            out[i - r0, j] = bf16_to_f32(W[i, j])


# --- prefill matmul without BLAS ---------------------------------------------------------
# out (T, d) = X (T, n) @ W.T as dot products over n: a 4-token x 4-row register block keeps 16
# accumulators while one flat loop over contiguous n loads 4 activation and 4 weight vectors
# (Numba disables the SLP vectorizer, DESIGN §6, so LLVM's loop vectorizer must see a flat loop
# with independent reductions). Rows are processed in TILE_ROWS blocks so a block of weights
# stays in L2 while every token passes over it; 16-bit weights are widened once per block into
# a per-thread f32 tile, not once per token block. OpenBLAS is never called: its spinning worker
# threads fought Numba's threads for the cores (a 14-token prefill went from 0.06 s to 1-4 s).

@njit(**_JIT)
def _mm4x4(X, A, a, out, t, c):
    # X rows t..t+3 (n,) . A rows a..a+3 (n,) -> out[t..t+3, c..c+3]
    n = X.shape[1]
    s00 = s01 = s02 = s03 = np.float32(0.0)
    s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = np.float32(0.0)
    s30 = s31 = s32 = s33 = np.float32(0.0)
    for j in range(n):
        x0 = X[t, j]
        x1 = X[t + 1, j]
        x2 = X[t + 2, j]
        x3 = X[t + 3, j]
        w0 = A[a, j]
        w1 = A[a + 1, j]
        w2 = A[a + 2, j]
        w3 = A[a + 3, j]
        s00 += x0 * w0
        s01 += x0 * w1
        s02 += x0 * w2
        s03 += x0 * w3
        s10 += x1 * w0
        s11 += x1 * w1
        s12 += x1 * w2
        s13 += x1 * w3
        s20 += x2 * w0
        s21 += x2 * w1
        s22 += x2 * w2
        s23 += x2 * w3
        s30 += x3 * w0
        s31 += x3 * w1
        s32 += x3 * w2
        s33 += x3 * w3
    out[t, c] = s00
    out[t, c + 1] = s01
    out[t, c + 2] = s02
    out[t, c + 3] = s03
    out[t + 1, c] = s10
    out[t + 1, c + 1] = s11
    out[t + 1, c + 2] = s12
    out[t + 1, c + 3] = s13
    out[t + 2, c] = s20
    out[t + 2, c + 1] = s21
    out[t + 2, c + 2] = s22
    out[t + 2, c + 3] = s23
    out[t + 3, c] = s30
    out[t + 3, c + 1] = s31
    out[t + 3, c + 2] = s32
    out[t + 3, c + 3] = s33


@njit(**_JIT)
def _mm1x4(X, A, a, out, t, c):
    # X row t (n,) . A rows a..a+3 (n,) -> out[t, c..c+3]  (token tail)
    n = X.shape[1]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(n):
        x = X[t, j]
        s0 += x * A[a, j]
        s1 += x * A[a + 1, j]
        s2 += x * A[a + 2, j]
        s3 += x * A[a + 3, j]
    out[t, c] = s0
    out[t, c + 1] = s1
    out[t, c + 2] = s2
    out[t, c + 3] = s3


@njit(**_JIT)
def _mm4x1(X, A, a, out, t, c):
    # X rows t..t+3 (n,) . A row a (n,) -> out[t..t+3, c]  (row tail)
    n = X.shape[1]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(n):
        w = A[a, j]
        s0 += X[t, j] * w
        s1 += X[t + 1, j] * w
        s2 += X[t + 2, j] * w
        s3 += X[t + 3, j] * w
    out[t, c] = s0
    out[t + 1, c] = s1
    out[t + 2, c] = s2
    out[t + 3, c] = s3


@njit(**_JIT)
def _mm1x1(X, A, a, out, t, c):
    # X row t (n,) . A row a (n,) -> out[t, c]
    n = X.shape[1]
    s = np.float32(0.0)
    for j in range(n):
        s += X[t, j] * A[a, j]
    out[t, c] = s


@njit(**_JIT)
def _mm_rows(X, A, a0, a1, out, c0):
    # X (T, n) @ A[a0:a1].T (f32) -> out[:, c0:c0+a1-a0]; 4x4 blocks, then the tails
    T = X.shape[0]
    T4 = T - T % 4
    a4 = a1 - (a1 - a0) % 4
    for t in range(0, T4, 4):
        for a in range(a0, a4, 4):
            _mm4x4(X, A, a, out, t, c0 + a - a0)
        for a in range(a4, a1):
            _mm4x1(X, A, a, out, t, c0 + a - a0)
    for t in range(T4, T):
        for a in range(a0, a4, 4):
            _mm1x4(X, A, a, out, t, c0 + a - a0)
        for a in range(a4, a1):
            _mm1x1(X, A, a, out, t, c0 + a - a0)


@njit(**_JIT)
def _mm_f32_range(X, W, out, r0, r1, tile):
    # X (T, n) @ W[r0:r1].T (f32) -> out[:, r0:r1], in blocks of tile.shape[0] weight rows
    # (tile: a zero-width view, f32 rows need no widening)
    rows = tile.shape[0]
    for b in range(r0, r1, rows):
        _mm_rows(X, W, b, min(r1, b + rows), out, b)


@njit(**_JIT)
def _mm_f16_range(X, W, out, r0, r1, tile):
    # X (T, n) @ W[r0:r1].T (f16 bits) -> out[:, r0:r1]; tile (rows, n) f32 scratch
    rows = tile.shape[0]
    for b in range(r0, r1, rows):
        e = min(r1, b + rows)
        widen_f16(W, b, e, tile)
        _mm_rows(X, tile, 0, e - b, out, b)


@njit(**_JIT)
def _mm_bf16_range(X, W, out, r0, r1, tile):
    # X (T, n) @ W[r0:r1].T (bf16 bits) -> out[:, r0:r1]; tile (rows, n) f32 scratch
    rows = tile.shape[0]
    for b in range(r0, r1, rows):
        e = min(r1, b + rows)
        widen_bf16(W, b, e, tile)
        _mm_rows(X, tile, 0, e - b, out, b)


@njit(**_JIT)
def _split(d, nblocks, b):
    # rows of block b when d rows are split in nblocks pieces that are multiples of 4
    step = ((d + nblocks - 1) // nblocks + 3) // 4 * 4
    return min(d, b * step), min(d, (b + 1) * step)


@njit(**_JIT_PAR)
def matmul_f32_par(X, W, out, tiles):
    # X (T, n) @ W (d, n).T f32 -> out (T, d); prange over tiles.shape[0] row blocks
    nb = tiles.shape[0]
    for b in prange(nb):
        r0, r1 = _split(W.shape[0], nb, b)
        _mm_f32_range(X, W, out, r0, r1, tiles[b])


@njit(**_JIT_PAR)
def matmul_f16_par(X, W, out, tiles):
    # X (T, n) @ W (d, n).T f16 bits -> out (T, d); prange over row blocks, tiles[b] per block
    nb = tiles.shape[0]
    for b in prange(nb):
        r0, r1 = _split(W.shape[0], nb, b)
        _mm_f16_range(X, W, out, r0, r1, tiles[b])


@njit(**_JIT_PAR)
def matmul_bf16_par(X, W, out, tiles):
    # X (T, n) @ W (d, n).T bf16 bits -> out (T, d); prange over row blocks, tiles[b] per block
    nb = tiles.shape[0]
    for b in prange(nb):
        r0, r1 = _split(W.shape[0], nb, b)
        _mm_bf16_range(X, W, out, r0, r1, tiles[b])


# The serial kernels are called from Python on the whole matrix (rows 0..d): no wrapper
# functions, each of which cost ~0.3 s of compile time on a cold JIT cache.
_SERIAL = {"f32": _mv_f32, "f16": _mv_f16, "bf16": _mv_bf16}
_PARALLEL = {"f32": matvec_f32_par, "f16": matvec_f16_par, "bf16": matvec_bf16_par}
_WIDEN = {"f16": widen_f16, "bf16": widen_bf16}
_MATMUL = {"f32": _mm_f32_range, "f16": _mm_f16_range, "bf16": _mm_bf16_range}
_MATMUL_PAR = {"f32": matmul_f32_par, "f16": matmul_f16_par, "bf16": matmul_bf16_par}

# Dequantization tiles per Python thread, grown on demand and shared by every Linear, so the
# scratch costs threads * TILE_ROWS * max(n) floats in total rather than per matrix. f32 weights
# need no tile: they get a zero-width view that only carries the block height.
_tls = threading.local()


def _tiles(nblocks: int, n: int) -> np.ndarray:
    size = nblocks * TILE_ROWS * n
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.size < size:
        buf = _tls.buf = np.empty(size, np.float32)
    return buf[:size].reshape(nblocks, TILE_ROWS, n)


class DenseLinear(Linear):
    """A loaded dense weight W (d, n): matvec / matmul / row on the stored parts (zero-copy)."""

    codec = "dense"
    matmul_min_t = MATMUL_MIN_T

    def __init__(self, W: np.ndarray, dtype: str):
        super().__init__(W.shape, W.nbytes, PAR_MIN_WEIGHTS)
        self.W = W
        self.dtype = dtype
        self._mv = _SERIAL[dtype]
        self._mv_par = _PARALLEL[dtype]
        self._mm = _MATMUL[dtype]
        self._mm_par = _MATMUL_PAR[dtype]

    def _matvec(self, x: np.ndarray, out: np.ndarray, threads: int) -> None:
        # out (d,) = W (d, n) @ x (n,)
        if threads > 1:
            self._mv_par(self.W, x, out, threads)
        else:
            self._mv(self.W, x, out, 0, self.shape[0])

    def _matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        # out (T, d) = X (T, n) @ W.T with the register-blocked Numba kernel (never BLAS)
        d, n = self.shape
        nb = self.threads_for(X.shape[0] * d * n >= PAR_MIN_MACS)
        tiles = _tiles(nb, 0 if self.dtype == "f32" else n)
        if nb > 1:
            self._mm_par(X, self.W, out, tiles)
        else:
            self._mm(X, self.W, out, 0, d, tiles[0])

    @classmethod
    def stack(cls, linears: list) -> "DenseLinear | None":
        """The rows of `linears` as one DenseLinear (same storage type)."""
        if any(type(w) is not cls or w.dtype != linears[0].dtype for w in linears):
            return None
        return cls(np.concatenate([w.W for w in linears]), linears[0].dtype)

    def row(self, i: int, out: np.ndarray) -> None:
        """out (n,) = W[i] as float32 (embedding lookup)."""
        if self.dtype == "f32":
            out[:] = self.W[i]
        else:
            _WIDEN[self.dtype](self.W, i, i + 1, out.reshape(1, -1))


def as_f32(parts: dict, params: dict) -> np.ndarray:
    """Whole weight as float32 (norm weights, biases): zero-copy for f32, widened otherwise."""
    dt = dtype_of(params)
    w = parts["weight"]
    if dt == "f32":
        return np.ascontiguousarray(w, np.float32)
    flat = np.ascontiguousarray(w).reshape(1, -1)
    out = np.empty(flat.shape, np.float32)
    _WIDEN[dt](flat, 0, 1, out)
    return out.reshape(w.shape)


def load_linear(parts: dict, params: dict) -> DenseLinear:
    """A DenseLinear over parts["weight"] (d, n), without copying C-contiguous arrays."""
    dt = dtype_of(params)
    W = parts["weight"]
    want = np.float32 if dt == "f32" else np.uint16
    if W.ndim != 2 or W.dtype != want:
        raise UnsupportedModelError(
            f"dense codec: weight must be 2-D {np.dtype(want).name} for {dt}, got {W.dtype} {W.shape}")
    return DenseLinear(np.ascontiguousarray(W), dt)

