"""BitStack codec, the kernels (formats/codec-bitstack.md).

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

from ...errors import UnsupportedModelError
from ...isa import table_lookup
from ...memory import thread_scratch
from ..base import Linear
from .format import _block_views, _f16, _from_f16, _meta, block_layout

_JIT = dict(cache=True, nogil=True, fastmath=True, no_cfunc_wrapper=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True, no_cfunc_wrapper=True)

PAR_MIN_WEIGHTS = 1 << 19  # matvecs this large split rows over threads (as dense.py measured)
MATMUL_MIN_T = 4           # below this many tokens a matmul is a loop of LUT matvecs
TILE_ROWS = 128            # rows rebuilt per matmul tile (tile stays in L2 for the BLAS call)


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


class BitStackLinear(Linear):
    """A loaded BitStack weight W (d, n) using its first `blocks` residual blocks."""

    codec = "bitstack"
    matmul_min_t = MATMUL_MIN_T

    def __init__(self, parts: dict, blocks: int | None = None):
        self.d, self.n, self.k, self.K = _meta(parts)
        super().__init__((self.d, self.n), 0, PAR_MIN_WEIGHTS)    # nbytes follows the prefix
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
    def _matvec(self, x: np.ndarray, out: np.ndarray, threads: int) -> None:
        # out (d,) = W (d, n) @ x (n,) over the active blocks (LUT kernel, no dense W)
        m = self.blocks
        if not m:
            out[:] = 0.0
            return
        tab = thread_scratch("bitstack.tab", m * self._per)
        y = out if self.dp == self.d else self._y
        if threads > 1:
            matvec_blocks_par(x, self.inv_scale, self._z, self._sig, self._ut, self._vf, tab, y, threads)
        else:
            matvec_blocks(x, self.inv_scale, self._z, self._sig, self._ut, self._vf, tab, y)
        if y is not out:
            out[:] = y[:self.d]

    def _matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        # out (T, d) = X (T, n) @ W.T: row tiles of W rebuilt by BLAS (|block| = U_tile Vᵀ, then
        # signs) and one BLAS matmul per tile (LUT matvecs below matmul_min_t tokens)
        if not self.blocks:
            out[:] = 0.0
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


def load_linear(parts: dict, params: dict | None = None, blocks: int | None = None) -> BitStackLinear:
    """A BitStackLinear over the first `blocks` blocks (default: every block in parts)."""
    if blocks is None:
        d, n, k, K = _meta(parts)
        blocks = 0
        while blocks < K and f"block.{blocks}" in parts:
            blocks += 1
    return BitStackLinear(parts, blocks)
