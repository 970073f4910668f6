"""SpQR codec, the kernels: LLVM IR through numba @intrinsic, the Numba drivers and
`SpQRLinear` (formats/codec-spqr.md)."""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...errors import UnsupportedModelError
from ...isa import _const_like, _lanes, byte_pair_dot, half_to_float, target
from ...kernels import f16_to_f32
from ...memory import thread_scratch
from ..base import Linear, outlier_rowptr, outlier_rows, stack_outliers
from ..llvm_ir import array_data as _data, hsum16 as _hsum, switch_on_bits
from .format import REQUIRED_PARTS, _check_shapes, params_of

_JIT = dict(cache=True, nogil=True, fastmath=True, no_cfunc_wrapper=True)
_JIT_PAR = dict(cache=True, nogil=True, fastmath=True, parallel=True, no_cfunc_wrapper=True)

# prange over rows only for matrices at least this big (a 2-thread region costs ~2-3 µs here with
# OpenMP, DESIGN §6 says up to 10): 576x576 q/o gain (measured: 15 -> 11 µs a matvec in a real token
# at 2 threads), 192x576 k/v do not
PAR_MIN_WEIGHTS = 1 << 18
MATMUL_MIN_T = 4        # below this many tokens matmul is a loop of matvecs
# matmul register block, rows x tokens per chunk pass: measured on Zen 3 (Qwen2.5-1.5B up/down,
# T = 64, CPU ms): 1x8 20.5/25.4, 1x4 22.4/27.0, 2x4 23.2/29.7, 1x2 25.5/31.5, 2x2 26.9/32.7
MM_ROWS, MM_TOKENS = 1, 8
XC_TILE_BYTES = 1 << 18     # prepared x of one token tile: stays in L2 while the rows pass


# --- kernels -------------------------------------------------------------------------------
# Codes are stored in chunks of 16 groups, one byte per group in each of 2·bits byte sections
# (formats/codec-spqr.md). A vector lane is a group: one <16 x i8> load of a section widens to
# the codes of 16 groups at 2 (4 bit), 4 (2 bit) positions. The matvec's activations are prepared
# once per call, chunk-major, as int8 with one scale per group (quantize_activations in
# reference.py: x[perm[16(16c + k) + t]] ≈ dx[c, k]·x8[c, t, k]), so the dot of a chunk is integer
# work: vpmaddubsw on x86 (isa.byte_pair_dot) multiplies the codes of two positions with their x8
# pair and adds them, 32 weights an instruction (byte layout at _pair_layout), summed in i16 (16·15·127 < 2^15); the
# group's dx, scale and zero (one lane per group) apply once per 256 weights with no horizontal
# sum per group. Measured on Zen 3 (AVX2): the f32 multiply-add form took 0.77 instructions a
# weight and spilled registers (16 ymm), 2-3x slower than this. LLVM IR through numba @intrinsic (as cluster/kernels.py): DESIGN §6, plain Numba loops
# stay scalar. The tail chunk (G mod 16 groups) uses the same code on its sections loaded 16
# bytes at a time and zeroed past the tail (the bytes read past a row lie in the next row; a
# matrix's last rows use masked loads, a branch per lane before AVX-512), except tails of 4 or 8
# groups (n = 576: 36 groups), whose rows are packed 4 or 2 to a vector.
# Measured on Zen 5 (SmolLM2 shapes): the multiply-adds of a chunk must run as 4 independent
# chains per row (2 rows sharing each x load there, _rows_sharing_x): with `fast` (reassoc) flags LLVM folds them
# into one 16-deep chain and the kernel is FMA-latency bound (2x slower in cache); a masked tail
# of 4 groups cost as much as a full chunk (+35 % on 576 columns); rows of 768 bytes read in
# pairs lost the hardware prefetcher (2x slower from DRAM) without the software prefetch.
# The matmul (prefill) is the same arithmetic per token: all T tokens are prepared by _prep_x,
# then each row's chunk is unpacked once and dotted with MM_TOKENS tokens (_mm_tile_ir), the
# tokens' prepared x tiled to stay in L2. Measured on Zen 3 (Qwen2.5-1.5B, T = 64, one thread):
# 66-77 GFLOP/s vs 47-50 for dequantized f32 tiles with the register-blocked f32 kernel (OpenBLAS
# sgemm on the decoded f32 matrix: 72-80); compute-bound, the tile size (16 KiB-256 KiB) made no
# difference.

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V16I8, _V16I32, _V16F32 = ir.VectorType(_I8, 16), ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)
_V16I16 = ir.VectorType(_I16, 16)
_V16I1 = ir.VectorType(ir.IntType(1), 16)
_FAST = ("fast",)
_CONTRACT = ("contract", "nnan", "ninf", "nsz", "arcp")     # FMA fusion without reassociation
XC_FLOATS = 96          # prepared x per chunk: 256 bytes of int8 pairs, dx (16 f32), dx·Σ_t x8 (16 f32)
XC_DX, XC_XS = 64, 80   # float offsets of dx and of the group sums in a chunk
_V32I8 = ir.VectorType(_I8, 32)
PREFETCH = 4096         # software prefetch distance of the codes, bytes (2048 slower, 8192 same)


def _vi(v):
    return ir.Constant(_V16I32, v if isinstance(v, list) else [v] * 16)


def _mask(idx):
    """A shufflevector mask of any length."""
    idx = list(idx)
    return ir.Constant(ir.VectorType(_I32, len(idx)), idx)


def _splat(builder, v):
    """IR: a scalar broadcast to 16 lanes."""
    vt = ir.VectorType(v.type, 16)
    return builder.shuffle_vector(builder.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(_I32, 0)),
                                  ir.Constant(vt, ir.Undefined), _vi(0))


def _gep(builder, p, idx, ety):
    return builder.gep(p, [idx], source_etype=ety)


def _lanes_below(builder, w):
    """IR: <16 x i1> mask of lanes k < w (w an i64)."""
    return builder.icmp_unsigned("<", _vi(list(range(16))), _splat(builder, builder.trunc(w, _I32)))


def _load_bytes(builder, p, mask, ity=_I32, overread=False):
    """IR: 16 bytes at p (lanes outside `mask` read as 0, not touched) -> <16 x ity>. With
    `overread` the lanes outside `mask` are loaded too (the caller knows they lie inside the
    array) and zeroed: x86 before AVX-512 and NEON have no masked byte load, and LLVM makes
    llvm.masked.load a branch per lane there (~450 instructions a tail chunk)."""
    if mask is None or overread:
        v = builder.load(p, typ=_V16I8, align=1)
        if mask is not None:
            v = builder.select(mask, v, ir.Constant(_V16I8, [0] * 16))
    else:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16I8, [ir.PointerType(), _V16I1, _V16I8]),
                                            "llvm.masked.load.v16i8.p0")
        v = builder.call(fn, [p, mask, ir.Constant(_V16I8, [0] * 16)])
    return v if ity == _I8 else builder.zext(v, ir.VectorType(ity, 16))


def _codes(builder, pcode, step, bits, mask, ity=_I32, to_float=True):
    """IR: the 16 code vectors q_t (lane k = group g0+k) of the chunk at pcode, whose 2·bits byte
    sections are `step` bytes apart: <16 x float>, or <16 x ity> integers without to_float."""
    return _decode_sections(builder, [_load_bytes(builder, _gep(builder, pcode, builder.mul(
        step, ir.Constant(step.type, k)), _I8), mask, ity) for k in range(2 * bits)], bits, to_float)


def _decode_sections(builder, sec, bits, to_float=True):
    """IR: 2·bits byte sections <16 x iN> (one byte per lane) -> the 16 code vectors q_t
    (<16 x float>, or <16 x iN> without to_float)."""
    out = []
    for t in range(16):
        c = lambda v: _const_like(sec[0].type, v)       # noqa: E731
        if bits == 4:
            v = sec[t // 2]
            q = builder.and_(v, c(15)) if t % 2 == 0 else builder.lshr(v, c(4))
        else:
            v, s = sec[t // 4], 2 * (t % 4)
            q = builder.and_(builder.lshr(v, c(s)) if s else v, c(3))
            if bits == 3:        # bit 2 of position t: bit t mod 8 of section 4 + t // 8
                h, k = sec[4 + t // 8], t % 8
                h = builder.shl(h, c(2 - k)) if k < 2 else builder.lshr(h, c(k - 2)) if k > 2 else h
                q = builder.or_(q, builder.and_(h, c(4)))
        out.append(builder.sitofp(q, _V16F32) if to_float else q)
    return out


def _rows_sharing_x() -> int:
    """Rows whose full chunks share each x load (_rows_ir): 2 with AVX-512's 32 vector registers
    (measured on Zen 5; 4 was slower on 576 columns). 1 elsewhere: with AVX2's 16, two rows' code
    vectors made LLVM spill the x vectors to the stack (15 stores and 16 reloads a chunk), and one
    row at a time was 15-20 % faster in cache and ~7 % in the 1.5B's layer order (Zen 3,
    BENCHMARKS.md); NEON's 128-bit registers hold half a vector, so it gets 1 too (not timed)."""
    return 2 if target().isa == "avx512" else 1


def _vload(builder, p, off):
    """IR: <16 x float> at p + off floats (off an int)."""
    return builder.load(_gep(builder, p, ir.Constant(ir.IntType(64), off), _F32), typ=_V16F32, align=4)


def _chunk_stats(builder, ps, psf, mask, smask, sshift, overread=False):
    """IR: scale and zero <16 x float> of a chunk's 16 groups: stat bytes at ps, the chunk's
    widened block stats sf[c] (4, 16) at psf."""
    return _scale_zero(builder, _load_bytes(builder, ps, mask, overread=overread), psf, smask, sshift)


def _scale_zero(builder, f, psf, smask, sshift, sf=None):
    """IR: scale and zero <16 x float> from stat bytes f <16 x i32> (quantized scale in the low
    sbits, zero above) and widened block stats (4, 16) at psf (or given as 4 vectors sf)."""
    qs = builder.sitofp(builder.and_(f, smask), _V16F32)
    qz = builder.sitofp(builder.lshr(f, sshift), _V16F32)
    sf = sf or [_vload(builder, psf, 16 * k) for k in range(4)]
    s = builder.fadd(builder.fmul(sf[0], qs, flags=_FAST), sf[1], flags=_FAST)
    z = builder.fadd(builder.fmul(sf[2], qz, flags=_FAST), sf[3], flags=_FAST)
    return s, z


def _chunks_ir(builder, G, bits, body, full=True, tail=True):
    """IR: body(c, pcode offset, step, mask) over the full 16-group chunks c, then the tail chunk."""
    i64 = G.type
    nfull = builder.ashr(G, ir.Constant(i64, 4))
    w = builder.and_(G, ir.Constant(i64, 15))
    if full:
        with cgutils.for_range(builder, nfull) as loop:
            c = loop.index
            body(c, builder.mul(c, ir.Constant(i64, 32 * bits)), ir.Constant(i64, 16), None)
    if tail:
        with builder.if_then(builder.icmp_signed("!=", w, ir.Constant(i64, 0))):
            body(nfull, builder.mul(nfull, ir.Constant(i64, 32 * bits)), w, _lanes_below(builder, w))


def _stat_consts(builder, sbits):
    sb = builder.trunc(sbits, _I32)
    return (_splat(builder, builder.sub(builder.shl(ir.Constant(_I32, 1), sb), ir.Constant(_I32, 1))),
            _splat(builder, sb))


# Prepared activations and code bytes share one pair layout per chunk (what vpunpck{l,h}bw of a
# 32-byte load of two 4-bit sections gives): for j < 4, vector L_j holds groups 0-7 and H_j groups
# 8-15, each as byte pairs of positions (4j, 4j + 1) in its first 16 bytes and (4j + 2, 4j + 3) in
# its last 16; stored L_0, H_0, L_1, ... (_x8_offset says where one activation lands).
_UNPACK_LO = [b for h in (0, 16) for k in range(8) for b in (h + k, 32 + h + k)]
_UNPACK_HI = [b + 8 for b in _UNPACK_LO]


def _pair_layout(builder, pairs):
    """IR: byte-pair vectors P_s (<32 x i8>, lane pair g = positions 2s, 2s + 1 of group g) for
    s < 8 -> the chunk's 8 vectors in pair layout order."""
    out = []
    for j in range(4):
        a, b = pairs[2 * j], pairs[2 * j + 1]
        out += [builder.shuffle_vector(a, b, _mask(list(range(16)) + list(range(32, 48)))),
                builder.shuffle_vector(a, b, _mask(list(range(16, 32)) + list(range(48, 64))))]
    return out


def _code_pairs(builder, pcode, step, bits, mask, overread=False):
    """IR: the chunk's codes at pcode (sections `step` bytes apart) as 8 byte vectors in pair
    layout order (_section_pairs); the tail chunk's sections are loaded under `mask`."""
    i64 = ir.IntType(64)
    if mask is None:
        def section(k):
            return builder.load(_gep(builder, pcode, ir.Constant(i64, 16 * k), _I8), typ=_V16I8, align=1)

        def two_sections(j):            # one 32-byte load
            return builder.load(_gep(builder, pcode, ir.Constant(i64, 32 * j), _I8), typ=_V32I8, align=1)
    else:
        def section(k):
            return _load_bytes(builder, _gep(builder, pcode, builder.mul(step, ir.Constant(i64, k)), _I8), mask,
                               _I8, overread)

        def two_sections(j):
            return builder.shuffle_vector(section(2 * j), section(2 * j + 1), _mask(range(32)))
    return _section_pairs(builder, bits, section, two_sections)


def _section_pairs(builder, bits, section, two_sections):
    """IR: a chunk's code bytes in pair layout order (8 vectors) from its sections: section(k)
    <16 x i8> (byte = group), two_sections(j) sections 2j, 2j + 1 as one <32 x i8>. Shifts, masks
    and byte unpacks (4 bit: two sections a vector; 2 and 3 bit: one section holds the low bits
    of 4 positions)."""
    k8 = lambda ty, v: ir.Constant(ty, [v] * ty.count)          # noqa: E731
    out = []
    if bits == 4:
        for j in range(4):
            v = two_sections(j)
            lo = builder.and_(v, k8(_V32I8, 15))
            hi = builder.and_(builder.lshr(v, k8(_V32I8, 4)), k8(_V32I8, 15))
            out += [builder.shuffle_vector(lo, hi, _mask(_UNPACK_LO)), builder.shuffle_vector(lo, hi, _mask(_UNPACK_HI))]
        return out
    v16 = _V16I8
    high = [section(4 + h) for h in range(2)] if bits == 3 else None
    for j in range(4):              # section j: positions 4j + i at bits 2i
        v = section(j)
        p = [builder.and_(builder.lshr(v, k8(v16, 2 * i)) if i else v, k8(v16, 3)) for i in range(4)]
        if bits == 3:               # bit 2 of position t: bit t mod 8 of section 4 + t // 8
            for i in range(4):
                h, k = high[j // 2], (4 * j + i) % 8
                h = builder.shl(h, k8(v16, 2 - k)) if k < 2 else builder.lshr(h, k8(v16, k - 2)) if k > 2 else h
                p[i] = builder.or_(p[i], builder.and_(h, k8(v16, 4)))
        a = builder.shuffle_vector(p[0], p[2], _mask(range(32)))
        b = builder.shuffle_vector(p[1], p[3], _mask(range(32)))
        out += [builder.shuffle_vector(a, b, _mask(_UNPACK_LO)), builder.shuffle_vector(a, b, _mask(_UNPACK_HI))]
    return out


def _chunk_dot(builder, a, pxc, R):
    """IR: dx · Σ_t q[r][t] · x8[t] <16 x float> per row r < R (lane = group): a[r] the row's code
    bytes in pair layout, the chunk's prepared activations at pxc; the integer sums are exact in
    i16 (16·15·127 < 2^15)."""
    acc = [[None, None] for _ in range(R)]
    for v in range(8):
        xp = builder.load(_gep(builder, pxc, ir.Constant(ir.IntType(64), 32 * v), _I8), typ=_V32I8, align=1)
        for r in range(R):
            p = byte_pair_dot(builder, a[r][v], xp)
            acc[r][v % 2] = p if acc[r][v % 2] is None else builder.add(acc[r][v % 2], p)
    dx = _vload(builder, pxc, XC_DX)
    out = []
    for lo, hi in acc:          # L lanes: groups 0-7 twice, H lanes: groups 8-15 twice
        s = builder.add(builder.shuffle_vector(lo, hi, _mask(list(range(8)) + list(range(16, 24)))),
                        builder.shuffle_vector(lo, hi, _mask(list(range(8, 16)) + list(range(24, 32)))))
        out.append(builder.fmul(builder.sitofp(s, _V16F32), dx, flags=_FAST))
    return out


def _scaled(builder, dot, s, z, xsv):
    """IR: s·(Σ q x − z·Σ x) = Σ s(q − z)x per lane."""
    return builder.fmul(s, builder.fsub(dot, builder.fmul(z, xsv, flags=_FAST), flags=_FAST), flags=_FAST)


def _rows_ir(builder, pcs, pss, psfs, px, pos, G, bits, smask, sshift, full=True, tail=True, overread=False):
    """IR: *pos[r] = Σ_j W'[r, j] x'[j] (no outliers) for the R = len(pcs) rows over the full chunks
    and/or the tail chunk (without the full chunks, *pos[r] += the tail's part); the rows share
    each x load. Row r: codes at pcs[r], stat bytes at pss[r], its block's widened stats sf at
    psfs[r] (_widen_stats), result at pos[r]; px: the prepared x (_prep_x). The rows may lie
    anywhere (a matrix's consecutive rows, or flash bundles); `overread`: the tail chunk's loads
    may read 16 bytes from each section and stat start (_load_bytes)."""
    R = len(pcs)
    i64 = G.type
    acc = [cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16)) for _ in range(R)]

    def body(c, off, step, mask):
        if mask is None:   # stream the codes ahead (measured: rows of 768 bytes read in pairs otherwise
            for r in range(R):      # lose the hardware prefetcher)
                for line in range(0, 32 * bits, 64):
                    _prefetch(builder, _gep(builder, pcs[r], builder.add(off, ir.Constant(i64, PREFETCH + line)), _I8))
        a = [_code_pairs(builder, _gep(builder, pcs[r], off, _I8), step, bits, mask, overread) for r in range(R)]
        pxc = _gep(builder, px, builder.mul(c, ir.Constant(i64, XC_FLOATS)), _F32)
        dots = _chunk_dot(builder, a, pxc, R)
        xsv = _vload(builder, pxc, XC_XS)
        g0 = builder.shl(c, ir.Constant(i64, 4))
        for r in range(R):
            pcsf = _gep(builder, psfs[r], builder.mul(c, ir.Constant(i64, 64)), _F32)
            s, z = _chunk_stats(builder, _gep(builder, pss[r], g0, _I8), pcsf, mask, smask, sshift, overread)
            builder.store(builder.fadd(builder.load(acc[r]), _scaled(builder, dots[r], s, z, xsv), flags=_FAST), acc[r])

    _chunks_ir(builder, G, bits, body, full, tail)
    for r in range(R):          # no reassociation: the same tree for every row (flash bundles)
        v = _hsum(builder, builder.load(acc[r]), flags=())
        builder.store(v if full else builder.fadd(builder.load(pos[r]), v), pos[r])


def _block_rows(builder, i, R, pc0, ps0, psf, po, G, bits):
    """IR: (pcs, pss, psfs, pos) of rows i .. i + R - 1 of a stored matrix (codes at pc0, stat
    bytes at ps0, one stat block's sf at psf, out at po): the row lists _rows_ir takes."""
    i64 = G.type
    rows = [builder.add(i, ir.Constant(i64, r)) for r in range(R)]
    rowb = builder.mul(G, ir.Constant(i64, 2 * bits))
    return ([_gep(builder, pc0, builder.mul(rowb, ri), _I8) for ri in rows],
            [_gep(builder, ps0, builder.mul(G, ri), _I8) for ri in rows], [psf] * R,
            [_gep(builder, po, ri, _F32) for ri in rows])


def _packed_tail_ir(builder, w, pcs, pss, psfs, px, pos, G, bits, smask, sshift):
    """IR: *pos[p] += the tail chunk's part of row p for the P = 16 // w rows (lists as _rows_ir),
    the rows packed into the lanes (lane p·w + k = row p, group g0 + k): one chunk's work for
    16 // w rows instead of one each. Tail x replicated per row slot at chunk nfull + 1 of xc, and
    each row's tail stats likewise in its sf (_widen_stats); rows of different stat blocks take
    their lanes from their own sf."""
    P = 16 // w
    i64 = G.type
    nfull = builder.ashr(G, ir.Constant(i64, 4))
    off = builder.mul(nfull, ir.Constant(i64, 32 * bits))
    g0 = builder.shl(nfull, ir.Constant(i64, 4))
    nb = 2 * bits * w                   # a row's tail chunk: 2·bits sections of w bytes
    blobs = [builder.load(_gep(builder, pc, off, _I8), typ=ir.VectorType(_I8, nb), align=1) for pc in pcs]
    while len(blobs) > 1:               # concatenate: <P·nb x i8>
        blobs = [builder.shuffle_vector(blobs[k], blobs[k + 1], _mask(range(2 * blobs[k].type.count)))
                 for k in range(0, len(blobs), 2)]
    cat = blobs[0]
    lanes = lambda k: [p * nb + k * w + g for p in range(P) for g in range(w)]      # noqa: E731  section k
    a = _section_pairs(builder, bits, lambda k: builder.shuffle_vector(cat, cat, _vi(lanes(k))),
                       lambda j: builder.shuffle_vector(cat, cat, _mask(lanes(2 * j) + lanes(2 * j + 1))))
    pxc = _gep(builder, px, builder.mul(builder.add(nfull, ir.Constant(i64, 1)), ir.Constant(i64, XC_FLOATS)), _F32)
    dot = _chunk_dot(builder, [a], pxc, 1)[0]
    iw = ir.IntType(8 * w)              # a row's w stat bytes as one integer
    st = ir.Constant(ir.VectorType(iw, P), ir.Undefined)
    for p, ps in enumerate(pss):
        v = builder.load(_gep(builder, ps, g0, _I8), typ=iw, align=1)
        st = builder.insert_element(st, v, ir.Constant(_I32, p))
    f = builder.zext(builder.bitcast(st, _V16I8), _V16I32)
    csf = builder.mul(builder.add(nfull, ir.Constant(i64, 1)), ir.Constant(i64, 64))
    sf = []
    for k in range(4):
        v = _vload(builder, _gep(builder, psfs[0], csf, _F32), 16 * k)
        for p in range(1, P):
            if psfs[p] is not psfs[0]:      # lanes of row slot p from row p's own block
                lanes = ir.Constant(_V16I1, [lane // w == p for lane in range(16)])
                v = builder.select(lanes, _vload(builder, _gep(builder, psfs[p], csf, _F32), 16 * k), v)
        sf.append(v)
    s, z = _scale_zero(builder, f, None, smask, sshift, sf)
    part = _scaled(builder, dot, s, z, _vload(builder, pxc, XC_XS))
    # a row's sum must not depend on its slot (flash bundles): the slots' lanes are summed as one
    # vector, lane p = row p, the same instructions for every slot whatever LLVM reorders
    cols = [builder.shuffle_vector(part, part, _mask([p * w + k for p in range(P)])) for k in range(w)]
    v = cols[0]
    for col in cols[1:]:
        v = builder.fadd(v, col)
    for p, po in enumerate(pos):
        builder.store(builder.fadd(builder.load(po), builder.extract_element(v, ir.Constant(_I32, p))), po)


def _overread_end(builder, context, codes_ty, codes, G, first, end):
    """IR: the end of the rows first..end-1 whose tail chunk may be loaded with `overread`
    (_load_bytes): the 16 - w bytes read past a row's codes and stat bytes (w = G mod 16) lie in
    the rows after it, so all but the matrix's last ceil((16 - w) / G) rows."""
    i64 = G.type
    d = builder.extract_value(context.make_array(codes_ty)(context, builder, codes).shape, 0)
    over = builder.sub(ir.Constant(i64, 16), builder.and_(G, ir.Constant(i64, 15)))
    safe = builder.sub(d, builder.sdiv(builder.add(over, builder.sub(G, ir.Constant(i64, 1))), G))
    return _imin(builder, _imax(builder, safe, first), end)


def _imin(builder, a, b):
    return builder.select(builder.icmp_signed("<", a, b), a, b)


def _imax(builder, a, b):
    return builder.select(builder.icmp_signed(">", a, b), a, b)


def _prefetch(builder, p):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        ir.VoidType(), [ir.PointerType(), _I32, _I32, _I32]), "llvm.prefetch.p0")
    builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


@intrinsic(prefer_literal=True)
def _dot_block(typingctx, codes, stq, xc, sf, out, i0, i1, G, sbits, bits):
    """out[i] = Σ_j W'[i, j] x'[j] without outliers for rows i0 <= i < i1 of one stat block:
    codes, stq as stored (G groups), xc (C + 1, XC_FLOATS) prepared x (_prep_x), sf (C + 1, 4, 16) the block's
    stats widened by _widen_stats. Full chunks _rows_sharing_x() rows at a time; then a tail chunk of w = 4 or 8
    groups packed 16 // w rows per vector, any other tail one row at a time (_overread_end)."""
    def codegen(context, builder, sig, args):
        i0_v, i1_v, G_v, sbits_v, bits_v = args[5:]
        i64 = G_v.type
        pc, ps, px, psf, po = [_data(context, builder, sig.args[k], args[k]) for k in range(5)]
        smask, sshift = _stat_consts(builder, sbits_v)

        def row_groups(R, start, fn, end=i1_v):
            """fn(i) for i = start, start + R, ... while i + R <= end; returns the first row left."""
            n = builder.sdiv(builder.sub(end, start), ir.Constant(i64, R))
            with cgutils.for_range(builder, n) as loop:
                fn(builder.add(start, builder.mul(loop.index, ir.Constant(i64, R))))
            return builder.add(start, builder.mul(n, ir.Constant(i64, R)))

        def emit(bits):
            # full chunks, then the tail chunk: packed rows first, single rows for what is left
            def rows(i, R, fn, **kw):
                pcs, pss, psfs, pos = _block_rows(builder, i, R, pc, ps, psf, po, G_v, bits)
                fn(pcs, pss, psfs, px, pos, G_v, bits, smask, sshift, **kw)

            R = _rows_sharing_x()
            rest = row_groups(R, i0_v, lambda i: rows(i, R, lambda *a: _rows_ir(builder, *a, tail=False)))
            if R > 1:
                row_groups(1, rest, lambda i: rows(i, 1, lambda *a: _rows_ir(builder, *a, tail=False)))
            w = builder.and_(G_v, ir.Constant(i64, 15))
            start = cgutils.alloca_once_value(builder, i0_v)
            for wc in (4, 8):
                with builder.if_then(builder.icmp_signed("==", w, ir.Constant(i64, wc))):
                    builder.store(row_groups(16 // wc, i0_v, lambda i, wc=wc: rows(
                        i, 16 // wc, lambda *a: _packed_tail_ir(builder, wc, *a))), start)
            with builder.if_then(builder.icmp_signed("!=", w, ir.Constant(i64, 0))):
                tail = lambda **kw: lambda i: rows(i, 1, lambda *a: _rows_ir(builder, *a, full=False, **kw))  # noqa: E731
                first = builder.load(start)
                safe = _overread_end(builder, context, sig.args[0], args[0], G_v, first, i1_v)
                row_groups(1, row_groups(1, first, tail(overread=True), safe), tail())

        switch_on_bits(builder, bits_v, (2, 3, 4), emit, sig.args[9])
        return context.get_dummy_value()

    return types.none(codes, stq, xc, sf, out, i0, i1, G, sbits, bits), codegen


def _mm_tile_ir(builder, R, K, i, t, pc0, ps0, px, xstride, psf, po, d, G, bits, smask, sshift,
                full=True, tail=True, overread=False):
    """IR: po[(t + k)·d + i + r] = Σ_j W'[i + r, j] x'_{t + k}[j] (no outliers) for r < R rows and
    k < K tokens over the full chunks and/or the tail chunk (without the full chunks, +=
    the tail's part): each chunk's codes and stats are unpacked once for the K tokens, each
    token's x load serves the R rows. px: xc of token 0, xstride floats apart."""
    i64 = G.type
    rowb = builder.mul(G, ir.Constant(i64, 2 * bits))
    rows = [builder.add(i, ir.Constant(i64, r)) for r in range(R)]
    pcs = [_gep(builder, pc0, builder.mul(rowb, ri), _I8) for ri in rows]
    pss = [_gep(builder, ps0, builder.mul(G, ri), _I8) for ri in rows]
    toks = [builder.add(t, ir.Constant(i64, k)) for k in range(K)]
    pxs = [_gep(builder, px, builder.mul(xstride, tk), _F32) for tk in toks]
    v8 = ir.VectorType(_F32, 8)         # 8-lane sums: half the accumulator registers
    acc = [[cgutils.alloca_once_value(builder, ir.Constant(v8, [0.0] * 8)) for _ in range(K)] for _ in range(R)]

    def body(c, off, step, mask):
        a = [_code_pairs(builder, _gep(builder, pcs[r], off, _I8), step, bits, mask, overread) for r in range(R)]
        pcsf = _gep(builder, psf, builder.mul(c, ir.Constant(i64, 64)), _F32)
        g0 = builder.shl(c, ir.Constant(i64, 4))
        sz = [_chunk_stats(builder, _gep(builder, pss[r], g0, _I8), pcsf, mask, smask, sshift, overread)
              for r in range(R)]
        for k in range(K):
            pxc = _gep(builder, pxs[k], builder.mul(c, ir.Constant(i64, XC_FLOATS)), _F32)
            dots = _chunk_dot(builder, a, pxc, R)
            xsv = _vload(builder, pxc, XC_XS)
            for r in range(R):
                s, z = sz[r]
                v = _scaled(builder, dots[r], s, z, xsv)
                v = builder.fadd(_lanes(builder, v, 0, 8), _lanes(builder, v, 8, 8), flags=_FAST)
                builder.store(builder.fadd(builder.load(acc[r][k]), v, flags=_FAST), acc[r][k])

    _chunks_ir(builder, G, bits, body, full, tail)
    for r in range(R):
        for k in range(K):
            v = _hsum(builder, builder.shuffle_vector(builder.load(acc[r][k]), ir.Constant(v8, [0.0] * 8),
                                                      _mask(range(16))))
            p = _gep(builder, po, builder.add(builder.mul(toks[k], d), rows[r]), _F32)
            builder.store(v if full else builder.fadd(builder.load(p), v, flags=_FAST), p)


@intrinsic(prefer_literal=True)
def _mm_block(typingctx, codes, stq, xc, sf, out, i0, i1, t0, t1, G, sbits, bits):
    """out[t, i] = Σ_j W'[i, j] x'_t[j] without outliers for rows i0 <= i < i1 of one stat block
    and tokens t0 <= t < t1: xc (T, C + 1, XC_FLOATS) the tokens' prepared x (_prep_x), sf as in
    _dot_block, out (T, d). MM_ROWS rows x MM_TOKENS tokens at a time, then what is left of
    either one at a time."""
    def codegen(context, builder, sig, args):
        i0_v, i1_v, t0_v, t1_v, G_v, sbits_v, bits_v = args[5:]
        i64 = G_v.type
        pc, ps, px, psf, po = [_data(context, builder, sig.args[k], args[k]) for k in range(5)]
        xarr = context.make_array(sig.args[2])(context, builder, args[2])
        oarr = context.make_array(sig.args[4])(context, builder, args[4])
        xstride = builder.mul(builder.extract_value(xarr.shape, 1), builder.extract_value(xarr.shape, 2))
        d = builder.extract_value(oarr.shape, 1)
        smask, sshift = _stat_consts(builder, sbits_v)

        def groups(step, start, end, fn):
            """fn(i) for i = start, start + step, ... while i + step <= end; returns the first left."""
            n = builder.sdiv(builder.sub(end, start), ir.Constant(i64, step))
            with cgutils.for_range(builder, n) as loop:
                fn(builder.add(start, builder.mul(loop.index, ir.Constant(i64, step))))
            return builder.add(start, builder.mul(n, ir.Constant(i64, step)))

        def emit(bits):
            def rows(R, i, full=True, tail=False, overread=False):
                tile = lambda K: lambda t: _mm_tile_ir(builder, R, K, i, t, pc, ps, px, xstride, psf, po, d,  # noqa: E731
                                                       G_v, bits, smask, sshift, full, tail, overread)
                groups(1, groups(MM_TOKENS, t0_v, t1_v, tile(MM_TOKENS)), t1_v, tile(1))
            # full chunks, then the tail chunk as _dot_block does it: rows packed 16 // w to a
            # vector for tails of w = 4 or 8 groups (one token at a time), the rest one row at a
            # time (_overread_end)
            groups(1, groups(MM_ROWS, i0_v, i1_v, lambda i: rows(MM_ROWS, i)), i1_v, lambda i: rows(1, i))
            w = builder.and_(G_v, ir.Constant(i64, 15))
            start = cgutils.alloca_once_value(builder, i0_v)
            for wc in (4, 8):
                with builder.if_then(builder.icmp_signed("==", w, ir.Constant(i64, wc))):
                    def packed(t, wc=wc):
                        tok = lambda p, n: _gep(builder, p, builder.mul(t, n), _F32)    # noqa: E731
                        def tail(i, wc=wc):
                            pcs, pss, psfs, pos = _block_rows(builder, i, 16 // wc, pc, ps, psf, tok(po, d), G_v, bits)
                            _packed_tail_ir(builder, wc, pcs, pss, psfs, tok(px, xstride), pos, G_v, bits, smask,
                                            sshift)
                        builder.store(groups(16 // wc, i0_v, i1_v, tail), start)
                    groups(1, t0_v, t1_v, packed)
            with builder.if_then(builder.icmp_signed("!=", w, ir.Constant(i64, 0))):
                first = builder.load(start)
                safe = _overread_end(builder, context, sig.args[0], args[0], G_v, first, i1_v)
                groups(1, groups(1, first, safe, lambda i: rows(1, i, full=False, tail=True, overread=True)),
                       i1_v, lambda i: rows(1, i, full=False, tail=True))

        switch_on_bits(builder, bits_v, (2, 3, 4), emit, sig.args[11])
        return context.get_dummy_value()

    return types.none(codes, stq, xc, sf, out, i0, i1, t0, t1, G, sbits, bits), codegen


def _row_ptr(context, builder, ty, arr, i):
    """IR: pointer to row i of a Numba array argument (its first stride times i past its data)."""
    a = context.make_array(ty)(context, builder, arr)
    stride = cgutils.unpack_tuple(builder, a.strides, ty.ndim)[0]
    return _gep(builder, a.data, builder.mul(i, stride), _I8)


@intrinsic(prefer_literal=True)
def _dot_rows(typingctx, wa, wb, cs, coff, soff, xc, sf, blks, out, G, sbits, bits):
    """out[r] = Σ_j W'[r, j] x'[j] without outliers for R = len(cs) rows that lie anywhere (the
    flash layout's bundles, formats/flash-layout.md § spqr): row r is row cs[r] of wa when
    cs[r] >= 0, else row -1 - cs[r] of wb (uint8 arrays); its codes start at byte coff of that row
    and its stat bytes at soff; its block's stats widened by _widen_stats are sf[blks[r]]; xc as
    in _dot_block. The same arithmetic as _dot_block: full chunks 2 rows at a time; a tail
    chunk of w = 4 or 8 groups packed 16 // w rows per vector, any other tail one row at a time
    with masked loads. (Row indices, not array views: a view per row costs reference counting
    comparable to the row's arithmetic.)"""
    if not (isinstance(cs, types.UniTuple) and isinstance(blks, types.UniTuple) and cs.count == blks.count):
        return None
    R = cs.count

    def codegen(context, builder, sig, args):
        wa_v, wb_v, cs_v, coff_v, soff_v, xc_v, sf_v, blks_v, out_v, G_v, sbits_v, bits_v = args
        i64 = G_v.type
        base = []
        for c in cgutils.unpack_tuple(builder, cs_v, R):
            neg = builder.icmp_signed("<", c, ir.Constant(i64, 0))
            pa = _row_ptr(context, builder, sig.args[0], wa_v, builder.select(neg, ir.Constant(i64, 0), c))
            pb = _row_ptr(context, builder, sig.args[1], wb_v, builder.select(neg, builder.sub(ir.Constant(i64, -1), c),
                                                                             ir.Constant(i64, 0)))
            base.append(builder.select(neg, pb, pa))
        pcs = [_gep(builder, b, coff_v, _I8) for b in base]
        pss = [_gep(builder, b, soff_v, _I8) for b in base]
        psfs = [builder.bitcast(_row_ptr(context, builder, sig.args[6], sf_v, b), ir.PointerType())
                for b in cgutils.unpack_tuple(builder, blks_v, R)]
        px = _data(context, builder, sig.args[5], xc_v)
        po = _data(context, builder, sig.args[8], out_v)
        pos = [_gep(builder, po, ir.Constant(i64, r), _F32) for r in range(R)]
        smask, sshift = _stat_consts(builder, sbits_v)

        def emit(bits):
            # rows in pairs on every ISA (not _rows_sharing_x): four one-row loops in one function
            # rounded differently by position, and a bundle's floats must not depend on its call
            for r0 in range(0, R, 2):
                sl = slice(r0, min(R, r0 + 2))
                _rows_ir(builder, pcs[sl], pss[sl], psfs[sl], px, pos[sl], G_v, bits, smask, sshift, tail=False)
            w = builder.and_(G_v, ir.Constant(i64, 15))
            is_packed = builder.or_(builder.icmp_signed("==", w, ir.Constant(i64, 4)),
                                    builder.icmp_signed("==", w, ir.Constant(i64, 8)))
            with builder.if_else(is_packed) as (then, otherwise):
                with then:
                    # rows short of a full pack repeat the last row into a discarded output, so a
                    # row's floats do not depend on how many rows share its call (every streaming
                    # mode computes the same floats as the resident bundles)
                    spare = cgutils.alloca_once(builder, _F32)
                    for wc in (4, 8):
                        P = 16 // wc
                        with builder.if_then(builder.icmp_signed("==", w, ir.Constant(i64, wc))):
                            for r0 in range(0, R, P):
                                sl = slice(r0, r0 + P)
                                pad = P - len(pcs[sl])
                                _packed_tail_ir(builder, wc, pcs[sl] + pcs[-1:] * pad, pss[sl] + pss[-1:] * pad,
                                                psfs[sl] + psfs[-1:] * pad, px, pos[sl] + [spare] * pad, G_v, bits,
                                                smask, sshift)
                with otherwise:
                    with builder.if_then(builder.icmp_signed("!=", w, ir.Constant(i64, 0))):
                        for r in range(R):
                            _rows_ir(builder, pcs[r:r + 1], pss[r:r + 1], psfs[r:r + 1], px, pos[r:r + 1], G_v,
                                     bits, smask, sshift, full=False)

        switch_on_bits(builder, bits_v, (2, 3, 4), emit, sig.args[11])
        return context.get_dummy_value()

    return types.none(wa, wb, cs, coff, soff, xc, sf, blks, out, G, sbits, bits), codegen


_INTERLEAVE = [b for k in range(16) for b in (k, 16 + k)]


def _column_dots(builder, pcs, xpairs, bits):
    """IR: for 16 columns (neurons) whose codes of one chunk (16 groups of 16 output rows, 2·bits
    sections of 16 bytes) are at pcs[u], with int8 activations paired as xpairs[v] = (x8[2v],
    x8[2v + 1]) in every byte pair: the 16 vectors <16 x i16> D_t, lane k = Σ_u q_u[16k + t]·x8[u]
    (output row 16(g0 + k) + t). Exact in i16 (16·15·127 < 2^15). Two columns' codes of the same
    output row go into one byte pair, so each vpmaddubsw (isa.byte_pair_dot) does 32 weights, as
    in the row dot (_chunk_dot)."""
    i64 = ir.IntType(64)
    k8 = lambda v: ir.Constant(_V32I8, [v] * 32)      # noqa: E731

    def sections(p, j):         # sections 2j, 2j + 1 as one <32 x i8>
        return builder.load(_gep(builder, p, ir.Constant(i64, 32 * j), _I8), typ=_V32I8, align=1)

    if bits == 4:
        # sections 2j, 2j + 1 hold positions 4j, 4j + 1 (lo, hi nibble, groups 0-15) then 4j + 2,
        # 4j + 3: in-lane byte unpacks of two columns' nibbles give pairs of positions
        # (4j | 4j + 2) x groups (0-7 | 8-15), reordered once after the 8 column pairs
        out = [None] * 16
        for j in range(4):
            acc = [None] * 4
            for v in range(8):
                ld = [sections(pcs[2 * v + e], j) for e in range(2)]
                lo = [builder.and_(a, k8(15)) for a in ld]
                hi = [builder.and_(builder.lshr(a, k8(4)), k8(15)) for a in ld]
                prs = [builder.shuffle_vector(lo[0], lo[1], _mask(_UNPACK_LO)),
                       builder.shuffle_vector(lo[0], lo[1], _mask(_UNPACK_HI)),
                       builder.shuffle_vector(hi[0], hi[1], _mask(_UNPACK_LO)),
                       builder.shuffle_vector(hi[0], hi[1], _mask(_UNPACK_HI))]
                for m in range(4):
                    p = byte_pair_dot(builder, prs[m], xpairs[v])
                    acc[m] = p if acc[m] is None else builder.add(acc[m], p)
            first, second = _mask(list(range(8)) + list(range(16, 24))), _mask(list(range(8, 16)) + list(range(24, 32)))
            for m, t in ((0, 4 * j), (2, 4 * j + 1)):
                out[t] = builder.shuffle_vector(acc[m], acc[m + 1], first)
                out[t + 2] = builder.shuffle_vector(acc[m], acc[m + 1], second)
        return out
    out = [None] * 16
    for v in range(8):
        q = [[builder.trunc(c, _V16I8) for c in _codes(builder, pcs[2 * v + e], ir.Constant(i64, 16), bits, None,
                                                        _I16, False)]
             for e in range(2)]
        for t in range(16):
            p = byte_pair_dot(builder, builder.shuffle_vector(q[0][t], q[1][t], _mask(_INTERLEAVE)), xpairs[v])
            out[t] = p if out[t] is None else builder.add(out[t], p)
    return out


@intrinsic(prefer_literal=True)
def _dot_columns(typingctx, addr, x8, dx, xs, stq, st, acc, G, sbits, bits):
    """acc[t, gi] += Σ_j W[16gi + t, j]·dx[j >> 4]·x8[j] (no outliers) for a matrix stored by
    columns (the flash layout's down column of a bundle: one spqr codes row over the d output
    rows, formats/flash-layout.md § spqr): column j's codes at address addr[j], int8 activations
    x8 (16·Gf,) with steps dx (Gf,) and xs = dx·Σ_t x8 per group of 16 columns (as _prep_x); the
    group's stats in output-row lanes, zero-padded to Gp = 16·ceil(G / 16) lanes: stat bytes stq
    (Gf, 16, Gp) [g, t, gi] and the fp16 block stats of row 16gi + t, st (Gf, 4, T, Gp) [g, plane,
    t, gi] with T = 1 when stat_group is a multiple of 16 (a block holds whole groups of 16 rows),
    else T = 16; acc (16, Gp) float32. A group whose x8 are all zero is skipped. Per group and
    chunk of 256 output rows: 8 column pairs of vpmaddubsw into i16 (_column_dots), then the 16
    output-row groups' scales and zeros once, as in the row dot (_rows_ir)."""
    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        pa, px8, pdx, pxs, pq, pst, pacc = [_data(context, builder, sig.args[k], args[k]) for k in range(7)]
        G_v, sbits_v, bits_v = args[7:]
        smask, sshift = _stat_consts(builder, sbits_v)
        Gf = builder.udiv(context.make_array(sig.args[1])(context, builder, args[1]).nitems, ir.Constant(i64, 16))
        Gp = builder.shl(builder.ashr(builder.add(G_v, ir.Constant(i64, 15)), ir.Constant(i64, 4)), ir.Constant(i64, 4))
        sh = cgutils.unpack_tuple(builder, context.make_array(sig.args[5])(context, builder, args[5]).shape, 4)
        T = sh[2]
        w = builder.and_(G_v, ir.Constant(i64, 15))

        def emit(bits):
            nsec = 2 * bits
            # the tail chunk's sections of the 16 columns, copied into whole 16-byte sections
            # (zero lanes past w): masked byte loads are scalarized on x86 (measured: the tail of 4
            # groups of d = 576 cost 8x the two full chunks); the stats arrays are padded instead
            tail = cgutils.alloca_once(builder, ir.ArrayType(_I8, 16 * nsec * 16))     # (each copy fills it)
            tails = [_gep(builder, builder.bitcast(tail, ir.PointerType()), ir.Constant(i64, u * nsec * 16), _I8)
                     for u in range(16)]

            def copy_tail(cols, off):
                done = builder.append_basic_block("tail_done")
                sw = builder.switch(w, done)
                for wc in range(1, 16):
                    bb = builder.append_basic_block(f"tail{wc}")
                    sw.add_case(ir.Constant(i64, wc), bb)
                    builder.position_at_end(bb)
                    vt, v2 = ir.VectorType(_I8, wc), ir.VectorType(_I8, 2 * wc)
                    spread = _mask([k if k < wc else k - 16 + wc if 16 <= k < 16 + wc else 2 * wc
                                    for k in range(32)])       # 2wc: a lane of the zero vector
                    for u in range(16):
                        for sec in range(0, nsec, 2):     # two sections a store, as _column_dots loads them
                            lo, hi = [builder.load(_gep(builder, cols[u], builder.add(
                                off, ir.Constant(i64, (sec + e) * wc)), _I8), typ=vt, align=1) for e in range(2)]
                            v = builder.shuffle_vector(builder.shuffle_vector(lo, hi, _mask(range(2 * wc))),
                                                       ir.Constant(v2, None), spread)
                            builder.store(v, builder.bitcast(_gep(builder, tails[u], ir.Constant(i64, 16 * sec), _I8),
                                                             _V32I8.as_pointer()), align=1)
                    builder.branch(done)
                builder.position_at_end(done)

            with cgutils.for_range(builder, Gf) as loop:
                g = loop.index
                x16 = builder.load(_gep(builder, px8, builder.shl(g, ir.Constant(i64, 4)), _I8), typ=ir.IntType(128),
                                   align=1)
                with builder.if_then(builder.icmp_unsigned("!=", x16, ir.Constant(ir.IntType(128), 0))):
                    xv = builder.bitcast(x16, ir.VectorType(_I16, 8))
                    xpairs = [builder.bitcast(_splat(builder, builder.extract_element(xv, ir.Constant(_I32, v))),
                                              _V32I8) for v in range(8)]
                    col0 = builder.shl(g, ir.Constant(i64, 4))
                    cols = [builder.inttoptr(builder.load(_gep(builder, pa, builder.add(col0, ir.Constant(i64, u)),
                                                               i64)), ir.PointerType()) for u in range(16)]
                    dxg = _splat(builder, builder.load(_gep(builder, pdx, g, _F32)))
                    xsg = _splat(builder, builder.load(_gep(builder, pxs, g, _F32)))
                    pqg = _gep(builder, pq, builder.mul(g, builder.shl(Gp, ir.Constant(i64, 4))), _I8)
                    psg = _gep(builder, pst, builder.mul(g, builder.mul(Gp, builder.shl(T, ir.Constant(i64, 2)))), _I16)

                    def body(c, off, step, mask):
                        g0 = builder.shl(c, ir.Constant(i64, 4))
                        if mask is None:
                            pcs = [_gep(builder, p, off, _I8) for p in cols]
                        else:
                            copy_tail(cols, off)
                            pcs = tails
                        dots = _column_dots(builder, pcs, xpairs, bits)

                        def block_stats(t):      # (4, 16) widened block stats of position t (plane m at m·T + t)
                            return [half_to_float(builder, builder.load(_gep(builder, psg, builder.add(builder.mul(
                                Gp, builder.add(builder.mul(T, ir.Constant(i64, m)), ir.Constant(i64, t))), g0), _I16),
                                typ=_V16I16, align=2)) for m in range(4)]

                        def accumulate(sf_of):
                            for t in range(16):
                                qb = _load_bytes(builder, _gep(builder, pqg, builder.add(builder.mul(
                                    Gp, ir.Constant(i64, t)), g0), _I8), None)
                                s, z = _scale_zero(builder, qb, None, smask, sshift, sf_of(t))
                                v = _scaled(builder, builder.fmul(builder.sitofp(dots[t], _V16F32), dxg, flags=_FAST),
                                            s, z, xsg)
                                pa_t = builder.bitcast(_gep(builder, pacc, builder.add(builder.mul(
                                    Gp, ir.Constant(i64, t)), g0), _F32), _V16F32.as_pointer())
                                builder.store(builder.fadd(builder.load(pa_t, align=4), v, flags=_FAST), pa_t, align=4)

                        with builder.if_else(builder.icmp_signed("==", T, ir.Constant(i64, 1))) as (one, per_t):
                            with one:           # stat_group a multiple of 16: one block per 16 output rows
                                sf = block_stats(0)
                                accumulate(lambda t: sf)
                            with per_t:
                                accumulate(block_stats)
                    _chunks_ir(builder, G_v, bits, body)

        switch_on_bits(builder, bits_v, (2, 3, 4), emit, sig.args[9])
        return context.get_dummy_value()

    return types.none(addr, x8, dx, xs, stq, st, acc, G, sbits, bits), codegen


@intrinsic
def _widen_stats(typingctx, st2, rb, G, sf):
    """sf (C + 1, 4, 16) float32 = fp16 stats st2 (R, 4, G) of row block rb, chunk-major (lanes
    past G are 0), and for a tail of w = 4 or 8 groups its lanes repeated 16 // w times at chunk
    C (the packed tail's): what the kernels read per chunk, decoded once per stat block."""
    def codegen(context, builder, sig, args):
        st_v, rb_v, G_v, sf_v = args
        i64 = G_v.type
        pst = _gep(builder, _data(context, builder, sig.args[0], st_v),
                   builder.mul(rb_v, builder.mul(G_v, ir.Constant(i64, 4))), _I16)
        psf = _data(context, builder, sig.args[3], sf_v)
        load = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            _V16I16, [ir.PointerType(), _V16I1, _V16I16]), "llvm.masked.load.v16i16.p0")
        nfull = builder.ashr(G_v, ir.Constant(i64, 4))
        w = builder.and_(G_v, ir.Constant(i64, 15))

        def chunk(c, mask):
            g0 = builder.shl(c, ir.Constant(i64, 4))
            for k in range(4):
                p = _gep(builder, pst, builder.add(builder.mul(G_v, ir.Constant(i64, k)), g0), _I16)
                if mask is None:
                    h = builder.load(p, typ=_V16I16, align=2)
                else:       # a masked load is a branch per lane before AVX-512: the tail chunk only
                    h = builder.call(load, [p, mask, ir.Constant(_V16I16, [0] * 16)])
                v = half_to_float(builder, h)
                dst = _gep(builder, psf, builder.add(builder.shl(c, ir.Constant(i64, 6)), ir.Constant(i64, 16 * k)), _F32)
                builder.store(v, builder.bitcast(dst, _V16F32.as_pointer()), align=4)
        with cgutils.for_range(builder, nfull) as loop:
            chunk(loop.index, None)
        with builder.if_then(builder.icmp_signed("!=", w, ir.Constant(i64, 0))):
            chunk(nfull, _lanes_below(builder, w))
        for wc in (4, 8):
            with builder.if_then(builder.icmp_signed("==", w, ir.Constant(i64, wc))):
                src = _gep(builder, psf, builder.shl(nfull, ir.Constant(i64, 6)), _F32)
                dst = _gep(builder, src, ir.Constant(i64, 64), _F32)
                for k in range(4):
                    v = _vload(builder, src, 16 * k)
                    v = builder.shuffle_vector(v, v, _vi([lane % wc for lane in range(16)]))
                    builder.store(v, builder.bitcast(_gep(builder, dst, ir.Constant(i64, 16 * k), _F32),
                                                     _V16F32.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(st2, rb, G, sf), codegen


@intrinsic(prefer_literal=True)
def _decode_row(typingctx, codes, coff, stq, soff, sf, G, sbits, bits, out, ooff):
    """out.flat[ooff + t·G + g] = W'[i, 16g + t] without outliers (positions t-major, stride G);
    codes at codes.flat[coff:], stat bytes at stq.flat[soff:], sf (C, 4, 16) as in _dot_block."""
    def codegen(context, builder, sig, args):
        codes_v, coff_v, stq_v, soff_v, sf_v, G_v, sbits_v, bits_v, out_v, ooff_v = args
        pc = _gep(builder, _data(context, builder, sig.args[0], codes_v), coff_v, _I8)
        ps = _gep(builder, _data(context, builder, sig.args[2], stq_v), soff_v, _I8)
        psf = _data(context, builder, sig.args[4], sf_v)
        po = _gep(builder, _data(context, builder, sig.args[8], out_v), ooff_v, _F32)
        i64 = G_v.type
        smask, sshift = _stat_consts(builder, sbits_v)
        store = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [_V16F32, ir.PointerType(), _V16I1]), "llvm.masked.store.v16f32.p0")

        def emit(bits):
            def body(c, off, step, mask):
                g0 = builder.shl(c, ir.Constant(i64, 4))
                q = _codes(builder, _gep(builder, pc, off, _I8), step, bits, mask)
                s, z = _chunk_stats(builder, _gep(builder, ps, g0, _I8),
                                    _gep(builder, psf, builder.mul(c, ir.Constant(i64, 64)), _F32),
                                    mask, smask, sshift)
                sz = builder.fmul(s, z, flags=_FAST)
                for t in range(16):
                    v = builder.fsub(builder.fmul(s, q[t], flags=_FAST), sz, flags=_FAST)
                    p = _gep(builder, po, builder.add(builder.mul(G_v, ir.Constant(i64, t)), g0), _F32)
                    if mask is None:
                        builder.store(v, builder.bitcast(p, _V16F32.as_pointer()), align=4)
                    else:               # the tail must not write into position t + 1
                        builder.call(store, [v, builder.bitcast(p, ir.PointerType()), mask])
            _chunks_ir(builder, G_v, bits, body)

        switch_on_bits(builder, bits_v, (2, 3, 4), emit, sig.args[7])
        return context.get_dummy_value()

    return types.none(codes, coff, stq, soff, sf, G, sbits, bits, out, ooff), codegen


def _x_index(perm: np.ndarray, G: int) -> np.ndarray:
    """Where each prepared activation comes from: (C + 1, 16, 16), entry [c, t, k] = the input
    column of xc[c, t, k] (see _prep_x) or PAD_INDEX for zero padding; uint16 (as perm) when
    n < 65535, else int32. Chunk C is the packed tail's (a tail of w = 4 or 8 groups repeated
    16 // w times, else all padding)."""
    C = -(-G // 16)
    n = perm.shape[0]
    dt = np.uint16 if n < 0xFFFF else np.int32
    pad = np.iinfo(dt).max
    j = np.arange(C * 256).reshape(C, 16, 16).transpose(0, 2, 1)        # [c, t, k] -> 256c + 16k + t
    idx = np.full((C + 1, 16, 16), pad, dt)
    idx[:C] = np.where(j < n, perm.astype(np.int64)[np.minimum(j, n - 1)], pad)
    w = G % 16
    if w in (4, 8):
        idx[C] = idx[C - 1][:, np.arange(16) % w]
    return idx


@intrinsic
def _prep_x(typingctx, x, xidx, xc):
    """xc (C + 1, XC_FLOATS) float32: the activations x[xidx[c, t, k]] (0 where xidx is its
    dtype's max) quantized as reference.quantize_activations does, one 16-lane gather per
    position: per chunk c the int8 activations in pair layout (_x8_offset), dx (floats XC_DX...)
    and dx·Σ_t x8 (floats XC_XS...)."""
    if not (isinstance(x, types.Array) and x.dtype == types.float32 and x.layout == "C"):
        return None             # the gather addresses x by its data pointer
    ib = xidx.dtype.bitwidth

    def codegen(context, builder, sig, args):
        x_v, idx_v, xc_v = args
        i64 = ir.IntType(64)
        px = _data(context, builder, sig.args[0], x_v)
        pidx = _data(context, builder, sig.args[1], idx_v)
        pxc = _data(context, builder, sig.args[2], xc_v)
        nch = builder.udiv(context.make_array(sig.args[1])(context, builder, idx_v).nitems, ir.Constant(i64, 256))
        vptr = ir.VectorType(ir.PointerType(), 16)
        gather = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            _V16F32, [vptr, _I32, _V16I1, _V16F32]), "llvm.masked.gather.v16f32.v16p0")
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F32, [_V16F32]), "llvm.fabs.v16f32")
        f = lambda v: ir.Constant(_V16F32, [v] * 16)       # noqa: E731
        v16i64 = ir.VectorType(i64, 16)
        base = _splat(builder, builder.ptrtoint(px, i64))   # llvmlite's gep takes no vector index
        with cgutils.for_range(builder, nch) as loop:
            ity = ir.IntType(ib)
            vty = ir.VectorType(ity, 16)
            src = _gep(builder, pidx, builder.shl(loop.index, ir.Constant(i64, 8)), ity)
            dst = _gep(builder, pxc, builder.mul(loop.index, ir.Constant(i64, XC_FLOATS)), _F32)
            xs, m = [], f(0.0)
            for t in range(16):
                idx = builder.load(_gep(builder, src, ir.Constant(i64, 16 * t), ity), typ=vty, align=ib // 8)
                ok = builder.icmp_unsigned("!=", idx, ir.Constant(vty, [(1 << (ib - 1 if ib == 32 else ib)) - 1] * 16))
                off = builder.shl(builder.zext(builder.select(ok, idx, ir.Constant(vty, [0] * 16)), v16i64),
                                  ir.Constant(v16i64, [2] * 16))
                ptrs = builder.inttoptr(builder.add(base, off), vptr)
                # every lane loads (padding reads x[0]) and padding becomes 0 after: with a mask
                # LLVM scalarizes the gather on AVX2 / NEON into a branch per lane (~1100
                # instructions a chunk), without one into plain loads
                g = builder.call(gather, [ptrs, ir.Constant(_I32, 4), ir.Constant(_V16I1, [1] * 16), f(0.0)])
                xs.append(builder.select(ok, g, f(0.0)))
                a = builder.call(fabs, [xs[-1]])
                m = builder.select(builder.fcmp_ordered(">", a, m), a, m)
            # no fast-math flags: the rounding must match the NumPy reference bit for bit
            inv = builder.select(builder.fcmp_ordered(">", m, f(0.0)), builder.fdiv(f(127.0), m), f(0.0))
            q8, qsum = [], ir.Constant(_V16I32, [0] * 16)
            for v in xs:
                half = builder.select(builder.fcmp_ordered("<", v, f(0.0)), f(-0.5), f(0.5))
                q = builder.fptosi(builder.fadd(builder.fmul(v, inv), half), _V16I32)
                qsum = builder.add(qsum, q)
                q8.append(builder.trunc(q, _V16I8))
            pairs = [builder.shuffle_vector(q8[2 * k], q8[2 * k + 1], _mask(j for i in range(16) for j in (i, 16 + i)))
                     for k in range(8)]
            for k, v in enumerate(_pair_layout(builder, pairs)):
                builder.store(v, builder.bitcast(_gep(builder, dst, ir.Constant(i64, 8 * k), _F32), _V32I8.as_pointer()), align=4)
            dx = builder.fdiv(m, f(127.0))
            builder.store(dx, builder.bitcast(_gep(builder, dst, ir.Constant(i64, XC_DX), _F32), _V16F32.as_pointer()), align=4)
            xsum = builder.fmul(builder.sitofp(qsum, _V16F32), dx)
            builder.store(xsum, builder.bitcast(_gep(builder, dst, ir.Constant(i64, XC_XS), _F32), _V16F32.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(x, xidx, xc), codegen


@njit(inline="always", **_JIT)
def _x8_offset(g, t):
    # byte of group g, position t in a chunk's pair layout (see _pair_layout)
    return 64 * (t >> 2) + 32 * (g >> 3) + 16 * ((t >> 1) & 1) + 2 * (g & 7) + (t & 1)


@njit(**_JIT)
def _mv_rows(bits, codes, stq, st2, orow, oc, ov, sg, sbits, xc, xb, out, r0, r1, sf):
    # SpQR W (d, n_pad) @ x (prepared in xc (C + 1, XC_FLOATS), xb its bytes) -> out[r0:r1];
    # sf (C + 1, 4, 16) scratch; outliers by row (orow, oc, ov: see SpQRLinear)
    G = stq.shape[1]
    i = r0
    while i < r1:                  # one stat block at a time: stats widened once per block
        rb = i // sg
        e = min(r1, (rb + 1) * sg)
        _widen_stats(st2, rb, G, sf)
        _dot_block(codes, stq, xc, sf, out, i, e, G, sbits, bits)
        i = e
    _add_outliers(orow, oc, ov, r0, r1, xc, xb, out)


@njit(inline="always", **_JIT)
def _add_outliers(orow, oc, ov, r0, r1, xc, xb, out):
    # out[r] += value · x' for the outliers of rows r0 <= r < r1 (row ids orow, base.outlier_rows),
    # in stored order: a row's adds in the order a per-row loop made them, the same float result
    for k in range(np.searchsorted(orow, r0), np.searchsorted(orow, r1)):
        c = np.int32(oc[k])
        ch, g, t = c >> 8, (c >> 4) & 15, c & 15
        out[orow[k]] += f16_to_f32(ov[k]) * (xc[ch, XC_DX + g] * xb[ch, _x8_offset(g, t)])


@njit(inline="always", **_JIT)
def _outliers_dot(rp, oc, ov, r, xc, xb, acc):
    # acc + Σ value · x' over the outliers of row r (CSR rp, oc, ov) with x prepared in xc (xb its
    # bytes): storage column c is chunk c >> 8, group (c >> 4) & 15, position c & 15
    for k in range(rp[r], rp[r + 1]):
        c = np.int32(oc[k])
        ch, g, t = c >> 8, (c >> 4) & 15, c & 15
        acc += f16_to_f32(ov[k]) * (xc[ch, XC_DX + g] * xb[ch, _x8_offset(g, t)])
    return acc


@functools.cache
def matvec_kernels(bits: int) -> tuple:
    """(serial, parallel) one-token matvec kernels for one bit width. `bits` is a closure
    constant, so the IR intrinsics emit only that width's code (switch_on_bits): a third of the
    compile on a cold cache (the first token waits for the serial one), each width cached apart."""

    @njit(**_JIT)
    def matvec(codes, stq, st2, orow, oc, ov, sg, sbits, x, xidx, xc, xb, out, sf):
        # SpQR W (d, n) @ x (n,) -> out (d,), one thread; xidx from _x_index; xc (C + 1, XC_FLOATS)
        # and xb (its bytes), sf (1, C + 1, 4, 16) scratch
        _prep_x(x, xidx, xc)
        _mv_rows(bits, codes, stq, st2, orow, oc, ov, sg, sbits, xc, xb, out, 0, codes.shape[0], sf[0])

    @njit(**_JIT_PAR)
    def matvec_par(codes, stq, st2, orow, oc, ov, sg, sbits, x, xidx, xc, xb, out, sf):
        # SpQR W (d, n) @ x (n,) -> out (d,); prange over sf.shape[0] row ranges of whole stat blocks
        _prep_x(x, xidx, xc)
        d = codes.shape[0]
        nblocks = sf.shape[0]
        step = ((d + nblocks - 1) // nblocks + sg - 1) // sg * sg
        for blk in prange(nblocks):
            _mv_rows(bits, codes, stq, st2, orow, oc, ov, sg, sbits, xc, xb, out,
                     min(d, blk * step), min(d, (blk + 1) * step), sf[blk])

    return matvec, matvec_par


@njit(**_JIT)
def _mm_rows(bits, codes, stq, st2, orow, oc, ov, sg, sbits, xc, xb, out, r0, r1, sf, tt):
    # SpQR W[r0:r1] @ x_t for the tokens prepared in xc (T, C + 1, XC_FLOATS) (xb its bytes)
    # -> out[:, r0:r1]; tokens tt at a time (their xc stays in L2), sf (C + 1, 4, 16) scratch
    G = stq.shape[1]
    T = xc.shape[0]
    for t0 in range(0, T, tt):
        t1 = min(T, t0 + tt)
        i = r0
        while i < r1:                  # one stat block at a time: stats widened once per block
            rb = i // sg
            e = min(r1, (rb + 1) * sg)
            _widen_stats(st2, rb, G, sf)
            _mm_block(codes, stq, xc, sf, out, i, e, t0, t1, G, sbits, bits)
            for tok in range(t0, t1):  # outliers as in _mv_rows, a token at a time (its xc in L1)
                _add_outliers(orow, oc, ov, i, e, xc[tok], xb[tok], out[tok])
            i = e


@functools.cache
def matmul_kernels(bits: int) -> tuple:
    """(serial, parallel) multi-token kernels for one bit width (closure constant as in
    matvec_kernels): every token's x quantized to int8 as the matvec does (_prep_x), then
    int8 dots of each unpacked code chunk with MM_TOKENS tokens at a time."""

    @njit(**_JIT)
    def matmul(codes, stq, st2, orow, oc, ov, sg, sbits, X, xidx, xc, xb, out, sf, tt):
        # SpQR X (T, n) @ W (d, n).T -> out (T, d), one thread; xc (T, C + 1, XC_FLOATS), xb its
        # bytes, sf (1, C + 1, 4, 16) scratch
        for t in range(X.shape[0]):
            _prep_x(X[t], xidx, xc[t])
        _mm_rows(bits, codes, stq, st2, orow, oc, ov, sg, sbits, xc, xb, out, 0, codes.shape[0], sf[0], tt)

    @njit(**_JIT_PAR)
    def matmul_par(codes, stq, st2, orow, oc, ov, sg, sbits, X, xidx, xc, xb, out, sf, tt):
        # as matmul; prange over sf.shape[0] row ranges of whole stat blocks
        for t in range(X.shape[0]):
            _prep_x(X[t], xidx, xc[t])
        d = codes.shape[0]
        nblocks = sf.shape[0]
        step = ((d + nblocks - 1) // nblocks + sg - 1) // sg * sg
        for blk in prange(nblocks):
            _mm_rows(bits, codes, stq, st2, orow, oc, ov, sg, sbits, xc, xb, out,
                     min(d, blk * step), min(d, (blk + 1) * step), sf[blk], tt)

    return matmul, matmul_par


@njit(**_JIT)
def _decode_rows(bits, codes, stq, st2, orow, oc, ov, sg, sbits, r0, r1, tile, sf):
    # SpQR rows r0:r1 -> tile (>= r1-r0, 16G) float32, column t·G + g = storage column 16g + t
    G = stq.shape[1]
    rowb = codes.shape[1]
    cur = -1
    for i in range(r0, r1):
        rb = i // sg
        if rb != cur:
            _widen_stats(st2, rb, G, sf)
            cur = rb
        r = i - r0
        _decode_row(codes, i * rowb, stq, i * G, sf, G, sbits, bits, tile, r * tile.shape[1])
        for k in range(np.searchsorted(orow, i), np.searchsorted(orow, i + 1)):
            c = np.int32(oc[k])
            tile[r, (c & 15) * G + (c >> 4)] += f16_to_f32(ov[k])


@njit(**_JIT)
def _row_out(perm, tmp, G, out):
    # tmp (16G,) row in tile column order -> out (n,) in original column order
    for j in range(perm.shape[0]):
        out[perm[j]] = tmp[(j & 15) * G + (j >> 4)]


class SpQRLinear(Linear):
    """A loaded SpQR weight W (d, n): matvec / matmul / row straight from the stored parts."""

    codec = "spqr"
    matmul_min_t = MATMUL_MIN_T

    def __init__(self, parts: dict, p: dict):
        self.bits, self.sbits, self.sg = p["bits"], p["stat_bits"], p["stat_group"]
        a = {k: np.ascontiguousarray(v) for k, v in parts.items()}
        d, G = _check_shapes(a, self.bits)
        # every stored part is resident as is (stats are decoded inside the kernels)
        super().__init__((d, a["perm"].shape[0]), sum(v.nbytes for v in parts.values()), PAR_MIN_WEIGHTS)
        self.codes, self.stq, self.st2 = a["codes"], a["stat_codes"], a["stats"]
        self.perm = a["perm"]
        # outliers by row id (base.outlier_rows) instead of the stored row pointers
        self.orow, self.oc, self.ov = outlier_rows(a["outlier_rowptr"]), a["outlier_col"], a["outlier_val"]
        self.G = G
        self.n_pad = G * 16
        # per-call scratch, allocated once: prepared activations and per-thread f32 block stats,
        # chunk-major and zero-padded to whole 16-group chunks (the tail chunk's vector loads read
        # the padding); with the stored parts this is all a matvec touches
        C = -(-G // 16) + 1          # + the packed tail's chunk (see _dot_block)
        self.xidx = _x_index(self.perm, G)
        self.xc = np.zeros((C, XC_FLOATS), np.float32)
        self.xb = self.xc.view(np.int8)
        self.sf = np.zeros((1, C, 4, 16), np.float32)
        # the kernels' leading arguments, built once (a matvec of a small matrix is ~2 µs)
        self._args = (self.bits, self.codes, self.stq, self.st2, self.orow, self.oc, self.ov, self.sg, self.sbits)
        self._mv, self._mv_par = matvec_kernels(self.bits)

    @property
    def rp(self) -> np.ndarray:
        """The outliers' stored row pointers (d + 1,) int32."""
        return outlier_rowptr(self.orow, self.shape[0])

    def _scratch(self, threads: int) -> np.ndarray:
        if self.sf.shape[0] < threads:
            self.sf = np.zeros((threads,) + self.sf.shape[1:], np.float32)
        return self.sf[:threads]

    def _matvec(self, x: np.ndarray, out: np.ndarray, threads: int) -> None:
        # out (d,) = W (d, n) @ x (n,) float32
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        if threads > 1:
            self._mv_par(*self._args[1:], x, self.xidx, self.xc, self.xb, out, self._scratch(threads))
        else:
            self._mv(*self._args[1:], x, self.xidx, self.xc, self.xb, out, self.sf)

    def _matmul(self, X: np.ndarray, out: np.ndarray) -> None:
        # out (T, d) = X (T, n) @ W.T with int8 activations, as T matvecs would compute it
        if not X.flags.c_contiguous:
            X = np.ascontiguousarray(X)
        T = X.shape[0]
        xc = thread_scratch("spqr.xc", (T,) + self.xc.shape)
        tt = max(MM_TOKENS, XC_TILE_BYTES // self.xc.nbytes // MM_TOKENS * MM_TOKENS)
        nb = self.threads_for(self.shape[0] >= 4 * self.sg)
        mm, mm_par = matmul_kernels(self.bits)
        if nb > 1:
            mm_par(*self._args[1:], X, self.xidx, xc, xc.view(np.int8), out, self._scratch(nb), tt)
        else:
            mm(*self._args[1:], X, self.xidx, xc, xc.view(np.int8), out, self.sf, tt)

    @classmethod
    def stack(cls, linears: list) -> "SpQRLinear | None":
        """The rows of `linears` as one SpQRLinear when they share the column permutation and
        params (q/k/v and gate/up do: act-order sorts the Hessian they share) and every part
        ends on a whole stat block."""
        a = linears[0]
        if any(type(w) is not cls or (w.bits, w.sbits, w.sg) != (a.bits, a.sbits, a.sg)
               or w.shape[0] % a.sg or not np.array_equal(w.perm, a.perm) for w in linears):
            return None
        rp, oc, ov = stack_outliers([(w.rp, w.oc, w.ov) for w in linears])
        parts = {"codes": np.concatenate([w.codes for w in linears]), "perm": a.perm,
                 "stat_codes": np.concatenate([w.stq for w in linears]),
                 "stats": np.concatenate([w.st2 for w in linears]),
                 "outlier_rowptr": rp, "outlier_col": oc, "outlier_val": ov}
        return cls(parts, {"bits": a.bits, "stat_bits": a.sbits, "stat_group": a.sg})

    def row(self, i: int, out: np.ndarray) -> None:
        """out (n,) = W[i] as float32 (embedding lookup)."""
        tmp = thread_scratch("spqr.row", (1, self.n_pad))
        _decode_rows(*self._args, i, i + 1, tmp, self.sf[0])
        _row_out(self.perm, tmp[0], self.G, out)


def load_linear(parts: dict, params: dict | None = None) -> SpQRLinear:
    """A SpQRLinear over the parts (zero-copy for C-contiguous arrays)."""
    p = params_of(params)
    missing = set(REQUIRED_PARTS) - set(parts)
    if missing:
        raise UnsupportedModelError(f"spqr codec: missing parts {sorted(missing)}")
    return SpQRLinear(parts, p)
