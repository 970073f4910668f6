"""LLVM IR helpers shared by the codecs' `@intrinsic` kernels (cluster, spqr)."""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types

_I32 = ir.IntType(32)


def array_data(context, builder, ty, val):
    """IR: the data pointer of a Numba array argument."""
    return context.make_array(ty)(context, builder, val).data


def hsum16(builder, v, flags=("fast",)):
    """IR: horizontal sum of a <16 x float> by halving shuffles (`flags` on the adds)."""
    n = 16
    while n > 1:
        n //= 2
        a = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        b = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
        v = builder.fadd(a, b, flags=flags)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def switch_on_bits(builder, bits_val, widths, emit, bits_type=None):
    """IR: switch on a runtime bit width to code specialized by `emit(bits)` for each of
    `widths`; any other value does nothing. When `bits_type` is a Numba integer literal (a
    compile-time constant of the caller, e.g. a closure variable; the intrinsic needs
    `prefer_literal=True`), only that width's code is emitted: a third of the IR of three
    widths, and as much less to compile on a cold cache."""
    if isinstance(bits_type, types.IntegerLiteral):
        if bits_type.literal_value in widths:
            emit(bits_type.literal_value)
        return
    done = builder.append_basic_block("bits_done")
    sw = builder.switch(bits_val, done)
    for bits in widths:
        bb = builder.append_basic_block(f"bits{bits}")
        sw.add_case(ir.Constant(bits_val.type, bits), bb)
        builder.position_at_end(bb)
        emit(bits)
        builder.branch(done)
    builder.position_at_end(done)


def arithmetic_fence(builder, v):
    """IR: v behind llvm.arithmetic.fence: LLVM may not fuse the product it holds into a later
    add (an FMA rounds once where a multiply then an add round twice). fastmath=False on the
    multiply is not enough: a fast add may still contract it, and whether it does differs by CPU
    and by scalar or vector code (the cluster matvec and matmul disagreed by an ulp on arm64)."""
    suffix = f"v{v.type.count}f32" if isinstance(v.type, ir.VectorType) else "f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v.type, [v.type]),
                                        "llvm.arithmetic.fence." + suffix)
    return builder.call(fn, [v])
