"""Cluster codec (formats/codec-cluster.md): k-means quality, weighted vs plain k-means, the
Numba kernels against NumPy `decode(parts) @ x` on odd shapes, honest bits per weight."""
import numpy as np
import pytest

from edgerun import kernels
from edgerun.codecs import cluster, get_codec
from edgerun.codecs.cluster import ClusterCodec, meta_array, pack_indices, unpack_indices
from edgerun.codecs.cluster.reference import matmul as matmul_ref, matvec as matvec_ref
from edgerun.errors import EdgerunError

RNG = np.random.default_rng(7)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_registry_and_roundtrip_error_decreases_with_bits():
    codec = get_codec("cluster")
    assert codec.name == "cluster"
    w = RNG.standard_normal((48, 512)).astype(np.float32)
    errs = [_rel(codec.decode(codec.encode(w, {"bits": b}), {}), w) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True), errs
    # Lloyd-Max on a Gaussian: 2 bits ≈ 0.34, 4 bits ≈ 0.10; 8 bits near fp16 noise
    assert errs[0] < 0.36 and errs[2] < 0.11 and errs[3] < 0.02, errs


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_roundtrip(bits):
    idx = RNG.integers(0, 1 << bits, size=(5, 77))
    codes = pack_indices(idx.astype(np.uint8), bits)
    assert codes.shape == (5, 3 * 4 * bits)            # 77 -> 3 blocks of 32, 4*bits bytes each
    np.testing.assert_array_equal(unpack_indices(codes, bits, 77), idx)


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_plane_order_1_packs_load_converted(bits):
    """A pack from before plane order 2 (4-entry meta, the 1-bit plane a little-endian uint32
    whose bit j is weight j) decodes and multiplies as the same indices in order 2."""
    d, n = 9, 77
    idx = RNG.integers(0, 1 << bits, size=(d, n)).astype(np.uint8)
    book = np.sort(RNG.standard_normal((d, 1 << bits)), axis=1).astype(np.float16).view(np.uint16)
    new = {"meta": meta_array(d, n, bits, 1), "codebook": book, "codes": pack_indices(idx, bits)}
    full = np.zeros((d, 3 * 32), np.uint8)
    full[:, :n] = idx >> (bits - 1)
    blk = new["codes"].reshape(d, 3, 4 * bits).copy()
    blk[..., -4:] = np.packbits(full.reshape(d, 3, 32), axis=-1, bitorder="little")
    old = {"meta": np.array([d, n, bits, 1], np.int32), "codebook": book, "codes": blk.reshape(d, -1)}
    assert not np.array_equal(old["codes"], new["codes"])
    np.testing.assert_array_equal(ClusterCodec.decode(old), ClusterCodec.decode(new))
    x = RNG.standard_normal(n).astype(np.float32)
    outs = [np.zeros(d, np.float32) for _ in range(2)]
    for parts, out in zip((old, new), outs):
        ClusterCodec.load(parts).matvec(x, out)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[1], matvec_ref(new, None, x), rtol=1e-5, atol=1e-5)


def test_weighted_kmeans_beats_plain_on_weighted_error():
    d, n = 32, 256
    w = RNG.standard_normal((d, n)).astype(np.float32)
    h = np.full(n, 0.01)
    heavy = RNG.choice(n, 6, replace=False)
    h[heavy] = 50.0                                     # a few heavy input channels
    H = np.diag(h)
    params = {"bits": 3, "group_rows": 1}
    plain = ClusterCodec.decode(ClusterCodec.encode(w, params))
    weighted = ClusterCodec.decode(ClusterCodec.encode(w, params, H))
    scale = np.sqrt(h)[None, :]
    e_plain = np.linalg.norm((w - plain) * scale)
    e_weighted = np.linalg.norm((w - weighted) * scale)
    assert e_weighted < 0.5 * e_plain, (e_weighted, e_plain)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    if request.param > 1:
        monkeypatch.setattr(cluster.kernels, "PAR_MIN_WEIGHTS", 0)    # take the prange kernels on small shapes
    kernels.set_threads(request.param)
    yield request.param
    kernels.set_threads(1)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(37, 45), (37, 1000)])
def test_kernels_match_numpy_decode(bits, shape, threads):
    d, n = shape
    w = RNG.standard_normal((d, n)).astype(np.float32)
    parts = ClusterCodec.encode(w, {"bits": bits, "group_rows": 3 if bits == 8 else 1})
    W = ClusterCodec.decode(parts).astype(np.float64)
    L = ClusterCodec.load(parts)
    assert L.shape == (d, n)
    x = RNG.standard_normal(n).astype(np.float32)
    out = np.full(d, np.nan, np.float32)
    L.matvec(x, out)
    np.testing.assert_allclose(out, matvec_ref(parts, None, x), rtol=1e-4, atol=1e-4 * np.sqrt(n))
    # the int8 path (bits <= 5) costs little against the codebook's own error
    np.testing.assert_allclose(out, W @ x, rtol=0, atol=0.03 * np.abs(W @ x).max())
    for T in (1, 3, 17):
        X = RNG.standard_normal((T, n)).astype(np.float32)
        O = np.full((T, d), np.nan, np.float32)
        L.matmul(X, O)
        np.testing.assert_allclose(O, matmul_ref(parts, None, X), rtol=1e-4, atol=1e-4 * np.sqrt(n))
    r = np.full(n, np.nan, np.float32)
    for i in (0, d - 1):
        L.row(i, r)
        np.testing.assert_array_equal(r, W[i].astype(np.float32))


@pytest.mark.parametrize("bits", [3, 5])
@pytest.mark.parametrize("sign", [1, -1])
def test_int8_matvec_extremes_stay_exact(bits, sign, threads):
    """Every product at its largest (codebook entry 127 of 127, activations ±127 at block scale
    2047) for 3 chunks of 16 blocks: the 16-bit pairs and 32-bit chunk sums do not overflow."""
    d, n, K = 8, 3 * 16 * 32 + 5, 1 << bits
    cb = np.linspace(-1, 2, K).astype(np.float16)
    parts = {"meta": meta_array(d, n, bits, 1), "codebook": np.tile(cb, (d, 1)).view(np.uint16),
             "codes": pack_indices(np.full((d, n), K - 1, np.uint8), bits)}
    x = np.full(n, sign * 3.0, np.float32)
    out = np.full(d, np.nan, np.float32)
    ClusterCodec.load(parts).matvec(x, out)
    np.testing.assert_allclose(out, np.full(d, sign * 6.0 * n), rtol=1e-5)
    np.testing.assert_allclose(out, matvec_ref(parts, None, x), rtol=1e-5)


@pytest.mark.parametrize("bits,g", [(2, 1), (3, 1), (4, 1), (8, 4), (4, None)])
def test_bits_per_weight_counts_every_byte(bits, g):
    d, n = 37, 1000
    w = RNG.standard_normal((d, n)).astype(np.float32)
    params = {"bits": bits} if g is None else {"bits": bits, "group_rows": g}
    parts = ClusterCodec.encode(w, params)
    g = int(parts["meta"][3])
    nblk = -(-n // 32)
    expect = d * nblk * 4 * bits + (-(-d // g)) * (1 << bits) * 2 + 20   # codes + f16 codebooks + meta
    assert ClusterCodec.nbytes(parts) == expect == sum(p.nbytes for p in parts.values())
    L = ClusterCodec.load(parts)
    assert L.nbytes == expect
    assert L.bits_per_weight == pytest.approx(expect * 8 / (d * n))


def test_default_group_rows():
    assert cluster.default_group_rows(3, 576) == 1      # 0.22 bits/weight of codebook
    assert cluster.default_group_rows(4, 576) == 2
    assert cluster.default_group_rows(4, 1536) == 1
    assert cluster.default_group_rows(8, 576) == 32


def test_bad_params_raise_edgerun_errors():
    w = RNG.standard_normal((4, 40)).astype(np.float32)
    with pytest.raises(EdgerunError):
        ClusterCodec.encode(w, {"bits": 9})
    with pytest.raises(EdgerunError):
        ClusterCodec.encode(w, {"bits": 4, "outliers": 0.5})
    with pytest.raises(EdgerunError):
        ClusterCodec.encode(w, {"bits": 4}, np.eye(3))
    parts = ClusterCodec.encode(w, {"bits": 4})
    parts["codes"] = parts["codes"][:, :-1]
    with pytest.raises(EdgerunError):
        ClusterCodec.load(parts)
    parts = ClusterCodec.encode(w, {"bits": 4, "outliers": 0.05})
    parts["outlier_col"] = parts["outlier_col"][:-1]
    with pytest.raises(EdgerunError):
        ClusterCodec.load(parts)


def _correlated_inputs(n, T=2048):
    """Calibration inputs X (T, n) with correlated, unequally scaled channels, and H = XᵀX / T."""
    X = RNG.standard_normal((T, n)) @ (RNG.standard_normal((n, n)) * 0.3 + np.eye(n))
    X *= np.exp(RNG.standard_normal(n))[None, :]
    return X, X.T @ X / T


@pytest.mark.parametrize("bits,g", [(3, 1), (4, 2)])
def test_gptq_rounding_beats_nearest_on_output_error(bits, g):
    d, n = 24, 160
    w = RNG.standard_normal((d, n)).astype(np.float32)
    X, H = _correlated_inputs(n)
    p = {"bits": bits, "group_rows": g}
    near = ClusterCodec.decode(ClusterCodec.encode(w, dict(p, gptq=False), H))
    gptq_parts = ClusterCodec.encode(w, p, H)
    gptq = ClusterCodec.decode(gptq_parts)
    # same codebooks (GPTQ only changes the rounding), lower ‖(W − Ŵ) Xᵀ‖
    np.testing.assert_array_equal(gptq_parts["codebook"], ClusterCodec.encode(w, dict(p, gptq=False), H)["codebook"])
    e_near = np.linalg.norm((w - near) @ X.T)
    e_gptq = np.linalg.norm((w - gptq) @ X.T)
    assert e_gptq < 0.8 * e_near, (e_gptq, e_near)


def test_outliers_are_exact_and_counted():
    d, n = 37, 1000
    w = RNG.standard_normal((d, n)).astype(np.float32)
    spikes = RNG.choice(d * n, 40, replace=False)
    w.reshape(-1)[spikes] = (RNG.choice([-1, 1], 40) * RNG.uniform(8, 12, 40)).astype(np.float16)
    base = ClusterCodec.encode(w, {"bits": 3})
    parts = ClusterCodec.encode(w, {"bits": 3, "outliers": 0.002})
    nnz = int(round(0.002 * d * n))
    assert parts["outlier_rowptr"][-1] == nnz == parts["outlier_col"].size
    assert ClusterCodec.nbytes(parts) == ClusterCodec.nbytes(base) + 4 * (d + 1) + 4 * nnz
    W = ClusterCodec.decode(parts)
    # the spikes are the most sensitive weights: stored sparse, they decode (nearly) exactly
    np.testing.assert_allclose(W.reshape(-1)[spikes], w.reshape(-1)[spikes], rtol=2e-3)
    assert _rel(W, w) < 0.85 * _rel(ClusterCodec.decode(base), w)


@pytest.mark.parametrize("bits", [3, 4])
def test_kernels_add_outliers(bits, threads):
    d, n = 37, 45
    w = RNG.standard_normal((d, n)).astype(np.float32)
    parts = ClusterCodec.encode(w, {"bits": bits, "outliers": 0.05}, _correlated_inputs(n, 256)[1])
    assert parts["outlier_col"].size > 0
    W = ClusterCodec.decode(parts).astype(np.float64)
    L = ClusterCodec.load(parts)
    x = RNG.standard_normal(n).astype(np.float32)
    out = np.full(d, np.nan, np.float32)
    L.matvec(x, out)
    np.testing.assert_allclose(out, matvec_ref(parts, None, x), rtol=1e-4, atol=1e-4 * np.sqrt(n))
    X = RNG.standard_normal((5, n)).astype(np.float32)
    O = np.full((5, d), np.nan, np.float32)
    L.matmul(X, O)
    np.testing.assert_allclose(O, matmul_ref(parts, None, X), rtol=1e-4, atol=1e-4 * np.sqrt(n))
    r = np.full(n, np.nan, np.float32)
    for i in range(d):
        L.row(i, r)
        np.testing.assert_allclose(r, W[i], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 5])
@pytest.mark.parametrize("shape", [(37, 45), (5, 16400)])
def test_int8_matmul_equals_matvecs(bits, shape, threads):
    """The prompt's matmul gives each token the bits a token-by-token decode would (same int8
    activations, sums in the same order): MM_TOKENS at a time, the tokens left one by one, and
    (n = 16400) tokens tiled so their int8 copy stays in L2."""
    d, n = shape
    w = RNG.standard_normal((d, n)).astype(np.float32)
    parts = ClusterCodec.encode(w, {"bits": bits, "outliers": 0.05, "gptq": False})
    L = ClusterCodec.load(parts)
    for T in (cluster.kernels.MM_TOKENS, 2 * cluster.kernels.MM_TOKENS + 3):
        X = (RNG.standard_normal((T, n)) * RNG.uniform(0.01, 10, (T, 1))).astype(np.float32)
        O = np.full((T, d), np.nan, np.float32)
        L.matmul(X, O)
        want = np.full((T, d), np.nan, np.float32)
        for t in range(T):
            L.matvec(X[t], want[t])
        np.testing.assert_array_equal(O, want)


@pytest.mark.parametrize("hessian", [True, False])
def test_encode_by_row_chunks_equals_whole(monkeypatch, hessian):
    """The encode runs in row chunks (bounded memory on a 1.5B model's head); the parts are the
    same, bit for bit, as from one chunk, outliers (a global top fraction) included."""
    from edgerun.codecs.cluster import encode as enc
    d, n, g = 301, 130, 2
    w = RNG.standard_normal((d, n)).astype(np.float32) * RNG.uniform(0.2, 2, n).astype(np.float32)
    X = RNG.standard_normal((3 * n, n)).astype(np.float32)
    H = (X.T @ X / len(X)).astype(np.float64) if hessian else None
    params = {"bits": 5, "group_rows": g, "outliers": 0.01}
    whole = ClusterCodec.encode(w, params, H)
    monkeypatch.setattr(enc, "CHUNK_BYTES", 4 * n * 7)            # 6-row chunks
    assert len(enc._chunks(d, n, g)) > 40
    chunked = ClusterCodec.encode(w, params, H)
    assert whole.keys() == chunked.keys()
    for p in whole:
        np.testing.assert_array_equal(whole[p], chunked[p], err_msg=p)
    assert whole["outlier_rowptr"][-1] == round(0.01 * d * n)
