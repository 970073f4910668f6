"""Cluster codec, the kernels: LLVM IR block decode through numba @intrinsic, the Numba drivers
and `ClusterLinear` (formats/codec-cluster.md).

Storage is by 32-weight blocks of 4·bits bytes, split into bit planes (4-, 2- and 1-bit fields)
so the kernel widens a whole block into two 16-lane index vectors with shifts and masks. The
matvec of codebooks up to K = 32 entries runs on bytes (formats/codec-cluster.md § Matvec): the
block's indices look up an unsigned 7-bit copy of the codebook with a byte shuffle (vpshufb,
NEON tbl), whose 32 products with the int8 activations are summed in integers (vpmaddubsw takes
the unsigned entries as they are, then vpmaddwd by the block's integer activation scale),
summed in integers over 16 blocks before one float add; the codebook's offset multiplies Σx
once per row. Measured on Zen 3 (AVX2) this replaced 4 vpermps + 2 blends per 16 weights of the
float lookup, then the unsigned entries saved the vpabsb + vpsignb a signed int8 codebook needs
(3-bit matvec −15 %) and the integer scales a convert and a float multiply-add per block
(−7 to −15 %). The matmul (prompt) is the same arithmetic per token with each block unpacked and
looked up once for 8 tokens (Qwen2.5-1.5B, T = 64, one thread: 37-43 → 88-104 GFLOP/s against
the f32 tiles it replaced); on AVX-512 for 16 tokens, dotted in pairs in 512-bit registers. The
float lookup (matmul tiles for K ≥ 64, embedding rows) is one AVX-512 permute for K ≤ 16
(`vpermps`, DESIGN §6), a two-table
permute for K = 32 (`vpermi2ps`) and a gather from an L1 float32 table for K ≥ 64
(edgerun/isa.py picks the variant the target CPU has).
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...isa import (_concat, _lanes, byte_dot, byte_dot_halves, byte_table_lookup, half_to_float, table_lookup,
                    target)
from ...kernels import f16_to_f32
from ...memory import thread_scratch
from ..base import Linear, outlier_rowptr, outlier_rows, stack_outliers
from ..llvm_ir import array_data as _data, arithmetic_fence, hsum16 as _hsum, switch_on_bits
from .format import (BLOCK, CHUNK_BLOCKS, INT8_MAX_BITS, SCALE_MAX, _check_meta, _outliers, _planes, codes_of,
                     meta_array, unsigned_codebook)

_JIT = dict(cache=True, nogil=True, fastmath=True, no_cfunc_wrapper=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True, no_cfunc_wrapper=True)

PAR_MIN_WEIGHTS = 1 << 18  # matvecs this large use both threads (int8 matvec, Zen 3: 576x576 29 -> 20 µs)
TILE_ROWS = 4              # rows decoded to f32 per matmul tile (register block of 4 rows)
MATMUL_MIN_T = 2           # below this many tokens a matmul is a loop of matvecs
# tokens per unpacked block in the int8 matmul: AVX-512 dots them in pairs (isa.byte_dot_halves)
# with 8 zmm accumulators; elsewhere one at a time, 8 ymm (AVX2 has 16 registers). Measured on
# Zen 5, one 1.5B layer's matmuls at T = 64, 1 thread: 256-bit, 8 tokens 37.2 ms; pairs, 8 tokens
# 30.0; pairs, 16 tokens 28.3 ms. The AVX2 target: pairs (two 256-bit dots) 42.8 ms against 37.9.
MM_TOKENS = 16 if target().isa == "avx512" else 8
MM_ROWS = 2 if target().isa == "avx512" else 1   # rows per x load in the int8 matmul (2: 16 more zmm accumulators)
MM_X_BYTES = 1 << 18       # int8 activations of the tokens the int8 matmul runs over each row (in L2)
SCRATCH = 256 + BLOCK      # per-thread f32 scratch: codebook table, then one decoded block


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
            at = [8 * (j % 4) + j // 4 for j in range(BLOCK)]      # weight j: byte j % 4, bit j // 4
            flo = builder.and_(builder.lshr(uv, ir.Constant(_V16I32, at[:16])), one)
            fhi = builder.and_(builder.lshr(uv, ir.Constant(_V16I32, at[16:])), one)
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


def _block_index_bytes(builder, pblocks, bits):
    """IR: the blocks at byte pointers `pblocks` (one, or two side by side: <64 x i8> for AVX-512)
    as <32·len(pblocks) x i8> lanes in column order: (idx, top) with idx the index bits of its 4-
    and 2-bit planes and, for odd bits, `top` holding the 1-bit plane (the index's top bit) in
    each lane's sign bit (else None)."""
    n = len(pblocks)
    vb, i8 = ir.VectorType(_I8, 32 * n), _I8
    c = lambda ty, v: ir.Constant(ty, [v] * ty.count)       # noqa: E731
    i64 = ir.IntType(64)

    def spread(parts, copies):
        # IR: each of `parts` (one element type, scalars or equal vectors) repeated `copies` times, in order
        if isinstance(parts[0].type, ir.VectorType):
            k = parts[0].type.count
            v = parts[0] if n == 1 else _concat(builder, *parts)
            order = [p * k + e for p in range(n) for _ in range(copies // k) for e in range(k)]
        else:
            v = ir.Constant(ir.VectorType(parts[0].type, n), ir.Undefined)
            for p, part in enumerate(parts):
                v = builder.insert_element(v, part, ir.Constant(_I32, p))
            order = [p for p in range(n) for _ in range(copies)]
        mask = ir.Constant(ir.VectorType(_I32, len(order)), order)
        return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), mask)

    idx, top = c(vb, 0), None
    off = shift = 0
    for width in _planes(bits):
        ps = [builder.gep(pb, [ir.Constant(_I32, off)], source_etype=i8) for pb in pblocks]
        if width == 4:          # byte k = f[k] | f[k + 16] << 4
            # the 16 bytes in both halves, the upper half shifted right by 4 as 64-bit lanes
            # (vbroadcasti128 + vpsrlvq), then & 15: lane k = f[k], lane 16 + k = f[16 + k]
            v2i64 = ir.VectorType(i64, 2)
            v4 = spread([builder.load(builder.bitcast(p, v2i64.as_pointer()), typ=v2i64, align=1) for p in ps], 4)
            f = builder.and_(builder.bitcast(builder.lshr(v4, ir.Constant(v4.type, [0, 0, 4, 4] * n)), vb), c(vb, 15))
        elif width == 2:        # byte k = f[k] | f[k + 8] << 2 | f[k + 16] << 4 | f[k + 24] << 6
            # the 8 bytes in each quarter of the vector, quarter q shifted right by 2q as a 64-bit
            # lane (vpbroadcastq + vpsrlvq: one uop on Haswell, where vpsrlvd takes three; a
            # byte's 2 low bits never cross into the next byte since 2q + 1 ≤ 7), then & 3:
            # lane 8q + k = f[8q + k]
            v4 = spread([builder.load(builder.bitcast(p, i64.as_pointer()), typ=i64, align=1) for p in ps], 4)
            sh = builder.lshr(v4, ir.Constant(v4.type, [0, 2, 4, 6] * n))
            f = builder.and_(builder.bitcast(sh, vb), c(vb, 3))
        else:                   # byte k = f[k] | f[k + 4] << 1 | ... | f[k + 28] << 7
            # the 4 bytes in each 32-bit lane d shifted left by 7 - d (vpbroadcastd + vpsllvd):
            # lane 4d + k's bit 7 = byte k's bit d = f[4d + k]; no mask, the lookup reads bit 7
            u8 = spread([builder.load(p, typ=_I32, align=1) for p in ps], 8)
            top = builder.bitcast(builder.shl(u8, ir.Constant(u8.type, [7 - d for d in range(8)] * n)), vb)
            break           # the 1-bit plane is always last
        idx = builder.or_(idx, builder.shl(f, c(vb, shift)) if shift else f)
        off += width * 4
        shift += width
    return idx, top


def _dot_i8_ir(builder, pcs, pxs, pexs, pcbs, nblk, bits, xstride=BLOCK, exstride=1, wide=False):
    """IR: for each row r and token k, float32 Σ_b ex_k[b] · Σ_j cb8_r[q_j]·x8_k[b][j] over `nblk`
    32-weight blocks of row r's codes at byte pointer pcs[r], token k's 32 int8 x of block b at
    pxs[k] + b·xstride and its int16 block scale at pexs[k] + b·exstride (elements), row r's
    unsigned codebook entries at pcbs[r] (K ≤ 32), in the order [r][k]: exact in 32-bit integers
    within each chunk of CHUNK_BLOCKS blocks, one float add per chunk. A block is unpacked and
    looked up once for all the tokens, and each x load serves every row; each token's sums run in
    the same order as with one token alone, so the matmul equals the matvec to the bit. `wide`
    (AVX-512): 512-bit dots (isa.byte_dot_halves) of token pairs when there are several tokens
    (tokens 2m and 2m + 1 side by side: x at pxs[2m] + 32, scale at pexs[2m] + 1), else of the
    loop's two blocks a trip (the same integer sums). Several rows need token pairs."""
    i16 = ir.IntType(16)
    fast = ("fast",)
    token_pairs, block_pairs = wide and len(pxs) > 1, wide and len(pxs) == 1
    assert not token_pairs or len(pxs) % 2 == 0, "token pairs need an even number of tokens"
    assert len(pcs) == 1 or token_pairs, "several rows need token pairs"
    per = 2 if token_pairs else 1           # tokens per accumulator
    v8f, v8i = ir.VectorType(_F32, 8), ir.VectorType(_I32, 8)
    vf, vi = ir.VectorType(_F32, 8 * per), ir.VectorType(_I32, 16 if wide else 8)
    firsts = list(zip(pxs[::per], pexs[::per]))
    facc = [[cgutils.alloca_once(builder, vf) for _ in firsts] for _ in pcs]
    iacc = [[cgutils.alloca_once(builder, vi) for _ in firsts] for _ in pcs]
    # odd bits: the entries with the top index bit clear, then those with it set
    starts = [0, 1 << (bits - 1)] if bits % 2 else [0]
    tables = [[builder.load(builder.gep(pcb, [ir.Constant(_I32, t)], source_etype=_I8),
                            typ=ir.VectorType(_I8, 16), align=1) for t in starts] for pcb in pcbs]

    def at(p, b, stride, ty, etype, align):
        return builder.load(builder.gep(p, [builder.mul(b, ir.Constant(b.type, stride))], source_etype=etype),
                            typ=ty, align=align)

    def weights(r, bs):
        pcodes = [builder.gep(pcs[r], [builder.mul(b, ir.Constant(b.type, 4 * bits))], source_etype=_I8) for b in bs]
        idx, top = _block_index_bytes(builder, pcodes, bits)
        return byte_table_lookup(builder, tables[r], idx, top, size=1 << (bits - bits % 2))

    def spread_scales(e):
        # <2 x i16> -> <32 x i16>: each half's scale over its 16 lanes (one vpermw)
        return builder.shuffle_vector(e, ir.Constant(e.type, None), ir.Constant(ir.VectorType(_I32, 32),
                                                                              [0] * 16 + [1] * 16))

    def add(acc, dot):
        builder.store(builder.add(builder.load(acc), dot), acc)

    def block(b):
        w8 = [weights(r, [b]) for r in range(len(pcs))]
        for m, (px, pex) in enumerate(firsts):
            if token_pairs:
                xv = at(px, b, xstride, ir.VectorType(_I8, 64), _I8, 1)
                e = spread_scales(at(pex, b, exstride, ir.VectorType(i16, 2), i16, 2))
                for r in range(len(pcs)):
                    add(iacc[r][m], byte_dot_halves(builder, w8[r], xv, e))
            else:
                dot = byte_dot(builder, w8[0], at(px, b, xstride, ir.VectorType(_I8, 32), _I8, 1),
                               at(pex, b, exstride, i16, i16, 2))
                if block_pairs:         # a chunk's odd block: lanes 0-7 of the wide accumulator
                    dot = _concat(builder, dot, ir.Constant(v8i, [0] * 8))
                add(iacc[0][m], dot)

    def two_blocks(b):
        # one token, blocks b and b + 1 in one zmm: their weights, x and scales side by side
        b1 = builder.add(b, ir.Constant(b.type, 1))
        px, pex = firsts[0]
        xv = _concat(builder, *[at(px, k, xstride, ir.VectorType(_I8, 32), _I8, 1) for k in (b, b1)])
        e = ir.Constant(ir.VectorType(i16, 2), ir.Undefined)
        for k, bk in enumerate((b, b1)):
            e = builder.insert_element(e, at(pex, bk, exstride, i16, i16, 2), ir.Constant(_I32, k))
        add(iacc[0][0], byte_dot_halves(builder, weights(0, [b, b1]), xv, spread_scales(e)))

    for f in (f for row in facc for f in row):
        builder.store(ir.Constant(vf, [0.0] * vf.count), f)
    ty = nblk.type
    chunk = ir.Constant(ty, CHUNK_BLOCKS)
    nchunks = builder.sdiv(builder.add(nblk, ir.Constant(ty, CHUNK_BLOCKS - 1)), chunk)
    with cgutils.for_range(builder, nchunks) as c:
        b0 = builder.mul(c.index, chunk)
        nb = builder.sub(nblk, b0)
        nb = builder.select(builder.icmp_signed("<", nb, chunk), nb, chunk)
        for acc in (a for row in iacc for a in row):
            builder.store(ir.Constant(vi, [0] * vi.count), acc)
        one = ir.Constant(ty, 1)
        with cgutils.for_range(builder, builder.ashr(nb, one)) as loop:   # two blocks a trip
            b = builder.add(b0, builder.shl(loop.index, one))
            if block_pairs:
                two_blocks(b)
            else:
                block(b)
                block(builder.add(b, one))
        with builder.if_then(builder.icmp_signed("!=", builder.and_(nb, one), ir.Constant(ty, 0))):
            block(builder.add(b0, builder.sub(nb, one)))
        for f, acc in zip((f for row in facc for f in row), (a for row in iacc for a in row)):
            a = builder.load(acc)
            if block_pairs:     # the two blocks' integer sums: the same integers as block by block
                a = builder.add(_lanes(builder, a, 0, 8), _lanes(builder, a, 8, 8))
            builder.store(builder.fadd(builder.load(f), builder.sitofp(a, vf), flags=fast), f)
    zeros = ir.Constant(v8f, [0.0] * 8)
    return [_hsum(builder, _concat(builder, _lanes(builder, builder.load(f), 8 * k, 8) if per == 2 else builder.load(f),
                                   zeros)) for row in facc for f in row for k in range(per)]


@intrinsic(prefer_literal=True)
def _dot_blocks_i8(typingctx, codes, coff, x8, ex, cb8, cboff, nblk, bits):
    """float32 Σ_b ex[b] · Σ_j cb8[q_j]·x8[32b + j] over `nblk` 32-weight blocks of codes[coff:],
    unsigned codebook entries at cb8.flat[cboff:] (K ≤ 32), int16 block scales ex (_dot_i8_ir).
    The activations' step and the codebook's step and offset are the caller's."""
    def codegen(context, builder, sig, args):
        codes_v, coff_v, x8_v, ex_v, cb_v, cboff_v, nblk_v, bits_v = args
        pc = builder.gep(_data(context, builder, sig.args[0], codes_v), [coff_v], source_etype=_I8)
        pcb = builder.gep(_data(context, builder, sig.args[4], cb_v), [cboff_v], source_etype=_I8)
        res = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))

        def emit(bits):
            builder.store(_dot_i8_ir(builder, [pc], [_data(context, builder, sig.args[2], x8_v)],
                                     [_data(context, builder, sig.args[3], ex_v)], [pcb], nblk_v, bits,
                                     wide=target().isa == "avx512")[0], res)

        switch_on_bits(builder, bits_v, range(2, INT8_MAX_BITS + 1), emit, sig.args[7])
        return builder.load(res)

    return types.float32(codes, coff, x8, ex, cb8, cboff, nblk, bits), codegen


@intrinsic(prefer_literal=True)
def _dot_blocks_i8_tile(typingctx, codes, coffs, x8t, ex_t, tile, slot, cb8, cboffs, nblk, bits, res, ntok):
    """res[r·ntok + k] = _dot_blocks_i8 of row r (codes at coffs[r], codebook entries at cb8.flat
    [cboffs[r]:]; coffs and cboffs tuples of one or, with ntok even on AVX-512, MM_ROWS rows) and
    of the tokens in slots slot + k < slot + ntok (a literal: MM_TOKENS or 1) of token tile `tile`:
    x8t (tiles, nblk, MM_TOKENS, 32) int8 and ex_t (tiles, nblk, MM_TOKENS) int16, C-contiguous,
    so a block's x and scales of all the tile's tokens lie side by side (no per-token address
    arithmetic in the loop); each block unpacked once for the ntok tokens (in pairs, 512-bit, on
    AVX-512), each x load shared by the rows."""
    def codegen(context, builder, sig, args):
        codes_v, coffs_v, x8_v, ex_v, tile_v, slot_v, cb_v, cboffs_v, nblk_v, bits_v, res_v, _ = args
        i64 = nblk_v.type
        rows = range(len(sig.args[1]))
        pcs = [builder.gep(_data(context, builder, sig.args[0], codes_v), [builder.extract_value(coffs_v, r)],
                           source_etype=_I8) for r in rows]
        pcbs = [builder.gep(_data(context, builder, sig.args[6], cb_v), [builder.extract_value(cboffs_v, r)],
                            source_etype=_I8) for r in rows]
        first = builder.add(builder.mul(builder.mul(tile_v, nblk_v), ir.Constant(i64, MM_TOKENS)), slot_v)
        px0 = builder.gep(_data(context, builder, sig.args[2], x8_v), [builder.mul(first, ir.Constant(i64, BLOCK))],
                          source_etype=_I8)
        pex0 = builder.gep(_data(context, builder, sig.args[3], ex_v), [first], source_etype=ir.IntType(16))
        pres = _data(context, builder, sig.args[10], res_v)
        k_all = range(sig.args[11].literal_value)
        pxs = [builder.gep(px0, [ir.Constant(_I32, k * BLOCK)], source_etype=_I8) for k in k_all]
        pexs = [builder.gep(pex0, [ir.Constant(_I32, k)], source_etype=ir.IntType(16)) for k in k_all]

        def emit(bits):
            sums = _dot_i8_ir(builder, pcs, pxs, pexs, pcbs, nblk_v, bits, MM_TOKENS * BLOCK, MM_TOKENS,
                              wide=target().isa == "avx512")
            for k, v in enumerate(sums):
                builder.store(v, builder.gep(pres, [ir.Constant(_I32, k)], source_etype=_F32))

        switch_on_bits(builder, bits_v, range(2, INT8_MAX_BITS + 1), emit, sig.args[9])
        return context.get_dummy_value()

    if not (isinstance(ntok, types.IntegerLiteral) and isinstance(coffs, types.UniTuple)
            and isinstance(cboffs, types.UniTuple) and len(coffs) == len(cboffs)):
        return None
    return types.none(codes, coffs, x8t, ex_t, tile, slot, cb8, cboffs, nblk, bits, res, ntok), codegen


@intrinsic(prefer_literal=True)
def _dot_blocks(typingctx, codes, coff, x, xoff, cb, cboff, tab, nblk, bits):
    """float32 Σ decode(codes[coff:] blocks)·x[xoff:] over `nblk` 32-weight blocks, for the
    float matvec of bits ≥ 6 (below, the matvec is _dot_blocks_i8): float32 tab, the codebook
    widened by the caller."""
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

        switch_on_bits(builder, bits_v, range(INT8_MAX_BITS + 1, 9), emit, sig.args[8])     # K ≤ 32: _dot_blocks_i8
        return builder.load(res)

    sig = types.float32(codes, coff, x, xoff, cb, cboff, tab, nblk, bits)
    return sig, codegen


@intrinsic(prefer_literal=True)
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

        switch_on_bits(builder, bits_v, range(2, 9), emit, sig.args[6])
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
def _sparse_add(orow, oc, ov, i, out):
    # out (n,) += row i of the outliers (orow int32 row ids (base.outlier_rows), oc u16 column,
    # ov f16 bits)
    for p in range(np.searchsorted(orow, i), np.searchsorted(orow, i + 1)):
        out[oc[p]] += f16_to_f32(ov[p])


@njit(**_JIT)
def _mv_rows(codes, cb, meta, orow, oc, ov, x, out, r0, r1, scr, bits):
    # codes (d, nblk*4*bits) u8, cb (G, K) f16 bits, outliers (orow, oc, ov) @ x (n,) -> out[r0:r1]; scr (SCRATCH,) f32
    n, group_rows = meta[1], meta[3]
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
        out[i] = acc
    for p in range(np.searchsorted(orow, r0), np.searchsorted(orow, r1)):    # outliers, in row order
        out[orow[p]] += f16_to_f32(ov[p]) * x[oc[p]]


# fastmath=False said explicitly: Numba lets a callee compiled for a fastmath caller inherit
# fastmath unless the callee sets it, and then m / 127 became m · (1/127), one ulp off the
# reference, and a block scale rint(dx / D) could round the other way
@njit(cache=True, nogil=True, fastmath=False)
def _quantize_x(x, x8, dx, ex):
    # x (n,) -> x8 (nblk, 32) int8, dx (nblk,) float32 per 32-column block and the block scales
    # ex (nblk,) int16 of format.block_scales; returns (D, D·Σ_b ex[b]·Σ x8[b]): the activations'
    # step and the sum the codebooks' offsets multiply. x8 and ex may be strided views (the
    # matmul writes its token tiles directly)
    n = x.shape[0]
    top = np.float32(0.0)
    for b in range(dx.shape[0]):
        m = np.float32(0.0)
        for j in range(b * 32, min(n, b * 32 + 32)):
            m = max(m, abs(x[j]))
        inv = np.float32(127.0) / m if m > 0 else np.float32(0.0)
        dx[b] = m / np.float32(127.0)
        top = max(top, dx[b])
        for j in range(32):
            v = x[b * 32 + j] * inv if b * 32 + j < n else np.float32(0.0)
            x8[b, j] = np.int8(np.trunc(v + (np.float32(-0.5) if v < 0 else np.float32(0.5))))
    D = top / np.float32(SCALE_MAX)
    isum = 0
    for b in range(dx.shape[0]):
        ex[b] = np.int16(np.rint(dx[b] / D)) if D > 0 else np.int16(0)
        s = 0
        for j in range(32):
            s += x8[b, j]
        isum += np.int64(ex[b]) * s
    return D, D * np.float32(isum)


# fastmath=False (said explicitly, see _quantize_x): the matvec and the matmul finish a row with
# the same roundings, so a prompt's tokens get the values a token-by-token decode would
@njit(cache=True, nogil=True, fastmath=False)
def _finish_row(acc, D, s, lo, xsum):
    # a row's int8 dot acc in the activations' step D and the codebook's step s and offset lo
    return acc * (D * s) + lo * xsum


@njit(cache=True, nogil=True, fastmath=False)
def _outlier_act(D, e, x):
    # the activation an fp16 outlier multiplies: int8 x at block scale e in step D
    return D * np.float32(e) * np.float32(x)


@intrinsic
def _outlier_term(typingctx, v, a):
    """An fp16 outlier v (as float32) times its activation a (_outlier_act), rounded on its own:
    never fused into the add it goes into (llvm_ir.arithmetic_fence), as _add_outlier_tile."""
    def codegen(context, builder, sig, args):
        return arithmetic_fence(builder, builder.fmul(args[0], args[1]))

    if not all(isinstance(t, types.Float) and t.bitwidth == 32 for t in (v, a)):
        return None
    return types.float32(v, a), codegen


@njit(**_JIT)
def _mv_rows_i8(codes, cb8, cbs, cblo, meta, orow, oc, ov, x8, ex, D, xsum, out, r0, r1, bits):
    # int8 matvec (K ≤ 32) of rows r0:r1 -> out[r0:r1]; x8, ex, D, xsum from _quantize_x
    group_rows = meta[3]
    nblk = ex.shape[0]
    rowbytes = codes.shape[1]
    g = r0 // group_rows
    left = (g + 1) * group_rows - r0        # rows of codebook g from r0 on (no division per row)
    p = np.searchsorted(orow, r0)
    for i in range(r0, r1):
        if left == 0:
            g += 1
            left = group_rows
        left -= 1
        acc = _dot_blocks_i8(codes, i * rowbytes, x8, ex, cb8, g * 32, nblk, bits)
        acc = _finish_row(acc, D, cbs[g], cblo[g], xsum)
        # the row's outliers in order, summed in a register (adding each to out[i] in memory
        # waited on the previous store: 1.5B gate/up's 82,576 outliers, 1 thread, +384-500 ->
        # +210-302 µs a token), each activation made from the int8 x where it is needed: a
        # float32 copy of x (35 KB for the 1.5B's down_proj) left L1 as the row's codes streamed
        # through, and its gathers stalled the row (1.5B decode, 2 threads, Zen 5: down_proj
        # 9.0 -> 6.0 ms a token, 27 outliers a row)
        while p < orow.shape[0] and orow[p] == i:
            c = np.int64(oc[p])
            acc += _outlier_term(f16_to_f32(ov[p]), _outlier_act(D, ex[c >> 5], x8[c >> 5, c & 31]))
            p += 1
        out[i] = acc


@functools.cache
def first_token_kernels(bits: int) -> tuple:
    """(int8 matvec, its parallel twin, row decode) for one bit width (the matvecs for K ≤ 32).
    `bits` is a closure constant, so the IR intrinsics emit only that width's code
    (switch_on_bits): less to compile before the first token on a cold cache, each width cached
    apart. The batched kernels below take bits at run time (a child process compiles them)."""

    @njit(**_JIT)
    def matvec_i8(codes, cb8, cbs, cblo, meta, orow, oc, ov, x, x8, dx, ex, out):
        # int8 matvec (K ≤ 32): x (n,) -> out (d,); x8 (nblk, 32) int8, dx (nblk,) f32 and ex
        # (nblk,) int16 scratch
        D, xsum = _quantize_x(x, x8, dx, ex)
        _mv_rows_i8(codes, cb8, cbs, cblo, meta, orow, oc, ov, x8, ex, D, xsum, out, 0, meta[0], bits)

    @njit(**_JIT_PAR)
    def matvec_i8_par(codes, cb8, cbs, cblo, meta, orow, oc, ov, x, x8, dx, ex, out, nb):
        # as matvec_i8, prange over nb row blocks
        D, xsum = _quantize_x(x, x8, dx, ex)
        d = meta[0]
        step = (d + nb - 1) // nb
        for b in prange(nb):
            _mv_rows_i8(codes, cb8, cbs, cblo, meta, orow, oc, ov, x8, ex, D, xsum, out, b * step,
                        min(d, (b + 1) * step), bits)

    @njit(**_JIT)
    def row(codes, cb, meta, orow, oc, ov, i, out, scr):
        # parts, row i -> out (n,) f32; scr (SCRATCH,) f32
        _row(codes, cb, meta, orow, oc, ov, i, out, scr, bits)

    return matvec_i8, matvec_i8_par, row


@intrinsic
def _add_outlier_tile(typingctx, res, o, xa, j, c, v):
    """res[o + k] += v · xa[j, c, k] for the MM_TOKENS tokens k of tile j as one vector multiply and
    one vector add (in memory, the scalar loop's 16 read-add-writes of res waited on each other's
    stores): _outlier_term's float ops, the product not fused into the add. res float32,
    xa (tiles, n, MM_TOKENS) float32 C-contiguous (_mm_rows_i8)."""
    def codegen(context, builder, sig, args):
        res_v, o_v, xa_v, j_v, c_v, v_v = args
        vf = ir.VectorType(_F32, MM_TOKENS)
        xa_arr = context.make_array(sig.args[2])(context, builder, xa_v)
        n = builder.extract_value(xa_arr.shape, 1)
        at = builder.mul(builder.add(builder.mul(j_v, n), c_v), ir.Constant(n.type, MM_TOKENS))
        pa = builder.bitcast(builder.gep(xa_arr.data, [at], source_etype=_F32), vf.as_pointer())
        pr = builder.bitcast(builder.gep(_data(context, builder, sig.args[0], res_v), [o_v], source_etype=_F32),
                             vf.as_pointer())
        vv = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), v_v, ir.Constant(_I32, 0)),
                                    ir.Constant(vf, ir.Undefined), ir.Constant(ir.VectorType(_I32, MM_TOKENS),
                                                                               [0] * MM_TOKENS))
        prod = arithmetic_fence(builder, builder.fmul(vv, builder.load(pa, typ=vf, align=4)))
        builder.store(builder.fadd(builder.load(pr, typ=vf, align=4), prod), pr, align=4)
        return context.get_dummy_value()

    return types.none(res, types.int64, xa, types.int64, types.int64, types.float32), codegen


if MM_ROWS == 2:
    @njit(inline="always", **_JIT)
    def _tile_dots(codes, i0, nr, rowbytes, x8t, ex_t, j, cb8, group_rows, nblk, bits, res):
        # res[r·MM_TOKENS + k] = full tile j's dots with rows i0 + r < i0 + nr, each x load shared
        # by the rows (_dot_blocks_i8_tile)
        if nr == 2:
            _dot_blocks_i8_tile(codes, (i0 * rowbytes, (i0 + 1) * rowbytes), x8t, ex_t, j, 0, cb8,
                                (i0 // group_rows * 32, (i0 + 1) // group_rows * 32), nblk, bits, res, MM_TOKENS)
        else:
            _dot_blocks_i8_tile(codes, (i0 * rowbytes,), x8t, ex_t, j, 0, cb8, (i0 // group_rows * 32,), nblk, bits,
                                res, MM_TOKENS)
else:       # one row a pass: no two-row variant compiled
    @njit(inline="always", **_JIT)
    def _tile_dots(codes, i0, nr, rowbytes, x8t, ex_t, j, cb8, group_rows, nblk, bits, res):
        _dot_blocks_i8_tile(codes, (i0 * rowbytes,), x8t, ex_t, j, 0, cb8, (i0 // group_rows * 32,), nblk, bits,
                            res, MM_TOKENS)


@njit(**_JIT)
def _mm_rows_i8(codes, cb8, cbs, cblo, meta, orow, oc, ov, x8t, ex_t, xa, D, xsum, out, r0, r1, bits):
    # int8 matmul (K ≤ 32) of rows r0:r1 -> out[:, r0:r1] for the T tokens quantized as the matvec
    # does, in tiles of MM_TOKENS (x8t, ex_t as _dot_blocks_i8_tile; xa (tiles, nblk·32,
    # MM_TOKENS) the activations outliers multiply (_outlier_act), empty without outliers; D and
    # xsum (T,)): tiles grouped so their x stays in L2, MM_ROWS rows a pass, each row's blocks
    # unpacked once per tile, its outliers added to the tile's sums (in row order, as the matvec
    # adds them) before the store
    T = D.shape[0]
    nblk = ex_t.shape[1]
    group_rows = meta[3]
    rowbytes = codes.shape[1]
    res = np.empty(MM_ROWS * MM_TOKENS, np.float32)
    step = max(1, MM_X_BYTES // (nblk * (BLOCK + 2) * MM_TOKENS))     # tiles per pass over the rows
    ntiles = (T + MM_TOKENS - 1) // MM_TOKENS
    for j0 in range(0, ntiles, step):
        p = np.searchsorted(orow, r0)
        for i0 in range(r0, r1, MM_ROWS):
            nr = min(MM_ROWS, r1 - i0)
            q0 = p                              # the rows' outliers: q0:q1 (row i0), q1:p (the next)
            while p < orow.shape[0] and orow[p] == i0:
                p += 1
            q1 = p
            while p < orow.shape[0] and orow[p] < i0 + nr:
                p += 1
            for j in range(j0, min(ntiles, j0 + step)):
                t0 = j * MM_TOKENS
                nt = min(MM_TOKENS, T - t0)
                if nt == MM_TOKENS:
                    _tile_dots(codes, i0, nr, rowbytes, x8t, ex_t, j, cb8, group_rows, nblk, bits, res)
                else:                           # the last tile's tokens one by one
                    for r in range(nr):
                        for k in range(nt):
                            _dot_blocks_i8_tile(codes, ((i0 + r) * rowbytes,), x8t, ex_t, j, k, cb8,
                                                ((i0 + r) // group_rows * 32,), nblk, bits, res[r * MM_TOKENS + k:], 1)
                for r in range(nr):
                    i, o = i0 + r, r * MM_TOKENS
                    g = i // group_rows
                    for k in range(nt):
                        res[o + k] = _finish_row(res[o + k], D[t0 + k], cbs[g], cblo[g], xsum[t0 + k])
                    for q in range(q0 if r == 0 else q1, q1 if r == 0 else p):
                        v, c = f16_to_f32(ov[q]), np.int64(oc[q])
                        if nt == MM_TOKENS:
                            _add_outlier_tile(res, o, xa, j, c, v)
                        else:
                            for k in range(nt):
                                res[o + k] += _outlier_term(v, xa[j, c, k])
                    for k in range(nt):
                        out[t0 + k, i] = res[o + k]


@njit(**_JIT)
def _quantize_tile(X, t, x8t, ex_t, xa, dx, D, xsum):
    # token t of X into its tile slot (x8t, ex_t as _dot_blocks_i8_tile; xa as _mm_rows_i8 unless
    # empty), D[t] and xsum[t]
    j, k = t // MM_TOKENS, t % MM_TOKENS
    D[t], xsum[t] = _quantize_x(X[t], x8t[j, :, k, :], dx[t], ex_t[j, :, k])
    if xa.shape[0]:
        for c in range(xa.shape[1]):
            xa[j, c, k] = _outlier_act(D[t], ex_t[j, c >> 5, k], x8t[j, c >> 5, k, c & 31])


@functools.cache
def matmul_kernels(bits: int) -> tuple:
    """(serial, parallel) int8 matmul kernels (K ≤ 32) for one bit width (a closure constant as in
    first_token_kernels): every token quantized as the matvec does, then _mm_rows_i8; the same
    result as T matvecs, to the bit."""

    @njit(**_JIT)
    def matmul_i8(codes, cb8, cbs, cblo, meta, orow, oc, ov, X, x8t, ex_t, xa, dx, D, xsum, out):
        # X (T, n) @ W.T -> out (T, d); x8t, ex_t the token tiles (_dot_blocks_i8_tile), xa the
        # outliers' activations (_mm_rows_i8), dx (T, nblk) f32, D and xsum (T,) f32 scratch
        for t in range(X.shape[0]):
            _quantize_tile(X, t, x8t, ex_t, xa, dx, D, xsum)
        _mm_rows_i8(codes, cb8, cbs, cblo, meta, orow, oc, ov, x8t, ex_t, xa, D, xsum, out, 0, meta[0], bits)

    @njit(**_JIT_PAR)
    def matmul_i8_par(codes, cb8, cbs, cblo, meta, orow, oc, ov, X, x8t, ex_t, xa, dx, D, xsum, out, nb):
        # as matmul_i8, prange over the tokens' quantization, then over nb row blocks
        for t in prange(X.shape[0]):
            _quantize_tile(X, t, x8t, ex_t, xa, dx, D, xsum)
        d = meta[0]
        step = (d + nb - 1) // nb
        for b in prange(nb):
            _mm_rows_i8(codes, cb8, cbs, cblo, meta, orow, oc, ov, x8t, ex_t, xa, D, xsum, out, b * step,
                        min(d, (b + 1) * step), bits)

    return matmul_i8, matmul_i8_par


@njit(**_JIT)
def matvec_cluster(codes, cb, meta, orow, oc, ov, x, out, scr, bits):
    # codes, cb, outliers orow/oc/ov (ClusterLinear); x (n,) -> out (d,); scr (1, SCRATCH) f32
    _mv_rows(codes, cb, meta, orow, oc, ov, x, out, 0, meta[0], scr[0], bits)


@njit(**_JIT_PAR)
def matvec_cluster_par(codes, cb, meta, orow, oc, ov, x, out, scr, bits):
    # codes, cb, outliers orow/oc/ov; x (n,) -> out (d,); prange over scr.shape[0] row blocks
    d = meta[0]
    nb = scr.shape[0]
    step = (d + nb - 1) // nb
    for b in prange(nb):
        _mv_rows(codes, cb, meta, orow, oc, ov, x, out, b * step, min(d, (b + 1) * step), scr[b], bits)


@njit(**_JIT)
def _decode_row(codes, cb, meta, orow, oc, ov, i, out, scr, bits):
    # row i of the parts -> out[:nblk*32] f32 (padding decoded too); scr (SCRATCH,) f32
    g = i // meta[3]
    _load_table(cb, g, bits, scr)
    nblk = codes.shape[1] // (4 * bits)
    _decode_blocks(codes, i * codes.shape[1], cb, g * cb.shape[1], scr, nblk, bits, out, 0)
    _sparse_add(orow, oc, ov, i, out)


@njit(inline="always", **_JIT)
def _row(codes, cb, meta, orow, oc, ov, i, out, scr, bits):
    # parts, row i -> out (n,) f32; scr (SCRATCH,) f32
    n = meta[1]
    nfull = n // 32
    g = i // meta[3]
    cboff = g * cb.shape[1]
    _load_table(cb, g, bits, scr)
    _decode_blocks(codes, i * codes.shape[1], cb, cboff, scr, nfull, bits, out, 0)
    if n > nfull * 32:
        _decode_blocks(codes, i * codes.shape[1] + nfull * 4 * bits, cb, cboff, scr, 1, bits, scr, 256)
        for j in range(n - nfull * 32):
            out[nfull * 32 + j] = scr[256 + j]
    _sparse_add(orow, oc, ov, i, out)


@njit(**_JIT)
def _mm_rows(codes, cb, meta, orow, oc, ov, X, out, r0, r1, tile, scr, bits):
    # X (T, n) @ W[r0:r1].T -> out[:, r0:r1]; tile (TILE_ROWS, nblk*32) f32 scratch
    T = X.shape[0]
    n = meta[1]
    for i0 in range(r0, r1, 4):
        nr = min(4, r1 - i0)
        for r in range(4):
            if r < nr:
                _decode_row(codes, cb, meta, orow, oc, ov, i0 + r, tile[r], scr, bits)
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
def matmul_cluster(codes, cb, meta, orow, oc, ov, X, out, tiles, scr, bits):
    # X (T, n) @ W.T -> out (T, d); tiles (1, 4, nblk*32), scr (1, SCRATCH) f32
    _mm_rows(codes, cb, meta, orow, oc, ov, X, out, 0, meta[0], tiles[0], scr[0], bits)


@njit(**_JIT_PAR)
def matmul_cluster_par(codes, cb, meta, orow, oc, ov, X, out, tiles, scr, bits):
    # X (T, n) @ W.T -> out (T, d); prange over tiles.shape[0] row blocks (multiples of 4 rows)
    d = meta[0]
    nb = tiles.shape[0]
    step = ((d + nb - 1) // nb + 3) // 4 * 4
    for b in prange(nb):
        _mm_rows(codes, cb, meta, orow, oc, ov, X, out, min(d, b * step), min(d, (b + 1) * step), tiles[b], scr[b], bits)


class ClusterLinear(Linear):
    """A loaded cluster weight W (d, n): matvec / matmul / row on the stored parts (zero-copy)."""

    codec = "cluster"
    matmul_min_t = MATMUL_MIN_T

    def __init__(self, parts: dict):
        d, n, bits, g = _check_meta(parts)
        super().__init__((d, n), sum(p.nbytes for p in parts.values()), PAR_MIN_WEIGHTS)
        self.codes = np.ascontiguousarray(codes_of(parts))
        self.codebook = np.ascontiguousarray(parts["codebook"])
        self.meta = np.ascontiguousarray(parts["meta"], dtype=np.int64)
        rp, self.oc, self.ov = _outliers(parts, d)
        self.orow = outlier_rows(rp)        # outliers by row id instead of the stored row pointers
        self.bits = bits
        self.group_rows = g
        self._ncols = self.codes.shape[1] // (4 * bits) * BLOCK
        self._scr = np.zeros((1, SCRATCH), np.float32)
        self._tiles = None
        self._mv, self._mv_par, self._row = first_token_kernels(bits)
        self.matmul_equals_matvec = bits <= INT8_MAX_BITS
        if bits <= INT8_MAX_BITS:   # the int8 matvec's codebooks and activation scratch
            self.cb8, self.cbs, self.cblo = unsigned_codebook(self.codebook)
            nblk = self.codes.shape[1] // (4 * bits)
            self.x8 = np.zeros((nblk, BLOCK), np.int8)
            self.dx, self.ex = np.zeros(nblk, np.float32), np.zeros(nblk, np.int16)

    @property
    def rp(self) -> np.ndarray:
        """The outliers' stored row pointers (d + 1,) int32."""
        return outlier_rowptr(self.orow, self.shape[0])

    def _scratch(self, threads: int) -> np.ndarray:
        # per-thread scratch, grown once (a few KiB), never per call
        if self._scr.shape[0] < threads:
            self._scr = np.zeros((threads, SCRATCH), np.float32)
        return self._scr[:threads]

    def _matvec(self, x: np.ndarray, out: np.ndarray, threads: int) -> None:
        # out (d,) = W (d, n) @ x (n,)
        if self.bits <= INT8_MAX_BITS:
            args = (self.codes, self.cb8, self.cbs, self.cblo, self.meta, self.orow, self.oc, self.ov, x, self.x8,
                    self.dx, self.ex, out)
            if threads > 1:
                self._mv_par(*args, threads)
            else:
                self._mv(*args)
            return
        if threads > 1:
            matvec_cluster_par(self.codes, self.codebook, self.meta, self.orow, self.oc, self.ov, x, out,
                               self._scratch(threads), self.bits)
        else:
            matvec_cluster(self.codes, self.codebook, self.meta, self.orow, self.oc, self.ov, x, out, self._scr, self.bits)

    def _matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        # out (T, d) = X (T, n) @ W.T. K ≤ 32: int8 activations, as T matvecs would compute it;
        # else rows decoded 4 at a time into L1, register-blocked f32 dots
        T = X.shape[0]
        nb = self.threads_for(self.shape[0] * T * self.shape[1] >= PAR_MIN_WEIGHTS)
        if self.bits <= INT8_MAX_BITS:
            if not X.flags.c_contiguous:
                X = np.ascontiguousarray(X)
            nblk, tiles = self.dx.shape[0], -(-T // MM_TOKENS)
            # one per-thread buffer, shared by every matrix: x8t | ex_t | xa (with outliers) | dx | D | xsum
            xa_tiles = tiles if self.oc.size else 0
            sizes = (tiles * nblk * MM_TOKENS * BLOCK // 4, tiles * nblk * MM_TOKENS // 2,
                     xa_tiles * nblk * BLOCK * MM_TOKENS, T * nblk, T, T)
            ends = np.cumsum(sizes)
            buf = thread_scratch("cluster.mm", (int(ends[-1]),))
            x8t, ex_t, xa, dx, D, xsum = (buf[e - k:e] for k, e in zip(sizes, ends))
            args = (self.codes, self.cb8, self.cbs, self.cblo, self.meta, self.orow, self.oc, self.ov, X,
                    x8t.view(np.int8).reshape(tiles, nblk, MM_TOKENS, BLOCK),
                    ex_t.view(np.int16).reshape(tiles, nblk, MM_TOKENS), xa.reshape(xa_tiles, nblk * BLOCK, MM_TOKENS),
                    dx.reshape(T, nblk), D, xsum, out)
            mm, mm_par = matmul_kernels(self.bits)
            if nb > 1:
                mm_par(*args, nb)
            else:
                mm(*args)
            return
        if self._tiles is None or self._tiles.shape[0] < nb:
            self._tiles = np.zeros((nb, TILE_ROWS, self._ncols), np.float32)
        if nb > 1:
            matmul_cluster_par(self.codes, self.codebook, self.meta, self.orow, self.oc, self.ov, X, out,
                               self._tiles[:nb], self._scratch(nb), self.bits)
        else:
            matmul_cluster(self.codes, self.codebook, self.meta, self.orow, self.oc, self.ov, X, out,
                           self._tiles, self._scr, self.bits)

    @classmethod
    def stack(cls, linears: list) -> "ClusterLinear | None":
        """The rows of `linears` as one ClusterLinear when they share bits, width and rows per
        codebook and every part ends on a whole codebook group."""
        a = linears[0]
        if any(type(w) is not cls or (w.bits, w.group_rows, w.shape[1]) != (a.bits, a.group_rows, a.shape[1])
               or w.shape[0] % a.group_rows for w in linears):
            return None
        d = sum(w.shape[0] for w in linears)
        rp, oc, ov = stack_outliers([(w.rp, w.oc, w.ov) for w in linears])
        parts = {"meta": meta_array(d, a.shape[1], a.bits, a.group_rows),
                 "codes": np.concatenate([w.codes for w in linears]),
                 "codebook": np.concatenate([w.codebook for w in linears]),
                 "outlier_rowptr": rp, "outlier_col": oc, "outlier_val": ov}
        return cls(parts)

    def row(self, i: int, out: np.ndarray) -> None:
        """out (n,) = W[i] as float32 (embedding lookup)."""
        self._row(self.codes, self.codebook, self.meta, self.orow, self.oc, self.ov, int(i), out, self._scr[0])
