"""BitStack codec, pack time: a weight as a stack of residual blocks (DESIGN §4 "bitstack"; spec
formats/codec-bitstack.md; Wang et al. 2024, "BitStack: Any-Size Compression of Large Language
Models in Variable Memory Environments").

Encode: scale input column j by the calibration activation norm s_j = sqrt(H_jj) (AWQ-style,
as BitStack's `get_act_scale`), then for i = 1..K: S_i = sign(R) (0 -> +1), rank-k SVD of |R|
(sqrt(σ) on both factors), R -= S_i ⊙ (u_i v_iᵀ). Block i = packed sign bits + u_i + v_i (fp16).
With calibration, signs are chosen by GPTQ instead, the first J blocks' together (`encode_stack`).
Loading the first m blocks gives W ≈ Σ_{i<m} S_i ⊙ (u_i v_iᵀ) · diag(1/s); the runtime grows or
shrinks a matrix by changing m.
Block importance (from the encode's own errors) and the global load order (BitStack §3.2) are
pack-time too.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ...errors import UnsupportedModelError
from ...kernels import row_bands, threaded_map
from ..gptq import damping, inverse_cholesky, output_error
from .format import _f16, _from_f16, block_layout, params_of

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
GREEDY_TRIAL_ROWS = 256    # rows on which the greedy first J blocks are tried against the joint ones


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
def _gptq_signs_block(RT, AT, U, negT, j0, j1, ET, r0, r1, best, pick, q, t):
    # columns j0..j1-1 of rows r0..r1-1, on transposes: RT (n, d) f32 the working residual
    # (updated inside the block), AT (J, n, d) f32 the magnitudes of J blocks, U (n, n) f32 upper
    # Cholesky factor of H⁻¹ -> negT (J, n, d) bool, ET (B, d) f32 the scaled errors that the
    # caller applies to the columns after j1. A column's rows are contiguous and independent,
    # so every loop over r below is a vector loop; best, pick, q, t (d,) scratch.
    J = AT.shape[0]
    for j in range(j0, j1):
        x = RT[j]
        for r in range(r0, r1):
            best[r] = np.inf
        for p in range(1 << J):                 # the nearest of the 2^J points: bit i of p = block i negative
            for r in range(r0, r1):
                t[r] = 0.0
            for i in range(J):
                sign = np.float32(-1.0 if (p >> i) & 1 else 1.0)
                for r in range(r0, r1):
                    t[r] += sign * AT[i, j, r]
            for r in range(r0, r1):
                dist = abs(x[r] - t[r])
                if dist < best[r]:
                    best[r], pick[r], q[r] = dist, p, t[r]
        for i in range(J):
            for r in range(r0, r1):
                negT[i, j, r] = (pick[r] >> i) & 1
        e = ET[j - j0]
        inv = np.float32(1.0 / U[j, j])
        for r in range(r0, r1):
            e[r] = (x[r] - q[r]) * inv
        for c in range(j + 1, j1):
            y, u = RT[c], U[j, c]
            for r in range(r0, r1):
                y[r] -= e[r] * u


def gptq_signs(R: np.ndarray, A: np.ndarray, U: np.ndarray,
               perm: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Signs S_i (as `neg`, J x d x n bool) of J blocks Σ_i S_i ⊙ A_i (A: J x d x n magnitudes)
    chosen together, column by column, with GPTQ's error feedback (Frantar et al. 2022): an
    entry's signs pick the point of {Σ_i ±A_i} nearest its running value (all 2^J tried), and
    each column's remaining error is compensated on the later columns through the inverse
    Hessian, so the J blocks together minimize the output error tr(E H Eᵀ). J = 1 is one
    block's signs; plain signs (neg = R < 0) are the paper's choice. Columns are visited in
    the order `perm` (U: the factor of the Hessian permuted so); neg is in R's own order.

    Also returns Σ e² of the scaled errors e = (x - q) / U_jj, which is tr(Δ H_d Δᵀ) for the
    rounding error Δ = R - Σ S_i ⊙ A_i and the damped Hessian H_d = (UᵀU)⁻¹ (Δ = e U, so
    Δ H_d Δᵀ = e U U⁻¹ U⁻ᵀ Uᵀ eᵀ): the output error for the price of the squares."""
    J, (d, n) = A.shape[0], R.shape
    A = np.asarray(A, np.float32)
    cols = np.arange(n) if perm is None else np.asarray(perm)
    RT = np.ascontiguousarray(R.T[cols], np.float32)           # (n, d): column j is row j
    AT = np.empty((J, n, d), np.float32)
    for a, at in zip(A, AT):                                    # no J x d x n temporaries
        np.take(a.T, cols, axis=0, out=at)
    negT = np.empty((J, n, d), np.bool_)
    ET = np.empty((GPTQ_BLOCK, d), np.float32)
    best, q, t = (np.empty(d, np.float32) for _ in range(3))
    pick = np.empty(d, np.int32)

    def band(rows):
        # rows are independent (error feedback runs along a row): each thread takes a band of
        # rows through every column block
        r0, r1, err = rows.start, rows.stop, 0.0
        for j0 in range(0, n, GPTQ_BLOCK):
            j1 = min(n, j0 + GPTQ_BLOCK)
            _gptq_signs_block(RT, AT, U, negT, j0, j1, ET, r0, r1, best, pick, q, t)
            err += float(np.sum(np.square(ET[:j1 - j0, r0:r1], dtype=np.float64)))
            if j1 < n:
                RT[j1:, r0:r1] -= U[j0:j1, j1:].T @ ET[:j1 - j0, r0:r1]
        return err

    err = sum(threaded_map(band, row_bands(d, 64)))
    neg = np.empty_like(negT)
    neg[:, cols] = negT
    return neg.transpose(0, 2, 1), err


@njit(**_JIT)
def _level_sums(t, w, mids, order, wsum, wtsum):
    # Lloyd's assignment step of fit_digits: t[r, j] goes to its row's nearest level, the one
    # after the count of the sorted levels' midpoints (mids) below it; order[r] maps sorted
    # places to level indices. Sums per level of w and w·t into wsum, wtsum (rows, P), zeroed.
    rows, n = t.shape
    place = np.empty(n, np.int32)
    for r in range(rows):
        place[:] = 0
        for k in range(mids.shape[1]):          # branch-free counts: a vector loop per midpoint
            b = mids[r, k]
            for j in range(n):
                place[j] += t[r, j] > b
        for j in range(n):
            p = order[r, place[j]]
            wsum[r, p] += w[r, j]
            wtsum[r, p] += w[r, j] * t[r, j]


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
        for _ in range(iters):
            levels = a[r0:r1] @ S.T                        # (rows, P)
            order = np.argsort(levels, axis=1)
            sorted_ = np.take_along_axis(levels, order, 1)
            mids = (sorted_[:, 1:] + sorted_[:, :-1]) / 2
            wsum, wtsum = np.zeros((r1 - r0, P)), np.zeros((r1 - r0, P))
            _level_sums(t, w, mids, order, wsum, wtsum)
            G = np.einsum("rp,pi,pj->rij", wsum, S, S)
            G += np.eye(J) * (1e-9 * np.trace(G, axis1=1, axis2=2)[:, None, None] + 1e-300)
            a[r0:r1] = np.linalg.solve(G, (wtsum @ S)[:, :, None])[:, :, 0]
    return a


def encode_stack(w: np.ndarray, params: dict, hessian: np.ndarray | None = None,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], list[float]]:
    """float32 (d, n) -> ({"meta", "inv_scale", "block.0" .. "block.K-1"} (formats/codec-bitstack.md),
    scores): scores[i] = the output error tr(E H Eᵀ) that block i removes, E = W - Ŵ (BitStack
    §3.2's block importance, measured as output error instead of perplexity; H = I without a
    hessian). A GPTQ pass gives the error after its blocks for free (`gptq_signs`); W's own, the
    joint blocks' prefixes and every block with plain signs cost one d·n² product each.

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
    Hs = Uh = None
    if hessian is not None:            # the Hessian of the scaled inputs x / s, in float32
        Hs = np.array(hessian, np.float32)
        Hs *= (1.0 / s).astype(np.float32)[:, None]
        Hs *= (1.0 / s).astype(np.float32)[None, :]
    if signs == "gptq" and Hs is not None:
        # GPTQ's act-order: columns by descending input energy (H_jj)
        perm = np.argsort(-np.diagonal(hessian), kind="stable")
        Uh = inverse_cholesky(Hs, PERCDAMP, perm=perm)[0]
        extra = damping(np.diagonal(Hs), PERCDAMP).astype(np.float32)

    def undamped(err, R):
        """A GPTQ pass's tr(Δ H_d Δᵀ) -> tr(Δ H Δᵀ), with Δ = R the residual after it."""
        return err - float(np.einsum("ij,ij,j->", R, R, extra, dtype=np.float64))

    def one_block(R, rng=rng):
        """The next block on residual R and the output error after it; R -= the block."""
        U, V = _rsvd(np.abs(R), k, rng)
        u16, v16 = _f16(U * gain), _f16(V)
        A = _from_f16(u16) @ _from_f16(v16).T
        if Uh is None:
            neg = R < 0
        else:
            neg, err = gptq_signs(R, A[None], Uh, perm)
            neg = neg[0]
        R -= np.where(neg, -A, A)       # what is *stored*: later blocks correct the fp16 rounding
        return (neg, u16, v16), output_error(R, Hs) if Uh is None else undamped(err, R)

    def joint_blocks(R):
        """Blocks 0..J-1 as one per-row 2^J-level grid with jointly chosen signs, and the output
        error after each; R -= them."""
        U, V = _rsvd(np.abs(R), k, rng)
        v16 = _f16(V)
        fit = _from_f16(_f16(U)) @ _from_f16(v16).T
        a = fit_digits(R, fit, np.tile(LATTICE_GAIN * 0.5 ** np.arange(J), (d, 1))).astype(np.float32)
        u16s = [_f16(U * a[:, i:i + 1]) for i in range(J)]
        A = np.stack([_from_f16(u) @ _from_f16(v16).T for u in u16s])
        negs, err = gptq_signs(R, A, Uh, perm)
        for i in range(J):
            R -= np.where(negs[i], -A[i], A[i])
        errs = [undamped(err, R)]
        E = R.copy()                    # the prefixes: the residual plus the blocks not loaded
        for i in range(J - 1, 0, -1):
            E += np.where(negs[i], -A[i], A[i])
            errs.insert(0, output_error(E, Hs))
        return [(negs[i], u16s[i], v16) for i in range(J)], errs

    errors = [output_error(R, Hs)]      # err(m) after the first m blocks
    blocks = []
    J = joint if Uh is not None else 0
    if J:
        # One grid per row (scaled by a rank-k fit) can fail a matrix whose input has a
        # massive-activation column; there the greedy blocks, refitted each step, do better
        # (SmolLM2: layer 11's down_proj, the only one of 210 matrices). Keep whichever first
        # J blocks leave the lower output error tr(E H Eᵀ). The greedy blocks are tried on a
        # sample of rows first (fitted to those rows alone, which if anything favours them) and
        # made for the whole matrix only where they win there: they cost J GPTQ passes.
        R0 = R.copy()
        blocks, errs = joint_blocks(R)
        sample = d > GREEDY_TRIAL_ROWS
        rows = np.sort(rng.choice(d, GREEDY_TRIAL_ROWS, replace=False)) if sample else np.arange(d)

        def greedy_blocks(Rg):           # the same draws as joint = 0 makes its first blocks with
            draws = np.random.default_rng(seed)
            return [one_block(Rg, draws) for _ in range(J)]

        Rg = R0[rows]
        greedy = greedy_blocks(Rg)
        if greedy[-1][1] < (output_error(R[rows], Hs) if sample else errs[-1]):
            if sample:
                Rg = R0
                greedy = greedy_blocks(Rg)
            if greedy[-1][1] < errs[-1]:
                blocks, errs, R = [b for b, _ in greedy], [e for _, e in greedy], Rg
        errors += errs
    while len(blocks) < K:
        block, err = one_block(R)
        blocks.append(block)
        errors.append(err)
    for i, (neg, u16, v16) in enumerate(blocks):
        blob = np.zeros(total, np.uint8)
        blob[: d * ((n + 7) // 8)] = np.packbits(neg, axis=1, bitorder="little").ravel()
        blob[uo: uo + 2 * d * k] = u16.view(np.uint8).ravel()
        blob[vo: vo + 2 * n * k] = v16.view(np.uint8).ravel()
        parts[f"block.{i}"] = blob
    return parts, [errors[i] - errors[i + 1] for i in range(K)]


# --- importance and global order (BitStack §3.2) ----------------------------------------------

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

