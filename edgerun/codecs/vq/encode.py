"""VQ codec, pack time: 2-D vector quantization with GPTQ error feedback (formats/codec-vq.md).

Each row is scaled by its (Hessian-weighted) RMS; consecutive pairs of columns in act order
(decreasing H_jj) become 2-D points, one c-bit code each into a codebook of K = 2^c centroids
shared by `group_rows` rows. The codebooks come from a k-means in the diagonal-Hessian metric
(Σ h_j (w_j − ŵ_j)², as the cluster codec's 1-D k-means; GPTVQ, van Baalen et al. 2024, §3.2),
then the codes are chosen pair by pair GPTQ-style (GPTQ, Frantar et al. 2022; GPTVQ §3.1): the
pair's centroid minimizes the error the remaining columns cannot undo, z1² + z2² with
z = A⁻ᵀ(w − ŵ) for A the pair's 2×2 block of U (upper Cholesky factor of H⁻¹), and that error is
fed to the later columns through U.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...errors import UnsupportedModelError
from ...kernels import PARALLEL_REGIONS, row_bands, threaded_map
from ..cluster.encode import _colweights
from ..gptq import inverse_cholesky
from .format import DIM, layout, pack_codes, pair_columns, params_of

_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True)

KMEANS_ITERS = 16          # Lloyd iterations (stops earlier when no point moves)
KMEANS_POINTS = 0          # k-means sample per codebook, points per centroid (params "kmeans_points"); 0: all
PERCDAMP = 0.01            # GPTQ dampening of H, relative to mean(diag H)
GPTQ_BLOCK = 128           # columns per GPTQ block (lazy batch updates between blocks)


@njit(**_JIT_PAR)
def _kmeans_all(P, wr, hp, group_rows, K, kx, iters, max_points, cents):
    # P (d, npairs, 2) f32 row-normalized pairs, wr (d,) f64 row weights s_r², hp (npairs, 2) f64
    # column weights h_j -> cents (G, K, 2) f64: per row group, k-means in the metric
    # Σ h (p − c)² (each coordinate's update a weighted mean), initialized on a kx × (K/kx) grid
    # of the group's value quantiles, on at most max_points of the group's points (a fixed
    # pseudo-random subset: point (u·2654435761) mod m for u < max_points; that prime makes them
    # distinct)
    d, npairs = P.shape[0], P.shape[1]
    G = cents.shape[0]
    ky = K // kx
    for g in prange(G):
        r0 = g * group_rows
        r1 = min(d, r0 + group_rows)
        m = (r1 - r0) * npairs
        for t in range(DIM):
            vals = np.sort(P[r0:r1, :, t].copy().reshape(m))
            kk = kx if t == 0 else ky
            for q in range(kk):
                v = vals[min(m - 1, int((q + 0.5) / kk * m))]
                for k in range(K):
                    if (k // ky if t == 0 else k % ky) == q:
                        cents[g, k, t] = v
        msub = min(m, max_points)
        assign = np.full(msub, -1, np.int64)
        for _ in range(iters):
            sw = np.zeros((K, DIM))
            swv = np.zeros((K, DIM))
            moved = 0
            for u in range(msub):
                s = u if msub == m else (u * 2654435761) % m
                i = r0 + s // npairs
                p = s % npairs
                x, y = P[i, p, 0], P[i, p, 1]
                ha, hb = hp[p, 0], hp[p, 1]
                best, bk = np.inf, 0
                for k in range(K):
                    e0 = x - cents[g, k, 0]
                    e1 = y - cents[g, k, 1]
                    cost = ha * e0 * e0 + hb * e1 * e1
                    if cost < best:
                        best, bk = cost, k
                if assign[u] != bk:
                    moved += 1
                    assign[u] = bk
                sw[bk, 0] += ha * wr[i]
                sw[bk, 1] += hb * wr[i]
                swv[bk, 0] += ha * wr[i] * x
                swv[bk, 1] += hb * wr[i] * y
            if moved == 0:
                break
            for k in range(K):          # an empty cluster keeps its centroid
                for t in range(DIM):
                    if sw[k, t] > 0:
                        cents[g, k, t] = swv[k, t] / sw[k, t]


@njit(**_JIT_PAR)
def _gptq_block(W, U, cents, scale, group_rows, live, b0, b1, idx, E):
    # W (d, 2·npairs) f32 pair-ordered columns, updated in place; U (2·npairs)² f32 upper Cholesky
    # factor of H⁻¹ in that order; cents (G, K, 2) f32; scale (d,) f32; live (2·npairs,) f32 (0 for
    # the padding column) -> idx[:, b0/2 : b1/2] pair codes, E (d, b1-b0) the errors z
    d = W.shape[0]
    K = cents.shape[1]
    for i in prange(d):
        g = i // group_rows
        s = scale[i]
        for a in range(b0, b1, 2):
            b = a + 1
            u11, u12, u22 = U[a, a], U[a, b], U[b, b]
            wa, wb = W[i, a], W[i, b]
            lb = live[b]
            best, bk = np.inf, 0
            for k in range(K):
                z1 = (wa - s * cents[g, k, 0]) / u11
                z2 = (wb - u12 * z1 - s * cents[g, k, 1]) / u22
                cost = z1 * z1 + lb * z2 * z2
                if cost < best:
                    best, bk = cost, k
            z1 = (wa - s * cents[g, bk, 0]) / u11
            z2 = lb * (wb - u12 * z1 - s * cents[g, bk, 1]) / u22
            idx[i, a // 2] = bk
            E[i, a - b0] = z1
            E[i, b - b0] = z2
            # GPTQ error feedback inside the block: the later columns absorb this pair's error
            for j in range(b + 1, b1):
                W[i, j] -= z1 * U[a, j] + z2 * U[b, j]


def _pair_weights(colw: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(npairs, 2) k-means weight h_j of each pair coordinate (0 for the padding column)."""
    return np.append(colw, 0.0)[cols]


def encode(w: np.ndarray, params: dict, hessian: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """float32 (d, n) -> {"meta", "codes", "codebook", "scale", "perm"} (formats/codec-vq.md).

    With `hessian` (n, n) = E[x xᵀ]: act-order pairs, diag(H)-weighted k-means and GPTQ code
    choice (params "gptq", default on); without it: natural order, plain k-means, nearest code.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise UnsupportedModelError(f"vq codec: weight must be 2-D, got shape {w.shape}")
    d, n = w.shape
    params = params or {}
    c, g = params_of(params, n)
    g = min(g, d)
    K = 1 << c
    npairs, _, _ = layout(n, c)
    size = DIM * npairs
    colw = _colweights(hessian, n)
    perm = np.argsort(-colw, kind="stable") if hessian is not None else np.arange(n)
    cols = pair_columns(perm, npairs)
    # per-row scale: the row's RMS in the h-weighted metric, as stored (f16)
    s = np.sqrt((w.astype(np.float64) ** 2 @ colw) / colw.sum()).astype(np.float16).astype(np.float32)
    s = np.where(np.isfinite(s), s, np.float32(0))
    inv = np.where(s > 0, 1 / np.where(s > 0, s, 1), 0).astype(np.float32)
    wpad = np.concatenate([w, np.zeros((d, 1), np.float32)], axis=1)[:, cols.reshape(-1)]   # (d, size)
    P = (wpad * inv[:, None]).reshape(d, npairs, DIM)
    cents = np.zeros((-(-d // g), K, DIM))
    kx = 1 << ((c + 1) // 2)
    with PARALLEL_REGIONS:
        _kmeans_all(P, s.astype(np.float64) ** 2, _pair_weights(colw, cols), g, K, kx,
                    int(params.get("iters", KMEANS_ITERS)),
                    (int(params.get("kmeans_points", KMEANS_POINTS)) or 1 << 40) * K, cents)
    cb16 = cents.astype(np.float16)
    cb32 = cb16.astype(np.float32)
    if hessian is not None and params.get("gptq", True):
        U, _ = inverse_cholesky(hessian, float(params.get("percdamp", PERCDAMP)), perm=perm, size=size)
    else:
        U = np.eye(size, dtype=np.float32)
    live = np.ones(size, np.float32)
    live[n:] = 0.0
    idx = np.empty((d, npairs), np.uint16)
    bands = row_bands(d)              # the lazy updates' rows, one band per kernel thread
    for b0 in range(0, size, GPTQ_BLOCK):
        b1 = min(size, b0 + GPTQ_BLOCK)
        E = np.empty((d, b1 - b0), np.float32)
        with PARALLEL_REGIONS:
            _gptq_block(wpad, U, cb32, s, g, live, b0, b1, idx, E)
        if b1 < size:       # lazy batch update of the columns after the block
            def update(rows):
                wpad[rows, b1:] -= E[rows] @ U[b0:b1, b1:]
            threaded_map(update, bands)
    return {"meta": np.array([d, n, c, g], np.int32), "codes": pack_codes(idx, c),
            "codebook": cb16.view(np.uint16), "scale": s.astype(np.float16).view(np.uint16),
            "perm": perm.astype(np.uint16)}
