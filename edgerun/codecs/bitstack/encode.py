"""BitStack codec, pack time: a weight as a stack of residual blocks (DESIGN §4 "bitstack"; spec
formats/codec-bitstack.md; Wang et al. 2024, "BitStack: Any-Size Compression of Large Language
Models in Variable Memory Environments").

Encode: scale input column j by the calibration activation norm s_j = sqrt(H_jj) (AWQ-style,
as BitStack's `get_act_scale`), then for i = 1..K: S_i = sign(R) (0 -> +1), rank-k SVD of |R|
(sqrt(σ) on both factors), R -= S_i ⊙ (u_i v_iᵀ). Block i = packed sign bits + u_i + v_i (fp16).
With calibration, signs are chosen by GPTQ instead, the first J blocks' together (`encode`).
Loading the first m blocks gives W ≈ Σ_{i<m} S_i ⊙ (u_i v_iᵀ) · diag(1/s); the runtime grows or
shrinks a matrix by changing m.
Block importance and the global load order (BitStack §3.2) are pack-time too.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ...errors import UnsupportedModelError
from ...kernels import row_bands, threaded_map
from ..gptq import inverse_cholesky, output_error
from .format import _available, _f16, _from_f16, _meta, block_layout, params_of
from .reference import decode_block

_JIT = dict(cache=True, nogil=True, fastmath=True)

POWER_ITERS = 3            # randomized SVD: power iterations ...
OVERSAMPLE = 8             # ... and extra columns (Halko et al. 2011)
GPTQ_BLOCK = 128           # sign selection: columns per lazy-update block (GPTQ, Frantar et al. 2022)
# ... and the Hessian damping. 1-bit signs are far coarser than GPTQ's 3-4 bit grids: strong
# damping (0.3 x mean diagonal) gave 5-10% lower output error than 0.01 on SmolLM2 layer 0
PERCDAMP = 0.3
# Joint signs (params["joint"] = J): the first J blocks' magnitudes are per-row multiples
# a_i(r) of one rank-k fit of |R| (a 2^J-level grid per row, `fit_digits`). The fit starts from a
# binary expansion, block i at 2^-i x LATTICE_GAIN x the fit ...
LATTICE_GAIN = 2.0
DIGIT_FIT_ITERS = 10       # ... and takes this many Lloyd steps (the error stops falling by ~10)
FIT_ROWS = 256             # rows fitted at once (scratch ~ 60 bytes x FIT_ROWS x n)


def _orth(Y: np.ndarray) -> np.ndarray:
    """Orthonormal basis of range(Y) (d, r) via the r x r Gram matrix (float64 eigh).

    Used instead of LAPACK QR: a tall-skinny QR in a threaded BLAS costs up to 100x more than
    this when the cores are busy; directions with a tiny eigenvalue are dropped."""
    Y = Y.astype(np.float64)
    lam, V = np.linalg.eigh(Y.T @ Y)
    keep = lam > lam[-1] * 1e-12 if lam[-1] > 0 else np.zeros(lam.shape, bool)
    keep[-1] = True
    return (Y @ (V[:, keep] / np.sqrt(np.maximum(lam[keep], 1e-300)))).astype(np.float32)


def _rsvd(A: np.ndarray, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Rank-k factors (U√σ (d,k), V√σ (n,k)) of A by randomized subspace iteration
    (Halko, Martinsson, Tropp 2011, Alg. 4.4); exact SVD of the small projection Qᵀ A."""
    d, n = A.shape
    r = min(k + OVERSAMPLE, d, n)
    Q = _orth(A @ rng.standard_normal((n, r)).astype(np.float32))
    for _ in range(POWER_ITERS):
        Q = _orth(A @ _orth(A.T @ Q))
    Ub, sig, Vt = np.linalg.svd((Q.T @ A).astype(np.float64), full_matrices=False)
    kk = min(k, sig.size)
    root = np.sqrt(sig[:kk])
    U = np.zeros((d, k), np.float32)
    V = np.zeros((n, k), np.float32)
    U[:, :kk] = Q @ (Ub[:, :kk] * root).astype(np.float32)
    V[:, :kk] = (Vt[:kk].T * root).astype(np.float32)
    return U, V


def activation_scale(hessian: np.ndarray | None, n: int) -> np.ndarray:
    """s (n,) float64 = sqrt(diag H), floored and normalized to RMS 1 (uniform without H).

    The normalization keeps W·diag(s) at the magnitude of W, so the fp16 factors stay in range;
    the floor gives columns never seen active a say (and avoids dividing by zero)."""
    if hessian is None:
        return np.ones(n)
    h = np.asarray(np.diagonal(hessian), np.float64)
    if h.shape != (n,):
        raise UnsupportedModelError(f"bitstack codec: hessian must be ({n}, {n}), got {np.shape(hessian)}")
    s = np.sqrt(np.maximum(np.nan_to_num(h, nan=0.0, posinf=0.0), 0.0))
    mean = s.mean() if s.size else 0.0
    s = np.maximum(s, 1e-3 * mean) if mean > 0 else np.ones(n)
    return s / np.sqrt(np.mean(s * s))


@njit(**_JIT)
def _gptq_signs_block(R, A, U, neg, j0, j1, E, r0, r1):
    # columns j0..j1-1 of rows r0..r1-1: R (d, n) f32 working residual (updated inside the
    # block), A (J, d, n) f32 the magnitudes of J blocks, U (n, n) f32 upper Cholesky factor of
    # H⁻¹ -> neg (J, d, n) bool, E (d, j1-j0) f32 the scaled errors that the caller applies to
    # the columns after j1
    J = A.shape[0]
    for j in range(j0, j1):
        ujj = U[j, j]
        for r in range(r0, r1):
            x, q, best = R[r, j], 0.0, np.inf
            for p in range(1 << J):             # the nearest of the 2^J points: bit i of p = block i negative
                t = 0.0
                for i in range(J):
                    t += -A[i, r, j] if (p >> i) & 1 else A[i, r, j]
                if abs(x - t) < best:
                    best, q, bp = abs(x - t), t, p
            for i in range(J):
                neg[i, r, j] = (bp >> i) & 1
            e = (x - q) / ujj
            E[r, j - j0] = e
            for c in range(j + 1, j1):
                R[r, c] -= e * U[j, c]


def gptq_signs(R: np.ndarray, A: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Signs S_i (as `neg`, J x d x n bool) of J blocks Σ_i S_i ⊙ A_i (A: J x d x n magnitudes)
    chosen together, column by column, with GPTQ's error feedback (Frantar et al. 2022): an
    entry's signs pick the point of {Σ_i ±A_i} nearest its running value (all 2^J tried), and
    each column's remaining error is compensated on the later columns through the inverse
    Hessian, so the J blocks together minimize the output error tr(E H Eᵀ). J = 1 is one
    block's signs; plain signs (neg = R < 0) are the paper's choice."""
    J, (d, n) = A.shape[0], R.shape
    # row-major copies: the callers pass column-permuted views (R[:, perm]), which NumPy lays out
    # column by column; the row loops below ran 5x slower on those (1.5B down_proj: 7.3 vs 1.4 s)
    R = np.array(R, np.float32, order="C")
    A = np.ascontiguousarray(A, np.float32)
    neg = np.empty((J, d, n), np.bool_)
    E = np.empty((d, GPTQ_BLOCK), np.float32)

    def band(rows):
        # rows are independent (error feedback runs along a row): each thread takes a band of
        # rows through every column block (1.5B down_proj: this loop was the encode's time)
        r0, r1 = rows.start, rows.stop
        for j0 in range(0, n, GPTQ_BLOCK):
            j1 = min(n, j0 + GPTQ_BLOCK)
            _gptq_signs_block(R, A, U, neg, j0, j1, E, r0, r1)
            if j1 < n:
                R[r0:r1, j1:] -= E[r0:r1, :j1 - j0] @ U[j0:j1, j1:]

    threaded_map(band, row_bands(d, 64))
    return neg


def fit_digits(R: np.ndarray, M: np.ndarray, a: np.ndarray, iters: int = DIGIT_FIT_ITERS) -> np.ndarray:
    """Per-row digit weights a (d, J) so that the 2^J-level grid {Σ_i ±a_i(r) M[r, j]} fits R.

    Lloyd's algorithm for this constrained codebook: round every entry to its nearest grid point,
    then refit the row's J weights by least squares to those sign patterns (the error in R's
    units, (R/M − Σ ±a_i)² M², never rises). Each row's grid so gets the step and the reach its
    own distribution needs, as cluster's per-row k-means codebook does, where one binary
    expansion for all rows (the initial a) stops at 3.75x the fit: on SmolLM2 the fitted grids
    stay nearly uniform but a_0 ranges 1.6-5.7 over the rows (formats/codec-bitstack.md)."""
    d, J = a.shape
    P = 1 << J
    S = 1.0 - 2.0 * ((np.arange(P)[:, None] >> np.arange(J)[None, :]) & 1)   # (P, J) signs, bit i = negative
    a = a.astype(np.float64, copy=True)
    for r0 in range(0, d, FIT_ROWS):                       # rows are independent: bounded scratch
        r1 = min(d, r0 + FIT_ROWS)
        m = M[r0:r1].astype(np.float64)
        live = np.abs(m) > 1e-12
        t = np.where(live, R[r0:r1] / np.where(live, m, 1.0), 0.0)
        w = np.where(live, m * m, 0.0)
        base = (np.arange(r1 - r0) * P)[:, None]
        for _ in range(iters):
            levels = a[r0:r1] @ S.T                        # (rows, P)
            order = np.argsort(levels, axis=1)
            sorted_ = np.take_along_axis(levels, order, 1)
            mids = (sorted_[:, 1:] + sorted_[:, :-1]) / 2
            nearest = np.stack([order[r, np.searchsorted(mids[r], t[r])] for r in range(r1 - r0)])
            cell = (nearest + base).ravel()
            wsum = np.bincount(cell, w.ravel(), (r1 - r0) * P).reshape(-1, P)
            wtsum = np.bincount(cell, (w * t).ravel(), (r1 - r0) * P).reshape(-1, P)
            G = np.einsum("rp,pi,pj->rij", wsum, S, S)
            G += np.eye(J) * (1e-9 * np.trace(G, axis1=1, axis2=2)[:, None, None] + 1e-300)
            a[r0:r1] = np.linalg.solve(G, (wtsum @ S)[:, :, None])[:, :, 0]
    return a


def encode(w: np.ndarray, params: dict, hessian: np.ndarray | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 (d, n) -> {"meta", "inv_scale", "block.0" .. "block.K-1"} (formats/codec-bitstack.md).

    `hessian` (n, n) = E[x xᵀ] of the input: s = sqrt(diag H) scales the columns before the
    decomposition (BitStack's activation-aware scaling); None means s = 1.

    params["overshoot"] (default 1, the paper's greedy step) scales each block's magnitude
    u vᵀ beyond the least-squares fit of |R|. The greedy step only moves an entry by about
    the mean |R| of its row/column, and those steps shrink geometrically, so entries a few
    times larger than their neighbours are never reached: the residual turns heavy-tailed
    (kurtosis 5 -> 100 in 10 blocks on SmolLM2) and the error stalls. Steps 1.25-1.3x larger
    cost ~2-5% of error at one block but halve it by 6 bits/weight (formats/codec-bitstack.md).
    With GPTQ signs 1.15 is best from 4 blocks on over layers 3-29 (-5% output error at 4
    blocks, -16% at 5, -28% at 6 vs 1.05).

    params["signs"] = "gptq" (with a hessian) picks each block's signs with GPTQ's error
    feedback (`gptq_signs`) instead of sign(R): the block then minimizes the output error.
    params["joint"] = J > 0 (with "gptq") makes the first J blocks one 2^J-level grid per row
    (one rank-k fit of |R| times per-row digit weights a_i(r) fitted to the row, `fit_digits`)
    whose signs GPTQ chooses together as it rounds to that grid (block by block, each block's
    feedback only serves the 1-bit model of its own step). On SmolLM2 at 4 blocks the fitted
    grid cuts the 99th-percentile per-token output error ~2x against a binary expansion, and
    held-out perplexity by a fifth (formats/codec-bitstack.md). Blocks J.. follow one by one."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise UnsupportedModelError(f"bitstack codec: weight must be 2-D, got shape {w.shape}")
    K, k, gain, signs, joint = params_of(params)
    d, n = w.shape
    s = activation_scale(hessian, n)
    R = w * s.astype(np.float32)[None, :]
    rng = np.random.default_rng(seed)
    uo, vo, total = block_layout(d, n, k)
    parts = {"meta": np.array([d, n, k, K], np.int32), "inv_scale": (1.0 / s).astype(np.float32)}
    Uh = None
    if signs == "gptq" and hessian is not None:
        # GPTQ's act-order: columns by descending input energy (H_jj), on the Hessian of
        # the scaled inputs x / s
        perm = np.argsort(-np.diagonal(hessian), kind="stable")
        back = np.argsort(perm)
        Hs = np.asarray(hessian, np.float64) / np.outer(s, s)
        Uh = inverse_cholesky(Hs, PERCDAMP, perm=perm)[0]

    def one_block(R):
        """The next block on residual R: (neg, u16, v16); R -= the block."""
        U, V = _rsvd(np.abs(R), k, rng)
        u16, v16 = _f16(U * gain), _f16(V)
        A = _from_f16(u16) @ _from_f16(v16).T
        neg = R < 0 if Uh is None else gptq_signs(R[:, perm], A[None, :, perm], Uh)[0][:, back]
        R -= np.where(neg, -A, A)       # what is *stored*: later blocks correct the fp16 rounding
        return neg, u16, v16

    def joint_blocks(R):
        """Blocks 0..J-1 as one per-row 2^J-level grid with jointly chosen signs; R -= them."""
        U, V = _rsvd(np.abs(R), k, rng)
        v16 = _f16(V)
        fit = _from_f16(_f16(U)) @ _from_f16(v16).T
        a = fit_digits(R, fit, np.tile(LATTICE_GAIN * 0.5 ** np.arange(J), (d, 1))).astype(np.float32)
        u16s = [_f16(U * a[:, i:i + 1]) for i in range(J)]
        A = np.stack([_from_f16(u) @ _from_f16(v16).T for u in u16s])
        negs = gptq_signs(R[:, perm], A[:, :, perm], Uh)[:, :, back]
        for i in range(J):
            R -= np.where(negs[i], -A[i], A[i])
        return [(negs[i], u16s[i], v16) for i in range(J)]

    blocks = []
    J = joint if Uh is not None else 0
    if J:
        # One grid per row (scaled by a rank-k fit) can fail a matrix whose input has a
        # massive-activation column; there the greedy blocks, refitted each step, do better
        # (SmolLM2: layer 11's down_proj, the only one of 210 matrices). Keep whichever first
        # J blocks leave the lower output error tr(E H Eᵀ).
        Rg = R.copy()
        greedy = [one_block(Rg) for _ in range(J)]
        blocks = joint_blocks(R)
        if output_error(Rg, Hs) < output_error(R, Hs):
            blocks, R = greedy, Rg
    while len(blocks) < K:
        blocks.append(one_block(R))
    for i, (neg, u16, v16) in enumerate(blocks):
        blob = np.zeros(total, np.uint8)
        blob[: d * ((n + 7) // 8)] = np.packbits(neg, axis=1, bitorder="little").ravel()
        blob[uo: uo + 2 * d * k] = u16.view(np.uint8).ravel()
        blob[vo: vo + 2 * n * k] = v16.view(np.uint8).ravel()
        parts[f"block.{i}"] = blob
    return parts


# --- importance and global order (BitStack §3.2) ----------------------------------------------

def block_importance(parts: dict, params: dict | None, hessian: np.ndarray | None,
                     w: np.ndarray | None = None) -> list[float]:
    """scores[i] = output-error reduction of adding block i: err(i) - err(i+1), err(m) =
    tr(E_m H E_mᵀ) = E‖E_m x‖², E_m = W - Ŵ_m (Ŵ_m = the first m blocks).

    This proxy replaces the paper's perplexity measurement per extra block (one forward pass per
    matrix per level is far too slow on a CPU). Without `w` the full K-block reconstruction
    stands in for W; without `hessian`, H = I (Frobenius error). Every row counts: on a sample of
    512 of its 1536 rows the 1.5B's down_proj scores were up to 1.8x off (a few rows carry most
    of its error)."""
    d, n, k, K = _meta(parts)
    m = _available(parts, K, None)
    # float32, one block at a time (float64 and every block decoded at once: 1.9 GB for the
    # 1.5B's down_proj); a float32 residual's error is ~1e-6 of its size, far below the scores'
    # differences
    if w is not None:
        E = np.array(w, np.float32)
    else:
        E = np.zeros((d, n), np.float32)
        for i in range(m):
            E += decode_block(parts, i)
    H = None if hessian is None else np.asarray(hessian, np.float32)
    prev, scores = output_error(E, H), []
    for i in range(m):
        E -= decode_block(parts, i)
        cur = output_error(E, H)
        scores.append(prev - cur)
        prev = cur
    return scores


def order_blocks(sizes: dict[str, int], scores: dict[str, list[float]]) -> list[tuple[str, int]]:
    """The global load order [(name, block_index), ...] (BitStack's importance sorting).

    Level by level: every matrix gets block i before any gets block i+1, so no matrix is ever
    two blocks ahead of another (letting the most important matrices run 1 or 3 blocks ahead was
    measured worse: formats/codec-bitstack.md); within a level, matrices go by importance per
    byte (scores[name][i] / sizes[name]) descending, ties by name, so a byte budget cut anywhere
    in a level keeps the most useful blocks of that level."""
    levels = max((len(s) for s in scores.values()), default=0)
    order = []
    for i in range(levels):
        level = [nm for nm in scores if len(scores[nm]) > i]
        level.sort(key=lambda nm: (-scores[nm][i] / max(int(sizes[nm]), 1), nm))
        order.extend((nm, i) for nm in level)
    return order

