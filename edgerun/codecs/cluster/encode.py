"""Cluster codec, pack time: k-means palettization (DESIGN §4 "cluster"; spec formats/codec-cluster.md).

Each weight is a `bits`-bit index into a codebook of K = 2^bits float16 values; one codebook
serves `group_rows` consecutive rows. The codebooks come from a *weighted* 1-D k-means per group
(SqueezeLLM, Kim et al. 2023, weights every entry by its Fisher sensitivity; we use diag(H),
H = E[x xᵀ] of the layer input, as the per-column sensitivity: the output error of row w is
(w-ŵ)ᵀ H (w-ŵ) ≈ Σ_j H_jj (w_j-ŵ_j)²). Init at weighted quantiles, then Lloyd iterations done on
the sorted values with prefix sums (1-D clusters are contiguous intervals).

Storage is by 32-weight blocks of 4·bits bytes, split into bit planes (4-, 2- and 1-bit fields)
so the kernel widens a whole block into two 16-lane index vectors with shifts and masks. The
lookup is one AVX-512 permute for K ≤ 16 (`vpermps`, DESIGN §6), a two-table permute for K = 32
(`vpermi2ps`) and a gather from an L1 float32 table for K ≥ 64.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...errors import UnsupportedModelError
from ...kernels import PARALLEL_REGIONS, row_bands, threaded_map
from ..gptq import inverse_cholesky as _inverse_cholesky
from .format import BLOCK, meta_array, pack_indices, params_of

_JIT = dict(cache=True, nogil=True, fastmath=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True)

LLOYD_ITERS = 40           # stops earlier when the clusters stop moving
PERCDAMP = 0.01            # GPTQ dampening of H, relative to mean(diag H)
GPTQ_BLOCK = 128           # columns per GPTQ block (lazy batch updates between blocks)
CHUNK_BYTES = 64 << 20     # float32 weights per row chunk of the encode (_chunks)


# --- encode (pack time) ------------------------------------------------------------------

@njit(**_JIT)
def _kmeans_group(v, w, K, iters, cent):
    # v (m,) sorted values, w (m,) their weights > 0 -> cent (K,) weighted 1-D k-means centroids
    m = v.shape[0]
    cw = np.zeros(m + 1)
    cwv = np.zeros(m + 1)
    for s in range(m):
        cw[s + 1] = cw[s] + w[s]
        cwv[s + 1] = cwv[s] + w[s] * v[s]
    total = cw[m]
    # init: value at the weighted (k + 1/2)/K quantile
    s = 0
    for k in range(K):
        q = (k + 0.5) / K * total
        while s < m - 1 and cw[s + 1] < q:
            s += 1
        cent[k] = v[s]
    bounds = np.zeros(K + 1, np.int64)
    prev = np.full(K + 1, -1, np.int64)
    for _ in range(iters):
        # assignment: cluster k holds the sorted values in [bounds[k], bounds[k+1])
        bounds[0] = 0
        bounds[K] = m
        for k in range(K - 1):
            mid = 0.5 * (cent[k] + cent[k + 1])
            bounds[k + 1] = np.searchsorted(v, mid)
        same = True
        for k in range(K + 1):
            if bounds[k] != prev[k]:
                same = False
            prev[k] = bounds[k]
        if same:
            break
        # update: weighted mean of each non-empty interval (an empty one keeps its centroid)
        for k in range(K):
            a, b = bounds[k], bounds[k + 1]
            if b > a and cw[b] > cw[a]:
                cent[k] = (cwv[b] - cwv[a]) / (cw[b] - cw[a])
        # keep the centroids sorted so the midpoints stay valid boundaries
        cent.sort()


@njit(**_JIT_PAR)
def _kmeans_all(W, colw, skip, group_rows, K, iters, cents):
    # W (d, n) f32, colw (n,) f64 > 0, skip (d, n) u8 or (0, 0) -> cents (G, K) f64, one weighted
    # k-means per row group; weights with skip != 0 (sparse outliers) are left out
    d, n = W.shape
    G = cents.shape[0]
    masked = skip.shape[0] > 0
    for g in prange(G):
        r0 = g * group_rows
        r1 = min(d, r0 + group_rows)
        m = 0
        vals = np.empty((r1 - r0) * n)
        wts = np.empty((r1 - r0) * n)
        for i in range(r0, r1):
            for j in range(n):
                if masked and skip[i, j]:
                    continue
                vals[m] = W[i, j]
                wts[m] = colw[j]
                m += 1
        order = np.argsort(vals[:m])
        _kmeans_group(vals[:m][order], wts[:m][order], K, iters, cents[g])


@njit(**_JIT_PAR)
def _assign_all(W, cents, group_rows, idx):
    # W (d, n) f32, cents (G, K) f32 sorted -> idx (d, n) uint8 nearest centroid
    d, n = W.shape
    for i in prange(d):
        c = cents[i // group_rows]
        for j in range(n):
            idx[i, j] = _nearest(c, W[i, j])


@njit(inline="always", **_JIT)
def _nearest(c, x):
    # c (K,) sorted, x scalar -> index of the nearest entry (binary search of the midpoints)
    lo, hi = 0, c.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if x > 0.5 * (c[mid] + c[mid + 1]):
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(**_JIT_PAR)
def _gptq_block(W, U, cents, group_rows, skip, b0, b1, idx, E):
    # W (d, n) f32 act-ordered columns, updated in place; U (n, n) f32 upper Cholesky factor of
    # H⁻¹; cents (G, K) f32 sorted; skip (d, n) u8 or (0, 0): outliers, kept exact
    # -> idx[:, b0:b1] nearest entries, E (d, b1-b0) errors scaled by 1/U[c, c]
    d = W.shape[0]
    masked = skip.shape[0] > 0
    for i in prange(d):
        c = cents[i // group_rows]
        for col in range(b0, b1):
            x = W[i, col]
            k = _nearest(c, x)
            idx[i, col] = k
            e = np.float32(0.0) if masked and skip[i, col] else (x - c[k]) / U[col, col]
            E[i, col - b0] = e
            # GPTQ error feedback inside the block: the later columns absorb this one's error
            for j in range(col + 1, b1):
                W[i, j] -= e * U[col, j]


def _colweights(hessian, n: int) -> np.ndarray:
    """Per-column k-means weights h_j = H_jj (floored), or 1 without calibration."""
    if hessian is None:
        return np.ones(n)
    colw = np.asarray(np.diagonal(hessian), np.float64).copy()
    if colw.shape != (n,):
        raise UnsupportedModelError(f"cluster codec: hessian must be ({n}, {n}), got {np.shape(hessian)}")
    colw = np.nan_to_num(colw, nan=0.0, posinf=0.0)
    mean = colw.mean() if colw.size else 1.0
    # floor: a column never seen active still gets a say, so every weight is assigned sanely
    return np.maximum(colw, 1e-6 * mean if mean > 0 else 1.0)


def _kmeans(w, colw, skip, g, K) -> np.ndarray:
    """Sorted codebooks (G, K) float16, rounded from the weighted k-means centroids."""
    cents = np.zeros((-(-w.shape[0] // g), K))
    with PARALLEL_REGIONS:
        _kmeans_all(w, colw, skip, g, K, LLOYD_ITERS, cents)
    return np.sort(cents.astype(np.float16), axis=1)      # stored values; rounding keeps order


def _chunks(d: int, n: int, g: int):
    """Row ranges of about CHUNK_BYTES of float32 weights, whole codebook groups each: the
    row-wise steps run chunk by chunk so a 1.5B model's 151936-row head never has a second
    full-size copy (peak RSS, BENCHMARKS.md pack time)."""
    rows = max(g, CHUNK_BYTES // (4 * n) // g * g)
    return [(r, min(d, r + rows)) for r in range(0, d, rows)]


def _gptq_factor(hessian, percdamp):
    """Columns in act order (decreasing H_jj) and U, the upper Cholesky factor of (H + damp·I)⁻¹
    in that order (float32)."""
    perm = np.argsort(-np.diagonal(hessian), kind="stable")
    U, _ = _inverse_cholesky(hessian, percdamp, perm=perm)
    return perm, U


def _gptq_round(w, perm, U, cb, g, skip):
    """GPTQ rounding to fixed codebooks (GPTQ, Frantar et al. 2022; GPTVQ, van Baalen et al. 2024):
    columns in act order `perm`, each weight to its *nearest* codebook entry, the error fed to
    the later columns through U (_gptq_factor), so Σ_i (w_i−ŵ_i) H (w_i−ŵ_i)ᵀ is minimized
    greedily. Rows are independent: `w` may be a chunk of whole codebook groups (`cb` its
    codebooks). Skipped weights (outliers) are kept exact.
    -> idx (d, n) uint8 and the weights as updated when their column was rounded (d, n)."""
    d, n = w.shape
    Wp = np.ascontiguousarray(w[:, perm], dtype=np.float32)
    skipp = np.ascontiguousarray(skip[:, perm]) if skip.shape[0] else skip
    idx = np.empty((d, n), np.uint8)
    bands = row_bands(d)              # the lazy updates' rows, one band per kernel thread
    for b0 in range(0, n, GPTQ_BLOCK):
        b1 = min(n, b0 + GPTQ_BLOCK)
        E = np.empty((d, b1 - b0), np.float32)
        with PARALLEL_REGIONS:
            _gptq_block(Wp, U, cb, g, skipp, b0, b1, idx, E)
        if b1 < n:       # lazy batch update of the columns after the block (a matmul per thread)
            def update(rows):
                Wp[rows, b1:] -= E[rows] @ U[b0:b1, b1:]
            threaded_map(update, bands)
    inv = np.argsort(perm)
    return np.ascontiguousarray(idx[:, inv]), Wp[:, inv]


def _outlier_score(w, cw) -> np.ndarray:
    """h_j (w_ij − mean_i)² of rows w (r, n), flat (SqueezeLLM's dense-and-sparse split: the
    sensitive tails that would stretch a codebook, by magnitude weighted by h_j = H_jj)."""
    x = w - w.mean(1, keepdims=True)
    x *= x
    x *= cw
    return x.reshape(-1)


class _Outliers:
    """The `frac` of all weights with the largest _outlier_score, as one mask per row chunk (the
    chunks taken in order). The k-th largest score comes from each chunk's own k largest; ties
    at it are taken in row-major order."""

    def __init__(self, w, colw, frac, chunks):
        self.cw = colw[None, :].astype(np.float32)
        self.k = k = int(round(frac * w.size))
        if k == 0:
            self.thr, self.ties = np.inf, 0
            return
        tops = []
        for r0, r1 in chunks:
            s = _outlier_score(w[r0:r1], self.cw)
            # a copy: the slice would keep the chunk's whole partitioned scores alive (on the
            # 1.5B's 151,936-row embedding that was 14 x 64 MB, the pack's peak)
            tops.append(np.partition(s, -min(k, s.size))[-min(k, s.size):].copy())
        tops = np.concatenate(tops)
        self.thr = np.partition(tops, -k)[-k]
        self.ties = k - int(np.count_nonzero(tops > self.thr))

    def mask(self, w) -> np.ndarray:
        """skip (r, n) uint8 for the next chunk's rows w."""
        skip = np.zeros(w.shape, np.uint8)
        if self.k:
            s = _outlier_score(w, self.cw)
            flat = skip.reshape(-1)
            flat[s > self.thr] = 1
            if self.ties:
                tie = np.flatnonzero(s == self.thr)[:self.ties]
                flat[tie] = 1
                self.ties -= tie.size
        return skip


def encode(w: np.ndarray, params: dict, hessian: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """float32 (d, n) -> {"codes", "codebook", "meta"} + outlier parts (formats/codec-cluster.md).

    `hessian` (n, n) = E[x xᵀ]: its diagonal weights each column in the k-means, and the
    whole of it drives the GPTQ rounding to the codebook (params "gptq", default on).
    Without it, every weight goes to its nearest codebook entry. Rows are encoded by chunks
    of whole codebook groups (_chunks); only the outliers' threshold looks at all of them.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise UnsupportedModelError(f"cluster codec: weight must be 2-D, got shape {w.shape}")
    d, n = w.shape
    params = params or {}
    bits, g, frac = params_of(params, n)
    g = min(g, d)
    K = 1 << bits
    chunks = _chunks(d, n, g)
    colw = _colweights(hessian, n)
    outliers = _Outliers(w, colw, frac, chunks) if frac else None
    gptq = hessian is not None and params.get("gptq", True)
    if gptq:
        perm, U = _gptq_factor(hessian, float(params.get("percdamp", PERCDAMP)))
    codes = np.empty((d, -(-n // BLOCK) * 4 * bits), np.uint8)
    cb16 = np.empty((-(-d // g), K), np.float16)
    rows, cols, vals = [], [], []
    for r0, r1 in chunks:
        wc = w[r0:r1]
        skip = outliers.mask(wc) if frac else np.zeros((0, 0), np.uint8)
        cb = cb16[r0 // g:-(-r1 // g)]
        cb[:] = _kmeans(wc, colw, skip, g, K)          # codebooks fit without the outliers
        cb32 = cb.astype(np.float32)
        if gptq:
            idx, wq = _gptq_round(wc, perm, U, cb32, g, skip)
        else:
            idx, wq = np.empty((r1 - r0, n), np.uint8), wc
            with PARALLEL_REGIONS:
                _assign_all(wc, cb32, g, idx)           # nearest *stored* centroid
        codes[r0:r1] = pack_indices(idx, bits)
        if frac:
            rr, cc = np.nonzero(skip)                   # row-major: CSR order
            dense = cb32[rr // g, idx[rr, cc]]
            # the sparse value is the f16 residual over the dense code, so dense + sparse ≈ w
            rows.append(rr + r0)
            cols.append(cc)
            vals.append((wq[rr, cc] - dense).astype(np.float16))
    parts = {"codes": codes, "codebook": cb16.view(np.uint16), "meta": meta_array(d, n, bits, g)}
    if frac:
        rows = np.concatenate(rows)
        parts["outlier_rowptr"] = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=d))]).astype(np.int32)
        parts["outlier_col"] = np.concatenate(cols).astype(np.uint16)
        parts["outlier_val"] = np.concatenate(vals).view(np.uint16)
    return parts

