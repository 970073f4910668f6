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
        return Transformer(cfg, Weights.from_ebin(e, cfg), context, 16), e.manifest


def logits(tf, ids, prefill):
    """Prefill `prefill` tokens as a chunk, then decode the rest one by one: both FFN paths."""
    out = [tf.forward(ids[:prefill], 0, all_logits=True)]
    out += [tf.forward([t], prefill + k)[None].copy() for k, t in enumerate(ids[prefill:])]
    return np.concatenate(out)


def small_window_budget(manifest, cfg, slots, criterion="off"):
    """An FFN budget whose window holds `slots` neurons per layer."""
    p = streaming.plan_streaming(manifest, cfg, 1 << 40, mode="window", criterion=criterion)
    fixed = p.total_bytes - p.resident_bytes["window buffers"]
    return fixed + slots * p.layers * p.bundle_bytes


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
        assert plan.mode == mode and (mode != "window" or plan.capacity == 17)
        np.testing.assert_array_equal(logits(tf, ids, 12), resident)          # memory changes, not math
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


def test_window_bookkeeping_random():
    rng = np.random.default_rng(0)
    f, cap, d = 50, 20, 3
    buf = np.zeros((cap, d), np.int64)
    w = streaming.NeuronWindow(f, cap, move=lambda s, t: buf.__setitem__(t, buf[s]))
    for step in range(1, 300):
        used = np.sort(rng.choice(f, rng.integers(0, 15), replace=False))
        slots = w.slot_of[used]
        w.touch(slots[slots >= 0], step)
        w.evict_older(step - 3 + 1)
        new = w.insert(used[slots < 0], step)
        buf[new] = used[slots < 0][:len(new), None]       # the "bundle" of a neuron is its id
        w.check()
        assert (buf[:w.count, 0] == w.neuron_at[:w.count]).all()   # bytes moved with their neuron
        assert (w.last[:w.count] >= step - 2).all()                  # nothing older than the window


def test_coalesce_runs():
    assert coalesce([1, 2, 3, 7, 9, 10], 10, base=100) == [(1, 3, 110, 30), (7, 1, 170, 10), (9, 2, 190, 20)]
    assert coalesce([], 10) == []


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
