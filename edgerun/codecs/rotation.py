"""Incoherence rotation of a linear's input axis (QuIP#, Tseng et al. 2024; QuaRot, Ashkboos et
al. 2024), around any codec (formats/ebin.md § "Rotated tensors").

A weight W (d, n) is stored as W' = W·Tᵀ, T = blockdiag(H_B)/√B · diag(s): B a power of two
dividing n, H_B the Sylvester Hadamard matrix, s random signs. T is orthogonal, so W x =
W' (T x): the forward pass rotates its input (a fast Walsh-Hadamard transform, n·log2 B adds) and
the codec computes as usual. Rotation spreads a row's large columns over B, so a 3-bit grid
fits the rotated rows better (tools/QUALITY.md, SmolLM2 at B = 64: cluster:3 perplexity −14 %,
spqr:3 −5 %; BENCHMARKS.md: 5-10 % of decode). Pack rotates the Hessian of the input the same way
(T H Tᵀ); linears reading one input (q/k/v, gate/up) share their signs, so placement can still
join them.
"""
from __future__ import annotations

import weakref
import zlib

import numpy as np
from numba import njit, prange

from ..kernels import PARALLEL_REGIONS
from ..memory import thread_scratch
from .base import Linear

BLOCK = 64          # columns per Hadamard block (QUALITY.md measured 64; a power of two)
SIGNS_PART = "rotation_signs"
ROTATE_PAR_MIN = 1 << 16    # values: a prompt chunk's rows are rotated on every thread


def block_for(n: int, block: int = BLOCK) -> int:
    """The largest power of two <= `block` that divides n (1: n is odd, nothing to rotate)."""
    b = 1
    while b * 2 <= block and n % (b * 2) == 0:
        b *= 2
    return b


def make_signs(n: int, key: str) -> np.ndarray:
    """(n,) int8 random ±1, seeded by `key` (the input the matrix reads: its sharers get the
    same signs). Pack time only: the signs are stored, so loading needs no generator."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return np.where(rng.random(n) < 0.5, -1, 1).astype(np.int8)


@njit(inline="always", nogil=True)
def _h8(x, out, t, g, s, pre, scaled):
    # out[t, g + s·k] for k < 8 := the 8-point Hadamard transform (stages 1, 2, 4) of the entries
    # x[t, g + s·k] (times pre[g + s·k] when `scaled`, a constant after inlining), straight-line
    a0, a1, a2, a3 = x[t, g], x[t, g + s], x[t, g + 2 * s], x[t, g + 3 * s]
    a4, a5, a6, a7 = x[t, g + 4 * s], x[t, g + 5 * s], x[t, g + 6 * s], x[t, g + 7 * s]
    if scaled:
        a0, a1, a2, a3 = a0 * pre[g], a1 * pre[g + s], a2 * pre[g + 2 * s], a3 * pre[g + 3 * s]
        a4, a5, a6, a7 = a4 * pre[g + 4 * s], a5 * pre[g + 5 * s], a6 * pre[g + 6 * s], a7 * pre[g + 7 * s]
    b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
    b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
    c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
    c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
    out[t, g], out[t, g + s], out[t, g + 2 * s], out[t, g + 3 * s] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
    out[t, g + 4 * s], out[t, g + 5 * s], out[t, g + 6 * s], out[t, g + 7 * s] = c0 - c4, c1 - c5, c2 - c6, c3 - c7


@njit(cache=True, nogil=True)
def _fwht_rows(x, pre, block, post, out):
    # out[t] = post ⊙ H_B-blocks(pre ⊙ x[t]) for each row t (out may be x). Stage h adds and
    # subtracts entries h apart within blocks of 2h, so stages h = 1 .. B/2 over the whole row are
    # the block-diagonal transform. B = 64 (the default) is H_8 ⊗ H_8: an 8-point transform of
    # each 8 consecutive entries, then of the 8 entries 8 apart in each block of 64, both
    # straight-line code (measured, n = 576, one call: 1.5 µs, of which ~1 is Numba's dispatch;
    # loops over the pairs h apart, h unknown to LLVM, took 3.0). No fast-math: nothing to
    # reassociate, and without contraction into FMA the result is the same on every CPU
    T, n = x.shape
    for t in range(T):
        h = 1
        if block >= 8:
            for g in range(0, n, 8):
                _h8(x, out, t, g, 1, pre, True)
            h = 8
            if block == 64:
                for b0 in range(0, n, 64):
                    for c in range(8):
                        _h8(out, out, t, b0 + c, 8, pre, False)
                h = 64
        else:
            for i in range(n):
                out[t, i] = x[t, i] * pre[i]
        while h < block:
            for b0 in range(0, n, 2 * h):
                for j in range(b0, b0 + h):
                    a, c = out[t, j], out[t, j + h]
                    out[t, j], out[t, j + h] = a + c, a - c
            h *= 2
        for i in range(n):
            out[t, i] *= post[i]


@njit(cache=True, nogil=True, parallel=True)
def _fwht_rows_par(x, pre, block, post, out, nb):
    # _fwht_rows over nb bands of rows (a prompt chunk's inputs; the 1.5B's down_proj in a
    # 128-token prefill, 2 threads: 234 -> 212 ms with its rotation split)
    T = x.shape[0]
    step = (T + nb - 1) // nb
    for b in prange(nb):
        t0, t1 = b * step, min(T, (b + 1) * step)
        _fwht_rows(x[t0:t1], pre, block, post, out[t0:t1])


@njit(cache=True, nogil=True)
def _fwht_cols(a, pre, block):
    # a = H_B-blocks(diag(pre) a) in place: the transform of every column (row pairs at once)
    n = a.shape[0]
    for i in range(n):
        for k in range(a.shape[1]):
            a[i, k] *= pre[i]
    h = 1
    while h < block:
        for b0 in range(0, n, 2 * h):
            for j in range(b0, b0 + h):
                for k in range(a.shape[1]):
                    u, v = a[j, k], a[j + h, k]
                    a[j, k], a[j + h, k] = u + v, u - v
        h *= 2


def _forward_factors(signs: np.ndarray, block: int, dtype=np.float32) -> tuple:
    """(pre, post) of T: signs then the scaled Hadamard blocks."""
    return (signs.astype(dtype) / dtype(np.sqrt(block))).astype(dtype), np.ones(len(signs), dtype)


def _inverse_factors(signs: np.ndarray, block: int, dtype=np.float32) -> tuple:
    """(pre, post) of T⁻¹ = Tᵀ = diag(s) blockdiag(H_B)/√B: the scaled Hadamard blocks, then the signs."""
    return np.full(len(signs), 1 / np.sqrt(block), dtype), signs.astype(dtype)


def _transform(x: np.ndarray, factors, block: int, out: np.ndarray | None) -> np.ndarray:
    """post ⊙ H_B-blocks(pre ⊙ x) of each row, factors = (pre, post), into out (new when None)."""
    x = np.ascontiguousarray(x)
    out = np.empty_like(x) if out is None else out
    pre, post = factors
    _fwht_rows(x, pre, block, post, out)
    return out


def rotate(x: np.ndarray, signs: np.ndarray, block: int, out: np.ndarray | None = None) -> np.ndarray:
    """T x for each row of x (m, n) float32/float64 into `out` (a new array, or x itself: in
    place): the input rotation, and W' = W·Tᵀ = rotate(W) row by row."""
    return _transform(x, _forward_factors(signs, block, x.dtype.type), block, out)


def unrotate(x: np.ndarray, signs: np.ndarray, block: int) -> np.ndarray:
    """Tᵀ x for each row of x (m, n) (a new array): W = unrotate(W') row by row."""
    return _transform(x, _inverse_factors(signs, block, x.dtype.type), block, None)


def rotate_hessian(h: np.ndarray, signs: np.ndarray, block: int) -> None:
    """H -> T H Tᵀ in place (H = E[x xᵀ] of the input, so the rotated input's statistics): rows
    then columns, no n × n copy (the 1.5B's down_proj Hessian is 320 MB in float32)."""
    pre, post = _forward_factors(signs, block, h.dtype.type)
    _fwht_rows(h, pre, block, post, h)
    _fwht_cols(h, pre, block)


def rotation_matrix(signs: np.ndarray, block: int) -> np.ndarray:
    """T (n, n) float64, explicitly: the reference the tests check the fast transform against."""
    H = np.ones((1, 1))
    while H.shape[0] < block:
        H = np.block([[H, H], [H, -H]])
    n = len(signs)
    T = np.zeros((n, n))
    for b in range(0, n, block):
        T[b:b + block, b:b + block] = H / np.sqrt(block)
    return T * signs.astype(np.float64)[None, :]


class RotatedLinear(Linear):
    """A codec Linear whose stored rows are W' = W·Tᵀ: matvec/matmul rotate x first, row(i)
    rotates the stored row back. No CUDA twin yet (`codec` is empty: cuda.codecs refuses it)."""

    no_cuda = "matrices with rotated inputs (pack --rotate): run them on the CPU (--device cpu)"

    def __init__(self, inner, signs: np.ndarray, block: int):
        super().__init__(inner.shape, inner.nbytes + signs.nbytes, 0)
        self.inner, self.signs, self.block = inner, signs, int(block)
        self.matmul_min_t, self.matmul_equals_matvec = inner.matmul_min_t, inner.matmul_equals_matvec
        self._fwd, self._inv = _forward_factors(signs, block), _inverse_factors(signs, block)
        # a token's rotated input: per matrix, as the codecs' own matvec scratch
        self._x = np.empty((1, inner.shape[1]), np.float32)

    def _rotated(self, X: np.ndarray, out: np.ndarray) -> np.ndarray:
        pre, post = self._fwd
        threads = self.threads_for(X.size >= ROTATE_PAR_MIN)
        if threads > 1 and X.shape[0] > 1:
            with PARALLEL_REGIONS:
                _fwht_rows_par(X, pre, self.block, post, out, min(threads, X.shape[0]))
        else:
            _fwht_rows(X, pre, self.block, post, out)
        return out

    def matvec(self, x: np.ndarray, out: np.ndarray) -> None:
        self.inner.matvec(self._rotated(x.reshape(1, -1), self._x)[0], out)

    def _matvec(self, x: np.ndarray, out: np.ndarray, threads: int) -> None:
        self.inner._matvec(self._rotated(x.reshape(1, -1), self._x)[0], out, threads)

    def matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        X = np.ascontiguousarray(X)
        self.inner.matmul(self._rotated(X, thread_scratch("rotation.x", X.shape)), out)

    def row(self, i: int, out: np.ndarray) -> None:
        tmp = thread_scratch("rotation.row", (1, self.shape[1]))
        self.inner.row(i, tmp[0])
        pre, post = self._inv
        _fwht_rows(tmp, pre, self.block, post, out.reshape(1, -1))

    @classmethod
    def stack(cls, linears: list) -> "RotatedLinear | None":
        """Rotated linears of one input (same signs and block) joined through their codec."""
        a = linears[0]
        if any(type(w) is not cls or w.block != a.block or not np.array_equal(w.signs, a.signs) for w in linears):
            return None
        inner = type(a.inner).stack([w.inner for w in linears])
        return None if inner is None else cls(inner, a.signs, a.block)


class HessianRotations:
    """Pack-time: rotates each Hessian in place once, however many linears share it (calibrate
    hands q/k/v, gate/up the same array). Weak references: a finished Hessian is not kept."""

    def __init__(self):
        self._done = []

    def __call__(self, h: np.ndarray | None, signs: np.ndarray, block: int) -> None:
        if h is None:
            return
        self._done = [r for r in self._done if r() is not None]
        if not any(r() is h for r in self._done):
            rotate_hessian(h, signs, block)
            self._done.append(weakref.ref(h))
