"""SpQR codec: GPTQ beats round-to-nearest, outliers help, the reference decode follows the spec,
kernels match the reference decode on odd shapes, bits per weight count every stored byte."""
from __future__ import annotations

import numpy as np
import pytest

from edgerun import kernels
from edgerun.codecs import get_codec
from edgerun.errors import UnsupportedModelError

codec = get_codec("spqr")


def _problem(d, n, seed=0, samples=2048):
    """Synthetic W and inputs with correlated channels and a few heavy columns; H = E[x xᵀ]."""
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n)) / np.sqrt(n) + np.eye(n)
    scale = np.exp(0.5 * rng.standard_normal(n))
    scale[rng.choice(n, 3, replace=False)] *= 15
    X = ((rng.standard_normal((samples, n)) @ M) * scale).astype(np.float32)
    W = (rng.standard_normal((d, n)) * 0.05).astype(np.float32)
    W[rng.random((d, n)) < 0.005] *= 12                      # a few weight outliers
    H = X.T.astype(np.float64) @ X / samples
    return W, X, H


def _err(W, Wd, X):
    return float(np.linalg.norm((W - Wd) @ X.T) / np.linalg.norm(W @ X.T))


def _rtn(W, bits):
    """Round-to-nearest baseline in the same storage: H = I (no error feedback), no outliers."""
    params = {"bits": bits, "permute": None, "outlier_threshold": None}
    return codec.decode(codec.encode(W, params), params)


def _spec_code(codes, i, g, t, G, bits):
    """Code of row i, group g, position t read byte by byte as formats/codec-spqr.md "codes" says."""
    g0 = g // 16 * 16
    w = min(16, G - g0)
    base = 2 * bits * g0 + (g - g0)               # byte of group g in section 0 of its chunk
    sec = lambda k: int(codes[i, base + k * w])   # noqa: E731
    if bits == 4:
        return (sec(t // 2) >> (4 * (t % 2))) & 15
    q = (sec(t // 4) >> (2 * (t % 4))) & 3
    if bits == 3:
        q |= ((sec(4 + t // 8) >> (t % 8)) & 1) << 2
    return q


def _spec_decode(parts, bits, sbits=3, sg=16):
    """Slow decode written from formats/codec-spqr.md, element by element."""
    codes, stq = parts["codes"], parts["stat_codes"]
    st = parts["stats"].view(np.float16).astype(np.float64)
    perm = parts["perm"]
    d, G = stq.shape
    assert codes.shape == (d, 2 * bits * G)
    n = len(perm)
    W = np.zeros((d, n))
    for i in range(d):
        for j in range(n):
            g, t = divmod(j, 16)
            q = _spec_code(codes, i, g, t, G, bits)
            f = int(stq[i, g])
            s = st[i // sg, 0, g] * (f & ((1 << sbits) - 1)) + st[i // sg, 1, g]
            z = st[i // sg, 2, g] * (f >> sbits) + st[i // sg, 3, g]
            W[i, perm[j]] = s * (q - z)
        for k in range(parts["outlier_rowptr"][i], parts["outlier_rowptr"][i + 1]):
            c = int(parts["outlier_col"][k])
            W[i, perm[c]] += float(parts["outlier_val"][k:k + 1].view(np.float16)[0])
    return W


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_and_outliers_help(bits):
    W, X, H = _problem(96, 128)
    Xt = X[:512]
    rtn = _err(W, _rtn(W, bits), Xt)
    plain = _err(W, codec.decode(p := codec.encode(W, {"bits": bits, "outlier_threshold": None}, H),
                                 {"bits": bits}), Xt)
    assert p["outlier_col"].size == 0
    full = codec.encode(W, {"bits": bits}, H)
    with_out = _err(W, codec.decode(full, {"bits": bits}), Xt)
    assert plain < 0.8 * rtn, (plain, rtn)
    assert with_out < plain, (with_out, plain)
    frac = full["outlier_col"].size / W.size
    assert 0.0005 < frac < 0.03, frac


def test_no_hessian_falls_back_to_identity():
    W, X, H = _problem(32, 64)
    parts = codec.encode(W, {"bits": 4, "permute": None, "outlier_threshold": None})
    assert np.array_equal(parts["perm"], np.arange(64))
    assert _err(W, codec.decode(parts, {"bits": 4}), X[:256]) < 0.2


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [45, 300])
def test_decode_matches_spec(bits, n):
    W, X, H = _problem(21, n, seed=bits)
    parts = codec.encode(W, {"bits": bits}, H)
    assert parts["outlier_col"].size > 0
    np.testing.assert_allclose(codec.decode(parts, {"bits": bits}), _spec_decode(parts, bits), rtol=1e-5, atol=1e-6)


# shapes: G < 16 groups (tail chunk only), n not a multiple of 16, exactly one 16-group chunk,
# full chunks plus a tail chunk (n = 300: 19 groups), d not a multiple of the 16-row stat blocks;
# tails of 4 and 8 groups take the packed-tail path (4 or 2 rows per vector, then single rows):
# alone (n = 64), after full chunks (n = 320: 20 groups, n = 384: 24 groups); other tails load
# past the row (all but the matrix's last rows, _overread_end): n = 960 is SmolLM2-360M's width
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d,n", [(37, 48), (37, 45), (70, 160), (17, 256), (21, 300), (37, 64), (70, 320),
                                 (21, 384), (35, 960)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_match_decode(bits, d, n, threads, monkeypatch):
    import edgerun.codecs.spqr as spqr
    from edgerun.codecs.spqr import reference
    from edgerun.codecs.spqr.reference import quantize_activations
    monkeypatch.setattr(spqr.kernels, "PAR_MIN_WEIGHTS", 0)          # exercise the prange path on small shapes
    W, X, H = _problem(d, n, seed=d + n)
    params = {"bits": bits}
    parts = codec.encode(W, params, H)
    ref = codec.decode(parts, params)
    lin = codec.load(parts, params)
    assert lin.shape == (d, n)
    kernels.set_threads(threads)
    try:
        x = X[0].copy()
        out = np.empty(d, np.float32)
        lin.matvec(x, out)
        want = ref @ quantize_activations(x, parts["perm"])        # the matvec's int8 activations
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        # and int8 activations with one scale per 16 cost well under the 4-bit weights' own error
        assert np.abs(out - ref @ x).max() <= 0.02 * np.abs(ref @ x).max()
        # matmul: int8 activations as the matvec's for every T (a loop of matvecs below
        # matmul_min_t); T = 9, 11 leave 1 and 3 tokens past whole token blocks
        for T in (3, 9, 11):
            Y = np.empty((T, d), np.float32)
            lin.matmul(X[:T], Y)
            want = reference.matmul(parts, params, X[:T])
            np.testing.assert_allclose(Y, want, rtol=1e-4, atol=1e-4 * np.abs(Y).max())
        row = np.empty(n, np.float32)
        for i in (0, d - 1):
            lin.row(i, row)
            np.testing.assert_allclose(row, ref[i], rtol=1e-6, atol=1e-7)
    finally:
        kernels.set_threads(1)


_GUARDED = r"""
import ctypes, mmap, sys
import numpy as np
from edgerun import kernels
from edgerun.codecs import get_codec

def guarded(a):
    # a copy of `a` that ends where an inaccessible page begins: a read past it faults
    page = mmap.PAGESIZE
    n = -(-a.nbytes // page) * page
    buf = mmap.mmap(-1, n + page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(addr + n), ctypes.c_size_t(page), 0) == 0
    out = np.frombuffer(buf, a.dtype, count=a.size, offset=n - a.nbytes).reshape(a.shape)
    out[...] = a
    return out

c = get_codec("spqr")
rng = np.random.default_rng(0)
for bits, d, n in [(4, 35, 960), (3, 21, 300), (2, 37, 45), (4, 19, 200), (4, 37, 64), (3, 17, 4)]:
    w = (rng.standard_normal((d, n)) * 0.05).astype(np.float32)
    parts = c.encode(w, {"bits": bits})
    ref = c.load(parts, {"bits": bits})
    lin = c.load({k: guarded(v) if k in ("codes", "stat_codes", "stats") else v for k, v in parts.items()},
                 {"bits": bits})
    assert lin.codes.ctypes.data != parts["codes"].ctypes.data          # the guarded copy is used
    X = rng.standard_normal((9, n)).astype(np.float32)
    for threads in (1, 2):
        kernels.set_threads(threads)
        a, b = np.empty(d, np.float32), np.empty(d, np.float32)
        ref.matvec(X[0], a); lin.matvec(X[0], b)
        assert np.array_equal(a, b), (bits, d, n)
        A, B = np.empty((9, d), np.float32), np.empty((9, d), np.float32)
        ref.matmul(X, A); lin.matmul(X, B)
        assert np.array_equal(A, B), (bits, d, n)
print("ok")
"""


def test_tail_loads_stay_inside_the_arrays():
    # tail chunks load 16 bytes per section and zero what lies past the tail (kernels
    # _overread_end): codes, stat bytes and stats placed right before an inaccessible page must
    # give the same results; a read past them would fault (in a child process, not this one)
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _GUARDED], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_matvec_strided_input():
    """The activation gather reads x by pointer: a non-contiguous x must give the same result."""
    W, X, H = _problem(40, 64)
    parts = codec.encode(W, {"bits": 4}, H)
    lin = codec.load(parts, {"bits": 4})
    xs = np.repeat(X[0], 2)[::2]                              # a strided view equal to X[0]
    assert not xs.flags.c_contiguous
    out, ref = np.empty(40, np.float32), np.empty(40, np.float32)
    lin.matvec(xs, out)
    lin.matvec(X[0].copy(), ref)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("bits", [3, 4])
def test_bits_per_weight_counts_every_part(bits):
    W, X, H = _problem(64, 96)
    parts = codec.encode(W, {"bits": bits}, H)
    lin = codec.load(parts, {"bits": bits})
    total = sum(v.nbytes for v in parts.values())
    assert lin.nbytes == total == codec.nbytes(parts)
    assert lin.bits_per_weight == pytest.approx(total * 8 / W.size)
    # codes + 8-bit stat codes per 16 weights + 4 fp16 per 16x16 block + perm + CSR
    expect = (bits + 8 / 16 + 64 / 256 + 16 / 64 + 32 * (64 + 1) / W.size
              + 32 * parts["outlier_col"].size / W.size)
    assert lin.bits_per_weight == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_roundtrip_and_chunk_layout(bits):
    import edgerun.codecs.spqr as spqr
    rng = np.random.default_rng(bits)
    Q = rng.integers(0, 1 << bits, (5, 16 * 19)).astype(np.uint8)      # one full chunk + 3 groups
    codes = spqr._pack_codes(Q, bits)
    assert codes.shape == (5, 2 * bits * 19)                           # exactly `bits` per weight
    assert np.array_equal(spqr._unpack_codes(codes, bits), Q)
    # group 17 (tail chunk, lane 1) position 0 lives in byte 2·bits·16 + 1, low bits
    assert codes[2, 2 * bits * 16 + 1] & 3 == Q[2, 16 * 17] & 3


def test_bad_codes_shape_raises():
    W, X, H = _problem(16, 32)
    parts = codec.encode(W, {"bits": 4}, H)
    with pytest.raises(UnsupportedModelError):
        codec.load(parts, {"bits": 3})


def test_bad_params_raise():
    W = np.zeros((16, 32), np.float32)
    with pytest.raises(UnsupportedModelError):
        codec.encode(W, {"bits": 5})
    with pytest.raises(UnsupportedModelError):
        codec.encode(W, {"group": 32})
    with pytest.raises(UnsupportedModelError):
        codec.encode(W, {}, np.eye(31))
