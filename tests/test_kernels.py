"""Kernels and the dense codec against NumPy / transformers references, on odd sizes."""
import math

import numpy as np
import pytest

from edgerun import kernels as K
from edgerun.codecs import CODECS, get_codec
from edgerun.codecs.dense import kernels as dense   # its TILE_ROWS, PAR_MIN_MACS, _tiles
from edgerun.codecs.dense import bf16_bits_to_f32, f32_to_bf16_bits
from edgerun.errors import EdgerunError, UnsupportedModelError

DTYPES = ["f32", "f16", "bf16"]
THREADS = sorted({1, min(2, K.numba.config.NUMBA_NUM_THREADS)})


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=THREADS)
def threads(request):
    K.set_threads(request.param)
    yield request.param
    K.set_threads(1)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --- elementwise / norms ------------------------------------------------------------------

def test_rmsnorm(rng):
    x, w = randn(rng, 45), randn(rng, 45)
    out = np.empty(45, np.float32)
    K.rmsnorm(x, w, 1e-6, out)
    np.testing.assert_allclose(out, x / np.sqrt(np.mean(x * x) + 1e-6) * w, rtol=1e-5, atol=1e-6)


# the layer ops: the Numba kernels and their NumPy stand-ins for a cold JIT cache (same contract)
LAYER_OPS = pytest.mark.parametrize("ops", [K, K.NumpyLayerOps], ids=["numba", "numpy"])


@LAYER_OPS
def test_rmsnorm_rows(rng, ops):
    X, w = randn(rng, 7, 45, scale=3.0), randn(rng, 45)
    out = np.empty_like(X)
    ops.rmsnorm_rows(X, w, 1e-5, out)
    ref = X / np.sqrt(np.mean(X * X, axis=1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@LAYER_OPS
def test_silu_mul_and_add(rng, ops):
    g, u = randn(rng, 3, 37, scale=8.0), randn(rng, 3, 37)
    g[0, :3] = [-100.0, 100.0, -88.5]          # exp overflows: silu is -0 / g
    out = np.empty_like(g)
    ops.silu_mul(g, u, out)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(out, g64 / (1 + np.exp(-g64)) * u, rtol=1e-5, atol=1e-6)
    x, y = randn(rng, 37), randn(rng, 37)
    ref = x + y
    K.add_inplace(x, y)
    np.testing.assert_array_equal(x, ref)


def test_silu_mul_rows_split_over_threads_equal_serial(rng):
    """A prompt chunk's silu_mul runs its rows on every thread: the same floats as one thread."""
    g, u = randn(rng, 64, K.SILU_PAR_MIN // 32 + 3, scale=8.0), randn(rng, 64, K.SILU_PAR_MIN // 32 + 3)
    serial, split = np.empty_like(g), np.empty_like(g)
    K.silu_mul(g, u, serial)
    K.set_threads(2)
    try:
        K.silu_mul(g, u, split)
    finally:
        K.set_threads(1)
    np.testing.assert_array_equal(split, serial)


def test_expf_accuracy():
    x = np.linspace(-87, 88, 20001).astype(np.float32).reshape(1, -1)
    out = np.empty_like(x)
    K.silu_mul(-x, np.ones_like(x), out)   # out = -x / (1 + exp(x))
    ref = -x.astype(np.float64) / (1 + np.exp(x.astype(np.float64)))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-30)


# --- rope ---------------------------------------------------------------------------------

def hf_rope(x, positions, inv_freq):
    """NumPy port of HF apply_rotary_pos_emb (rotate_half, cos/sin duplicated over halves)."""
    freqs = positions[:, None].astype(np.float64) * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


@LAYER_OPS
def test_rope_matches_hf(rng, ops):
    T, H, D, theta = 5, 3, 8, 10000.0
    x = randn(rng, T, H, D)
    start = 13
    cos, sin = K.rope_tables(D, 32, theta, None)
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ref = hf_rope(x.astype(np.float64), np.arange(start, start + T), inv)
    ops.rope(x, start, cos, sin)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


def _hf_inv_freq(rope_parameters, head_dim=64, theta=500000.0):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = dict(rope_parameters, rope_theta=theta)
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      rope_parameters=params, max_position_embeddings=131072)
    inv, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    return inv.double().numpy()


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "linear", "factor": 4.0},
])
def test_rope_tables_match_transformers(scaling):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    ref_inv = _hf_inv_freq(scaling)
    positions = np.arange(0, 4096, 37)
    cos, sin = K.rope_tables(64, 4096, 500000.0, scaling)
    # transformers computes inv_freq in float32: compare angles at float32 precision
    np.testing.assert_allclose(cos[positions], np.cos(positions[:, None] * ref_inv), atol=2e-3)
    np.testing.assert_allclose(sin[positions], np.sin(positions[:, None] * ref_inv), atol=2e-3)
    ours = K._inv_freq(64, 500000.0, scaling)
    np.testing.assert_allclose(ours, ref_inv, rtol=1e-6)
    # the older key name "type" means the same
    legacy = {("type" if k == "rope_type" else k): v for k, v in scaling.items()}
    np.testing.assert_array_equal(K.rope_tables(64, 16, 500000.0, legacy)[0], cos[:16])


def test_rope_tables_default_and_unknown():
    cos, sin = K.rope_tables(8, 10, 10000.0, {"rope_type": "default"})
    ang = np.arange(10)[:, None] * (1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8))
    np.testing.assert_allclose(cos, np.cos(ang), atol=1e-7)
    assert cos.dtype == np.float32 and sin.shape == (10, 4)
    with pytest.raises(UnsupportedModelError, match="yarn"):
        K.rope_tables(8, 10, 10000.0, {"rope_type": "yarn", "factor": 4.0})


# --- attention ----------------------------------------------------------------------------

def ref_attention(q, k, v, start):
    T, H, D = q.shape
    group = H // k.shape[0]
    out = np.empty(q.shape, np.float64)
    for t in range(T):
        for h in range(H):
            L = start + t + 1
            s = k[h // group, :L].astype(np.float64) @ q[t, h] / math.sqrt(D)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[h // group, :L]
    return out


@pytest.mark.parametrize("T,H,Hkv,D,start,C", [
    (3, 6, 2, 8, 5, 11), (1, 6, 2, 8, 0, 4), (1, 6, 3, 10, 13, 19), (7, 4, 4, 6, 0, 7),
    (2, 9, 3, 64, 40, 50)])
def test_attention(rng, threads, T, H, Hkv, D, start, C):
    q = randn(rng, T, H, D, scale=2.0)
    k, v = randn(rng, Hkv, C, D), randn(rng, Hkv, C, D)
    # garbage beyond start+T must be ignored (causal mask / cache tail)
    k[:, start + T:] = 1e6
    v[:, start + T:] = np.nan
    ref = ref_attention(q, k, v, start)
    out = np.empty_like(q)
    K.attention(q, k, v, start, out)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    scores = np.empty((H, C), np.float32)
    out2 = np.empty_like(q)
    old = K.ATTN_PAR_MIN
    K.ATTN_PAR_MIN = 0          # force the parallel kernel when threads > 1
    try:
        K.attention(q, k, v, start, out2, scores)
    finally:
        K.ATTN_PAR_MIN = old
    np.testing.assert_allclose(out2, ref, rtol=1e-4, atol=1e-5)
    # the NumPy stand-in (cold JIT cache), on float32 and on the model's f16-bits cache
    K.NumpyLayerOps.attention(q, k, v, start, out2)
    np.testing.assert_allclose(out2, ref, rtol=1e-4, atol=1e-5)
    with np.errstate(over="ignore"):            # the 1e6 garbage tail becomes inf: still ignored
        kb, vb = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
    K.attention(q, kb, vb, start, out)
    K.NumpyLayerOps.attention(q, kb, vb, start, out2)
    np.testing.assert_allclose(out2, out, rtol=1e-4, atol=1e-5)


# --- dense codec --------------------------------------------------------------------------

def test_registry():
    assert get_codec("dense").name == "dense" and "dense" in CODECS
    with pytest.raises(UnsupportedModelError, match="nope"):
        get_codec("nope")
    with pytest.raises(EdgerunError, match="f8"):
        get_codec("dense").encode(np.zeros((2, 2), np.float32), {"dtype": "f8"})


def bf16_reference(w):
    """Round-to-nearest-even to 8 mantissa bits, computed in float64 arithmetic."""
    w = w.astype(np.float64)
    m, e = np.frexp(w)                     # w = m * 2^e, 0.5 <= |m| < 1
    return (np.round(m * 256) / 256 * np.exp2(e)).astype(np.float32)   # np.round: half to even


def test_encode_decode_rounding(rng):
    codec = get_codec("dense")
    w = randn(rng, 37, 45, scale=3.0)
    # include exact ties for bf16 (low 16 bits 0x8000) with even and odd kept halves
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x40000001], np.uint32).view(np.float32)
    w.flat[:4] = ties
    f16 = codec.encode(w, {"dtype": "f16"})["weight"]
    assert f16.dtype == np.uint16 and f16.shape == w.shape
    np.testing.assert_array_equal(codec.decode({"weight": f16}, {"dtype": "f16"}),
                                  w.astype(np.float16).astype(np.float32))
    bf = codec.encode(w, {"dtype": "bf16"})["weight"]
    assert bf.dtype == np.uint16
    dec = codec.decode({"weight": bf}, {"dtype": "bf16"})
    np.testing.assert_array_equal(dec, bf16_reference(w))
    np.testing.assert_array_equal(dec.flat[:4], np.array([1.0, 1.015625, -1.0, 2.0], np.float32))
    f32 = codec.encode(w, {"dtype": "f32"})
    np.testing.assert_array_equal(codec.decode(f32, {"dtype": "f32"}), w)
    assert codec.nbytes(f32) == w.size * 4 and codec.nbytes({"weight": bf}) == w.size * 2
    assert np.isnan(bf16_bits_to_f32(f32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,n", [(37, 45), (5, 3), (1100, 600)])
def test_dense_linear(rng, threads, dtype, d, n):
    codec = get_codec("dense")
    params = {"dtype": dtype}
    parts = codec.encode(randn(rng, d, n), params)
    W = codec.decode(parts, params).astype(np.float64)
    lin = codec.load(parts, params)
    assert lin.shape == (d, n)
    assert lin.nbytes == codec.nbytes(parts)
    assert lin.bits_per_weight == {"f32": 32, "f16": 16, "bf16": 16}[dtype]
    x = randn(rng, n)
    out = np.empty(d, np.float32)
    lin.matvec(x, out)
    np.testing.assert_allclose(out, W @ x, rtol=1e-4, atol=1e-4)
    if d * n > 1000:            # also exercise the prange kernel regardless of the size threshold
        out[:] = 0
        lin._mv_par(lin.W, x, out, threads)
        np.testing.assert_allclose(out, W @ x, rtol=1e-4, atol=1e-4)
    for T in (2, 9):            # loop-of-matvecs path and register-blocked kernel path
        X = randn(rng, T, n)
        O = np.empty((T, d), np.float32)
        lin.matmul(X, O)
        np.testing.assert_allclose(O, X @ W.T, rtol=1e-4, atol=1e-4)
    row = np.empty(n, np.float32)
    lin.row(d - 1, row)
    np.testing.assert_array_equal(row, W[d - 1].astype(np.float32))
    np.testing.assert_array_equal(codec.as_f32(parts, params), W.astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,n", [(37, 45), (70, 130), (5, 3)])
def test_dense_matmul_kernel(rng, threads, dtype, d, n, monkeypatch):
    """The no-BLAS prefill matmul: every T tail (T % 4), row tail (d % 4) and tile boundary."""
    monkeypatch.setattr(dense, "TILE_ROWS", 16)     # several tiles and a ragged last one
    monkeypatch.setattr(dense, "PAR_MIN_MACS", 0)   # threads > 1 always takes the prange kernel
    codec = get_codec("dense")
    params = {"dtype": dtype}
    parts = codec.encode(randn(rng, d, n), params)
    W = codec.decode(parts, params).astype(np.float64)
    lin = codec.load(parts, params)
    for T in (1, 3, 4, 5, 17, 64):
        X = randn(rng, T, n)
        want = X.astype(np.float64) @ W.T
        O = np.full((T, d), np.nan, np.float32)
        lin.matmul(X, O)
        np.testing.assert_allclose(O, want, rtol=1e-4, atol=1e-4)
        # the kernels themselves, also below MATMUL_MIN_T, serial and split in `threads` blocks
        tiles = dense._tiles(threads, 0 if dtype == "f32" else n)
        O[:] = np.nan
        lin._mm(X, lin.W, O, 0, d, tiles[0])
        np.testing.assert_allclose(O, want, rtol=1e-4, atol=1e-4)
        O[:] = np.nan
        lin._mm_par(X, lin.W, O, tiles)
        np.testing.assert_allclose(O, want, rtol=1e-4, atol=1e-4)


def test_load_rejects_wrong_dtype():
    codec = get_codec("dense")
    with pytest.raises(UnsupportedModelError):
        codec.load({"weight": np.zeros((3, 4), np.float32)}, {"dtype": "f16"})


@pytest.mark.parametrize("physical,usable,load,expect", [
    (8, 16, 0.2, 8),       # quiet laptop: the physical cores
    (2, 2, 0.1, 2),        # quiet 2-core machine
    (2, 2, 1.3, 1),        # another process holds a core
    (4, 4, 9.0, 1),        # overloaded: never below 1
    (8, 16, 11.6, 4),      # 4 logical CPUs idle: no more threads than that
])
def test_default_threads_follow_idle_physical_cores(monkeypatch, physical, usable, load, expect):
    import os

    import numba
    import psutil
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: physical if not logical else usable)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 64)
    assert K.default_threads() == expect


def test_cold_cache_runs_serial_kernels_until_the_child_is_done(rng, monkeypatch):
    """kernels.py "Cold JIT cache": while the child compiling the batched and parallel kernels
    runs, a matmul is a loop of matvecs and nothing runs on threads; once it has exited, `finish`
    (load its kernels) runs once and the full kernels are used."""
    import subprocess
    import sys
    codec, params = get_codec("dense"), {"dtype": "f16"}
    parts = codec.encode(randn(rng, 64, 48), params)
    lin = codec.load(parts, params)
    batched = []
    monkeypatch.setattr(lin, "_matmul", lambda X, out: batched.append(X.shape[0]))
    monkeypatch.setattr(K, "POLL_S", 0.0)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    finished = []
    K.set_threads(2)
    try:
        K.defer_full_kernels(child, lambda: finished.append(True))
        X, out = randn(rng, 8, 48), np.full((8, 64), np.nan, np.float32)
        lin.matmul(X, out)
        assert batched == [] and not finished and lin.threads_for(True) == 1 and not K.full_kernels_ready()
        assert K.layer_ops() is K.NumpyLayerOps
        np.testing.assert_allclose(out, X @ codec.decode(parts, params).T, rtol=1e-4, atol=1e-4)
        child.stdin.close()
        child.wait()
        lin.matmul(X, out)
        assert batched == [8] and finished == [True] and lin.threads_for(True) == 2
        assert K.layer_ops() is K
    finally:
        child.kill()
        K._pending = None
        K.set_threads(1)
