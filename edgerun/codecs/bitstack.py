"""BitStack codec: a weight as a stack of residual blocks (DESIGN §4 "bitstack"; spec
formats/codec-bitstack.md; Wang et al. 2024, "BitStack: Any-Size Compression of Large Language
Models in Variable Memory Environments").

Encode: scale input column j by the calibration activation norm s_j = sqrt(H_jj) (AWQ-style,
as BitStack's `get_act_scale`), then for i = 1..K: S_i = sign(R) (0 -> +1), rank-k SVD of |R|
(sqrt(σ) on both factors), R -= S_i ⊙ (u_i v_iᵀ). Block i = packed sign bits + u_i + v_i (fp16).
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

import threading

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import UnsupportedModelError
from ..kernels import f16_to_f32, get_threads

_JIT = dict(cache=True, nogil=True, fastmath=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True)

LANES = 16                 # the kernel's rank width: one AVX-512 register of float32
PAR_MIN_WEIGHTS = 1 << 19  # matvecs this large split rows over threads (as dense.py measured)
MATMUL_MIN_T = 4           # below this many tokens a matmul is a loop of LUT matvecs
TILE_ROWS = 128            # rows rebuilt per matmul tile (tile stays in L2 for the BLAS call)
POWER_ITERS = 3            # randomized SVD: power iterations ...
OVERSAMPLE = 8             # ... and extra columns (Halko et al. 2011)


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

_I8, _I16, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(64), ir.FloatType()
WIDTHS = (4, 8, 16)        # kernel lane widths: the rank is zero-padded up to the next one


def _width(k: int) -> int:
    return next(L for L in WIDTHS if k <= L)


def _lanes(lanes):
    """The literal lane count of an intrinsic's last argument (None if not a literal 4/8/16)."""
    L = getattr(lanes, "literal_value", None)
    return L if L in WIDTHS else None


def _data(context, builder, ty, val):
    return context.make_array(ty)(context, builder, val).data


def _c64(v):
    return ir.Constant(_I64, v)


def _fast(builder, op, a, b):
    return getattr(builder, op)(a, b, flags=("fast",))


def _load_f16(builder, p, L):
    """IR: L fp16 values at i16* p -> <L x float>."""
    h = builder.load(p, typ=ir.VectorType(_I16, L), align=2)
    return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), L)), ir.VectorType(_F32, L))


def _hsum(builder, v, L):
    """IR: horizontal sum of a <L x float> by halving shuffles."""
    n = L
    while n > 1:
        n //= 2
        a = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n))))
        b = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n, 2 * n))))
        v = _fast(builder, "fadd", a, b)
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


@intrinsic(prefer_literal=True)
def _tables(typingctx, v, z, nchunks, tab, lanes):
    """tab[c, p, :] = Σ_t (bit t of p ? -1 : +1) · v[4c+t, :L] · z[4c+t] for c < nchunks."""
    L = _lanes(lanes)
    if L is None:
        return None
    VF = ir.VectorType(_F32, L)

    def codegen(context, builder, sig, args):
        v_v, z_v, nc_v, tab_v, _ = args
        pv = _data(context, builder, sig.args[0], v_v)
        pz = _data(context, builder, sig.args[1], z_v)
        pt = _data(context, builder, sig.args[3], tab_v)
        undef = ir.Constant(VF, ir.Undefined)
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), L), [0] * L)
        with cgutils.for_range(builder, nc_v) as loop:
            c = loop.index
            a = []
            for t in range(4):
                j = builder.add(builder.mul(c, _c64(4)), _c64(t))
                vj = _load_f16(builder, builder.gep(pv, [builder.mul(j, _c64(L))], source_etype=_I16), L)
                zj = builder.load(builder.gep(pz, [j], source_etype=_F32))
                zs = builder.shuffle_vector(builder.insert_element(undef, zj, ir.Constant(ir.IntType(32), 0)),
                                            undef, zeros)
                a.append(_fast(builder, "fmul", vj, zs))
            two_a = [_fast(builder, "fadd", x, x) for x in a]
            e = [None] * 16
            e[0] = _fast(builder, "fadd", _fast(builder, "fadd", a[0], a[1]), _fast(builder, "fadd", a[2], a[3]))
            for p in range(1, 16):
                t = (p & -p).bit_length() - 1          # lowest set bit: flip column t to negative
                e[p] = _fast(builder, "fsub", e[p & (p - 1)], two_a[t])
            base = builder.mul(c, _c64(16 * L))
            for p in range(16):
                dst = builder.gep(pt, [builder.add(base, _c64(p * L))], source_etype=_F32)
                builder.store(e[p], builder.bitcast(dst, VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(v, z, nchunks, tab, lanes), codegen


@intrinsic(prefer_literal=True)
def _lut_dot(typingctx, signs, soff, tab, nbytes, u, uoff, lanes):
    """float32 u[uoff:uoff+L] · Σ_j (tab[2j, lo(b_j)] + tab[2j+1, hi(b_j)]), b_j = signs[soff+j]."""
    L = _lanes(lanes)
    if L is None:
        return None
    VF = ir.VectorType(_F32, L)

    def codegen(context, builder, sig, args):
        s_v, soff_v, tab_v, nb_v, u_v, uoff_v, _ = args
        ps = builder.gep(_data(context, builder, sig.args[0], s_v), [soff_v], source_etype=_I8)
        pt = _data(context, builder, sig.args[2], tab_v)
        pu = builder.gep(_data(context, builder, sig.args[4], u_v), [uoff_v], source_etype=_I16)
        acc0 = cgutils.alloca_once_value(builder, ir.Constant(VF, [0.0] * L))
        acc1 = cgutils.alloca_once_value(builder, ir.Constant(VF, [0.0] * L))
        with cgutils.for_range(builder, nb_v) as loop:
            j = loop.index
            b = builder.zext(builder.load(builder.gep(ps, [j], source_etype=_I8)), _I64)
            base = builder.mul(j, _c64(32 * L))            # two chunks of 16 entries per byte
            sh = _c64(L.bit_length() - 1)                   # entry p starts at p * L floats
            o0 = builder.add(base, builder.shl(builder.and_(b, _c64(15)), sh))
            o1 = builder.add(builder.add(base, _c64(16 * L)), builder.shl(builder.lshr(b, _c64(4)), sh))
            t0 = builder.load(builder.gep(pt, [o0], source_etype=_F32), typ=VF, align=4)
            t1 = builder.load(builder.gep(pt, [o1], source_etype=_F32), typ=VF, align=4)
            builder.store(_fast(builder, "fadd", builder.load(acc0), t0), acc0)
            builder.store(_fast(builder, "fadd", builder.load(acc1), t1), acc1)
        acc = _fast(builder, "fadd", builder.load(acc0), builder.load(acc1))
        return _hsum(builder, _fast(builder, "fmul", acc, _load_f16(builder, pu, L)), L)

    return types.float32(signs, soff, tab, nbytes, u, uoff, lanes), codegen


@njit(**_JIT)
def build_tables(v, z, tab):
    # v (n, L) f16 bits, z (n,) f32 -> tab (>= 2*ceil(n/8)*16*L,) f32 sign-pattern sums
    n, L = v.shape
    nfull = n // 4
    if L == 16:      # one literal lane count per call site: three specializations, one branch
        _tables(v, z, nfull, tab, 16)
    elif L == 8:
        _tables(v, z, nfull, tab, 8)
    else:
        _tables(v, z, nfull, tab, 4)
    nchunks = 2 * ((n + 7) // 8)
    for c in range(nfull, nchunks):     # partial / empty chunks: columns >= n contribute 0
        for p in range(16):
            for q in range(L):
                acc = np.float32(0.0)
                for t in range(4):
                    j = 4 * c + t
                    if j < n:
                        a = f16_to_f32(v[j, q]) * z[j]
                        acc += -a if (p >> t) & 1 else a
                tab[(c * 16 + p) * L + q] = acc


@njit(**_JIT)
def _lut_rows(signs, u, tab, out, r0, r1, accumulate):
    # signs (d, nb) u8, u (d, L) f16 bits, tab (tables) -> out[r0:r1] (+)= u[r]·(S[r] @ A)
    nb = signs.shape[1]
    L = u.shape[1]
    for r in range(r0, r1):
        if L == 16:
            y = _lut_dot(signs, r * nb, tab, nb, u, r * 16, 16)
        elif L == 8:
            y = _lut_dot(signs, r * nb, tab, nb, u, r * 8, 8)
        else:
            y = _lut_dot(signs, r * nb, tab, nb, u, r * 4, 4)
        if accumulate:
            out[r] += y
        else:
            out[r] = y


@njit(**_JIT)
def matvec_block(signs, u, v, z, tab, out, accumulate):
    # one block: signs (d, nb) u8, u (d, L), v (n, L) f16 bits, L in 4/8/16; z (n,) -> out (d,) (+)=
    build_tables(v, z, tab)
    _lut_rows(signs, u, tab, out, 0, signs.shape[0], accumulate)


@njit(**_JIT_PAR)
def matvec_block_par(signs, u, v, z, tab, out, accumulate, nthreads):
    # as matvec_block, rows split into nthreads prange blocks (the table is shared, read-only)
    build_tables(v, z, tab)
    d = signs.shape[0]
    step = (d + nthreads - 1) // nthreads
    for b in prange(nthreads):
        _lut_rows(signs, u, tab, out, b * step, min(d, (b + 1) * step), accumulate)


@njit(**_JIT)
def apply_signs(signs, P, W, r0, accumulate):
    # signs (d, nb) u8 rows r0.., P (R, n) f32 = |block| tile -> W (R, n) (+)= ±P
    R, n = P.shape
    for i in range(R):
        row = signs[r0 + i]
        for j in range(n):
            neg = (np.int32(row[j >> 3]) >> np.int32(j & 7)) & np.int32(1)
            val = P[i, j] * np.float32(1 - 2 * neg)
            if accumulate:
                W[i, j] += val
            else:
                W[i, j] = val


@njit(**_JIT)
def row_block(signs, u, v, i, out, accumulate):
    # row i of one block S ⊙ (u vᵀ) -> out (n,) (+)=
    n, k = v.shape
    for j in range(n):
        acc = np.float32(0.0)
        for q in range(k):
            acc += f16_to_f32(u[i, q]) * f16_to_f32(v[j, q])
        if (signs[i, j >> 3] >> (j & 7)) & 1:
            acc = -acc
        if accumulate:
            out[j] += acc
        else:
            out[j] = acc


# Scratch shared by every BitStackLinear of a Python thread, grown on demand: the per-token
# tables (one block at a time) and the matmul tiles, so scratch is per process, not per matrix.
_tls = threading.local()


def _scratch(name: str, size: int, align: int = 64) -> np.ndarray:
    buf = getattr(_tls, name, None)
    if buf is None or buf.size < size:
        raw = np.empty(size + align // 4, np.float32)
        off = (-raw.ctypes.data % align) // 4      # 64-byte aligned: one table entry = one line
        buf = raw[off: off + size]
        setattr(_tls, name, buf)
    return buf[:size]


def table_floats(n: int, lanes: int = LANES) -> int:
    """float32 count of one block's per-token table: ceil(n/8) bytes x 2 chunks x 16 x lanes."""
    return 2 * ((n + 7) // 8) * 16 * lanes


class BitStackLinear:
    """A loaded BitStack weight W (d, n) using its first `blocks` residual blocks."""

    def __init__(self, parts: dict, blocks: int | None = None):
        self.d, self.n, self.k, self.K = _meta(parts)
        self.shape = (self.d, self.n)
        self.inv_scale = np.ascontiguousarray(parts["inv_scale"])
        self._meta_bytes = int(parts["meta"].nbytes + self.inv_scale.nbytes)
        self.block_bytes = block_layout(self.d, self.n, self.k)[2]
        self._views: list = []        # per loaded block: (signs, u, v) views, u/v padded to 16 lanes
        self._z = np.empty(self.n, np.float32)
        self._big = self.d * self.n >= PAR_MIN_WEIGHTS
        self.lanes = _width(min(self.k, LANES))
        if self.k > LANES:
            raise UnsupportedModelError(f"bitstack codec: the kernels support rank <= {LANES}, got {self.k}")
        self.set_blocks(self.K if blocks is None else blocks, parts)

    # -- size ---------------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        """How many blocks are active (the prefix 0..blocks-1)."""
        return len(self._views)

    @property
    def nbytes(self) -> int:
        """Bytes of the loaded blocks + inv_scale + meta."""
        return self.blocks * self.block_bytes + self._meta_bytes

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / (self.d * self.n)

    def set_blocks(self, m: int, parts: dict | None = None) -> None:
        """Use the first m blocks. Shrinking drops references to the suffix (its memory is freed
        once the caller drops it too); growing needs parts["block.i"] for every new i."""
        m = int(m)
        if not 0 <= m <= self.K:
            raise UnsupportedModelError(f"bitstack codec: blocks={m} is out of range 0..{self.K}")
        if m <= self.blocks:
            del self._views[m:]
            return
        have = self.blocks
        for i in range(have, m):
            blob = (parts or {}).get(f"block.{i}")
            if blob is None:
                raise UnsupportedModelError(f"bitstack codec: block.{i} is not available (asked for {m} blocks)")
            signs, u, v = _block_views(np.ascontiguousarray(blob), self.d, self.n, self.k)
            if self.k < self.lanes:   # the kernel reads 4/8/16 lanes: zero rank columns (a copy)
                u = np.pad(u, ((0, 0), (0, self.lanes - self.k)))
                v = np.pad(v, ((0, 0), (0, self.lanes - self.k)))
            self._views.append((signs, u, v))

    # -- compute ------------------------------------------------------------------------------
    def matvec(self, x: np.ndarray, out: np.ndarray) -> None:
        """out (d,) = W (d, n) @ x (n,) over the active blocks (LUT kernel, no dense W)."""
        if not self._views:
            out[:] = 0.0
            return
        z = self._z
        np.multiply(x, self.inv_scale, out=z)
        tab = _scratch("tab", table_floats(self.n, self.lanes))
        threads = get_threads()
        par = threads > 1 and self._big
        for i, (signs, u, v) in enumerate(self._views):
            if par:
                matvec_block_par(signs, u, v, z, tab, out, i > 0, threads)
            else:
                matvec_block(signs, u, v, z, tab, out, i > 0)

    def matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        """out (T, d) = X (T, n) @ W.T: LUT matvecs for a few tokens, else row tiles of W rebuilt
        by BLAS (|block| = U_tile Vᵀ, then signs) and one BLAS matmul per tile."""
        T = X.shape[0]
        if T < MATMUL_MIN_T or not self._views:
            for t in range(T):
                self.matvec(X[t], out[t])
            return
        d, n = self.shape
        Z = X * self.inv_scale
        P = _scratch("P", TILE_ROWS * n).reshape(TILE_ROWS, n)
        W = _scratch("W", TILE_ROWS * n).reshape(TILE_ROWS, n)
        vf = [_from_f16(v).T.copy() for _, _, v in self._views]   # (L, n) per block, once per call
        for r0 in range(0, d, TILE_ROWS):
            r1 = min(d, r0 + TILE_ROWS)
            R = r1 - r0
            for i, (signs, u, _) in enumerate(self._views):
                np.matmul(_from_f16(u[r0:r1]), vf[i], out=P[:R])
                apply_signs(signs, P[:R], W[:R], r0, i > 0)
            np.matmul(Z, W[:R].T, out=out[:, r0:r1])

    def row(self, i: int, out: np.ndarray) -> None:
        """out (n,) = W[i] as float32 (embedding lookup)."""
        if not self._views:
            out[:] = 0.0
            return
        for b, (signs, u, v) in enumerate(self._views):
            row_block(signs, u, v, int(i), out, b > 0)
        out *= self.inv_scale


class BitStackCodec:
    """Residual sign + low-rank blocks; params {"blocks": K (16), "rank": k (16)}."""

    name = "bitstack"

    @staticmethod
    def _params(params: dict) -> tuple[int, int]:
        params = params or {}
        K, k = int(params.get("blocks", 16)), int(params.get("rank", 16))
        if not 1 <= K <= 64 or not 1 <= k <= LANES:
            raise UnsupportedModelError(f"bitstack codec: blocks={K} (1..64) and rank={k} (1..{LANES}) required")
        return K, k

    @staticmethod
    def encode(w: np.ndarray, params: dict, hessian: np.ndarray | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """float32 (d, n) -> {"meta", "inv_scale", "block.0" .. "block.K-1"} (formats/codec-bitstack.md).

        `hessian` (n, n) = E[x xᵀ] of the input: s = sqrt(diag H) scales the columns before the
        decomposition (BitStack's activation-aware scaling); None means s = 1."""
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise UnsupportedModelError(f"bitstack codec: weight must be 2-D, got shape {w.shape}")
        K, k = BitStackCodec._params(params)
        d, n = w.shape
        s = activation_scale(hessian, n)
        R = w * s.astype(np.float32)[None, :]
        rng = np.random.default_rng(seed)
        uo, vo, total = block_layout(d, n, k)
        parts = {"meta": np.array([d, n, k, K], np.int32), "inv_scale": (1.0 / s).astype(np.float32)}
        for i in range(K):
            neg = R < 0
            U, V = _rsvd(np.abs(R), k, rng)
            u16, v16 = _f16(U), _f16(V)
            blob = np.zeros(total, np.uint8)
            blob[: d * ((n + 7) // 8)] = np.packbits(neg, axis=1, bitorder="little").ravel()
            blob[uo: uo + 2 * d * k] = u16.view(np.uint8).ravel()
            blob[vo: vo + 2 * n * k] = v16.view(np.uint8).ravel()
            parts[f"block.{i}"] = blob
            # subtract what is *stored* (fp16 factors), so later blocks correct the rounding too
            A = _from_f16(u16) @ _from_f16(v16).T
            R -= np.where(neg, -A, A)
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
    two blocks ahead of another; within a level, matrices go by importance per byte
    (scores[name][i] / sizes[name]) descending, ties by name, so a byte budget cut anywhere in a
    level keeps the most useful blocks of that level."""
    levels = max((len(s) for s in scores.values()), default=0)
    order = []
    for i in range(levels):
        level = [nm for nm in scores if len(scores[nm]) > i]
        level.sort(key=lambda nm: (-scores[nm][i] / max(int(sizes[nm]), 1), nm))
        order.extend((nm, i) for nm in level)
    return order
