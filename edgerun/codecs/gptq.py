"""GPTQ helpers shared by the encoders of spqr, cluster and bitstack (pack time, NumPy)."""
from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager

import numpy as np

from ..kernels import get_threads, row_bands, threaded_map

BLOCK = 256      # columns per panel of the blocked factorizations below

_shared = threading.local()


def output_error(E: np.ndarray, H: np.ndarray | None) -> float:
    """tr(E H Eᵀ) = Σ over calibration inputs of ‖E x‖² (H = Σ x xᵀ, symmetric): the output error
    GPTQ minimizes, for a weight error E (d, n); H None is the identity (Frobenius). BLAS products
    and elementwise sums: the three-operand einsum("ij,jk,ik->") loops d·n² times without BLAS
    (1.5B down_proj: ~140 s each, against ~3 s). H's upper triangle of column blocks only,
    E_Q H_QQ + 2 E_{<Q} H_{<Q,Q} against E_Q: ~0.56 of the full product's flops. Rows split over
    the kernel threads."""
    if H is None:
        return float(np.sum(np.square(E, dtype=np.float64)))
    n = E.shape[1]
    step = max(256, -(-n // 8))

    def band(rows):
        e, total = E[rows], 0.0
        for q0 in range(0, n, step):
            q1 = min(n, q0 + step)
            f = e[:, q0:q1] @ H[q0:q1, q0:q1]
            if q0:
                f += 2 * (e[:, :q0] @ H[:q0, q0:q1])
            total += np.einsum("ij,ij->", f, e[:, q0:q1], dtype=np.float64)
        return total

    return float(sum(threaded_map(band, row_bands(E.shape[0], 64))))


@contextmanager
def shared_factors():
    """Within: `inverse_cholesky` of the same Hessian array with the same arguments is computed
    once (its result read-only). For encoding one matrix with several codecs or bit widths
    (pack --bpw's trials): the 1.5B model's down_proj factorization (n = 8960) is most of each
    trial. The Hessians passed in must not change inside."""
    outer = getattr(_shared, "memo", None)
    _shared.memo = {} if outer is None else outer
    try:
        yield
    finally:
        _shared.memo = outer


def inverse_cholesky(H: np.ndarray, percdamp: float, perm: np.ndarray | None = None,
                     size: int | None = None):
    """`_inverse_cholesky`, reused inside `shared_factors()`."""
    memo = getattr(_shared, "memo", None)
    if memo is None:
        return _inverse_cholesky(H, percdamp, perm, size)
    key = (id(H), float(percdamp), None if perm is None else np.asarray(perm).tobytes(), size or H.shape[0])
    hit = memo.get(key)
    if hit is None or hit[0]() is not H:
        U, dead = _inverse_cholesky(H, percdamp, perm, size)
        U.flags.writeable = dead.flags.writeable = False
        # a weak reference: a Hessian made for one encode (bitstack's scaled copy) frees its
        # factor with it, and an id reused by a new array is not mistaken for the old one
        hit = memo[key] = (weakref.ref(H, lambda _, key=key: memo.pop(key, None)), U, dead)
    return hit[1], hit[2]


def _inverse_cholesky(H: np.ndarray, percdamp: float, perm: np.ndarray | None = None,
                      size: int | None = None):
    """Upper Cholesky factor U of (H' + damp·I)⁻¹ (GPTQ) as float32, where H' = H[perm][:, perm]
    padded with zero rows/columns to `size`, after zeroing dead inputs (H'_jj <= 0, their
    diagonal set to 1): -> U (size, size) float32, dead (size,) bool.

    One size×size buffer, which becomes U, and panel-sized temporaries: with J the reversal,
    U = J M⁻¹ J where J H' J = M Mᵀ (lower Cholesky), so a Cholesky and a triangular inverse,
    both blocked and in place, replace GPTQ's Cholesky, inverse, product and second Cholesky (a
    quarter of the flops; for the 1.5B model's down_proj, n = 8960, 4 GB of temporaries became
    none). In float32, as GPTQ's reference code factors (the damping bounds the condition
    number): half the memory and time of float64 (BENCHMARKS.md, pack time)."""
    n = H.shape[0]
    N = n if size is None else size
    rev = (np.arange(n) if perm is None else np.asarray(perm))[::-1]
    A = np.zeros((N, N), np.float32)    # J H' J: padded columns (logically last) come first
    for r in range(0, n, BLOCK):
        A[N - n + r:N - n + r + BLOCK, N - n:] = H[rev[r:r + BLOCK]][:, rev]
    diag = np.einsum("ii->i", A)     # a view: writes go to A
    dead = diag <= 0
    diag += damping(diag, percdamp).astype(np.float32)
    _cholesky_lower(A)
    _invert_lower(A)
    _reverse_in_place(A.reshape(-1))  # J M⁻¹ J: both axes reversed is the flat order reversed
    return A, dead[::-1].copy()


def damping(diag: np.ndarray, percdamp: float) -> np.ndarray:
    """What `inverse_cholesky` adds to a Hessian's diagonal (n,) float64: a dead input's entry
    (H_jj <= 0) is raised to 1, then every entry gets percdamp x the mean |diagonal|."""
    h = np.asarray(diag, np.float64)
    dead = h <= 0
    return np.where(dead, 1.0 - h, 0.0) + percdamp * np.mean(np.abs(np.where(dead, 1.0, h)))


def _reverse_in_place(a: np.ndarray, chunk: int = 1 << 20) -> None:
    """a (m,) -> a[::-1], swapping chunks from both ends (NumPy's a[:] = a[::-1] copies all of a)."""
    m = a.shape[0]
    for k in range(0, m // 2, chunk):
        c = min(chunk, m // 2 - k)
        lo = a[k:k + c].copy()
        a[k:k + c] = a[m - k - c:m - k][::-1]
        a[m - k - c:m - k] = lo[::-1]


def _cholesky_lower(A: np.ndarray) -> None:
    """In place: A (n, n) symmetric positive definite -> its lower Cholesky factor L (upper part
    zeroed). Right-looking blocked Cholesky (LAPACK potrf) with column-panel updates."""
    n = A.shape[0]
    for j in range(0, n, BLOCK):
        j1 = min(n, j + BLOCK)
        try:
            L11 = np.linalg.cholesky(A[j:j1, j:j1])
        except np.linalg.LinAlgError:
            raise np.linalg.LinAlgError("the damped Hessian is not positive definite") from None
        A[j:j1, j:j1] = L11
        A[j:j1, j1:] = 0.0
        if j1 == n:
            break
        L21 = A[j1:, j:j1] @ np.linalg.inv(L11).T                   # A21 L11⁻ᵀ
        A[j1:, j:j1] = L21

        def update(k):                                               # A22 -= L21 L21ᵀ, lower part
            k1 = min(n, k + BLOCK)
            A[k:, k:k1] -= L21[k - j1:] @ L21[k - j1:k1 - j1].T
        threaded_map(update, range(j1, n, BLOCK))


def _invert_lower(L: np.ndarray) -> None:
    """In place: L (n, n) lower triangular (upper part zero) -> L⁻¹ (LAPACK trtri, lower,
    blocked): from the last diagonal block up, X21 = -X22 L21 L11⁻¹ with X22 already inverted.
    X22 L21 is summed over X22's column panels: tall products, which OpenBLAS runs ~8x faster
    than the short-and-wide row-panel ones (256 output rows; BENCHMARKS.md, pack time)."""
    n = L.shape[0]
    for j in range((n - 1) // BLOCK * BLOCK, -1, -BLOCK):
        j1 = min(n, j + BLOCK)
        inv11 = np.tril(np.linalg.inv(L[j:j1, j:j1]))
        if j1 < n:
            A21 = L[j1:, j:j1].copy()

            def rows(span):       # rows r0..r1 of X21; X22's column panel c is zero above row c
                r0, r1 = span
                T = np.zeros((r1 - r0, j1 - j), L.dtype)
                for c in range(j1, r1, BLOCK):
                    c1 = min(n, c + BLOCK)
                    a = max(c, r0)
                    T[a - r0:] += L[a:r1, c:c1] @ A21[c - j1:c1 - j1]
                L[r0:r1, j:j1] = -T @ inv11
            threaded_map(rows, _triangle_spans(j1, n, get_threads()))
        L[j:j1, j:j1] = inv11


def _triangle_spans(lo: int, hi: int, parts: int) -> list:
    """Row ranges of [lo, hi) with equal shares of a lower triangle's area (row r holds r - lo
    entries): one per thread."""
    cuts = [lo + int(round((hi - lo) * math.sqrt(i / parts))) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
