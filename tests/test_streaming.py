"""Flash streaming of FFN neurons (edgerun/streaming.py, edgerun/flashio.py, formats/flash-layout.md)."""
from __future__ import annotations

import numpy as np
import pytest

from edgerun import streaming
from edgerun.config import ModelConfig
from edgerun.ebin import EbinFile
from edgerun.flashio import FlashReader, coalesce
from edgerun.model import Transformer, Weights


def load(path, context=64):
    with EbinFile(path) as e:
        cfg = ModelConfig.from_dict(e.manifest["config"])
        return Transformer(cfg, Weights.from_ebin(e, cfg), context, 16, kv_dtype="f32"), e.manifest


def logits(tf, ids, prefill):
    """Prefill `prefill` tokens as a chunk, then decode the rest one by one: both FFN paths."""
    out = [tf.forward(ids[:prefill], 0, all_logits=True)]
    out += [tf.forward([t], prefill + k)[None].copy() for k, t in enumerate(ids[prefill:])]
    return np.concatenate(out)


def small_window_budget(manifest, cfg, slots, criterion="off"):
    """The smallest FFN budget whose window holds `slots` neurons per layer (the plan's own sizes)."""
    lo, hi = 0, 1 << 34
    while lo < hi:                      # capacity grows with the budget: bisect on the plan itself
        mid = (lo + hi) // 2
        try:
            ok = streaming.plan_streaming(manifest, cfg, mid, mode="window", criterion=criterion).capacity >= slots
        except streaming.BudgetError:
            ok = False
        lo, hi = (lo, mid) if ok else (mid + 1, hi)
    return lo


@pytest.fixture(scope="module")
def tiny_packs(tiny_dir, tmp_path_factory):
    from edgerun.convert.pack import pack
    d = tmp_path_factory.mktemp("flash")
    src = tiny_dir("llama")
    pack(src, d / "flash.ebin", dtype="f16", layout="flash", calib_text=None)
    pack(src, d / "plain.ebin", dtype="f16")
    return src, d / "flash.ebin", d / "plain.ebin"


def test_bundle_layout_round_trip(tiny_packs):
    from safetensors.numpy import load_file
    src, flash, _ = tiny_packs
    w = load_file(src / "model.safetensors")
    with EbinFile(flash) as e:
        fl = e.manifest["flash"]
        assert not any("mlp" in n for n in e.manifest["tensors"])      # stored once, as bundles
        for i, entry in enumerate(fl["layers"]):
            b = e.read(entry["bundles"]).view(np.float16).astype(np.float32)
            perm = e.read(entry["perm"])
            assert sorted(perm.tolist()) == list(range(fl["intermediate_size"]))
            inv = np.argsort(perm)
            for k, name in enumerate(("gate_proj", "up_proj")):
                ref = w[f"model.layers.{i}.mlp.{name}.weight"].astype(np.float16).astype(np.float32)
                np.testing.assert_array_equal(b[inv, k], ref)
            down = w[f"model.layers.{i}.mlp.down_proj.weight"].astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(b[inv, 2].T, down)


def test_criterion_off_streams_identical_logits(tiny_packs):
    _, flash, plain = tiny_packs
    ids = list(range(3, 30))
    tf, man = load(flash)
    plan = streaming.attach(tf, flash, man, 1 << 30, criterion="off")
    assert plan.mode == "resident"
    resident = logits(tf, ids, 12)
    ref_tf, _ = load(plain)
    np.testing.assert_allclose(resident, logits(ref_tf, ids, 12), atol=2e-5)   # same model as a plain pack
    budget = small_window_budget(man, tf.cfg, 17)
    for mode in ("window", "layer", "naive"):
        tf, man = load(flash)
        plan = streaming.attach(tf, flash, man, budget if mode == "window" else 1 << 30, mode=mode, window=2,
                                criterion="off")
        assert plan.mode == mode and (mode != "window" or plan.capacity >= 17)
        np.testing.assert_array_equal(logits(tf, ids, 12), resident)          # memory changes, not math
        assert plan.stats.bytes_read > 0


def test_budget_without_room_for_two_read_buffers_reads_into_one(tiny_packs):
    """Criterion off prefetches the next layer into a second read buffer; at the smallest budget
    (edgerun info's minimum) there is room for one, and the reads are not overlapped."""
    _, flash, _ = tiny_packs
    ids = list(range(3, 30))
    tf, man = load(flash)
    streaming.attach(tf, flash, man, 1 << 30, criterion="off")
    resident = logits(tf, ids, 12)
    least = streaming.minimum_plan(man, tf.cfg)
    assert not least.prefetch and "FFN read scratch (the missing neurons of a layer)" in least.resident_bytes
    double = streaming.plan_streaming(man, tf.cfg, least.total_bytes + least.neurons * least.bundle_bytes + (1 << 20),
                                      mode="window", criterion="off")
    assert double.prefetch                                  # with room for it, reads overlap again
    with pytest.raises(streaming.BudgetError):
        streaming.plan_streaming(man, tf.cfg, least.total_bytes - 1, mode="window", criterion="off")
    tf, man = load(flash)
    plan = streaming.attach(tf, flash, man, least.total_bytes, mode="window", window=2, criterion="off")
    assert not plan.prefetch and len(tf.layers[0].ffn.sh.scratch) == 1
    np.testing.assert_array_equal(logits(tf, ids, 12), resident)
    assert plan.stats.bytes_read > 0


def test_criterion_streamed_equals_criterion_resident(tiny_packs):
    _, flash, _ = tiny_packs
    ids = list(range(3, 30))
    tf, man = load(flash)
    streaming.attach(tf, flash, man, 1 << 30, criterion="gate:0.5")
    resident = logits(tf, ids, 12)
    tf, man = load(flash)
    plan = streaming.attach(tf, flash, man, small_window_budget(man, tf.cfg, 30, "gate:0.5"), mode="window",
                            window=3, criterion="gate:0.5")
    np.testing.assert_array_equal(logits(tf, ids, 12), resident)
    assert 0 < plan.stats.neurons_loaded < plan.stats.neurons_used


def test_smollm2_criterion_off_identical(smollm2_gguf, tmp_path):
    from edgerun.convert.pack import pack
    out = tmp_path / "smol-flash.ebin"
    pack(smollm2_gguf, out, dtype="f16", layout="flash", calib_tokens=256)
    ids = [1, 504, 3458, 282, 260, 1345, 314, 1967, 28, 216]
    tf, man = load(out)
    streaming.attach(tf, out, man, 1 << 32, criterion="off")
    resident = logits(tf, ids, 6)
    tf, man = load(out)
    plan = streaming.attach(tf, out, man, small_window_budget(man, tf.cfg, 400), mode="window", criterion="off")
    np.testing.assert_array_equal(logits(tf, ids, 6), resident)
    assert plan.stats.bytes_read > 0


def test_layer_stats_against_the_whitened_svd():
    # layer_stats never forms M = gate·L; its predictor must still be the rank-r SVD of M
    # (A = U_r S_r, B = V_rᵀ L⁻¹) and its order and thresholds those of |silu(X gateᵀ)|
    rng = np.random.default_rng(3)
    N, d, f, r = 600, 40, 150, 6
    X = (rng.standard_normal((N, d)) @ rng.standard_normal((d, d)) * 0.3).astype(np.float32)
    gate = rng.standard_normal((f, d)).astype(np.float32) * np.linspace(0.2, 2.0, d).astype(np.float32)
    st = streaming.layer_stats(X, gate, rank=r)
    H = (X.T.astype(np.float64) @ X) / N
    H += np.eye(d) * 1e-4 * np.trace(H) / d
    L = np.linalg.cholesky(H)
    U, s, Vt = np.linalg.svd(gate.astype(np.float64) @ L, full_matrices=False)
    ref = (U[:, :r] * s[:r]) @ Vt[:r] @ np.linalg.inv(L)                  # A B, sign-free
    np.testing.assert_allclose(st["A"].astype(np.float64) @ st["B"], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    G = X.astype(np.float64) @ gate.T
    S = np.abs(G / (1 + np.exp(-G)))
    np.testing.assert_allclose(st["thresholds"]["gate"], np.quantile(S, streaming.SPARSITY_GRID),
                               rtol=1e-5, atol=1e-6 * S.max())     # f32 vs f64 near zero
    freq = (S > np.quantile(S, streaming.FREQ_SPARSITY)).mean(axis=0)
    np.testing.assert_allclose(st["frequency"], np.sort(freq)[::-1], atol=2 / N)
    A16, B16 = (st[k].astype(np.float16).astype(np.float64) for k in ("A", "B"))
    P = (X @ B16.T) @ A16.T
    np.testing.assert_allclose(st["thresholds"]["lowrank"],
                               np.quantile(np.abs(P / (1 + np.exp(-P))), streaming.SPARSITY_GRID), rtol=1e-4,
                               atol=1e-6 * S.max())


def test_window_bookkeeping_random():
    rng = np.random.default_rng(0)
    f, cap, k = 50, 20, 3
    buf = np.arange(cap)                                   # the "bundle" of a neuron is its id
    w = streaming.NeuronWindow(f, cap)
    w.check()
    for step in range(1, 300):
        used = np.sort(rng.choice(f, rng.integers(0, 15), replace=False))
        slots = w.slot_of[used]
        w.touch(slots[slots >= 0], step)
        miss = used[slots < 0]
        assert len(miss) <= f - cap                          # the read scratch's size suffices
        old_last = w.last.copy()
        victims = w.victims(step - k + 1, len(miss))
        assert (old_last[victims] < step - k + 1).all()      # only neurons unused for k tokens leave
        w.replace(victims, miss[:len(victims)], step)
        buf[victims] = miss[:len(victims)]
        w.check()
        assert (buf == w.neuron_at).all()
        assert (w.slot_of[used] >= 0).sum() == len(used) - len(miss) + len(victims)


def test_window_victims_least_recent_then_least_frequent():
    w = streaming.NeuronWindow(10, 4)                       # holds neurons 0..3
    w.touch(np.array([1, 3]), 5)
    w.touch(np.array([0]), 4)
    assert w.victims(6, 1).tolist() == [2]                   # never used (step 0)
    assert w.victims(6, 2).tolist() == [0, 2]                # then the least recently used
    w.touch(np.array([0, 2]), 5)
    assert w.victims(6, 1).tolist() == [3]                   # a tie: the least frequent (highest id)
    assert w.victims(5, 4).tolist() == []                    # everything was used within the window


def test_coalesce_runs():
    assert coalesce([1, 2, 3, 7, 9, 10], 10, base=100) == [(1, 3, 110, 30), (7, 1, 170, 10), (9, 2, 190, 20)]
    assert coalesce([], 10) == []
    assert coalesce([1, 2, 3, 7, 9, 10], 10, gap=1) == [(1, 3, 10, 30), (7, 4, 70, 40)]
    assert coalesce([1, 2, 3, 7, 9, 10], 10, gap=3) == [(1, 10, 10, 100)]
    # at most `limit` units in all: the smallest holes are filled first
    assert coalesce([1, 2, 3, 7, 9, 10], 10, gap=3, limit=8) == [(1, 3, 10, 30), (7, 4, 70, 40)]
    assert coalesce([1, 2, 3, 7, 9, 10], 10, gap=3, limit=6) == coalesce([1, 2, 3, 7, 9, 10], 10)


def test_span_jobs_read_pages_straight_into_the_arena(tmp_path):
    from edgerun.flashio import ALIGN, aligned_array
    data = np.random.default_rng(2).integers(0, 256, 50 * ALIGN + 77, dtype=np.uint8).tobytes()
    p = tmp_path / "blob"
    p.write_bytes(data)
    with FlashReader(p, threads=2) as r:
        for offset, n, pos, spill in [(5000, 3 * ALIGN + 10, 5000 % ALIGN, True),     # congruent: direct
                                      (5000, 3 * ALIGN + 10, 100, True),              # not: bounced
                                      (5000, 3 * ALIGN + 10, 5000 % ALIGN, False),
                                      (len(data) - 3000, 3000, (len(data) - 3000) % ALIGN, True)]:   # file end
            arena = aligned_array((6 * ALIGN,), np.uint8)
            arena[:] = 7
            jobs = r.span_jobs(offset, n, arena, pos, piece=ALIGN, spill=spill)
            assert len(jobs) > 1                                # pieces for both threads
            r.read_many(jobs)
            assert arena[pos:pos + n].tobytes() == data[offset:offset + n]
            direct = spill and (pos - offset) % ALIGN == 0
            outside = np.r_[arena[:pos - offset % ALIGN], arena[pos + n + ALIGN:]] if direct else \
                np.r_[arena[:pos], arena[pos + n:]]
            assert (outside == 7).all()                         # nothing written beyond the slack


def test_prefetch_of_a_cancelled_forward_is_discarded(tiny_packs):
    _, flash, _ = tiny_packs
    ids = list(range(3, 20))
    tf, man = load(flash)
    streaming.attach(tf, flash, man, 1 << 30, criterion="off")
    resident = logits(tf, ids, 8)
    tf, man = load(flash)
    plan = streaming.attach(tf, flash, man, small_window_budget(man, tf.cfg, 20), mode="window", criterion="off")
    x, out = np.ones((1, tf.cfg.hidden_size), np.float32), np.empty((1, tf.cfg.hidden_size), np.float32)
    tf.layers[0].ffn.compute(x, out)           # a forward stopped after layer 0: layer 1's read in flight
    assert plan.reader is not None
    np.testing.assert_array_equal(logits(tf, ids, 8), resident)


def test_direct_reader_matches_plain_read(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 3 * 4096 * 100 + 123, dtype=np.uint8).tobytes()
    p = tmp_path / "blob"
    p.write_bytes(data)
    with FlashReader(p, threads=2) as r:
        cases = [(0, 4096), (1, 10), (4095, 2), (5000, 3 * 4096 + 17), (len(data) - 77, 77),
                 (12345, (1 << 20) + 5), (0, len(data))]
        for off, n in cases:
            out = bytearray(n)
            r.read_into(off, out)
            assert bytes(out) == data[off:off + n], (off, n)
        outs = [bytearray(n) for _, n in cases]
        r.read_many([(off, o) for (off, _), o in zip(cases, outs)])
        assert all(bytes(o) == data[off:off + n] for (off, n), o in zip(cases, outs))
    with FlashReader(p, direct=False) as r:          # the fadvise fallback (tmpfs) reads the same
        out = bytearray(999)
        r.read_into(4001, out)
        assert bytes(out) == data[4001:5000]


def test_info_minimum_includes_the_streaming_buffers(tiny_packs):
    import re

    from click.testing import CliRunner

    import edgerun
    from edgerun.cli import main
    _, flash, _ = tiny_packs
    out = CliRunner().invoke(main, ["info", str(flash), "-c", "64"]).output
    minimum = int(re.search(r"minimum --ram (\d+)MiB", out).group(1)) * 2**20
    with EbinFile(flash) as e:
        least = streaming.minimum_plan(e.manifest, ModelConfig.from_dict(e.manifest["config"]))
    assert "\n".join(least.lines()) in out                                    # the least streaming plan, listed
    with edgerun.load(flash, ram=minimum + (8 << 20), context=64) as m:    # + the RSS measurement's noise
        assert m.stream_plan.mode in ("window", "resident")
        assert m.generate("a", max_tokens=2, temperature=0) is not None


def test_verbose_prints_the_plan_and_the_streaming_statistics(tiny_packs):
    # `-v`: the plan before loading, and after the reply the bytes read per token and the hit rate
    from click.testing import CliRunner

    from edgerun.cli import main
    _, flash, _ = tiny_packs
    out = CliRunner().invoke(main, ["generate", str(flash), "-p", "a", "-n", "3", "--temp", "0", "-c", "64",
                                    "--stream", "window", "-v"]).output
    assert "memory plan:" in out and "weights: feed-forward bundles, streamed (window)" in out
    stats = next(line for line in out.splitlines() if line.startswith("[FFN streamed: "))
    assert "MB read/token" in stats and "hit rate" in stats
    out = CliRunner().invoke(main, ["generate", str(flash), "-p", "a", "-n", "3", "--temp", "0", "-c", "64"]).output
    assert "FFN streamed" not in out


# ------------------------------------------------------------------------------ compressed bundles (layout v2)

@pytest.fixture(scope="module")
def spqr_packs(tiny_dir, tmp_path_factory):
    """The tiny model at spqr:4 (attention and FFN; embeddings and head cluster:5), flash and standard."""
    from edgerun.convert.pack import make_recipe, pack
    d = tmp_path_factory.mktemp("flash_spqr")
    src = tiny_dir("llama")
    recipe = make_recipe("f16", codec="spqr", bits=4)
    pack(src, d / "flash.ebin", recipe=recipe, layout="flash", calib_tokens=1024)
    pack(src, d / "plain.ebin", recipe=recipe, calib_tokens=1024)
    return d / "flash.ebin", d / "plain.ebin"


@pytest.mark.parametrize("bits,d,f,sg", [(2, 200, 72, 16), (3, 72, 200, 16), (4, 40, 56, 16),
                                         # full 16-group chunks (the 4-bit down columns' fast path),
                                         # tails of 4 / 8 groups (rows packed per vector), 1 group;
                                         # neuron counts not a multiple of 4 (single bundles)
                                         (4, 576, 37, 16), (4, 384, 61, 32), (3, 320, 45, 16),
                                         (2, 264, 33, 16), (4, 320, 40, 8), (3, 272, 19, 24)])
def test_spqr_bundle_kernels_match_the_codec(bits, d, f, sg):
    # every width, tail chunks, outliers (also in padding columns), stat groups that are and are
    # not multiples of 16: the bundle kernels over a shuffled neuron order compute what SpQRLinear
    # computes (one token: int8 activations; T=3: per token; T=5: decoded tiles), up to float
    # summation order; also a subset of the bundles, in the window's order
    from edgerun.codecs import get_codec
    rng = np.random.default_rng(bits)
    c, P = get_codec("spqr"), {"bits": bits, "outlier_threshold": 0.05, "stat_group": sg}
    parts = [c.encode(rng.standard_normal(s).astype(np.float32) * 0.1, P) for s in ((f, d), (f, d), (d, f))]
    perm = rng.permutation(f)
    bundles, shared = c.flash_cut(*parts, P, perm)
    assert bundles.shape == (f, sum(n for _, n in c.flash_bundle_parts(P, d).values()))
    kern = c.flash_kernels(shared, perm, P, d, f, {})
    lins = [c.load(p, P) for p in parts]
    ids = np.arange(f)
    x = rng.standard_normal(d).astype(np.float32)
    g, ref = np.zeros(f, np.float32), np.zeros(f, np.float32)
    kern.gate_scores(np.ascontiguousarray(bundles[:, :kern.gate_bytes]), x, g)      # criterion gate:S
    lins[0].matvec(x, ref)
    np.testing.assert_allclose(g, ref[perm], atol=1e-5 * np.abs(ref).max())
    for T in (1, 3, 5):
        x = rng.standard_normal((T, d)).astype(np.float32)
        out = np.zeros((T, d), np.float32)
        streaming.ffn_rows(kern, bundles, bundles, ids, ids, x, out)
        g, u, ref = np.zeros((T, f), np.float32), np.zeros((T, f), np.float32), np.zeros((T, d), np.float32)

        def mm(i, X, o):    # from matmul_min_t tokens the bundle kernels decode float32 tiles, while
            if T < kern.matmul_min_t:       # SpQRLinear.matmul quantizes x to int8: the float decode
                lins[i].matmul(X, o)
            else:
                o[:] = X @ c.decode(parts[i], P).T
        mm(0, x, g)
        mm(1, x, u)
        mm(2, (g / (1 + np.exp(-g)) * u).astype(np.float32), ref)
        np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())
    # a subset of the neurons (others absent, as with a criterion), split between the window
    # (codes >= 0) and the read scratch (codes < 0), in a shuffled order
    x = rng.standard_normal((1, d)).astype(np.float32)
    ids = np.sort(rng.choice(f, size=max(1, 2 * f // 3), replace=False))
    codes = np.where(np.arange(len(ids)) % 3 == 0, -1 - np.arange(len(ids)), ids)
    out = np.zeros((1, d), np.float32)
    streaming.ffn_rows(kern, bundles, bundles[ids], codes, ids, x, out)
    g, u, ref = np.zeros((1, f), np.float32), np.zeros((1, f), np.float32), np.zeros((1, d), np.float32)
    lins[0].matvec(x[0], g[0])
    lins[1].matvec(x[0], u[0])
    h = np.zeros((1, f), np.float32)
    h[0, perm[ids]] = (g / (1 + np.exp(-g)) * u)[0, perm[ids]]
    lins[2].matvec(h[0], ref[0])
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


def test_spqr_bundles_hold_the_standard_packs_weights(spqr_packs):
    # the bundles, decoded, are exactly the standard pack's gate / up rows and down columns
    from edgerun.codecs import get_codec
    flash, plain = spqr_packs
    spqr = get_codec("spqr")
    with EbinFile(flash) as e, EbinFile(plain) as p:
        fl = e.manifest["flash"]
        assert fl["version"] == 2 and fl["codec"] == "spqr" and not any("mlp" in n for n in e.manifest["tensors"])
        for i, entry in enumerate(fl["layers"]):
            kern = spqr.flash_kernels({k: e.read(n) for k, n in entry["shared"].items()}, e.read(entry["perm"]),
                                      fl["params"], fl["hidden_size"], fl["intermediate_size"], {})
            b = e.read(entry["bundles"])
            assert b.shape == (fl["intermediate_size"], fl["bundle_bytes"])
            ids = np.arange(len(b))
            tile = np.empty((len(b), 3, fl["hidden_size"]), np.float32)
            kern.widen(b, b, ids, ids, 0, len(b), tile)
            inv = np.argsort(e.read(entry["perm"]))
            for k, name in enumerate(("gate_proj", "up_proj", "down_proj")):
                t = p.manifest["tensors"][f"model.layers.{i}.mlp.{name}.weight"]
                w = spqr.decode({part: p.read(a) for part, a in t["parts"].items()}, t["params"])
                np.testing.assert_allclose(tile[inv, k], w if k < 2 else w.T, rtol=1e-6, atol=1e-6)


def test_spqr_flash_computes_the_standard_pack(spqr_packs):
    # criterion off: token by token the flash pack's logits are the standard spqr pack's up to
    # float rounding (both quantize activations to int8 as SpQRLinear's matvec does; in a prefill
    # chunk the bundle kernels decode float32 tiles while SpQRLinear.matmul keeps int8, so there
    # the packs differ by the activation rounding), and every streaming mode computes the same
    # floats as the resident bundles
    flash, plain = spqr_packs
    ids = list(range(3, 30))
    tf, man = load(flash)
    plan = streaming.attach(tf, flash, man, 1 << 30, criterion="off")
    assert plan.mode == "resident" and plan.dtype == "spqr:4"
    ref_tf, _ = load(plain)
    np.testing.assert_allclose(logits(tf, ids, 1), logits(ref_tf, ids, 1), rtol=1e-4, atol=1e-4)
    resident = logits(tf, ids, 12)
    budget = small_window_budget(man, tf.cfg, 17)
    for mode in ("window", "layer", "naive"):
        tf, man = load(flash)
        plan = streaming.attach(tf, flash, man, budget if mode == "window" else 1 << 30, mode=mode, window=2,
                                criterion="off")
        assert plan.mode == mode and (mode != "window" or 17 <= plan.capacity < tf.cfg.intermediate_size)
        np.testing.assert_array_equal(logits(tf, ids, 12), resident)
        assert plan.stats.bytes_read > 0 and plan.bundle_bytes == man["flash"]["bundle_bytes"]


def test_spqr_flash_criterion_streamed_equals_resident(spqr_packs):
    flash, _ = spqr_packs
    ids = list(range(3, 30))
    tf, man = load(flash)
    streaming.attach(tf, flash, man, 1 << 30, criterion="lowrank:0.5")
    resident = logits(tf, ids, 12)
    tf, man = load(flash)
    plan = streaming.attach(tf, flash, man, small_window_budget(man, tf.cfg, 30, "lowrank:0.5"), mode="window",
                            window=3, criterion="lowrank:0.5")
    np.testing.assert_array_equal(logits(tf, ids, 12), resident)
    assert 0 < plan.stats.neurons_loaded < plan.stats.neurons_used
    # gate:S keeps the bundles' gate parts resident and computes the exact (codec) gate
    tf, man = load(flash)
    plan = streaming.attach(tf, flash, man, 1 << 30, criterion="gate:0.5")
    resident = logits(tf, ids, 12)
    tf, man = load(flash)
    plan = streaming.attach(tf, flash, man, small_window_budget(man, tf.cfg, 30, "gate:0.5"), mode="window",
                            window=3, criterion="gate:0.5")
    np.testing.assert_array_equal(logits(tf, ids, 12), resident)
    f, gate_bytes = tf.cfg.intermediate_size, 2 * 4 * -(-tf.cfg.hidden_size // 16) + -(-tf.cfg.hidden_size // 16)
    assert plan.resident_bytes["gate rows (resident)"] == tf.cfg.num_layers * f * gate_bytes
    assert 0 < plan.stats.neurons_loaded < plan.stats.neurons_used


def test_spqr_flash_plan_counts_compressed_bundles(spqr_packs):
    flash, _ = spqr_packs
    with EbinFile(flash) as e:
        man, cfg = e.manifest, ModelConfig.from_dict(e.manifest["config"])
        fl = man["flash"]
        plan = streaming.plan_streaming(man, cfg, 1 << 40, criterion="off")
        bundles = sum(e.arrays[entry["bundles"]].length for entry in fl["layers"])
        shared = sum(e.arrays[n].length for entry in fl["layers"] for n in entry["shared"].values())
    assert plan.resident_bytes["FFN bundles (resident)"] == bundles
    assert shared == fl["shared_bytes"] <= plan.resident_bytes["FFN shared parts (stats, outliers) and scratch"]
    d = fl["hidden_size"]
    assert fl["bundle_bytes"] == 3 * 2 * 4 * -(-d // 16) + 2 * -(-d // 16)     # 3 rows of 4-bit codes, 2 of stat codes


def test_spqr_flash_corrupted_bundle_sizes_are_clear_errors(spqr_packs, tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import fuzz_ebin as fz
    from edgerun.errors import FormatError
    from edgerun.validate import verify_file
    flash, _ = spqr_packs
    base = fz.Ebin(Path(flash).read_bytes())
    b0 = base.manifest["flash"]["layers"][0]["bundles"]
    cases = {"bundle_bytes": lambda m: m["flash"].__setitem__("bundle_bytes", m["flash"]["bundle_bytes"] + 2),
             "bundle_parts": lambda m: m["flash"]["bundle_parts"]["down.codes"].__setitem__(1, 7),
             "array shape": lambda m: m["arrays"][b0].__setitem__("shape", [m["arrays"][b0]["shape"][0] * 2,
                                                                            m["arrays"][b0]["shape"][1] // 2]),
             "shared_bytes": lambda m: m["flash"].__setitem__("shared_bytes", 1),
             "version": lambda m: m["flash"].__setitem__("version", 1)}
    for label, edit in cases.items():
        e = base.copy()
        edit(e.manifest)
        path = tmp_path / "bad.ebin"
        path.write_bytes(e.with_manifest(e.manifest))
        with pytest.raises(FormatError, match="flash"):
            verify_file(path)
    # a shared index array out of range is caught when the kernels are built, not by a crash
    e = base.copy()
    pos = e.manifest["flash"]["layers"][1]["shared"]["down.pos"]
    bad = e.array(pos)
    bad[0] = 10_000
    e.set_array(pos, bad.tobytes())
    path = tmp_path / "bad-pos.ebin"
    path.write_bytes(e.with_manifest(e.manifest))
    tf, man = load(path)
    with pytest.raises(FormatError, match="down.pos"):
        streaming.attach(tf, path, man, 1 << 30, criterion="off")


def test_flash_refuses_a_codec_without_bundles_before_calibrating(tiny_dir, tmp_path):
    from edgerun.convert.pack import make_recipe, pack
    from edgerun.errors import UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="--layout flash does not support the bitstack codec"):
        pack(tiny_dir("llama"), tmp_path / "x.ebin", recipe=make_recipe("f16", codec="bitstack"), layout="flash",
             calib_tokens=256)


def test_flash_with_compressed_attention_and_dense_ffn(tiny_dir, tmp_path):
    # a calibrated recipe whose FFN stays f16: version-1 dense bundles from the same single pass
    from edgerun.convert.pack import make_recipe, pack
    src = tiny_dir("llama")
    recipe = make_recipe("f16", recipe="attention=spqr:4")
    pack(src, tmp_path / "flash.ebin", recipe=recipe, layout="flash", calib_tokens=512)
    pack(src, tmp_path / "plain.ebin", recipe=recipe, calib_tokens=512)
    tf, man = load(tmp_path / "flash.ebin")
    assert man["flash"]["version"] == 1 and man["flash"]["dtype"] == "f16"
    streaming.attach(tf, tmp_path / "flash.ebin", man, 1 << 30, criterion="off")
    ref, _ = load(tmp_path / "plain.ebin")
    ids = list(range(3, 20))
    np.testing.assert_allclose(logits(tf, ids, 8), logits(ref, ids, 8), atol=2e-5)


WARM_UP_COMPILES = """
import sys
from numba.core import event
from edgerun import api, kernels
from edgerun.ebin import EbinFile
kernels.set_threads(2)
with EbinFile(sys.argv[1]) as e, event.install_recorder("numba:compile") as rec:
    api._warm_up(e, batched=False)
    api._warm_up(e, batched=True)
print(len(rec.buffer))
"""


def test_warm_cache_compiles_nothing(spqr_packs, tmp_path):
    """A second process on the same JIT cache compiles no kernel: a kernel whose cache key changes
    from process to process (e.g. a closure over other compiled functions, whose cells Numba
    pickles) compiles at every load, and on a cold cache that made the parent re-run the warm-up
    mid-generation."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = [subprocess.run([sys.executable, "-c", WARM_UP_COMPILES, str(spqr_packs[0])], env=env,
                           capture_output=True, text=True, timeout=900) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    assert int(runs[0].stdout.split()[-1]) > 0 and int(runs[1].stdout.split()[-1]) == 0


GENERATION_COMPILES = """
import sys
import numpy as np
from numba.core import event
import edgerun
from edgerun import kernels
m = edgerun.load(sys.argv[1], threads=2)
with event.install_recorder("numba:compile") as rec:
    list(m.stream_tokens(list(range(3, 40)), max_tokens=6, temperature=0))
    # a real model's FFN at a full prefill chunk (wider than the tiny one's): rows on the threads
    g = np.ones((64, 8960), np.float32)
    kernels.silu_mul(g, g, np.empty_like(g))
print(len(rec.buffer))
"""


def test_warm_up_covers_generation_with_a_lookup_only_embedding(tiny_dir, tmp_path):
    """An untied embedding of a kind of its own is warmed up for row lookups only (its matvec
    and matmul never run); prefill and decode then compile nothing (cold cache, no deferral),
    nor does a prefill chunk of a wide FFN (the threads' silu_mul: compiled mid-prompt, it held a
    cancel for a second)."""
    import os
    import subprocess
    import sys
    from edgerun.convert.pack import make_recipe, pack
    recipe = make_recipe("f16", recipe="embed=cluster:6,attention=spqr:4,ffn=spqr:4,head=cluster:5")
    pack(tiny_dir("llama"), tmp_path / "m.ebin", recipe=recipe, calib_tokens=512)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "EDGERUN_DEFER_COMPILE": "0"}
    run = subprocess.run([sys.executable, "-c", GENERATION_COMPILES, str(tmp_path / "m.ebin")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) == 0
