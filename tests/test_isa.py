"""edgerun.isa: the instruction set is read off LLVM's code for Numba's target, each IR variant
matches NumPy, and every codec's kernels compile for AVX-512 even on a host without it.

The kernel tests themselves run again under an AVX2 and a baseline target in .ci/run (their own
NUMBA_CACHE_DIR each), and every codec and a tiny model on each target in tests/test_targets.py."""
import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import llvmlite.binding as llvm
import numpy as np
import pytest
from llvmlite import ir
from numba.core import cgutils

from edgerun import isa

X86 = platform.machine().lower() in ("x86_64", "amd64")
HASWELL = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+lzcnt,+mmx,+movbe,+pclmul,"
           "+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt")
x86_only = pytest.mark.skipif(not X86, reason="x86 CPU names")


@x86_only
@pytest.mark.parametrize("cpu,features,expect", [
    ("haswell", HASWELL, ("avx2", True)),
    ("generic", "", ("portable", False)),          # baseline x86-64: SSE2, no F16C
    ("x86-64-v2", "", ("portable", False)),
    ("skylake-avx512", "", ("avx512", True)),
    ("knl", "", ("avx2", True)),                  # AVX-512F without BW: the byte kernels are AVX2's
    ("haswell", HASWELL.replace("+avx2", "-avx2").replace("+f16c", "-f16c"), ("portable", False)),
])
def test_probe_reads_the_instruction_set(cpu, features, expect):
    t = isa.probe(cpu, features)
    assert (t.isa, t.half) == expect
    assert t.isa in isa.ISAS and cpu in t.describe()


def _host_runs(variant: str) -> bool:
    host = isa.probe(llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()).isa
    return variant == "portable" or variant == host or (variant == "avx2" and host == "avx512")


def _jit(build, cpu=None, features=None):
    """Compile an IR module made by build(module) for (cpu, features) (default: the host) ->
    (engine, asm); keep the engine alive while calling into it."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    mod = ir.Module()
    build(mod)
    tm = llvm.Target.from_default_triple().create_target_machine(
        cpu=cpu or llvm.get_host_cpu_name(),
        features=llvm.get_host_cpu_features().flatten() if features is None else features, opt=2)
    parsed = llvm.parse_assembly(str(mod))
    engine = llvm.create_mcjit_compiler(parsed, tm)
    engine.finalize_object()
    return engine, tm.emit_assembly(parsed)


def _variant_fn(build, variant, name, nargs, *marks):
    """The function `name` (nargs pointers) of build's module, JIT-compiled for the host when the
    host runs `variant`; else None, after checking that it compiles for a CPU that has it
    (skylake-avx512 / haswell) to code with each of `marks`."""
    if not _host_runs(variant):
        _, asm = _jit(build, {"avx512": "skylake-avx512", "avx2": "haswell"}[variant], "")
        assert all(m in asm for m in marks), marks
        return None
    engine, _ = _jit(build)
    fn = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * nargs)(engine.get_function_address(name))
    fn.engine = engine          # keep the code alive as long as the function
    return fn


@pytest.mark.parametrize("hardware", [False, True])
def test_half_to_float_every_bit_pattern(hardware):
    """All 65536 halves (zeros, subnormals, normals, infinities, NaNs) widen as NumPy does."""
    if hardware and not isa.target().half:
        pytest.skip("the host converts halves in software")

    def build(mod):
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [ir.PointerType(), ir.PointerType()]), "widen")
        b = ir.IRBuilder(fn.append_basic_block())
        v16h, v16f = ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.FloatType(), 16)
        with cgutils.for_range(b, ir.Constant(ir.IntType(64), 65536 // 16)) as loop:
            off = b.mul(loop.index, ir.Constant(ir.IntType(64), 16))
            h = b.load(b.gep(fn.args[0], [off], source_etype=ir.IntType(16)), typ=v16h, align=2)
            b.store(isa.half_to_float(b, h, hardware=hardware),
                    b.gep(fn.args[1], [off], source_etype=ir.FloatType()), align=4)
        b.ret_void()

    engine, asm = _jit(build)
    assert ("__extendhfsf2" in asm) is False
    bits = np.arange(65536, dtype=np.uint16)
    out = np.empty(65536, np.float32)
    ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(engine.get_function_address("widen"))(
        bits.ctypes.data, out.ctypes.data)
    ref = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(out[ok].view(np.uint32), ref[ok].view(np.uint32))


@pytest.mark.parametrize("variant", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("size", [4, 8, 16, 32])
def test_table_lookup_matches_numpy(variant, size):
    """Each variant's lookup runs where the host can run it; elsewhere it must compile for a CPU
    that has the instructions (skylake-avx512 / haswell)."""
    if not X86 and variant != "portable":
        pytest.skip("x86 variants")
    v16f, v16i = ir.VectorType(ir.FloatType(), 16), ir.VectorType(ir.IntType(32), 16)

    def build(mod):
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [ir.PointerType()] * 3), "look")
        b = ir.IRBuilder(fn.append_basic_block())
        tab, idx, out = fn.args
        tables = [b.load(b.gep(tab, [ir.Constant(ir.IntType(32), 16 * k)], source_etype=ir.FloatType()),
                         typ=v16f, align=4) for k in range(max(1, size // 16))]
        b.store(isa.table_lookup(b, tables, b.load(idx, typ=v16i, align=4), size, isa=variant), out, align=4)
        b.ret_void()

    look = _variant_fn(build, variant, "look", 3, "vperm")
    if look is None:
        return
    rng = np.random.default_rng(size)
    tab = rng.standard_normal(32).astype(np.float32)
    for _ in range(20):
        idx = rng.integers(0, size, 16).astype(np.int32)
        out = np.empty(16, np.float32)
        look(tab.ctypes.data, idx.ctypes.data, out.ctypes.data)
        np.testing.assert_array_equal(out, tab[idx])


@pytest.mark.parametrize("variant", ["portable", "avx2", "avx512"])
def test_byte_pair_dot_matches_numpy(variant):
    """a[0::2]·x[0::2] + a[1::2]·x[1::2] per lane for bytes a up to 127 times -127..127."""
    if not X86 and variant != "portable":
        pytest.skip("x86 variants")
    v32b = ir.VectorType(ir.IntType(8), 32)

    def build(mod):
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [ir.PointerType()] * 3), "pdot")
        b = ir.IRBuilder(fn.append_basic_block())
        pa, px, out = fn.args
        r = isa.byte_pair_dot(b, b.load(pa, typ=v32b, align=1), b.load(px, typ=v32b, align=1), isa=variant)
        b.store(r, out, align=2)
        b.ret_void()

    fn = _variant_fn(build, variant, "pdot", 3, "vpmaddubsw")
    if fn is None:
        return
    rng = np.random.default_rng(0)
    for hi in (16, 128):        # 2·127·127 < 2^15: within i16, as the callers keep it
        a = rng.integers(0, hi, 32).astype(np.uint8)
        x = rng.integers(-127, 128, 32).astype(np.int8)
        x[:2] = (-127, 127)
        out = np.empty(16, np.int16)
        fn(a.ctypes.data, x.ctypes.data, out.ctypes.data)
        p = a.astype(np.int32) * x
        np.testing.assert_array_equal(out, p[0::2] + p[1::2])


@pytest.mark.parametrize("variant", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("size,half", [(16, None), (32, None), (32, 16), (8, 4)])
@pytest.mark.parametrize("lanes", [32, 64])
def test_byte_table_lookup_matches_numpy(variant, size, half, lanes):
    """`size` entries; with `half`, the upper half picked by a separate vector's sign bit (the
    cluster matvec's 1-bit plane) and idx < half; 32 lanes (one block) or 64 (two)."""
    if not X86 and variant != "portable":
        pytest.skip("x86 variants")
    v16b, vlanes = ir.VectorType(ir.IntType(8), 16), ir.VectorType(ir.IntType(8), lanes)
    starts = [0] if size == 16 else [0, half or 16]

    def build(mod):
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [ir.PointerType()] * 4), "look")
        b = ir.IRBuilder(fn.append_basic_block())
        tab, idx, top, out = fn.args
        tables = [b.load(b.gep(tab, [ir.Constant(ir.IntType(32), k)], source_etype=ir.IntType(8)),
                         typ=v16b, align=1) for k in starts]
        sign = b.load(top, typ=vlanes, align=1) if half else None
        b.store(isa.byte_table_lookup(b, tables, b.load(idx, typ=vlanes, align=1), sign, size=half or 16, isa=variant),
                out, align=1)
        b.ret_void()

    fn = _variant_fn(build, variant, "look", 4, "vpshufb")
    if fn is None:
        return
    rng = np.random.default_rng(size)
    tab = rng.integers(-127, 128, 32).astype(np.int8)
    for _ in range(10):
        low = rng.integers(0, half or size, lanes)
        top = rng.integers(-128, 128, lanes).astype(np.int8)
        idx = low.astype(np.int8)
        out = np.empty(lanes, np.int8)
        fn(tab.ctypes.data, idx.ctypes.data, top.ctypes.data, out.ctypes.data)
        np.testing.assert_array_equal(out, tab[low + (half or 0) * (top < 0)] if half else tab[low])


@pytest.mark.parametrize("scale", [None, 2047])
@pytest.mark.parametrize("variant", ["portable", "avx2", "avx512"])
def test_byte_dot_matches_numpy(variant, scale):
    """Unsigned bytes 0..127 times signed -127..127 (the cluster matvec's ranges) times an i16
    block scale, extremes included."""
    if not X86 and variant != "portable":
        pytest.skip("x86 variants")
    v32b = ir.VectorType(ir.IntType(8), 32)

    def build(mod):
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [ir.PointerType()] * 3), "udot")
        b = ir.IRBuilder(fn.append_basic_block())
        pa, px, out = fn.args
        e = None if scale is None else ir.Constant(ir.IntType(16), scale)
        b.store(isa.byte_dot(b, b.load(pa, typ=v32b, align=1), b.load(px, typ=v32b, align=1), e, isa=variant),
                out, align=4)
        b.ret_void()

    fn = _variant_fn(build, variant, "udot", 3, "vpmaddubsw", "vpmaddwd")
    if fn is None:
        return
    rng = np.random.default_rng(1)
    for _ in range(10):
        a = rng.integers(0, 128, 32).astype(np.uint8)
        x = rng.integers(-127, 128, 32).astype(np.int8)
        a[:8], x[:8] = (127, 127, 0, 127, 127, 127, 7, 0), (127, 127, 5, -127, -127, -127, -1, 0)
        out = np.empty(8, np.int32)
        fn(a.ctypes.data, x.ctypes.data, out.ctypes.data)
        np.testing.assert_array_equal(out, (a.astype(np.int32) * x).reshape(8, 4).sum(axis=1) * (scale or 1))


@pytest.mark.parametrize("weights", [32, 64])
@pytest.mark.parametrize("variant", ["portable", "avx2", "avx512"])
def test_byte_dot_halves_matches_numpy(variant, weights):
    """Two byte_dots in one: one block's weight bytes against two tokens' (32) or two blocks'
    weights against one token's (64), each half's i16 scale spread over its 16 lanes, extremes
    included: the first half's dot in lanes 0-7, the second's in lanes 8-15."""
    if not X86 and variant != "portable":
        pytest.skip("x86 variants")
    va, v64b = ir.VectorType(ir.IntType(8), weights), ir.VectorType(ir.IntType(8), 64)
    v32s = ir.VectorType(ir.IntType(16), 32)

    def build(mod):
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [ir.PointerType()] * 4), "udot2")
        b = ir.IRBuilder(fn.append_basic_block())
        pa, px, ps, out = fn.args
        b.store(isa.byte_dot_halves(b, b.load(pa, typ=va, align=1), b.load(px, typ=v64b, align=1),
                                    b.load(ps, typ=v32s, align=2), isa=variant), out, align=4)
        b.ret_void()

    fn = _variant_fn(build, variant, "udot2", 4, "vpmaddubsw", "zmm" if variant == "avx512" else "vpmaddwd")
    if fn is None:
        return
    rng = np.random.default_rng(2)
    for _ in range(10):
        a = rng.integers(0, 128, weights).astype(np.uint8)
        x = rng.integers(-127, 128, (2, 32)).astype(np.int8)
        s = rng.integers(1, 2048, 2).astype(np.int16)
        a[:8], x[:, :8] = (127, 127, 0, 127, 127, 127, 7, 0), (127, 127, 5, -127, -127, -127, -1, 0)
        s[rng.integers(0, 2)] = 2047
        out = np.empty(16, np.int32)
        fn(a.ctypes.data, x.ctypes.data, np.repeat(s, 16).ctypes.data, out.ctypes.data)
        w = np.resize(a, 64).reshape(2, 32).astype(np.int32)
        want = (w * x).reshape(2, 8, 4).sum(axis=2) * s[:, None].astype(np.int32)
        np.testing.assert_array_equal(out, want.ravel())


@x86_only
def test_every_codec_kernel_compiles_for_avx512(tmp_path):
    """On any x86 host: LLVM compiles each codec's matvec/matmul/row (1 and 2 threads) and the
    attention kernel for an AVX-512 CPU without aborting (nothing is run: see the script)."""
    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    try:
        import kernels_compile_only
    finally:
        sys.path.remove(str(here))
    cases = tmp_path / "cases.npz"
    kernels_compile_only.save_cases(cases)
    env = {**os.environ, "NUMBA_CPU_NAME": "x86-64-v4", "NUMBA_CPU_FEATURES": "",
           "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    r = subprocess.run([sys.executable, str(here / "kernels_compile_only.py"), str(cases)], env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("avx512 "), r.stdout


def test_info_names_the_kernel_variant(tiny_dir, tmp_path):
    from edgerun.convert.pack import pack
    from edgerun.info import describe
    pack(tiny_dir("llama"), tmp_path / "t.ebin")
    text = describe(tmp_path / "t.ebin")
    line = next(l for l in text.splitlines() if l.startswith("kernels"))
    assert isa.target().isa in line and isa.target().cpu in line
