"""BitStack codec: a weight as a stack of residual blocks (DESIGN §4 "bitstack"; spec
formats/codec-bitstack.md; Wang et al. 2024, "BitStack: Any-Size Compression of Large Language
Models in Variable Memory Environments").

Encode: scale input column j by the calibration activation norm s_j = sqrt(H_jj) (AWQ-style,
as BitStack's `get_act_scale`), then for i = 1..K: S_i = sign(R) (0 -> +1), rank-k SVD of |R|
(sqrt(σ) on both factors), R -= S_i ⊙ (u_i v_iᵀ). Block i = packed sign bits + u_i + v_i (fp16).
With calibration, signs are chosen by GPTQ instead, the first J blocks' together (`encode`).
Loading the first m blocks gives W ≈ Σ_{i<m} S_i ⊙ (u_i v_iᵀ) · diag(1/s); the runtime grows or
shrinks a matrix by changing m.

Compute (LUT-GEMM / T-MAC): y = Σ_i Σ_q u_i[:, q] ⊙ (S_i @ (v_i[:, q] ⊙ z)), z = x / s. Per
block and token, for every chunk of 4 input columns the 16 signed sums of the k-vectors
v_i[j] z_j are tabulated (16 x L floats, L = k padded to 4/8/16; one cache line per entry at
L = 16); a row then costs one L-lane load + add per 4 weights and one dot with u_i[row] at the
end. Dense W is never rebuilt by matvec; the batched matmul (prefill) rebuilds row tiles with
BLAS instead, which wins from a few tokens on (k multiply-adds per weight per block, once,
vs one table walk per token).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import UnsupportedModelError
from ..isa import table_lookup
from ..kernels import get_threads
from ..memory import thread_scratch
from .llvm_ir import inverse_cholesky

_JIT = dict(cache=True, nogil=True, fastmath=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True)

MAX_RANK = 16              # rank of a block's factors (the spec's limit)
PAR_MIN_WEIGHTS = 1 << 19  # matvecs this large split rows over threads (as dense.py measured)
MATMUL_MIN_T = 4           # below this many tokens a matmul is a loop of LUT matvecs
TILE_ROWS = 128            # rows rebuilt per matmul tile (tile stays in L2 for the BLAS call)
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
MAX_JOINT = 8              # the rounding tries all 2^J sign patterns of an entry
FIT_ROWS = 256             # rows fitted at once (scratch ~ 60 bytes x FIT_ROWS x n)


# --- encode / decode (NumPy reference) -----------------------------------------------------

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


def _f16(a: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bits (uint16), saturating instead of overflowing to inf."""
    return np.ascontiguousarray(np.clip(a, -65504.0, 65504.0), np.float16).view(np.uint16)


def _from_f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


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
def _gptq_signs_block(R, A, U, neg, j0, j1, E):
    # columns j0..j1-1: R (d, n) f32 working residual (updated inside the block), A (J, d, n) f32
    # the magnitudes of J blocks, U (n, n) f32 upper Cholesky factor of H⁻¹ -> neg (J, d, n) bool,
    # E (d, j1-j0) f32 the scaled errors that the caller applies to the columns after j1
    J, d = A.shape[0], R.shape[0]
    for j in range(j0, j1):
        ujj = U[j, j]
        for r in range(d):
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
    R = R.astype(np.float32, copy=True)
    neg = np.empty((J, d, n), np.bool_)
    E = np.empty((d, GPTQ_BLOCK), np.float32)
    for j0 in range(0, n, GPTQ_BLOCK):
        j1 = min(n, j0 + GPTQ_BLOCK)
        _gptq_signs_block(R, A, U, neg, j0, j1, E)
        if j1 < n:
            R[:, j1:] -= E[:, :j1 - j0] @ U[j0:j1, j1:]
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


def block_layout(d: int, n: int, k: int) -> tuple[int, int, int]:
    """(u offset, v offset, total bytes) of one "block.i" byte array (formats/codec-bitstack.md):
    signs (d, ceil(n/8)) | pad to 64 | u (d, k) fp16 | pad to 64 | v (n, k) fp16."""
    sb = d * ((n + 7) // 8)
    uo = -(-sb // 64) * 64
    vo = -(-(uo + 2 * d * k) // 64) * 64
    return uo, vo, vo + 2 * n * k


def _block_views(blob: np.ndarray, d: int, n: int, k: int):
    """(signs (d, nb) u8, u (d, k) u16, v (n, k) u16) views into one block's bytes."""
    uo, vo, total = block_layout(d, n, k)
    if blob.dtype != np.uint8 or blob.ndim != 1 or blob.size != total:
        raise UnsupportedModelError(
            f"bitstack codec: a block of a {d}x{n} rank-{k} matrix must be {total} uint8 bytes, "
            f"got {blob.dtype} {blob.shape}")
    nb = (n + 7) // 8
    signs = blob[: d * nb].reshape(d, nb)
    u = blob[uo: uo + 2 * d * k].view(np.uint16).reshape(d, k)
    v = blob[vo: vo + 2 * n * k].view(np.uint16).reshape(n, k)
    return signs, u, v


def _meta(parts: dict) -> tuple[int, int, int, int]:
    try:
        d, n, k, K = (int(x) for x in parts["meta"])
    except (KeyError, ValueError, TypeError):
        raise UnsupportedModelError("bitstack codec: parts must hold meta [d, n, rank, blocks]") from None
    inv = parts.get("inv_scale")
    if inv is None or inv.dtype != np.float32 or inv.shape != (n,):
        raise UnsupportedModelError(f"bitstack codec: inv_scale must be float32 ({n},)")
    return d, n, k, K


def _available(parts: dict, K: int, blocks: int | None) -> int:
    m = K if blocks is None else int(blocks)
    if not 0 <= m <= K:
        raise UnsupportedModelError(f"bitstack codec: blocks={m} is out of range 0..{K}")
    missing = [i for i in range(m) if f"block.{i}" not in parts]
    if missing:
        raise UnsupportedModelError(f"bitstack codec: block.{missing[0]} is not loaded (asked for {m} blocks)")
    return m


def _dense_block(signs, u, v, n):
    """S ⊙ (u vᵀ) as float32 (d, n) from one block's views."""
    neg = np.unpackbits(signs, axis=1, count=n, bitorder="little").astype(bool)
    w = _from_f16(u) @ _from_f16(v).T
    return np.where(neg, -w, w)


# --- kernels -------------------------------------------------------------------------------
#
# Loaded layout (built from the stored block at load time; the file layout is unchanged):
#   sig (dp/16, nb, 16) u8  the sign bytes of 16 consecutive rows side by side: sig[t, b, i] is
#                           byte b of row 16t+i (dp = d rounded up to 16, padded rows are 0)
#   ut  (r, dp) f32         u transposed: the 16 rows of a tile are one vector per rank component
#   vf  (8nb, r) f32        v widened, zero rows for the padding columns j >= n
# Per token and block the tables tab[c, q, p] = Σ_t (bit t of p ? -1 : +1) · vf[4c+t, q] · z[4c+t]
# hold the 16 sign patterns of a 4-column chunk in one 16-float register; a tile of 16 rows then
# looks up all 16 rows' nibbles at once with vpermps (T-MAC's row-parallel table lookup, in
# float32 so there is no table quantization error): 128 weights per sign-byte vector.

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16F = ir.VectorType(_F32, 16)
_V16I = ir.VectorType(_I32, 16)
TILE = 16                  # rows per vpermps lookup (one AVX-512 register of float32)
GROUPS = (4, 2, 1)         # rank components handled per pass over a tile's sign bytes


def _data(context, builder, ty, val):
    return context.make_array(ty)(context, builder, val).data


def _c64(v):
    return ir.Constant(_I64, v)


def _fast(builder, op, a, b):
    return getattr(builder, op)(a, b, flags=("fast",))


def _splat_i32(v):
    return ir.Constant(_V16I, [v] * 16)


@intrinsic(prefer_literal=True)
def _tile_lut(typingctx, sig, soff, tab, q0, r, nb, ut, uoff, dp, y, yoff, accumulate, group):
    """y[yoff:yoff+16] (+)= Σ_{q0 <= q < q0+G} ut[uoff + q·dp : +16] ⊙ acc_q, where
    acc_q = Σ_b (T[2b, q][lo(s_b)] + T[2b+1, q][hi(s_b)]), s_b = sig[soff + 16b : +16] (one sign
    byte of each of the tile's 16 rows), T[c, q] = tab[(c·r + q)·16 : +16], G = group (1, 2, 4)."""
    G = getattr(group, "literal_value", None)
    if G not in GROUPS:
        return None

    def codegen(context, builder, sig_, args):
        s_v, soff_v, tab_v, q0_v, r_v, nb_v, ut_v, uoff_v, dp_v, y_v, yoff_v, acc_v, _ = args
        ps = builder.gep(_data(context, builder, sig_.args[0], s_v), [soff_v], source_etype=_I8)
        pt = _data(context, builder, sig_.args[2], tab_v)
        pu = _data(context, builder, sig_.args[6], ut_v)
        py = builder.gep(_data(context, builder, sig_.args[9], y_v), [yoff_v], source_etype=_F32)
        zero = ir.Constant(_V16F, [0.0] * 16)
        lo_acc = [cgutils.alloca_once_value(builder, zero) for _ in range(G)]
        hi_acc = [cgutils.alloca_once_value(builder, zero) for _ in range(G)]
        stride = builder.mul(r_v, _c64(16))                  # floats per chunk (all rank components)
        with cgutils.for_range(builder, nb_v) as loop:
            b = loop.index
            raw = builder.load(builder.gep(ps, [builder.mul(b, _c64(16))], source_etype=_I8),
                               typ=ir.VectorType(_I8, 16), align=1)
            idx = builder.zext(raw, _V16I)
            lo = builder.and_(idx, _splat_i32(15))
            hi = builder.lshr(idx, _splat_i32(4))
            base_lo = builder.mul(builder.mul(b, _c64(2)), stride)
            base_hi = builder.add(base_lo, stride)
            for g in range(G):
                qo = builder.mul(builder.add(q0_v, _c64(g)), _c64(16))
                for base, idx_v, acc in ((base_lo, lo, lo_acc[g]), (base_hi, hi, hi_acc[g])):
                    t = builder.load(builder.gep(pt, [builder.add(base, qo)], source_etype=_F32), typ=_V16F, align=4)
                    builder.store(_fast(builder, "fadd", builder.load(acc), table_lookup(builder, [t], idx_v)), acc)
        out = None
        for g in range(G):
            uo = builder.add(uoff_v, builder.mul(builder.add(q0_v, _c64(g)), dp_v))
            ug = builder.load(builder.gep(pu, [uo], source_etype=_F32), typ=_V16F, align=4)
            term = _fast(builder, "fmul", ug, _fast(builder, "fadd", builder.load(lo_acc[g]), builder.load(hi_acc[g])))
            out = term if out is None else _fast(builder, "fadd", out, term)
        py_v = builder.bitcast(py, _V16F.as_pointer())
        old = builder.select(builder.icmp_unsigned("!=", acc_v, ir.Constant(acc_v.type, 0)),
                             builder.load(py_v, align=4), zero)
        builder.store(_fast(builder, "fadd", old, out), py_v, align=4)
        return context.get_dummy_value()

    return types.none(sig, soff, tab, q0, r, nb, ut, uoff, dp, y, yoff, accumulate, group), codegen


@njit(**_JIT)
def build_tables(vf, z, tab):
    # vf (8nb, r) f32 (zero padding rows), z (8nb,) f32 (zero tail) -> tab (2nb·r·16,) f32:
    # tab[(c·r + q)·16 + p] = Σ_t (bit t of p ? -1 : +1) · vf[4c+t, q] · z[4c+t]
    npad, r = vf.shape
    for c in range(npad // 4):
        for q in range(r):
            a0 = vf[4 * c, q] * z[4 * c]
            a1 = vf[4 * c + 1, q] * z[4 * c + 1]
            a2 = vf[4 * c + 2, q] * z[4 * c + 2]
            a3 = vf[4 * c + 3, q] * z[4 * c + 3]
            base = (c * r + q) * 16
            for p in range(16):      # fixed trip count: LLVM vectorizes the 16 patterns
                s0 = np.float32(1 - 2 * (p & 1))
                s1 = np.float32(1 - 2 * ((p >> 1) & 1))
                s2 = np.float32(1 - 2 * ((p >> 2) & 1))
                s3 = np.float32(1 - 2 * ((p >> 3) & 1))
                tab[base + p] = s0 * a0 + s1 * a1 + s2 * a2 + s3 * a3


@njit(**_JIT)
def _tiles(sig, ut, tab, y, t0, t1, accumulate):
    # sig (dp/16, nb, 16) u8, ut (r, dp) f32, tab (tables) -> y[16t0:16t1] (+)= tiles t0..t1-1
    nb = sig.shape[1]
    r, dp = ut.shape
    flat = sig.reshape(-1)
    uflat = ut.reshape(-1)
    for t in range(t0, t1):
        q = 0
        while q < r:             # rank components in passes of 4, 2, 1 (one literal group each)
            acc = accumulate or q > 0
            if r - q >= 4:
                _tile_lut(flat, t * nb * 16, tab, q, r, nb, uflat, t * 16, dp, y, t * 16, acc, 4)
                q += 4
            elif r - q >= 2:
                _tile_lut(flat, t * nb * 16, tab, q, r, nb, uflat, t * 16, dp, y, t * 16, acc, 2)
                q += 2
            else:
                _tile_lut(flat, t * nb * 16, tab, q, r, nb, uflat, t * 16, dp, y, t * 16, acc, 1)
                q += 1


@njit(**_JIT)
def _blocks_range(sig, ut, tab, y, t0, t1):
    # sig (m, nt, nb, 16) u8, ut (m, r, dp) f32, tab (m·per,) tables -> y[16t0:16t1] = Σ_i block i;
    # blocks outer so that one block's tables stay in L1 across the tiles
    m = sig.shape[0]
    per = tab.shape[0] // m
    for i in range(m):
        _tiles(sig[i], ut[i], tab[i * per:(i + 1) * per], y, t0, t1, i > 0)


@njit(**_JIT)
def _prepare(x, inv_scale, z, vf, tab):
    # z[:n] = x ⊙ inv_scale (the tail stays 0), then every block's tables -> tab (m·per,)
    n = x.shape[0]
    for j in range(n):
        z[j] = x[j] * inv_scale[j]
    m = vf.shape[0]
    per = tab.shape[0] // m
    for i in range(m):
        build_tables(vf[i], z, tab[i * per:(i + 1) * per])


@njit(**_JIT)
def matvec_blocks(x, inv_scale, z, sig, ut, vf, tab, y):
    # x (n,) -> y (dp,) = Σ_i block i · (x ⊙ inv_scale); m blocks: sig (m, nt, nb, 16) u8,
    # ut (m, r, dp), vf (m, 8nb, r) f32; z (8nb,) and tab (m·per,) f32 scratch
    _prepare(x, inv_scale, z, vf, tab)
    _blocks_range(sig, ut, tab, y, 0, sig.shape[1])


@njit(**_JIT_PAR)
def matvec_blocks_par(x, inv_scale, z, sig, ut, vf, tab, y, nthreads):
    # as matvec_blocks, tiles split into nthreads prange blocks: one parallel region per matrix
    # (a region costs ~10 us at 2 threads, so not one per block), tables shared read-only
    _prepare(x, inv_scale, z, vf, tab)
    nt = sig.shape[1]
    step = (nt + nthreads - 1) // nthreads
    for b in prange(nthreads):
        _blocks_range(sig, ut, tab, y, b * step, min(nt, (b + 1) * step))


@njit(**_JIT)
def apply_signs(sig, P, W, r0, accumulate):
    # sig (dp/16, nb, 16) u8 of rows r0.., P (R, n) f32 = |block| tile -> W (R, n) (+)= ±P
    R, n = P.shape
    for i in range(R):
        r = r0 + i
        for j in range(n):
            neg = (np.int32(sig[r >> 4, j >> 3, r & 15]) >> np.int32(j & 7)) & np.int32(1)
            val = P[i, j] * np.float32(1 - 2 * neg)
            if accumulate:
                W[i, j] += val
            else:
                W[i, j] = val


@njit(**_JIT)
def row_block(sig, ut, vf, i, out, accumulate):
    # row i of one block S ⊙ (u vᵀ) -> out (n,) (+)=
    n = out.shape[0]
    r = ut.shape[0]
    for j in range(n):
        acc = np.float32(0.0)
        for q in range(r):
            acc += ut[q, i] * vf[j, q]
        if (sig[i >> 4, j >> 3, i & 15] >> (j & 7)) & 1:
            acc = -acc
        if accumulate:
            out[j] += acc
        else:
            out[j] = acc


def interleave_block(signs: np.ndarray, u: np.ndarray, v: np.ndarray, n: int):
    """Stored views (signs (d, nb) u8, u (d, k), v (n, k) fp16 bits) -> the kernels' layout
    (sig (dp/16, nb, 16) u8, ut (k, dp) f32, vf (8nb, k) f32), see the comment above."""
    d, nb = signs.shape
    k = u.shape[1]
    dp = -(-d // TILE) * TILE
    sig = np.zeros((dp, nb), np.uint8)
    sig[:d] = signs
    sig = np.ascontiguousarray(sig.reshape(dp // TILE, TILE, nb).transpose(0, 2, 1))
    ut = np.zeros((k, dp), np.float32)
    ut[:, :d] = _from_f16(u).T
    vf = np.zeros((8 * nb, k), np.float32)
    vf[:n] = _from_f16(v)
    return sig, ut, vf


def deinterleave_block(sig: np.ndarray, ut: np.ndarray, vf: np.ndarray, d: int, n: int):
    """The inverse of interleave_block: (signs (d, nb) u8, u (d, k), v (n, k) fp16 bits)."""
    nt, nb, _ = sig.shape
    signs = np.ascontiguousarray(sig.transpose(0, 2, 1).reshape(nt * TILE, nb)[:d])
    return signs, _f16(ut[:, :d].T), _f16(vf[:n])


def table_floats(n: int, rank: int) -> int:
    """float32 count of one block's per-token tables: 2·ceil(n/8) chunks x rank x 16 patterns."""
    return 2 * ((n + 7) // 8) * rank * 16


class BitStackLinear:
    """A loaded BitStack weight W (d, n) using its first `blocks` residual blocks."""

    def __init__(self, parts: dict, blocks: int | None = None):
        self.d, self.n, self.k, self.K = _meta(parts)
        self.shape = (self.d, self.n)
        self.inv_scale = np.ascontiguousarray(parts["inv_scale"])
        self._meta_bytes = int(parts["meta"].nbytes + self.inv_scale.nbytes)
        self.block_bytes = block_layout(self.d, self.n, self.k)[2]
        nb = (self.n + 7) // 8
        self.dp = -(-self.d // TILE) * TILE
        # the active blocks in the kernels' layout, stacked: sig (m, dp/16, nb, 16), ut (m, k, dp),
        # vf (m, 8nb, k); one kernel call per matrix covers every block
        self._sig = np.zeros((0, self.dp // TILE, nb, TILE), np.uint8)
        self._ut = np.zeros((0, self.k, self.dp), np.float32)
        self._vf = np.zeros((0, 8 * nb, self.k), np.float32)
        self._z = np.zeros(8 * nb, np.float32)      # x / s, zero tail for the padding columns
        self._per = table_floats(self.n, self.k)    # floats of one block's per-token tables
        self._y = np.empty(self.dp, np.float32)     # padded rows when d is not a multiple of 16
        self._big = self.d * self.n >= PAR_MIN_WEIGHTS
        self.set_blocks(self.K if blocks is None else blocks, parts)

    # -- size ---------------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        """How many blocks are active (the prefix 0..blocks-1)."""
        return self._sig.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the loaded blocks + inv_scale + meta (as stored; the kernels' layout of a
        block takes the same sign bytes plus ~2x its fp16 factors as float32)."""
        return self.blocks * self.block_bytes + self._meta_bytes

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / (self.d * self.n)

    @property
    def _views(self) -> list:
        """The active blocks as stored: [(signs (d, nb) u8, u (d, k), v (n, k) fp16 bits)] (for
        the CUDA upload, which keeps the stored layout)."""
        return [deinterleave_block(*blk, self.d, self.n) for blk in zip(self._sig, self._ut, self._vf)]

    def set_blocks(self, m: int, parts: dict | None = None) -> None:
        """Use the first m blocks. Shrinking drops the suffix (its memory is freed at once);
        growing needs parts["block.i"] for every new i (copied into the kernels' layout, so the
        caller's block arrays can be dropped)."""
        m = int(m)
        if not 0 <= m <= self.K:
            raise UnsupportedModelError(f"bitstack codec: blocks={m} is out of range 0..{self.K}")
        if m <= self.blocks:       # copies, so the dropped suffix's memory is freed now
            self._sig, self._ut, self._vf = (a[:m].copy() for a in (self._sig, self._ut, self._vf))
            return
        new = []
        for i in range(self.blocks, m):
            blob = (parts or {}).get(f"block.{i}")
            if blob is None:
                raise UnsupportedModelError(f"bitstack codec: block.{i} is not available (asked for {m} blocks)")
            new.append(interleave_block(*_block_views(np.ascontiguousarray(blob), self.d, self.n, self.k), self.n))
        self._sig, self._ut, self._vf = (np.concatenate([old] + [blk[j][None] for blk in new])
                                         for j, old in enumerate((self._sig, self._ut, self._vf)))

    # -- compute ------------------------------------------------------------------------------
    def matvec(self, x: np.ndarray, out: np.ndarray) -> None:
        """out (d,) = W (d, n) @ x (n,) over the active blocks (LUT kernel, no dense W)."""
        m = self.blocks
        if not m:
            out[:] = 0.0
            return
        tab = thread_scratch("bitstack.tab", m * self._per)
        y = out if self.dp == self.d else self._y
        threads = get_threads()
        if threads > 1 and self._big:
            matvec_blocks_par(x, self.inv_scale, self._z, self._sig, self._ut, self._vf, tab, y, threads)
        else:
            matvec_blocks(x, self.inv_scale, self._z, self._sig, self._ut, self._vf, tab, y)
        if y is not out:
            out[:] = y[:self.d]

    def matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        """out (T, d) = X (T, n) @ W.T: LUT matvecs for a few tokens, else row tiles of W rebuilt
        by BLAS (|block| = U_tile Vᵀ, then signs) and one BLAS matmul per tile."""
        T = X.shape[0]
        if T < MATMUL_MIN_T or not self.blocks:
            for t in range(T):
                self.matvec(X[t], out[t])
            return
        d, n = self.shape
        Z = X * self.inv_scale
        P = thread_scratch("bitstack.P", (TILE_ROWS, n))
        W = thread_scratch("bitstack.W", (TILE_ROWS, n))
        for r0 in range(0, d, TILE_ROWS):
            r1 = min(d, r0 + TILE_ROWS)
            R = r1 - r0
            for i, (sig, ut, vf) in enumerate(zip(self._sig, self._ut, self._vf)):
                np.matmul(ut[:, r0:r1].T, vf[:n].T, out=P[:R])
                apply_signs(sig, P[:R], W[:R], r0, i > 0)
            np.matmul(Z, W[:R].T, out=out[:, r0:r1])

    def row(self, i: int, out: np.ndarray) -> None:
        """out (n,) = W[i] as float32 (embedding lookup)."""
        if not self.blocks:
            out[:] = 0.0
            return
        for b, (sig, ut, vf) in enumerate(zip(self._sig, self._ut, self._vf)):
            row_block(sig, ut, vf, int(i), out, b > 0)
        out *= self.inv_scale


class BitStackCodec:
    """Residual sign + low-rank blocks; params {"blocks": K (16), "rank": k (16), "overshoot": 1.0,
    "signs": "sign" | "gptq", "joint": J (0)}."""

    name = "bitstack"

    @staticmethod
    def _params(params: dict) -> tuple[int, int, float, str, int]:
        params = params or {}
        K, k = int(params.get("blocks", 16)), int(params.get("rank", 16))
        gain = float(params.get("overshoot", 1.0))
        signs = params.get("signs", "sign")
        joint = int(params.get("joint", 0))
        if (not 1 <= K <= 64 or not 1 <= k <= MAX_RANK or not 0.5 <= gain <= 2.0 or signs not in ("sign", "gptq")
                or not 0 <= joint <= min(K, MAX_JOINT)):
            raise UnsupportedModelError(f"bitstack codec: blocks={K} (1..64), rank={k} (1..{MAX_RANK}), "
                                        f"overshoot={gain} (0.5..2), signs={signs!r} (sign, gptq) and "
                                        f"joint={joint} (0..min(blocks, {MAX_JOINT})) required")
        return K, k, gain, signs, joint

    @staticmethod
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
        K, k, gain, signs, joint = BitStackCodec._params(params)
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
            Uh = inverse_cholesky(Hs[np.ix_(perm, perm)], PERCDAMP)[0].astype(np.float32)

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
            if np.einsum("ij,jk,ik->", Rg, Hs, Rg) < np.einsum("ij,jk,ik->", R, Hs, R):
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

    @staticmethod
    def decode(parts: dict, params: dict | None = None, blocks: int | None = None) -> np.ndarray:
        """Reference NumPy decode of the first `blocks` blocks (default all) to float32 (d, n)."""
        d, n, k, K = _meta(parts)
        m = _available(parts, K, blocks)
        W = np.zeros((d, n), np.float32)
        for i in range(m):
            W += _dense_block(*_block_views(parts[f"block.{i}"], d, n, k), n)
        return W * parts["inv_scale"][None, :]

    @staticmethod
    def load(parts: dict, params: dict | None = None, blocks: int | None = None) -> BitStackLinear:
        """A BitStackLinear over the first `blocks` blocks (default: every block in parts)."""
        if blocks is None:
            d, n, k, K = _meta(parts)
            blocks = 0
            while blocks < K and f"block.{blocks}" in parts:
                blocks += 1
        return BitStackLinear(parts, blocks)

    @staticmethod
    def nbytes(parts: dict) -> int:
        """Bytes of every stored part."""
        return int(sum(p.nbytes for p in parts.values()))


# --- importance and global order (BitStack §3.2) ----------------------------------------------

def block_importance(parts: dict, params: dict | None, hessian: np.ndarray | None,
                     w: np.ndarray | None = None) -> list[float]:
    """scores[i] = output-error reduction of adding block i: err(i) - err(i+1), err(m) =
    tr(E_m H E_mᵀ) = E‖E_m x‖², E_m = W - Ŵ_m (Ŵ_m = the first m blocks).

    This proxy replaces the paper's perplexity measurement per extra block (one forward pass per
    matrix per level is far too slow on a CPU). Without `w` the full K-block reconstruction
    stands in for W; without `hessian`, H = I (Frobenius error)."""
    d, n, k, K = _meta(parts)
    m = _available(parts, K, None)
    inv = parts["inv_scale"].astype(np.float64)
    Bs = [_dense_block(*_block_views(parts[f"block.{i}"], d, n, k), n).astype(np.float64) * inv
          for i in range(m)]
    E = (np.asarray(w, np.float64) if w is not None else sum(Bs, np.zeros((d, n)))).copy()
    H = None if hessian is None else np.asarray(hessian, np.float64)

    def err(E):
        return float(np.sum(E * E)) if H is None else float(np.einsum("ij,ij->", E @ H, E))

    prev, scores = err(E), []
    for B in Bs:
        E -= B
        cur = err(E)
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
