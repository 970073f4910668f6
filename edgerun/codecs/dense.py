"""Dense codec: weights stored as float32, float16 or bfloat16 (DESIGN §4 "dense").

Parts: {"weight": array of the weight's shape}, float32 for "f32", uint16 bits for "f16"
(IEEE half, round-to-nearest-even as np.float16) and "bf16" (high half of the float32, rounded
to nearest even). Kernels widen 16-bit values in registers (`kernels.f16_to_f32`,
`kernels.bf16_to_f32`), so decode streams 2 bytes per weight.
"""
from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange

from ..errors import UnsupportedModelError
from ..kernels import bf16_to_f32, f16_to_f32, get_threads

_JIT = dict(cache=True, nogil=True, fastmath=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True)

DTYPES = ("f32", "f16", "bf16")

# A matvec with at least this many weights uses the prange kernel when threads > 1. A 2-thread
# region costs ~10 µs (DESIGN §6); measured in tools/bench_kernels.py, only the FFN-sized
# (1536x576, ~1.8 MB f16) and larger matrices gain.
PAR_MIN_WEIGHTS = 1 << 19
# Rows dequantized per tile for the batched matmul (tile stays in L2 for the BLAS call).
TILE_ROWS = 256
# Below this many tokens a matmul is a loop of matvecs (BLAS gains nothing, the tile costs).
MATMUL_MIN_T = 4


# --- encode / decode (NumPy reference) -----------------------------------------------------

def f32_to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(w)
    out = rounded.astype(np.uint16)
    out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32 (exact)."""
    return (b.astype(np.uint32) << 16).view(np.float32)


def _dtype(params: dict) -> str:
    dt = (params or {}).get("dtype", "f32")
    if dt not in DTYPES:
        raise UnsupportedModelError(f"dense codec: dtype {dt!r} is not supported (use one of {DTYPES})")
    return dt


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


@njit(**_JIT)
def matvec_f32(W, x, out):
    # W (d, n) f32 @ x (n,) -> out (d,)
    _mv_f32(W, x, out, 0, W.shape[0])


@njit(**_JIT)
def matvec_f16(W, x, out):
    # W (d, n) f16 bits @ x (n,) -> out (d,)
    _mv_f16(W, x, out, 0, W.shape[0])


@njit(**_JIT)
def matvec_bf16(W, x, out):
    # W (d, n) bf16 bits @ x (n,) -> out (d,)
    _mv_bf16(W, x, out, 0, W.shape[0])


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


_SERIAL = {"f32": matvec_f32, "f16": matvec_f16, "bf16": matvec_bf16}
_PARALLEL = {"f32": matvec_f32_par, "f16": matvec_f16_par, "bf16": matvec_bf16_par}
_WIDEN = {"f16": widen_f16, "bf16": widen_bf16}

# One dequantization tile per Python thread, grown on demand and shared by every Linear, so the
# scratch costs TILE_ROWS * max(n) floats in total rather than per matrix.
_tls = threading.local()


def _tile(rows: int, n: int) -> np.ndarray:
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.size < rows * n:
        buf = _tls.buf = np.empty(rows * n, np.float32)
    return buf[: rows * n].reshape(rows, n)


class DenseLinear:
    """A loaded dense weight W (d, n): matvec / matmul / row on the stored parts (zero-copy)."""

    def __init__(self, W: np.ndarray, dtype: str):
        self.W = W
        self.dtype = dtype
        self.shape = W.shape
        self.nbytes = int(W.nbytes)
        self.bits_per_weight = self.nbytes * 8 / W.size
        self._mv = _SERIAL[dtype]
        self._mv_par = _PARALLEL[dtype]
        self._big = W.size >= PAR_MIN_WEIGHTS

    def matvec(self, x: np.ndarray, out: np.ndarray) -> None:
        """out (d,) = W (d, n) @ x (n,)."""
        threads = get_threads()
        if threads > 1 and self._big:
            self._mv_par(self.W, x, out, threads)
        else:
            self._mv(self.W, x, out)

    def matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        """out (T, d) = X (T, n) @ W.T: BLAS on f32 weights, on L2-sized widened tiles otherwise."""
        T = X.shape[0]
        if T < MATMUL_MIN_T:
            for t in range(T):
                self.matvec(X[t], out[t])
            return
        if self.dtype == "f32":
            np.matmul(X, self.W.T, out=out)
            return
        d, n = self.shape
        widen = _WIDEN[self.dtype]
        tile = _tile(TILE_ROWS, n)
        for r0 in range(0, d, TILE_ROWS):
            r1 = min(d, r0 + TILE_ROWS)
            widen(self.W, r0, r1, tile)
            # out[:, r0:r1] has unit inner stride: numpy hands it to BLAS without a copy
            np.matmul(X, tile[: r1 - r0].T, out=out[:, r0:r1])

    def row(self, i: int, out: np.ndarray) -> None:
        """out (n,) = W[i] as float32 (embedding lookup)."""
        if self.dtype == "f32":
            out[:] = self.W[i]
        else:
            _WIDEN[self.dtype](self.W, i, i + 1, out.reshape(1, -1))


class DenseCodec:
    """f32 / f16 / bf16 weights; params {"dtype": "f32"|"f16"|"bf16"} (default f32)."""

    name = "dense"

    @staticmethod
    def encode(w: np.ndarray, params: dict) -> dict[str, np.ndarray]:
        """float32 (d, n) or (n,) -> {"weight": float32 | uint16 bits} of the same shape."""
        dt = _dtype(params)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if dt == "f32":
            return {"weight": w.copy()}
        if dt == "f16":
            return {"weight": w.astype(np.float16).view(np.uint16)}
        return {"weight": f32_to_bf16_bits(w)}

    @staticmethod
    def decode(parts: dict, params: dict) -> np.ndarray:
        """Reference NumPy decode to float32 (tests only)."""
        dt = _dtype(params)
        w = parts["weight"]
        if dt == "f32":
            return np.asarray(w, np.float32).copy()
        if dt == "f16":
            return w.view(np.float16).astype(np.float32)
        return bf16_bits_to_f32(w)

    @staticmethod
    def as_f32(parts: dict, params: dict) -> np.ndarray:
        """Whole weight as float32 (norm weights, biases): zero-copy for f32, widened otherwise."""
        dt = _dtype(params)
        w = parts["weight"]
        if dt == "f32":
            return np.ascontiguousarray(w, np.float32)
        flat = np.ascontiguousarray(w).reshape(1, -1)
        out = np.empty(flat.shape, np.float32)
        _WIDEN[dt](flat, 0, 1, out)
        return out.reshape(w.shape)

    @staticmethod
    def load(parts: dict, params: dict) -> DenseLinear:
        """A DenseLinear over parts["weight"] (d, n), without copying C-contiguous arrays."""
        dt = _dtype(params)
        W = parts["weight"]
        want = np.float32 if dt == "f32" else np.uint16
        if W.ndim != 2 or W.dtype != want:
            raise UnsupportedModelError(
                f"dense codec: weight must be 2-D {np.dtype(want).name} for {dt}, got {W.dtype} {W.shape}")
        return DenseLinear(np.ascontiguousarray(W), dt)

    @staticmethod
    def nbytes(parts: dict) -> int:
        """Bytes of the stored parts."""
        return int(sum(p.nbytes for p in parts.values()))
