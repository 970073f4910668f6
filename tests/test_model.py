"""The forward pass against transformers on the same weights (f32 compute): logits at every
position, through m.logits (prefill in chunks) and through the KV-cached one-token path, and
greedy continuations."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ARCHS, hf_greedy, hf_logits

import edgerun
from edgerun.convert.pack import pack

TOL = 1e-2


def load_hf(directory):
    from transformers import AutoModelForCausalLM
    import torch
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def check_model(m, ref, ids, n_greedy=12):
    # every position of a prompt longer than one prefill chunk
    ours = m.logits(ids)
    theirs = hf_logits(ref, ids)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= TOL
    # KV-cached path: a short prefill, then one token at a time
    tf = m._transformer
    split = 5
    step = [tf.forward(ids[:split], 0).copy()]
    for pos in range(split, len(ids)):
        step.append(tf.forward([ids[pos]], pos).copy())
    assert np.abs(np.stack(step) - theirs[split - 1:]).max() <= TOL
    # greedy continuation through the generation loop
    expected = hf_greedy(ref, ids[:16], n_greedy)
    got = list(m.stream_tokens(ids[:16], max_tokens=n_greedy, temperature=0))
    assert got == expected[:len(got)]
    if len(got) < n_greedy:                       # stopped early: only on a stop token
        assert expected[len(got)] in m.stop_ids


@pytest.mark.parametrize("ops", ["numba", "numpy"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_matches_transformers(arch, ops, tiny_dir, tmp_path, monkeypatch):
    """ops "numpy": the layer ops' NumPy stand-ins that run while a cold JIT cache compiles."""
    if ops == "numpy":
        from edgerun import kernels
        monkeypatch.setattr(kernels, "layer_ops", lambda: kernels.NumpyLayerOps)
    src = tiny_dir(arch)
    out = tmp_path / "tiny.ebin"
    pack(src, out, dtype="f32")
    rng = np.random.default_rng(1)
    with edgerun.load(out, kv_dtype="f32") as m:
        ids = rng.integers(0, m.config.vocab_size, size=80).tolist()   # 80 > one 64-token prefill chunk
        check_model(m, load_hf(src), ids)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_tiny_16bit_close_to_f32(dtype, tiny_dir, tmp_path):
    """16-bit storage changes logits only by rounding of the weights."""
    src = tiny_dir("llama")
    pack(src, tmp_path / "a.ebin", dtype="f32")
    pack(src, tmp_path / "b.ebin", dtype=dtype)
    ids = list(range(3, 40))
    with edgerun.load(tmp_path / "a.ebin", kv_dtype="f32") as a, edgerun.load(tmp_path / "b.ebin", kv_dtype="f32") as b:
        ref, got = a.logits(ids), b.logits(ids)
    assert np.abs(ref - got).max() < (0.05 if dtype == "f16" else 0.3)
    assert np.abs(ref - got).max() > 0       # the rounding did happen


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf, tmp_path_factory):
    """SmolLM2 as transformers loads it from the GGUF, saved as an f32 HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    directory = tmp_path_factory.mktemp("smollm2_hf")
    kw = dict(gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
    # transformers refuses to save a GGUF-loaded model: write the f32 state dict and config directly
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (directory / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(directory)
    return directory, model, tok


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_smollm2_matches_transformers(source, smollm2_hf, smollm2_gguf, tmp_path):
    directory, ref, tok = smollm2_hf
    out = tmp_path / "smollm2.ebin"
    pack(directory if source == "hf" else smollm2_gguf, out, dtype="f32")
    text = "The history of the city of Paris begins around 250 BC, when a tribe of the Senones"
    ids = tok(text)["input_ids"] * 3 + tok("settled on an island in the river. 1234 café")["input_ids"]
    with edgerun.load(out, kv_dtype="f32") as m:
        assert m.tokenizer.encode(text) == tok(text)["input_ids"]
        check_model(m, ref, ids, n_greedy=24)
    # the default f16 KV cache: only the rounding of K and V (~0.02 of logits of ±15)
    with edgerun.load(out) as m:
        assert m._transformer.state.key_cache.dtype == np.float16
        tf, theirs = m._transformer, hf_logits(ref, ids)
        step = [tf.forward(ids[:5], 0).copy()] + [tf.forward([i], pos).copy() for pos, i in enumerate(ids[5:], 5)]
        err = np.abs(np.stack(step) - theirs[4:]).max()
        assert 0 < err <= 0.1, err


def test_mapped_embedding_reads_rows_and_hands_their_pages_back(tmp_path):
    """An untied embedding's rows stay in the file (plan.mapped_parts): MappedRows gives the same
    rows as the loaded matrix, and the pages its lookups touch are handed back every
    MAPPED_LOOKUPS lookups, so a whole pass over a 64 MiB matrix leaves RSS near where it was
    (a plain mapping keeps every page it touched)."""
    import psutil
    from edgerun.codecs import get_codec
    from edgerun.ebin import EbinFile, EbinWriter
    from edgerun.model import MappedRows
    rng = np.random.default_rng(0)
    V, d = 4096, 4096
    w = rng.standard_normal((V, d), dtype=np.float32)
    with EbinWriter(tmp_path / "e.ebin") as wr:
        wr.add_array("embed", w)
        wr.close({"tensors": {}})
    del w
    dense, params = get_codec("dense"), {"dtype": "f32"}
    rss = lambda: psutil.Process().memory_info().rss      # noqa: E731
    out = np.empty(d, np.float32)
    with EbinFile(tmp_path / "e.ebin") as e:
        arr, mm = e.map("embed")
        ref = np.array(arr[[0, 1234, V - 1]])
        emb = MappedRows(dense.load({"weight": arr}, params), [mm])
        before = rss()
        for i in range(V):
            emb.row(i, out)
        grown = rss() - before
        for k, i in enumerate([0, 1234, V - 1]):
            emb.row(i, out)
            np.testing.assert_array_equal(out, ref[k])
        arr2, mm2 = e.map("embed")           # the same without handing pages back
        before = rss()
        for i in range(V):
            out[:] = arr2[i]
        kept = rss() - before
        del arr2
        mm2.close()
    assert kept > 48 * 2**20 and grown < 8 * 2**20, (kept, grown)
