"""The CPU that Numba compiles for, and the LLVM IR whose instructions depend on it (DESIGN §6).

Numba compiles for `NUMBA_CPU_NAME` / `NUMBA_CPU_FEATURES` when they are set, else for the host.
Our kernels' `@intrinsic` code generators ask `target()` which instruction set that is and emit
the matching variant, so the same source runs on x86-64 baseline (SSE2), AVX2 and AVX-512 and on
arm64 (NEON). An x86-specific intrinsic emitted for a CPU without it makes LLVM abort the whole
process, hence every ISA-specific path here has a portable twin in plain LLVM vector IR.

The instruction set is not guessed from a CPU name: a two-function probe module is compiled to
assembly by LLVM for exactly Numba's (cpu, features) pair and read back (zmm registers for 512-bit
byte adds mean AVX-512 with BW, whose byte instructions the kernels use: an AVX-512F-only CPU
counts as AVX2; ymm means AVX2; a call to `__extendhfsf2` means no hardware half->float
conversion).
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils, config

_I32, _F32 = ir.IntType(32), ir.FloatType()

# Instruction sets with a kernel variant, best first.
ISAS = ("avx512", "avx2", "neon", "portable")


@dataclass(frozen=True)
class Target:
    """What the JIT compiles for: `isa` (one of ISAS), `half` (hardware f16 -> f32), `cpu`."""
    isa: str
    half: bool
    cpu: str

    def describe(self) -> str:
        conv = "hardware" if self.half else "integer"
        return f"{self.isa} (Numba target {self.cpu}), {conv} f16 conversion"


_PROBE = r"""
define void @add512(ptr %a, ptr %b) #0 {
  %x = load <64 x i8>, ptr %a, align 4
  %y = load <64 x i8>, ptr %b, align 4
  %s = add <64 x i8> %x, %y
  store <64 x i8> %s, ptr %a, align 4
  ret void
}
define void @widen(ptr %a, ptr %b) {
  %h = load <8 x half>, ptr %a, align 2
  %f = fpext <8 x half> %h to <8 x float>
  store <8 x float> %f, ptr %b, align 4
  ret void
}
attributes #0 = { "min-legal-vector-width"="512" "prefer-vector-width"="512" }
"""


def numba_cpu() -> tuple[str, str]:
    """(cpu name, feature string) exactly as Numba's CPU codegen chooses them."""
    name = config.CPU_NAME or llvm.get_host_cpu_name()
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm.get_host_cpu_features().flatten()
    return name, features


@functools.lru_cache(maxsize=None)
def probe(cpu: str, features: str) -> Target:
    """Compile the probe for (cpu, features) and read the instruction set off its assembly."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    tm = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=features, opt=2)
    asm = tm.emit_assembly(llvm.parse_assembly(_PROBE))
    arm = platform.machine().lower() in ("aarch64", "arm64")
    if arm:
        isa = "neon"
    elif "zmm" in asm:
        isa = "avx512"
    elif "ymm" in asm:      # 256-bit byte adds exist from AVX2 on (AVX splits them)
        isa = "avx2"
    else:
        isa = "portable"
    half = "__extendhfsf2" not in asm and "__gnu_h2f_ieee" not in asm
    return Target(isa, half, cpu)


def target() -> Target:
    """The Target Numba compiles for in this process."""
    return probe(*numba_cpu())


# --- IR helpers ------------------------------------------------------------------------------

def _const_like(ty, value):
    """A constant `value` of type `ty`, splatted when `ty` is a vector."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [value] * ty.count)
    return ir.Constant(ty, value)


def half_to_float(builder, h, hardware=None):
    """IR: IEEE half bits (i16 or <N x i16>) -> float (float or <N x float>).

    With hardware conversion (x86 F16C, arm64) this is `fpext half`. Without it LLVM would call
    compiler-rt's `__extendhfsf2`, which Numba's JIT cannot resolve, so the conversion is done in
    integers: shift exponent and mantissa into place and rescale by 2^112 (exact for normals and
    subnormals), then restore infinities/NaNs and the sign. `hardware` overrides the target
    (tests).
    """
    vec = isinstance(h.type, ir.VectorType)
    i32 = ir.VectorType(_I32, h.type.count) if vec else _I32
    f32 = ir.VectorType(_F32, h.type.count) if vec else _F32
    if target().half if hardware is None else hardware:
        hty = ir.VectorType(ir.HalfType(), h.type.count) if vec else ir.HalfType()
        return builder.fpext(builder.bitcast(h, hty), f32)
    c = functools.partial(_const_like, i32)
    w = builder.zext(h, i32)
    sign = builder.shl(builder.and_(w, c(0x8000)), c(16))
    em = builder.shl(builder.and_(w, c(0x7FFF)), c(13))
    scaled = builder.fmul(builder.bitcast(em, f32), _const_like(f32, 2.0 ** 112))
    special = builder.icmp_unsigned("==", builder.and_(w, c(0x7C00)), c(0x7C00))
    bits = builder.select(special, builder.or_(em, c(0x7F800000)), builder.bitcast(scaled, i32))
    return builder.bitcast(builder.or_(bits, sign), f32)


def _intrinsic(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _lanes(builder, v, first, count):
    """IR: lanes first..first+count-1 of vector v."""
    return builder.shuffle_vector(v, ir.Constant(v.type, None), ir.Constant(ir.VectorType(_I32, count),
                                                                         list(range(first, first + count))))


def _concat(builder, a, b):
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n))))


def _select_on_bit(builder, idx, bit, one, zero):
    """IR: lane-wise `idx & (1 << bit) ? one : zero`."""
    mask = _const_like(idx.type, 1 << bit)
    test = builder.icmp_unsigned("!=", builder.and_(idx, mask), _const_like(idx.type, 0))
    return builder.select(test, one, zero)


def table_lookup(builder, tables, idx, size=None, isa=None):
    """IR: <16 x float> r with r[l] = table[idx[l]], the table being `tables` (one or two
    <16 x float>: 16 or 32 entries) concatenated, of which the first `size` (a power of two,
    default all) are used; idx <16 x i32> in [0, size). `isa` overrides the target (tests).

    AVX-512: vpermps / vpermi2ps on zmm. AVX2: vpermps on 8-entry quarters of the table, picked
    by the index's higher bits. Elsewhere (SSE2, NEON): a tree of lane-wise selects over
    broadcast table entries, 16-byte vector operations only (no gathers).
    """
    isa = isa or target().isa
    v16f = ir.VectorType(_F32, 16)
    size = size or 16 * len(tables)
    if isa == "avx512":
        if len(tables) == 1:
            return _intrinsic(builder, "llvm.x86.avx512.permvar.sf.512", v16f, [tables[0], idx])
        return _intrinsic(builder, "llvm.x86.avx512.vpermi2var.ps.512", v16f, [tables[0], idx, tables[1]])
    if isa == "avx2":
        v8f = ir.VectorType(_F32, 8)
        eighths = [_lanes(builder, t, o, 8) for t in tables for o in (0, 8)][:max(1, size // 8)]
        halves = []
        for o in (0, 8):
            i8 = _lanes(builder, idx, o, 8)
            picks = [_intrinsic(builder, "llvm.x86.avx2.permps", v8f, [e, i8]) for e in eighths]
            bit = 3
            while len(picks) > 1:       # bit 3 picks the table's eighth, bit 4 its half
                picks = [_select_on_bit(builder, i8, bit, picks[k + 1], picks[k]) for k in range(0, len(picks), 2)]
                bit += 1
            halves.append(picks[0])
        return _concat(builder, *halves)
    entries = [builder.shuffle_vector(t, ir.Constant(v16f, None), ir.Constant(ir.VectorType(_I32, 16), [k] * 16))
               for t in tables for k in range(16)][:size]
    bit = 0
    while len(entries) > 1:             # each level halves the candidates on one index bit
        entries = [_select_on_bit(builder, idx, bit, entries[k + 1], entries[k]) for k in range(0, len(entries), 2)]
        bit += 1
    return entries[0]


def byte_pair_dot(builder, a, xpairs, isa=None):
    """IR: <16 x i16> r with r[k] = a[2k]·x[2k] + a[2k + 1]·x[2k + 1] for unsigned bytes a and
    signed bytes x (<32 x i8> each); the caller keeps every sum within i16 (vpmaddubsw
    saturates, the portable path wraps). `isa` overrides the target (tests).

    AVX2 / AVX-512: one vpmaddubsw (the int8 dot product llama.cpp's quantized matvecs are built
    on). Elsewhere (SSE2, NEON): widening 16-lane i16 multiplies and an add, which NEON does as
    umull/smlal-class instructions.
    """
    isa = isa or target().isa
    v16i16 = ir.VectorType(ir.IntType(16), 16)
    if isa in ("avx2", "avx512"):
        return _intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [a, xpairs])

    def half(v, first, ext):
        return ext(builder.shuffle_vector(v, ir.Constant(v.type, None), ir.Constant(
            ir.VectorType(_I32, 16), list(range(first, 32, 2)))), v16i16)
    return builder.add(builder.mul(half(a, 0, builder.zext), half(xpairs, 0, builder.sext)),
                       builder.mul(half(a, 1, builder.zext), half(xpairs, 1, builder.sext)))


def byte_table_lookup(builder, tables, idx, top=None, size=16, isa=None):
    """IR: <32 x i8> r with r[l] = tables[t][idx[l]], idx <32 x i8> in [0, size) and t the table
    (one or two <16 x i8> of which the first `size` entries are used) picked by index bit 4
    (idx in [0, 32)) or, when `top` (<32 x i8>) is given, by its lane's sign bit; <64 x i8> idx
    (and top) give <64 x i8>. `isa` overrides the target (tests).

    AVX2 / AVX-512: vpshufb per table, then vpblendvb (64 lanes on AVX-512: vpshufb zmm, else
    per half); arm64: tbl; elsewhere (SSE2) a tree of byte selects.
    """
    isa = isa or target().isa
    v32i8, v16i8 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(8), 16)
    if idx.type.count == 64 and isa != "avx512":
        return _concat(builder, *[byte_table_lookup(builder, tables, _lanes(builder, idx, o, 32),
                                                    None if top is None else _lanes(builder, top, o, 32), size, isa)
                                  for o in (0, 32)])
    if isa in ("avx2", "avx512"):
        lo4 = builder.and_(idx, _const_like(idx.type, 15))
        if idx.type.count == 64:
            quad = [_concat(builder, _concat(builder, t, t), _concat(builder, t, t)) for t in tables]
            picks = [_intrinsic(builder, "llvm.x86.avx512.pshuf.b.512", idx.type, [t4, lo4]) for t4 in quad]
        else:
            picks = [_intrinsic(builder, "llvm.x86.avx2.pshuf.b", v32i8, [_concat(builder, t, t), lo4]) for t in tables]
    elif isa == "neon":
        lo4 = builder.and_(idx, _const_like(v32i8, 15))
        halves = [_lanes(builder, lo4, o, 16) for o in (0, 16)]
        picks = [_concat(builder, *[_intrinsic(builder, "llvm.aarch64.neon.tbl1.v16i8", v16i8, [t, h])
                                    for h in halves]) for t in tables]
    else:
        picks = []
        for t in tables:
            entries = [builder.shuffle_vector(t, ir.Constant(v16i8, None), ir.Constant(ir.VectorType(_I32, 32), [k] * 32))
                       for k in range(size)]
            bit = 0
            while len(entries) > 1:
                entries = [_select_on_bit(builder, idx, bit, entries[k + 1], entries[k]) for k in range(0, len(entries), 2)]
                bit += 1
            picks.append(entries[0])
    if len(picks) == 1:
        return picks[0]
    if top is None:
        return _select_on_bit(builder, idx, 4, picks[1], picks[0])
    return builder.select(builder.icmp_signed("<", top, _const_like(top.type, 0)), picks[1], picks[0])


def byte_dot(builder, a, b, scale=None, isa=None):
    """IR: <8 x i32> r with r[k] = scale · Σ_{j=4k}^{4k+3} a[j]·b[j] for unsigned bytes a and
    signed bytes b (<32 x i8> each) and an i16 `scale` (default 1), or a <16 x i16> scale vector
    whose lanes 2k and 2k + 1 both hold r[k]'s multiplier; the caller keeps each pair
    a[2k]·b[2k] + a[2k+1]·b[2k+1] within i16 (byte_pair_dot) and the result within i32. `isa`
    overrides the target (tests).

    AVX2 / AVX-512: vpmaddubsw then vpmaddwd with the scale (llama.cpp's K-quant dots on CPUs
    without VNNI multiply their 16-bit sums the same way). Elsewhere: byte_pair_dot's widening
    multiplies, then widening multiplies by the scale and pairwise adds.
    """
    isa = isa or target().isa
    pairs = byte_pair_dot(builder, a, b, isa)
    v16i16, v8i32 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(_I32, 8)
    if scale is None:
        sv = _const_like(v16i16, 1)
    elif isinstance(scale.type, ir.VectorType):
        sv = scale
    else:
        sv = builder.shuffle_vector(builder.insert_element(ir.Constant(v16i16, None), scale, ir.Constant(_I32, 0)),
                                    ir.Constant(v16i16, None), ir.Constant(ir.VectorType(_I32, 16), [0] * 16))
    if isa in ("avx2", "avx512"):
        return _intrinsic(builder, "llvm.x86.avx2.pmadd.wd", v8i32, [pairs, sv])
    v16i32 = ir.VectorType(_I32, 16)
    wide = builder.mul(builder.sext(pairs, v16i32), builder.sext(sv, v16i32))
    return builder.add(*[builder.shuffle_vector(wide, wide, ir.Constant(v8i32, list(range(o, 16, 2)))) for o in (0, 1)])


def byte_dot_halves(builder, a, b, scales, isa=None):
    """IR: <16 x i32>, byte_dot(a, b[0:32], scales[0:16]) in lanes 0-7 and byte_dot(a, b[32:64],
    scales[16:32]) in lanes 8-15 for signed bytes b (<64 x i8>) and unsigned bytes a: <32 x i8>
    serving both halves (one block's weights, two tokens) or <64 x i8> (two blocks, one token);
    each half's scale spread over its 16 lanes of `scales` (<32 x i16>). `isa` overrides the
    target (tests).

    AVX-512 (BW): one 512-bit vpmaddubsw and one vpmaddwd (LLVM fuses it with an accumulating add
    into VNNI's vpdpwssd where the CPU has it): 64 products an instruction where byte_dot does 32.
    Elsewhere: the two byte_dots.
    """
    isa = isa or target().isa
    halves = [a, a] if a.type.count == 32 else [_lanes(builder, a, o, 32) for o in (0, 32)]
    if isa != "avx512":
        return _concat(builder, *[byte_dot(builder, halves[k], _lanes(builder, b, 32 * k, 32),
                                           _lanes(builder, scales, 16 * k, 16), isa) for k in (0, 1)])
    v32i16, v16i32 = ir.VectorType(ir.IntType(16), 32), ir.VectorType(_I32, 16)
    pairs = _intrinsic(builder, "llvm.x86.avx512.pmaddubs.w.512", v32i16, [_concat(builder, *halves), b])
    return _intrinsic(builder, "llvm.x86.avx512.pmaddw.d.512", v16i32, [pairs, scales])
