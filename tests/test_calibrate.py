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
