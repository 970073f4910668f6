"""BitStack codec (formats/codec-bitstack.md): reference decode vs the paper's procedure, LUT
kernels vs decode(parts) @ x, block prefixes, importance and the level-wise global order."""
import numpy as np
import pytest

from edgerun import kernels
from edgerun.codecs import get_codec
from edgerun.codecs.bitstack import encode as bitstack_encode
from edgerun.codecs.bitstack import (BitStackCodec, _block_views, activation_scale, block_layout,
                                     deinterleave_block, fit_digits, gptq_signs, interleave_block, order_blocks)
from edgerun.errors import EdgerunError

RNG = np.random.default_rng(7)


def _data(d, n, K=4, k=16, hessian=True):
    w = RNG.standard_normal((d, n)).astype(np.float32)
    X = RNG.standard_normal((400, n)).astype(np.float32) * RNG.uniform(0.2, 3.0, n).astype(np.float32)
    H = (X.T @ X / 400).astype(np.float64) if hessian else None
    return w, H, BitStackCodec.encode(w, {"blocks": K, "rank": k}, H)


@pytest.fixture(scope="module")
def enc45():
    return _data(37, 45)


@pytest.fixture(scope="module")
def enc48():
    return _data(37, 48)


def test_registry_and_parts(enc48):
    w, H, parts = enc48
    assert isinstance(get_codec("bitstack"), BitStackCodec)
    assert sorted(parts) == ["block.0", "block.1", "block.2", "block.3", "inv_scale", "meta"]
    assert parts["meta"].tolist() == [37, 48, 16, 4]
    assert all(parts[f"block.{i}"].dtype == np.uint8 and parts[f"block.{i}"].size == block_layout(37, 48, 16)[2]
               for i in range(4))


def test_decode_matches_paper_procedure(enc45):
    """Blocks reproduce the residual iteration: S_i = sign(R), |R| ≈ u vᵀ, R -= S_i ⊙ (u vᵀ)."""
    w, H, parts = enc45
    s = activation_scale(H, w.shape[1])
    np.testing.assert_allclose(parts["inv_scale"], 1 / s, rtol=1e-6)
    R = w * s[None, :]
    uo, vo, _ = block_layout(37, 45, 16)
    for i in range(4):
        blob = parts[f"block.{i}"]
        neg = np.unpackbits(blob[:37 * 6].reshape(37, 6), axis=1, count=45, bitorder="little").astype(bool)
        assert np.array_equal(neg, R < 0)
        u = blob[uo:uo + 37 * 32].view(np.float16).astype(np.float64).reshape(37, 16)
        v = blob[vo:vo + 45 * 32].view(np.float16).astype(np.float64).reshape(45, 16)
        approx = u @ v.T
        # the randomized SVD is within a few % of the optimal rank-16 approximation of |R|
        sig = np.linalg.svd(np.abs(R), compute_uv=False)
        assert np.linalg.norm(approx - np.abs(R)) < 1.05 * np.sqrt(np.sum(sig[16:] ** 2)) + 1e-3
        R = R - np.where(neg, -approx, approx)
        np.testing.assert_allclose(BitStackCodec.decode(parts, {}, blocks=i + 1), w - R / s[None, :],
                                   rtol=1e-4, atol=1e-4)


def test_error_falls_with_blocks():
    w = RNG.standard_normal((96, 160)).astype(np.float32)
    parts = BitStackCodec.encode(w, {"blocks": 6, "rank": 8})
    errs = [np.linalg.norm(BitStackCodec.decode(parts, {}, blocks=m) - w) for m in range(7)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[6] < 0.2 * errs[0]


@pytest.mark.parametrize("fixture", ["enc48", "enc45"])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_matvec_matmul_row_vs_decode(request, fixture, m):
    w, H, parts = request.getfixturevalue(fixture)
    d, n = w.shape
    W = BitStackCodec.decode(parts, {}, blocks=m)
    lin = BitStackCodec.load(parts, {}, blocks=m)
    assert lin.shape == (d, n) and lin.blocks == m
    scale = np.abs(W).sum(axis=1).max()
    x = RNG.standard_normal(n).astype(np.float32)
    out = np.full(d, np.nan, np.float32)
    lin.matvec(x, out)
    np.testing.assert_allclose(out, W @ x, atol=2e-5 * scale)
    for T in (1, 3, 17):
        X = RNG.standard_normal((T, n)).astype(np.float32)
        O = np.full((T, d), np.nan, np.float32)
        lin.matmul(X, O)
        np.testing.assert_allclose(O, X @ W.T, atol=2e-5 * scale)
    r = np.full(n, np.nan, np.float32)
    lin.row(5, r)
    np.testing.assert_allclose(r, W[5], atol=1e-5 * np.abs(W).max())


def test_overshoot_scales_steps_and_lowers_the_error_later():
    """Each block is `overshoot` x the least-squares step; past a few blocks the larger steps
    reach the tails the greedy ones never do (formats/codec-bitstack.md)."""
    w = RNG.standard_normal((96, 160)).astype(np.float32)
    greedy = BitStackCodec.encode(w, {"blocks": 8, "rank": 2})
    over = BitStackCodec.encode(w, {"blocks": 8, "rank": 2, "overshoot": 1.25})
    d1g = BitStackCodec.decode(greedy, {}, blocks=1)
    np.testing.assert_allclose(BitStackCodec.decode(over, {}, blocks=1), 1.25 * d1g, rtol=2e-3, atol=1e-3)
    err = {name: [np.linalg.norm(BitStackCodec.decode(p, {}, blocks=m) - w) for m in (1, 8)]
           for name, p in (("greedy", greedy), ("over", over))}
    assert err["greedy"][0] < err["over"][0]          # one block: the greedy step is optimal
    assert err["over"][1] < 0.5 * err["greedy"][1]    # eight blocks: less than half the error
    with pytest.raises(EdgerunError, match="overshoot"):
        BitStackCodec.encode(w, {"overshoot": 3})


def test_gptq_signs_lower_the_output_error():
    """signs="gptq" picks each block's signs with GPTQ's error feedback through H⁻¹: the output
    error tr(E H Eᵀ) is lower than with sign(R) (correlated inputs, where the feedback has
    something to compensate), and the blocks still decode as stored."""
    d, n = 48, 160
    w = RNG.standard_normal((d, n)).astype(np.float32)
    mix = RNG.standard_normal((n, n)).astype(np.float32) * 0.3 + np.eye(n, dtype=np.float32)
    X = RNG.standard_normal((600, n)).astype(np.float32) @ mix
    H = (X.T @ X / 600).astype(np.float64)
    errs = {}
    for signs in ("sign", "gptq"):
        parts = BitStackCodec.encode(w, {"blocks": 4, "rank": 2, "signs": signs}, H)
        errs[signs] = []
        for m in range(1, 5):
            E = (w - BitStackCodec.decode(parts, {}, blocks=m)).astype(np.float64)
            errs[signs].append(np.trace(E @ H @ E.T))
    # the first blocks gain most (on this synthetic H the plain signs catch up by block 3; on
    # SmolLM2 layers the gain lasts to ~6 blocks, formats/codec-bitstack.md)
    assert errs["gptq"][0] < 0.8 * errs["sign"][0] and errs["gptq"][1] < 0.95 * errs["sign"][1], errs
    lin = BitStackCodec.load(parts, {})
    x = RNG.standard_normal(n).astype(np.float32)
    out = np.empty(d, np.float32)
    lin.matvec(x, out)
    np.testing.assert_allclose(out, BitStackCodec.decode(parts, {}) @ x, atol=1e-4 * np.abs(w).sum(1).max())
    with pytest.raises(EdgerunError, match="signs"):
        BitStackCodec.encode(w, {"signs": "best"}, H)


def test_joint_signs_round_the_first_blocks_as_one_grid(monkeypatch):
    """joint=J: the first J blocks are one grid per row (block i's magnitude a_i(r) x one rank-k
    fit, as stored) whose signs GPTQ chooses together; at J blocks the output error is well below
    the block-by-block choice, and the greedy blocks after J keep most of the lead. Where the
    block-by-block blocks are better, the encoder keeps them."""
    rng = np.random.default_rng(0)      # its own data: the sampled trial below is one draw
    d, n = 64, 192
    w = (rng.standard_normal((d, n)) * rng.uniform(0.5, 2, (d, 1))).astype(np.float32)
    mix = rng.standard_normal((n, n)).astype(np.float32) * 0.3 + np.eye(n, dtype=np.float32)
    X = rng.standard_normal((800, n)).astype(np.float32) @ mix
    H = (X.T @ X / 800).astype(np.float64)
    params = {"blocks": 6, "rank": 2, "overshoot": 1.15, "signs": "gptq"}

    def errors(parts):
        return [np.einsum("ij,jk,ik->", E, H, E) for E in
                ((w - BitStackCodec.decode(parts, {}, blocks=m)).astype(np.float64) for m in range(1, 7))]

    block_by_block = errors(BitStackCodec.encode(w, params, H))
    parts = BitStackCodec.encode(w, dict(params, joint=4), H)
    joint = errors(parts)
    u, v = zip(*(_block_views(parts[f"block.{i}"], d, n, 2)[1:] for i in range(4)))
    assert all(np.array_equal(v[0], vi) for vi in v)           # one column factor ...
    u = [ui.view(np.float16).astype(np.float64) for ui in u]
    for ui in u[1:]:                                          # ... and per-row multiples of one row factor
        np.testing.assert_allclose(ui[:, 0] * u[0][:, 1], ui[:, 1] * u[0][:, 0], rtol=2e-2, atol=1e-3)
    assert joint[3] < 0.8 * block_by_block[3] and joint[5] < block_by_block[5], (joint, block_by_block)
    # three input columns 300x the others (massive activations): one grid per row cannot serve
    # those columns' weights and the rest, so the encoder keeps the block-by-block blocks
    X[:, 7:10] *= 300
    H = (X.T @ X / 800).astype(np.float64)
    first = [BitStackCodec.decode(BitStackCodec.encode(w, dict(params, joint=j), H), {}, blocks=4) for j in (0, 4)]
    assert np.array_equal(*first)
    # ... also when the greedy blocks are tried on a sample of the rows first (half of them here)
    monkeypatch.setattr(bitstack_encode, "GREEDY_TRIAL_ROWS", 32)
    assert np.array_equal(BitStackCodec.decode(BitStackCodec.encode(w, dict(params, joint=4), H), {}, blocks=4), first[0])
    with pytest.raises(EdgerunError, match="joint"):
        BitStackCodec.encode(w, dict(params, joint=7), H)
    with pytest.raises(EdgerunError, match="joint"):
        BitStackCodec.encode(w, dict(params, blocks=16, joint=9), H)


def test_gptq_signs_same_on_two_threads():
    # the rows are split over the kernel threads (independent along the error feedback): the
    # signs must not depend on the split, odd row counts included
    d, n, J = 203, 300, 3
    R = RNG.standard_normal((d, n)).astype(np.float32)
    A = np.abs(RNG.standard_normal((J, d, n))).astype(np.float32) * 0.4
    X = RNG.standard_normal((900, n))
    U = np.linalg.cholesky(np.linalg.inv(X.T @ X / 900 + 0.1 * np.eye(n))).T.astype(np.float32)
    one, err_one = gptq_signs(R, A, U)
    kernels.set_threads(2)
    try:
        two, err_two = gptq_signs(R, A, U)
    finally:
        kernels.set_threads(1)
    np.testing.assert_array_equal(one, two)
    assert err_one == pytest.approx(err_two, rel=1e-6)      # BLAS rounds by band shape
    # GPTQ's identity: Σ e² = tr(Δ H_d Δᵀ), H_d = (UᵀU)⁻¹ the damped Hessian, Δ the rounding error
    delta = (R - np.where(one, -A, A).sum(0)).astype(np.float64)
    H_d = X.T @ X / 900 + 0.1 * np.eye(n)
    assert err_one == pytest.approx(np.trace(delta @ H_d @ delta.T), rel=1e-4)


def test_gptq_signs_pick_the_nearest_grid_point():
    """Without feedback (H = I) every entry takes the nearest of the 2^J points {Σ_i ±A_i},
    also when the magnitudes are no binary expansion (a greedy digit-by-digit choice is not)."""
    J, d, n = 3, 9, 40
    A = np.abs(RNG.standard_normal((J, d, n))).astype(np.float32)
    R = (RNG.standard_normal((d, n)) * 2).astype(np.float32)
    neg, _ = gptq_signs(R, A, np.eye(n, dtype=np.float32))
    chosen = np.where(neg, -A, A).sum(0)
    points = np.stack([np.where((p >> np.arange(J) & 1)[:, None, None] == 1, -A, A).sum(0) for p in range(1 << J)])
    np.testing.assert_allclose(np.abs(R - chosen), np.abs(R[None] - points).min(0), rtol=1e-5, atol=1e-6)


def test_fit_digits_fits_each_rows_grid():
    """Lloyd's steps for the per-row grid {Σ_i ±a_i M}: the weighted error never rises; on rows
    from a coarser grid, a Laplace and a Gaussian distribution it ends well below the binary
    expansion it starts from (reach 3.75); a Gaussian row's grid tightens, and a row with 1% of
    its entries at ±8 gets a grid that reaches them."""
    rng = np.random.default_rng(5)
    d, n, J = 4, 4000, 4
    M = rng.uniform(0.5, 2.0, (d, n))
    signs = 1 - 2 * ((np.arange(1 << J)[:, None] >> np.arange(J)) & 1)          # (16, J)
    spiky = rng.standard_normal(n)
    spiky[:40] = 8 * rng.choice([-1, 1], 40)
    R = M * np.stack([rng.choice([-1, 1], (n, J)) @ [2.4, 1.1, 0.5, 0.2], rng.laplace(0, 1, n),
                      rng.standard_normal(n), spiky])
    start = np.tile(2.0 * 0.5 ** np.arange(J), (d, 1))

    def error(a):
        levels = a @ signs.T                                                      # (d, 16)
        return (np.min((R[:, :, None] / M[:, :, None] - levels[:, None, :]) ** 2, axis=2) * M * M).sum(1)

    errs = [error(fit_digits(R, M, start, iters=i)) for i in (0, 1, 3, 10)]
    assert all(np.all(b <= a * (1 + 1e-9)) for a, b in zip(errs, errs[1:])), errs
    assert np.all(errs[-1][:3] < 0.8 * errs[0][:3]), errs
    reach = np.abs(fit_digits(R, M, start)).sum(1)
    assert reach[2] < 3.5 and abs(reach[3] - 8) < 0.4, reach


@pytest.mark.parametrize("d,n,k", [(37, 45, 1), (48, 40, 2), (20, 24, 3), (33, 64, 5), (16, 8, 8), (40, 72, 16)])
def test_interleaved_layout_round_trip_and_ranks(d, n, k):
    """The kernels' layout (16 rows' sign bytes side by side) round-trips to the stored block, and
    the matvec matches decode for every rank (passes of 4, 2 and 1 rank components)."""
    w, _, parts = _data(d, n, K=2, k=k, hessian=False)
    views = _block_views(parts["block.1"], d, n, k)
    sig, ut, vf = interleave_block(*views, n)
    assert sig.shape == (-(-d // 16), (n + 7) // 8, 16) and ut.shape == (k, -(-d // 16) * 16)
    if d > 19:
        assert sig[1, 0, 3] == views[0][19, 0]       # tile 1, byte 0, row 16 + 3
    for a, b in zip(deinterleave_block(sig, ut, vf, d, n), views):
        assert np.array_equal(a, b)
    lin = BitStackCodec.load(parts, {})
    assert all(np.array_equal(a, b) for a, b in zip(lin._views[1], views))
    x = RNG.standard_normal(n).astype(np.float32)
    out = np.full(d, np.nan, np.float32)
    lin.matvec(x, out)
    np.testing.assert_allclose(out, BitStackCodec.decode(parts, {}) @ x, atol=1e-4 * np.abs(w).sum(1).max())


def test_matvec_two_threads_big_matrix():
    """Matrices of >= 2^19 weights split their 16-row tiles over threads."""
    w, _, parts = _data(784, 704, K=3, k=2, hessian=False)
    lin = BitStackCodec.load(parts, {})
    x = RNG.standard_normal(704).astype(np.float32)
    ref = BitStackCodec.decode(parts, {}) @ x
    out = np.full(784, np.nan, np.float32)
    kernels.set_threads(2)
    try:
        lin.matvec(x, out)
    finally:
        kernels.set_threads(1)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())


def test_set_blocks_grow_shrink_and_sizes(enc48):
    w, H, parts = enc48
    prefix = {k: v for k, v in parts.items() if not k.startswith("block.") or int(k[6:]) < 2}
    lin = BitStackCodec.load(prefix, {})          # only blocks 0, 1 present: loads 2
    assert lin.blocks == 2
    bb = block_layout(37, 48, 16)[2]
    assert lin.nbytes == 2 * bb + parts["meta"].nbytes + parts["inv_scale"].nbytes
    x = RNG.standard_normal(48).astype(np.float32)
    out = np.empty(37, np.float32)
    with pytest.raises(EdgerunError, match="block.2"):
        lin.set_blocks(3, prefix)
    lin.set_blocks(4, parts)
    lin.matvec(x, out)
    np.testing.assert_allclose(out, BitStackCodec.decode(parts, {}) @ x, atol=1e-4)
    lin.set_blocks(1)
    assert lin.blocks == 1 and lin.nbytes < 2 * bb
    lin.matvec(x, out)
    np.testing.assert_allclose(out, BitStackCodec.decode(parts, {}, blocks=1) @ x, atol=1e-4)
    lin.set_blocks(0)
    lin.matvec(x, out)
    assert not out.any()
    with pytest.raises(EdgerunError):
        lin.set_blocks(5, parts)
    with pytest.raises(EdgerunError, match="block.2"):
        BitStackCodec.decode(prefix, {}, blocks=4)


def test_bad_inputs():
    with pytest.raises(EdgerunError):
        BitStackCodec.encode(np.zeros(8, np.float32), {})
    with pytest.raises(EdgerunError):
        BitStackCodec.encode(np.zeros((4, 8), np.float32), {"rank": 32})
    with pytest.raises(EdgerunError, match="hessian"):
        BitStackCodec.encode(np.zeros((4, 8), np.float32), {}, np.eye(9))
    w, _, parts = _data(8, 16, K=1, hessian=False)
    bad = dict(parts, **{"block.0": parts["block.0"][:-1]})
    with pytest.raises(EdgerunError, match="uint8 bytes"):
        BitStackCodec.load(bad, {})


@pytest.mark.parametrize("params", [{"blocks": 4, "rank": 3},
                                    {"blocks": 6, "rank": 2, "signs": "gptq", "overshoot": 1.15},
                                    {"blocks": 6, "rank": 2, "signs": "gptq", "joint": 3}],
                         ids=["sign", "gptq", "joint"])
@pytest.mark.parametrize("hessian", [True, False], ids=["hessian", "frobenius"])
def test_scores_are_the_output_error_each_block_removes(params, hessian):
    """encode_stack's scores[i] = err(i) - err(i+1), err(m) = tr(E_m H E_mᵀ) of the decoded
    first m blocks (H = I without a hessian): after a GPTQ pass err comes from GPTQ's Σ e²
    identity minus the damping, so this checks that identity on the stored blocks too."""
    d, n = 23, 150
    w = RNG.standard_normal((d, n)).astype(np.float32)
    mix = RNG.standard_normal((n, n)) * 0.3 + np.eye(n)
    X = RNG.standard_normal((500, n)) @ mix * RNG.uniform(0.2, 3.0, n)
    H = X.T @ X / 500 if hessian else None
    parts, scores = BitStackCodec.encode_stack(w, params, H)
    errs = []
    for m in range(params["blocks"] + 1):
        E = (w - BitStackCodec.decode(parts, {}, blocks=m)).astype(np.float64)
        errs.append(np.trace(E @ H @ E.T) if hessian else np.sum(E * E))
    np.testing.assert_allclose(scores, -np.diff(errs), rtol=2e-4, atol=1e-5 * errs[0])
    assert errs[-1] < 0.05 * errs[0]
    parts_again = BitStackCodec.encode(w, params, H)
    assert all(np.array_equal(parts[p], parts_again[p]) for p in parts)


def test_order_blocks_level_invariant():
    rng = np.random.default_rng(3)
    names = [f"m{i}" for i in range(9)]
    nblocks = {nm: int(rng.integers(2, 6)) for nm in names}
    scores = {nm: list(rng.uniform(0, 10, nblocks[nm])) for nm in names}
    sizes = {nm: int(rng.integers(100, 1000)) for nm in names}
    order = order_blocks(sizes, scores)
    assert sorted(order) == sorted((nm, i) for nm in names for i in range(nblocks[nm]))
    have = dict.fromkeys(names, 0)
    for nm, i in order:
        assert i == have[nm]                       # blocks of a matrix come in order
        have[nm] += 1
        # no matrix two blocks ahead: every matrix that has block i-1 got it before this block i
        assert all(have[o] >= min(i, nblocks[o]) for o in names)
    # within a level: importance per byte, descending
    lvl0 = [nm for nm, i in order if i == 0]
    dens = [scores[nm][0] / sizes[nm] for nm in lvl0]
    assert dens == sorted(dens, reverse=True)
    assert order_blocks({}, {}) == []


def test_fisher_sensitivity_is_the_resized_models(tiny_dir, tmp_path):
    """The estimated ΔNLL of one matrix dropping block `level`-1, computed from the full pack's
    parts, is ½ Σ_t (g_tᵀ B x_t)² on the loaded model resized to `level` blocks (its own inputs
    and output gradients: backprop.linear_gradients, tested against finite differences)."""
    import edgerun
    from edgerun.backprop import linear_gradients
    from edgerun.bitstack_runtime import fisher_sensitivity, sensitivity_order
    from edgerun.codecs.bitstack.reference import decode_block
    from edgerun.convert.pack import make_recipe, pack
    from edgerun.ebin import EbinFile
    from edgerun.model import LAYER_TENSORS
    out = tmp_path / "tiny-bs.ebin"
    pack(tiny_dir("qwen2"), out, recipe=make_recipe("f16", "bitstack", 4), calib_tokens=512)
    windows = np.random.default_rng(0).integers(3, 200, (2, 24))
    with edgerun.load(out, context=64) as m, EbinFile(out) as f:
        tensors, imp = f.manifest["tensors"], f.manifest["bitstack"]["importance"]
        parts = {n: {p: f.read(a) for p, a in tensors[n]["parts"].items()} for n in imp}
        got = fisher_sensitivity(m._transformer, parts, windows, 3)
        for n in imp:
            m._stack.linears[n].set_blocks(3)
        want = {}

        def visit(i, field, X, G):
            name = f"model.layers.{i}.{LAYER_TENSORS[field]}"
            change = X @ decode_block(parts[name], 2).T
            want[name] = 0.5 * np.sum(np.sum(G * change, axis=1) ** 2) / (windows.size - len(windows))

        linear_gradients(m._transformer, windows, visit)
        assert sorted(got) == sorted(imp)
        for name in imp:
            assert got[name] == pytest.approx(want[name], rel=1e-3), name
        assert all(v > 0 for v in got.values())
        order, delta = sensitivity_order(m._transformer, parts, imp, windows, level=3)
        assert delta == pytest.approx(got)
        assert sorted(order) == sorted((n, i) for n in imp for i in range(4))
