"""Cluster codec: k-means palettization (DESIGN §4 "cluster"; spec formats/codec-cluster.md).

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
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import UnsupportedModelError
from ..kernels import f16_to_f32, get_threads
from ..isa import half_to_float, table_lookup
from .llvm_ir import array_data as _data, hsum16 as _hsum, inverse_cholesky as _inverse_cholesky, switch_on_bits

_JIT = dict(cache=True, nogil=True, fastmath=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True)

BLOCK = 32                 # weights per block; a block is 4*bits bytes
PAR_MIN_WEIGHTS = 1 << 19  # matvecs this large use both threads (dense.py measured the same)
TILE_ROWS = 4              # rows decoded to f32 per matmul tile (register block of 4 rows)
MATMUL_MIN_T = 2           # below this many tokens a matmul is a loop of matvecs
LLOYD_ITERS = 40           # stops earlier when the clusters stop moving
SCRATCH = 256 + BLOCK      # per-thread f32 scratch: codebook table, then one decoded block
PERCDAMP = 0.01            # GPTQ dampening of H, relative to mean(diag H)
GPTQ_BLOCK = 128           # columns per GPTQ block (lazy batch updates between blocks)
OUTLIER_PARTS = ("outlier_rowptr", "outlier_col", "outlier_val")   # CSR, present only with outliers


def _planes(bits: int) -> list[int]:
    """Field widths of a block's bit planes, lowest index bits first: 4-bit planes, 2, 1."""
    return [4] * (bits // 4) + [2] * ((bits % 4) // 2) + [1] * (bits % 2)


def default_group_rows(bits: int, n: int) -> int:
    """Smallest power of two g with codebook overhead K·16 / (g·n) ≤ 0.25 bits/weight.

    On SmolLM2 (weights from its Q4_1 GGUF) per-row codebooks were best at 2-3 bits, while at
    4 bits sharing a codebook over 2-8 rows gave equal or lower error than per-row at fewer
    bits (tools/bench_cluster.py). n = 576: 2-3 bits g = 1, 4 bits g = 2, 8 bits g = 32.
    """
    g = 1
    while (1 << bits) * 16 > 0.25 * g * n and g < 1 << 20:
        g *= 2
    return g


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


def pack_indices(idx: np.ndarray, bits: int) -> np.ndarray:
    """Indices (d, n) < 2^bits -> codes (d, nblk·4·bits) uint8 in the block/bit-plane layout."""
    d, n = idx.shape
    nblk = -(-n // BLOCK)
    full = np.zeros((d, nblk * BLOCK), np.uint8)
    full[:, :n] = idx
    blk = full.reshape(d, nblk, BLOCK)
    out, shift = [], 0
    for width in _planes(bits):
        f = (blk >> shift) & ((1 << width) - 1)
        if width == 4:      # byte k: weight k (low nibble), weight k+16 (high)
            out.append(f[..., :16] | (f[..., 16:] << 4))
        elif width == 2:    # byte k: weights k, k+8, k+16, k+24 at bits 0, 2, 4, 6
            out.append(f[..., 0:8] | (f[..., 8:16] << 2) | (f[..., 16:24] << 4) | (f[..., 24:32] << 6))
        else:               # little-endian uint32: bit j = weight j
            out.append(np.packbits(f, axis=-1, bitorder="little"))
        shift += width
    return np.concatenate(out, axis=-1).reshape(d, nblk * 4 * bits)


def unpack_indices(codes: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_indices: codes (d, nblk·4·bits) -> indices (d, n) int64."""
    d = codes.shape[0]
    nblk = codes.shape[1] // (4 * bits)
    blk = codes.reshape(d, nblk, 4 * bits).astype(np.int64)
    idx = np.zeros((d, nblk, BLOCK), np.int64)
    off = shift = 0
    for width in _planes(bits):
        if width == 4:
            p = blk[..., off:off + 16]
            f = np.concatenate([p & 15, p >> 4], axis=-1)
        elif width == 2:
            p = blk[..., off:off + 8]
            f = np.concatenate([(p >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
        else:
            p = blk[..., off:off + 4].astype(np.uint8)
            f = np.unpackbits(p, axis=-1, bitorder="little").astype(np.int64)
        idx |= f << shift
        off += width * 4
        shift += width
    return idx.reshape(d, nblk * BLOCK)[:, :n]


# --- the block kernel (LLVM IR through numba @intrinsic) -------------------------------------

_I32, _F32, _I8 = ir.IntType(32), ir.FloatType(), ir.IntType(8)
_V16I32, _V16F32 = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)


def _splat(v, n=16):
    return ir.Constant(ir.VectorType(v.type, n), [v] * n)


def _block_index_vectors(builder, pblock, bits):
    """IR: the 32 indices of the block at byte pointer `pblock` as two <16 x i32> (lo, hi)."""
    lo = hi = ir.Constant(_V16I32, [0] * 16)
    off = shift = 0
    for width in _planes(bits):
        p = builder.gep(pblock, [ir.Constant(_I32, off)], source_etype=_I8)
        if width == 4:
            v = builder.zext(builder.load(p, typ=ir.VectorType(_I8, 16), align=1), _V16I32)
            flo = builder.and_(v, _splat(ir.Constant(_I32, 15)))
            fhi = builder.lshr(v, _splat(ir.Constant(_I32, 4)))
        elif width == 2:
            v8 = builder.zext(builder.load(p, typ=ir.VectorType(_I8, 8), align=1), ir.VectorType(_I32, 8))
            three = ir.Constant(ir.VectorType(_I32, 8), [3] * 8)
            f = [builder.and_(builder.lshr(v8, ir.Constant(ir.VectorType(_I32, 8), [s] * 8)), three)
                 for s in (0, 2, 4, 6)]
            cat = ir.Constant(ir.VectorType(_I32, 16), list(range(16)))
            flo = builder.shuffle_vector(f[0], f[1], cat)
            fhi = builder.shuffle_vector(f[2], f[3], cat)
        else:
            u = builder.load(p, typ=_I32, align=1)
            uv = builder.shuffle_vector(builder.insert_element(ir.Constant(_V16I32, ir.Undefined), u,
                                                               ir.Constant(_I32, 0)),
                                        ir.Constant(_V16I32, ir.Undefined), ir.Constant(_V16I32, [0] * 16))
            one = _splat(ir.Constant(_I32, 1))
            flo = builder.and_(builder.lshr(uv, ir.Constant(_V16I32, list(range(16)))), one)
            fhi = builder.and_(builder.lshr(uv, ir.Constant(_V16I32, list(range(16, 32)))), one)
        if shift:
            flo = builder.shl(flo, _splat(ir.Constant(_I32, shift)))
            fhi = builder.shl(fhi, _splat(ir.Constant(_I32, shift)))
        lo = builder.or_(lo, flo)
        hi = builder.or_(hi, fhi)
        off += width * 4
        shift += width
    return lo, hi


def _f16_table(builder, pcb, first, count):
    """IR: `count` (≤ 16) f16 codebook entries from pcb[first] widened to <16 x float> (rest 0)."""
    i16 = ir.IntType(16)
    p = builder.gep(pcb, [ir.Constant(_I32, first)], source_etype=i16)
    v = builder.load(p, typ=ir.VectorType(i16, count), align=2)
    if count < 16:   # exact-size load (no read past the codebook), padded with zeros
        v = builder.shuffle_vector(v, ir.Constant(ir.VectorType(i16, count), [0] * count),
                                   ir.Constant(_V16I32, list(range(count)) + [count] * (16 - count)))
    return half_to_float(builder, v)


def _lookup_fn(builder, pcb, ptab, bits):
    """IR: a function idx <16 x i32> -> codebook[idx] <16 x float>.

    K ≤ 32: the codebook row at pcb (f16) is widened into registers once per call and indexed with
    the target's permute (edgerun.isa.table_lookup); K ≥ 64:
    gathers from ptab, the row already widened to a float32 table in L1 by the caller.
    """
    mod = builder.module
    if bits <= 5:   # the 16 or 32 entries sit in one or two registers
        tables = [_f16_table(builder, pcb, 16 * t, min(16, 1 << bits)) for t in range((1 << bits) // 16 or 1)]
        return lambda idx: table_lookup(builder, tables, idx, 1 << bits)
    # 64-256 entries: gather from the L1 table
    vptr = ir.VectorType(ir.PointerType(), 16)
    gather = cgutils.get_or_insert_function(
        mod, ir.FunctionType(_V16F32, [vptr, _I32, ir.VectorType(ir.IntType(1), 16), _V16F32]),
        "llvm.masked.gather.v16f32.v16p0")
    mask = ir.Constant(ir.VectorType(ir.IntType(1), 16), [1] * 16)
    zero = ir.Constant(_V16F32, [0.0] * 16)
    i64, v16i64 = ir.IntType(64), ir.VectorType(ir.IntType(64), 16)
    base = builder.ptrtoint(ptab, i64)
    vbase = builder.shuffle_vector(builder.insert_element(ir.Constant(v16i64, ir.Undefined), base,
                                                          ir.Constant(_I32, 0)),
                                   ir.Constant(v16i64, ir.Undefined), ir.Constant(_V16I32, [0] * 16))

    def look(idx):
        # vector of addresses base + 4*idx (llvmlite's gep cannot take a vector index)
        off = builder.shl(builder.zext(idx, v16i64), _splat(ir.Constant(i64, 2)))
        ptrs = builder.inttoptr(builder.add(vbase, off), vptr)
        return builder.call(gather, [ptrs, ir.Constant(_I32, 4), mask, zero])
    return look


def _block_ptrs(builder, pc, px, b, bits):
    """IR: byte pointer of block b's codes and float pointer of its 32 x values."""
    pcb = builder.gep(pc, [builder.mul(b, ir.Constant(b.type, 4 * bits))], source_etype=_I8)
    return pcb, builder.gep(px, [builder.mul(b, ir.Constant(b.type, BLOCK))], source_etype=_F32)


@intrinsic
def _dot_blocks(typingctx, codes, coff, x, xoff, cb, cboff, tab, nblk, bits):
    """float32 Σ decode(codes[coff:] blocks)·x[xoff:] over `nblk` 32-weight blocks.

    Codebook: f16 cb.flat[cboff:] for bits ≤ 5, float32 tab (widened by the caller) above.
    """
    def codegen(context, builder, sig, args):
        codes_v, coff_v, x_v, xoff_v, cb_v, cboff_v, tab_v, nblk_v, bits_v = args
        pc = builder.gep(_data(context, builder, sig.args[0], codes_v), [coff_v], source_etype=_I8)
        px = builder.gep(_data(context, builder, sig.args[2], x_v), [xoff_v], source_etype=_F32)
        pcb = builder.gep(_data(context, builder, sig.args[4], cb_v), [cboff_v], source_etype=ir.IntType(16))
        ptab = _data(context, builder, sig.args[6], tab_v)
        res = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
        accs = [cgutils.alloca_once(builder, _V16F32) for _ in range(4)]
        fast = ("fast",)

        def block(look, b, a0, a1, bits):
            pcode, xb = _block_ptrs(builder, pc, px, b, bits)
            lo, hi = _block_index_vectors(builder, pcode, bits)
            x0 = builder.load(xb, typ=_V16F32, align=4)
            x1 = builder.load(builder.gep(xb, [ir.Constant(_I32, 16)], source_etype=_F32), typ=_V16F32, align=4)
            builder.store(builder.fadd(builder.load(a0), builder.fmul(look(lo), x0, flags=fast), flags=fast), a0)
            builder.store(builder.fadd(builder.load(a1), builder.fmul(look(hi), x1, flags=fast), flags=fast), a1)

        def emit(bits):
            look = _lookup_fn(builder, pcb, ptab, bits)
            for a in accs:
                builder.store(ir.Constant(_V16F32, [0.0] * 16), a)
            # two blocks per iteration into four accumulators: hides the add latency
            one = ir.Constant(nblk_v.type, 1)
            with cgutils.for_range(builder, builder.ashr(nblk_v, one)) as loop:
                b = builder.shl(loop.index, one)
                block(look, b, accs[0], accs[1], bits)
                block(look, builder.add(b, one), accs[2], accs[3], bits)
            odd = builder.icmp_signed("!=", builder.and_(nblk_v, one), ir.Constant(nblk_v.type, 0))
            with builder.if_then(odd):
                block(look, builder.sub(nblk_v, one), accs[0], accs[1], bits)
            s01 = builder.fadd(builder.load(accs[0]), builder.load(accs[1]), flags=fast)
            s23 = builder.fadd(builder.load(accs[2]), builder.load(accs[3]), flags=fast)
            builder.store(_hsum(builder, builder.fadd(s01, s23, flags=fast)), res)

        switch_on_bits(builder, bits_v, range(2, 9), emit)
        return builder.load(res)

    sig = types.float32(codes, coff, x, xoff, cb, cboff, tab, nblk, bits)
    return sig, codegen


@intrinsic
def _decode_blocks(typingctx, codes, coff, cb, cboff, tab, nblk, bits, out, ooff):
    """out[ooff : ooff + 32·nblk] = decode(codes[coff:] blocks) as float32 (codebook as above)."""
    def codegen(context, builder, sig, args):
        codes_v, coff_v, cb_v, cboff_v, tab_v, nblk_v, bits_v, out_v, ooff_v = args
        pc = builder.gep(_data(context, builder, sig.args[0], codes_v), [coff_v], source_etype=_I8)
        pcb = builder.gep(_data(context, builder, sig.args[2], cb_v), [cboff_v], source_etype=ir.IntType(16))
        ptab = _data(context, builder, sig.args[4], tab_v)
        po = builder.gep(_data(context, builder, sig.args[7], out_v), [ooff_v], source_etype=_F32)

        def emit(bits):
            look = _lookup_fn(builder, pcb, ptab, bits)
            with cgutils.for_range(builder, nblk_v) as loop:
                pcode, ob = _block_ptrs(builder, pc, po, loop.index, bits)
                lo, hi = _block_index_vectors(builder, pcode, bits)
                ob1 = builder.gep(ob, [ir.Constant(_I32, 16)], source_etype=_F32)
                builder.store(look(lo), builder.bitcast(ob, _V16F32.as_pointer()), align=4)
                builder.store(look(hi), builder.bitcast(ob1, _V16F32.as_pointer()), align=4)

        switch_on_bits(builder, bits_v, range(2, 9), emit)
        return context.get_dummy_value()

    sig = types.none(codes, coff, cb, cboff, tab, nblk, bits, out, ooff)
    return sig, codegen


# --- kernels -----------------------------------------------------------------------------

@njit(inline="always", **_JIT)
def _load_table(cb, g, bits, tab):
    # cb (G, K) f16 bits -> tab[:K] f32, only for the gather path (bits ≥ 6; lower bits read cb)
    if bits >= 6:
        for k in range(cb.shape[1]):
            tab[k] = f16_to_f32(cb[g, k])


@njit(inline="always", **_JIT)
def _sparse_dot(rp, oc, ov, i, x):
    # row i of the CSR outliers (rp int32, oc u16 column, ov f16 bits) · x (n,) -> f32
    acc = np.float32(0.0)
    for p in range(rp[i], rp[i + 1]):
        acc += f16_to_f32(ov[p]) * x[oc[p]]
    return acc


@njit(inline="always", **_JIT)
def _sparse_add(rp, oc, ov, i, out):
    # out (n,) += row i of the CSR outliers
    for p in range(rp[i], rp[i + 1]):
        out[oc[p]] += f16_to_f32(ov[p])


@njit(**_JIT)
def _mv_rows(codes, cb, meta, rp, oc, ov, x, out, r0, r1, scr):
    # codes (d, nblk*4*bits) u8, cb (G, K) f16 bits, CSR outliers @ x (n,) -> out[r0:r1]; scr (SCRATCH,) f32
    n, bits, group_rows = meta[1], meta[2], meta[3]
    K = cb.shape[1]
    nfull = n // 32
    tail = n - nfull * 32
    rowbytes = codes.shape[1]
    tb = 256                      # scr[256:288] holds a decoded tail block
    cur = -1
    for i in range(r0, r1):
        g = i // group_rows
        if g != cur:
            _load_table(cb, g, bits, scr)
            cur = g
        acc = _dot_blocks(codes, i * rowbytes, x, 0, cb, g * K, scr, nfull, bits)
        if tail:
            _decode_blocks(codes, i * rowbytes + nfull * 4 * bits, cb, g * K, scr, 1, bits, scr, tb)
            for j in range(tail):
                acc += scr[tb + j] * x[nfull * 32 + j]
        out[i] = acc + _sparse_dot(rp, oc, ov, i, x)


@njit(**_JIT)
def matvec_cluster(codes, cb, meta, rp, oc, ov, x, out, scr):
    # codes, cb, outlier CSR rp/oc/ov: parts; x (n,) -> out (d,); scr (1, SCRATCH) f32
    _mv_rows(codes, cb, meta, rp, oc, ov, x, out, 0, meta[0], scr[0])


@njit(**_JIT_PAR)
def matvec_cluster_par(codes, cb, meta, rp, oc, ov, x, out, scr):
    # codes, cb, rp/oc/ov: parts; x (n,) -> out (d,); prange over scr.shape[0] row blocks
    d = meta[0]
    nb = scr.shape[0]
    step = (d + nb - 1) // nb
    for b in prange(nb):
        _mv_rows(codes, cb, meta, rp, oc, ov, x, out, b * step, min(d, (b + 1) * step), scr[b])


@njit(**_JIT)
def _decode_row(codes, cb, meta, rp, oc, ov, i, out, scr):
    # row i of the parts -> out[:nblk*32] f32 (padding decoded too); scr (SCRATCH,) f32
    g = i // meta[3]
    _load_table(cb, g, meta[2], scr)
    nblk = codes.shape[1] // (4 * meta[2])
    _decode_blocks(codes, i * codes.shape[1], cb, g * cb.shape[1], scr, nblk, meta[2], out, 0)
    _sparse_add(rp, oc, ov, i, out)


@njit(**_JIT)
def row_cluster(codes, cb, meta, rp, oc, ov, i, out, scr):
    # parts, row i -> out (n,) f32; scr (SCRATCH,) f32
    n, bits = meta[1], meta[2]
    nfull = n // 32
    g = i // meta[3]
    cboff = g * cb.shape[1]
    _load_table(cb, g, bits, scr)
    _decode_blocks(codes, i * codes.shape[1], cb, cboff, scr, nfull, bits, out, 0)
    if n > nfull * 32:
        _decode_blocks(codes, i * codes.shape[1] + nfull * 4 * bits, cb, cboff, scr, 1, bits, scr, 256)
        for j in range(n - nfull * 32):
            out[nfull * 32 + j] = scr[256 + j]
    _sparse_add(rp, oc, ov, i, out)


@njit(**_JIT)
def _mm_rows(codes, cb, meta, rp, oc, ov, X, out, r0, r1, tile, scr):
    # X (T, n) @ W[r0:r1].T -> out[:, r0:r1]; tile (TILE_ROWS, nblk*32) f32 scratch
    T = X.shape[0]
    n = meta[1]
    for i0 in range(r0, r1, 4):
        nr = min(4, r1 - i0)
        for r in range(4):
            if r < nr:
                _decode_row(codes, cb, meta, rp, oc, ov, i0 + r, tile[r], scr)
            else:
                tile[r, :] = 0.0
        w0, w1, w2, w3 = tile[0], tile[1], tile[2], tile[3]
        for t in range(T):
            # 4 rows per pass: each X element loaded once feeds 4 multiply-adds
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for j in range(n):
                xv = X[t, j]
                a0 += w0[j] * xv
                a1 += w1[j] * xv
                a2 += w2[j] * xv
                a3 += w3[j] * xv
            out[t, i0] = a0
            if nr > 1:
                out[t, i0 + 1] = a1
            if nr > 2:
                out[t, i0 + 2] = a2
            if nr > 3:
                out[t, i0 + 3] = a3


@njit(**_JIT)
def matmul_cluster(codes, cb, meta, rp, oc, ov, X, out, tiles, scr):
    # X (T, n) @ W.T -> out (T, d); tiles (1, 4, nblk*32), scr (1, SCRATCH) f32
    _mm_rows(codes, cb, meta, rp, oc, ov, X, out, 0, meta[0], tiles[0], scr[0])


@njit(**_JIT_PAR)
def matmul_cluster_par(codes, cb, meta, rp, oc, ov, X, out, tiles, scr):
    # X (T, n) @ W.T -> out (T, d); prange over tiles.shape[0] row blocks (multiples of 4 rows)
    d = meta[0]
    nb = tiles.shape[0]
    step = ((d + nb - 1) // nb + 3) // 4 * 4
    for b in prange(nb):
        _mm_rows(codes, cb, meta, rp, oc, ov, X, out, min(d, b * step), min(d, (b + 1) * step), tiles[b], scr[b])


# --- codec -------------------------------------------------------------------------------

def _check_meta(parts: dict) -> tuple[int, int, int, int]:
    try:
        d, n, bits, g = (int(v) for v in parts["meta"])
        codes, cb = parts["codes"], parts["codebook"]
    except (KeyError, ValueError, TypeError):
        raise UnsupportedModelError("cluster codec: parts must hold meta [d, n, bits, group_rows], "
                                    "codes and codebook") from None
    nblk = -(-n // BLOCK)
    G = -(-d // g) if g > 0 else -1
    if (not 2 <= bits <= 8 or codes.dtype != np.uint8 or codes.shape != (d, nblk * 4 * bits)
            or cb.dtype != np.uint16 or cb.shape != (G, 1 << bits)):
        raise UnsupportedModelError(
            f"cluster codec: inconsistent parts (meta {d}x{n} bits={bits} group_rows={g}, "
            f"codes {codes.dtype} {codes.shape}, codebook {cb.dtype} {cb.shape})")
    sparse = [k for k in OUTLIER_PARTS if k in parts]
    if sparse:
        try:
            rp, oc, ov = (parts[k] for k in OUTLIER_PARTS)
        except KeyError:
            raise UnsupportedModelError(f"cluster codec: outlier parts {sparse} without all of {OUTLIER_PARTS}") from None
        nnz = int(rp[-1]) if rp.shape == (d + 1,) else -1
        if (rp.dtype != np.int32 or oc.dtype != np.uint16 or ov.dtype != np.uint16 or nnz < 0
                or rp[0] != 0 or np.any(np.diff(rp) < 0) or oc.shape != (nnz,) or ov.shape != (nnz,)
                or (nnz and int(oc.max()) >= n)):
            raise UnsupportedModelError(f"cluster codec: inconsistent outlier parts for a {d}x{n} weight")
    return d, n, bits, g


def _outliers(parts: dict, d: int):
    """(rowptr, col, val) of the sparse outliers; empty (all-zero row pointers) when absent."""
    if OUTLIER_PARTS[0] in parts:
        return tuple(np.ascontiguousarray(parts[k]) for k in OUTLIER_PARTS)
    return np.zeros(d + 1, np.int32), np.zeros(0, np.uint16), np.zeros(0, np.uint16)


class ClusterLinear:
    """A loaded cluster weight W (d, n): matvec / matmul / row on the stored parts (zero-copy)."""

    def __init__(self, parts: dict):
        d, n, bits, g = _check_meta(parts)
        self.codes = np.ascontiguousarray(parts["codes"])
        self.codebook = np.ascontiguousarray(parts["codebook"])
        self.meta = np.ascontiguousarray(parts["meta"], dtype=np.int64)
        self.rp, self.oc, self.ov = _outliers(parts, d)
        self.shape = (d, n)
        self.bits = bits
        self.group_rows = g
        self.nbytes = ClusterCodec.nbytes(parts)
        self.bits_per_weight = self.nbytes * 8 / (d * n)
        self._big = d * n >= PAR_MIN_WEIGHTS
        self._ncols = self.codes.shape[1] // (4 * bits) * BLOCK
        self._scr = np.zeros((1, SCRATCH), np.float32)
        self._tiles = None

    def _scratch(self, threads: int) -> np.ndarray:
        # per-thread scratch, grown once (a few KiB), never per call
        if self._scr.shape[0] < threads:
            self._scr = np.zeros((threads, SCRATCH), np.float32)
        return self._scr[:threads]

    def matvec(self, x: np.ndarray, out: np.ndarray) -> None:
        """out (d,) = W (d, n) @ x (n,)."""
        threads = get_threads()
        if threads > 1 and self._big:
            matvec_cluster_par(self.codes, self.codebook, self.meta, self.rp, self.oc, self.ov, x, out,
                               self._scratch(threads))
        else:
            matvec_cluster(self.codes, self.codebook, self.meta, self.rp, self.oc, self.ov, x, out, self._scr)

    def matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        """out (T, d) = X (T, n) @ W.T: rows decoded 4 at a time into L1, register-blocked dots."""
        T = X.shape[0]
        if T < MATMUL_MIN_T:
            for t in range(T):
                self.matvec(X[t], out[t])
            return
        threads = get_threads()
        nb = threads if threads > 1 and self.shape[0] * T * self.shape[1] >= PAR_MIN_WEIGHTS else 1
        if self._tiles is None or self._tiles.shape[0] < nb:
            self._tiles = np.zeros((nb, TILE_ROWS, self._ncols), np.float32)
        if nb > 1:
            matmul_cluster_par(self.codes, self.codebook, self.meta, self.rp, self.oc, self.ov, X, out,
                               self._tiles[:nb], self._scratch(nb))
        else:
            matmul_cluster(self.codes, self.codebook, self.meta, self.rp, self.oc, self.ov, X, out,
                           self._tiles, self._scr)

    def row(self, i: int, out: np.ndarray) -> None:
        """out (n,) = W[i] as float32 (embedding lookup)."""
        row_cluster(self.codes, self.codebook, self.meta, self.rp, self.oc, self.ov, int(i), out, self._scr[0])


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
    _kmeans_all(w, colw, skip, g, K, LLOYD_ITERS, cents)
    return np.sort(cents.astype(np.float16), axis=1)      # stored values; rounding keeps order


def _gptq_round(w, hessian, cb, g, skip, percdamp):
    """GPTQ rounding to fixed codebooks (GPTQ, Frantar et al. 2022; GPTVQ, van Baalen et al. 2024):
    columns in act order (decreasing H_jj), each weight to its *nearest* codebook entry, the
    error fed to the later columns through U, the upper Cholesky factor of (H + damp·I)⁻¹, so
    Σ_i (w_i−ŵ_i) H (w_i−ŵ_i)ᵀ is minimized greedily. Skipped weights (outliers) are kept exact.
    -> idx (d, n) uint8 and the weights as updated when their column was rounded (d, n)."""
    d, n = w.shape
    perm = np.argsort(-np.diagonal(hessian), kind="stable")
    U, _ = _inverse_cholesky(np.asarray(hessian, np.float64)[np.ix_(perm, perm)], percdamp)
    U = U.astype(np.float32)
    Wp = np.ascontiguousarray(w[:, perm], dtype=np.float32)
    skipp = np.ascontiguousarray(skip[:, perm]) if skip.shape[0] else skip
    idx = np.empty((d, n), np.uint8)
    for b0 in range(0, n, GPTQ_BLOCK):
        b1 = min(n, b0 + GPTQ_BLOCK)
        E = np.empty((d, b1 - b0), np.float32)
        _gptq_block(Wp, U, cb, g, skipp, b0, b1, idx, E)
        if b1 < n:       # lazy batch update of the columns after the block (one matmul)
            Wp[:, b1:] -= E @ U[b0:b1, b1:]
    inv = np.argsort(perm)
    return np.ascontiguousarray(idx[:, inv]), Wp[:, inv]


def _pick_outliers(w, colw, frac) -> np.ndarray:
    """skip (d, n) uint8: the `frac` of weights with the largest h_j (w_ij − mean_i)², i.e. the
    sensitive tails that would stretch a codebook (SqueezeLLM's dense-and-sparse split, with its
    magnitude criterion weighted by the column sensitivity h_j = H_jj)."""
    d, n = w.shape
    k = int(round(frac * d * n))
    skip = np.zeros((d, n), np.uint8)
    if k > 0:
        score = colw[None, :].astype(np.float32) * (w - w.mean(1, keepdims=True)) ** 2
        skip.reshape(-1)[np.argpartition(score.reshape(-1), -k)[-k:]] = 1
    return skip


class ClusterCodec:
    """k-means palettized weights; params {"bits": 2..8, "group_rows": g, "outliers": fraction,
    "gptq": True, "percdamp": 0.01}."""

    name = "cluster"

    @staticmethod
    def _params(params: dict, n: int) -> tuple[int, int, float]:
        params = params or {}
        bits = int(params.get("bits", 4))
        if not 2 <= bits <= 8:
            raise UnsupportedModelError(f"cluster codec: bits={bits} is not supported (use 2..8)")
        g = int(params.get("group_rows") or default_group_rows(bits, n))
        if g < 1:
            raise UnsupportedModelError(f"cluster codec: group_rows={g} must be >= 1")
        frac = float(params.get("outliers", 0) or 0)
        if not 0 <= frac <= 0.1:
            raise UnsupportedModelError(f"cluster codec: outliers={frac} must be a fraction in [0, 0.1]")
        if frac and n > 65536:
            raise UnsupportedModelError(f"cluster codec: outliers need n <= 65536 (16-bit columns), got {n}")
        return bits, g, frac

    @staticmethod
    def encode(w: np.ndarray, params: dict, hessian: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """float32 (d, n) -> {"codes", "codebook", "meta"} + outlier parts (formats/codec-cluster.md).

        `hessian` (n, n) = E[x xᵀ]: its diagonal weights each column in the k-means, and the
        whole of it drives the GPTQ rounding to the codebook (params "gptq", default on).
        Without it, every weight goes to its nearest codebook entry.
        """
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise UnsupportedModelError(f"cluster codec: weight must be 2-D, got shape {w.shape}")
        d, n = w.shape
        params = params or {}
        bits, g, frac = ClusterCodec._params(params, n)
        g = min(g, d)
        K = 1 << bits
        colw = _colweights(hessian, n)
        skip = _pick_outliers(w, colw, frac) if frac else np.zeros((0, 0), np.uint8)
        cb16 = _kmeans(w, colw, skip, g, K)               # codebooks fit without the outliers
        cb32 = cb16.astype(np.float32)
        if hessian is not None and params.get("gptq", True):
            idx, wq = _gptq_round(w, hessian, cb32, g, skip, float(params.get("percdamp", PERCDAMP)))
        else:
            idx, wq = np.empty((d, n), np.uint8), w
            _assign_all(w, cb32, g, idx)                   # nearest *stored* centroid
        parts = {"codes": pack_indices(idx, bits), "codebook": cb16.view(np.uint16),
                 "meta": np.array([d, n, bits, g], np.int32)}
        if frac:
            rows, cols = np.nonzero(skip)                  # row-major: CSR order
            dense = cb32[rows // g, idx[rows, cols]]
            # the sparse value is the f16 residual over the dense code, so dense + sparse ≈ w
            parts["outlier_rowptr"] = np.concatenate([[0], np.cumsum(skip.sum(1, dtype=np.int64))]).astype(np.int32)
            parts["outlier_col"] = cols.astype(np.uint16)
            parts["outlier_val"] = (wq[rows, cols] - dense).astype(np.float16).view(np.uint16)
        return parts

    @staticmethod
    def decode(parts: dict, params: dict | None = None) -> np.ndarray:
        """Reference NumPy decode to float32 (tests only)."""
        d, n, bits, g = _check_meta(parts)
        idx = unpack_indices(parts["codes"], bits, n)
        cb = parts["codebook"].view(np.float16).astype(np.float32)
        W = np.take_along_axis(np.repeat(cb, g, axis=0)[:d], idx, axis=1)
        rp, oc, ov = _outliers(parts, d)
        rows = np.repeat(np.arange(d), np.diff(rp))
        W[rows, oc.astype(np.int64)] += ov.view(np.float16).astype(np.float32)
        return W

    @staticmethod
    def load(parts: dict, params: dict | None = None) -> ClusterLinear:
        """A ClusterLinear over the parts (zero-copy for C-contiguous arrays)."""
        return ClusterLinear(parts)

    @staticmethod
    def nbytes(parts: dict) -> int:
        """Bytes of every stored part (codes, codebooks, meta): the honest size."""
        return int(sum(p.nbytes for p in parts.values()))
