"""Layer-wise calibration: the statistics it collects, and that a lossless codec through the
calibrated path reproduces the plain pack exactly."""
from __future__ import annotations

import numpy as np

import edgerun
from edgerun.calibrate import HessianAccumulator, calibrate_and_store, calibration_sequences
from edgerun.config import ModelConfig, tensor_names
from edgerun.convert.pack import TensorStore, make_recipe, open_source, pack
from edgerun.ebin import EbinWriter


def test_hessian_accumulator_matches_numpy():
    rng = np.random.default_rng(0)
    acc = HessianAccumulator(7)
    rows = [rng.standard_normal((n, 7), dtype=np.float32) for n in (1, 5, 64)]
    for X in rows:
        acc.add(X)
    X = np.concatenate(rows).astype(np.float64)
    np.testing.assert_allclose(acc.hessian(), X.T @ X / len(X), rtol=1e-5)


def test_hessian_accumulator_panels_and_flushes(monkeypatch):
    # several column panels (the lower block triangle, mirrored at the end) and several buffer
    # flushes, one of them partial
    monkeypatch.setattr(HessianAccumulator, "PANEL", 16)
    monkeypatch.setattr(HessianAccumulator, "BUFFER_BYTES", 4 * 37 * 256)
    rng = np.random.default_rng(1)
    n = 37
    acc = HessianAccumulator(n)
    X = rng.standard_normal((700, n), dtype=np.float32)
    for a, b in ((0, 3), (3, 300), (300, 700)):
        acc.add(X[a:b])
    H = acc.hessian()
    X = X.astype(np.float64)
    np.testing.assert_allclose(H, X.T @ X / len(X), rtol=1e-5, atol=1e-6)
    assert np.array_equal(H, H.T)


def test_f32_linear_matches_numpy():
    from edgerun import kernels
    from edgerun.calibrate import f32_linear
    rng = np.random.default_rng(2)
    w = rng.standard_normal((50, 24), dtype=np.float32)
    X = rng.standard_normal((97, 24), dtype=np.float32)
    before = kernels.get_threads()
    try:
        for threads in (1, 2):
            kernels.set_threads(threads)
            out = np.empty((97, 50), np.float32)
            f32_linear(w).matmul(X, out)
            np.testing.assert_allclose(out, X @ w.T, rtol=1e-5, atol=1e-5)
    finally:
        kernels.set_threads(before)
    v = np.empty(50, np.float32)
    f32_linear(w).matvec(X[0], v)
    np.testing.assert_allclose(v, w @ X[0], rtol=1e-5, atol=1e-5)


def test_calibrated_path_with_lossless_codec_equals_plain_pack(tiny_dir, tmp_path):
    src = tiny_dir("qwen3")
    pack(src, tmp_path / "plain.ebin", dtype="f32")
    seen = {}
    with open_source(src) as source:
        cfg = ModelConfig.from_dict(source.meta.config)
        from edgerun.tokenizer import Tokenizer
        tok = Tokenizer(source.meta.tokenizer_json, bos_token_id=None, eos_token_ids=[], add_bos_token=False,
                        chat_template=None)
        from conftest import CORPUS
        seqs = calibration_sequences(tok, CORPUS * 4, 4 * 100, 100)
        with EbinWriter(tmp_path / "calibrated.ebin") as writer:
            store = TensorStore(writer, make_recipe("f32"))

            def recording_store(name, w, hessian):
                seen[name] = hessian
                return store(name, w, hessian)      # dense takes (and ignores) it, as in a recipe

            calibrate_and_store(source, cfg, seqs, recording_store)
            from edgerun.ebin import EbinFile
            with EbinFile(tmp_path / "plain.ebin") as plain:
                manifest = {k: v for k, v in plain.manifest.items() if k not in ("arrays", "format")}
            manifest["tensors"] = {n: store.entries[n] for n in tensor_names(cfg)}
            writer.close(manifest)
    # every linear got a symmetric positive semi-definite Hessian of its input size; vectors none
    for name, h in seen.items():
        if name.endswith("proj.weight"):
            assert h is not None and h.shape[0] == h.shape[1] and np.allclose(h, h.T)
            assert np.linalg.eigvalsh(h).min() > -1e-6
        elif "norm" in name:
            assert h is None
    ids = list(range(5, 60))
    with edgerun.load(tmp_path / "plain.ebin") as a, edgerun.load(tmp_path / "calibrated.ebin") as b:
        np.testing.assert_array_equal(a.logits(ids), b.logits(ids))


def test_store_sees_file_order_and_its_errors_reach_the_caller(tiny_dir):
    """Layers are stored on a worker thread while the next one runs: `store` still gets every
    tensor in file order with progress after each layer, and an error inside it stops
    calibration with that error."""
    import pytest
    from conftest import CORPUS
    from edgerun.tokenizer import Tokenizer
    src = tiny_dir("qwen3")
    with open_source(src) as source:
        cfg = ModelConfig.from_dict(source.meta.config)
        tok = Tokenizer(source.meta.tokenizer_json, bos_token_id=None, eos_token_ids=[], add_bos_token=False,
                        chat_template=None)
        seqs = calibration_sequences(tok, CORPUS * 4, 2 * 100, 100)
        events = []

        def store(name, w, hessian):
            events.append(name)

        calibrate_and_store(source, cfg, seqs, store, progress=lambda i, n: events.append(i))
        stored = [e for e in events if isinstance(e, str)]
        assert sorted(stored) == sorted(source.tensor_names())
        layers = [int(n.split(".")[2]) for n in stored if n.startswith("model.layers.")]
        assert layers == sorted(layers)
        for i in range(1, cfg.num_layers + 1):      # progress(i) once layer i - 1 is stored
            before = events[:events.index(i)]
            assert f"model.layers.{i - 1}.mlp.down_proj.weight" in before
            assert not any(n.startswith(f"model.layers.{i}.") for n in before if isinstance(n, str))

        def failing(name, w, hessian):
            if name == "model.layers.0.mlp.up_proj.weight":
                raise ValueError("encoder failed")

        with pytest.raises(ValueError, match="encoder failed"):
            calibrate_and_store(source, cfg, seqs, failing)


def test_pack_runs_under_numbas_workqueue_threading_layer(tiny_dir, tmp_path):
    """Numba's workqueue threading layer (left where neither TBB nor OpenMP is installed, as on
    macOS) aborts the process when two threads launch parallel regions at once, and a pack's
    forward (attention) and encode worker (cluster's k-means and GPTQ blocks) both launch them:
    kernels.PARALLEL_REGIONS serializes those. Without it this pack aborts (measured)."""
    import os
    import subprocess
    import sys
    code = ("import sys, numba; from edgerun.convert.pack import make_recipe, pack; "
            "pack(sys.argv[1], sys.argv[2], recipe=make_recipe('f16', 'cluster', 4), threads=2); "
            "print(numba.threading_layer())")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_dir("qwen3")), str(tmp_path / "c.ebin")],
                       env={**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == "workqueue"
