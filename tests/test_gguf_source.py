"""GGUFSource against transformers' own GGUF loader (weights, config, tokenizer) on the real
SmolLM2 GGUF, plus small synthetic GGUFs written here for the paths SmolLM2 does not take."""
from __future__ import annotations

import importlib.util
import math

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from tokenizers import Tokenizer

from edgerun.convert import gguf as gguf_mod
from edgerun.convert.gguf import GGUFSource, build_tokenizer, llama3_rope_factors, llama3_rope_scaling
from edgerun.errors import EdgerunError, FormatError, UnsupportedModelError

TEXTS = [
    "Hello world! 123",
    "12345 3.14159 and 1,000,000.",
    "naïve café 日本語 Ünïcödé",
    "emoji 🙂👍🏽 mixed",
    "def f(x):\n\tif x:\n        return [1, 2]\n\n\n# done\r\n",
    "  leading spaces and trailing   ",
    " it's I'M we've they'll",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


# --- the real model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_path():
    from edgerun.default_model import default_gguf
    return default_gguf()


@pytest.fixture(scope="module")
def source(gguf_path):
    with GGUFSource(gguf_path) as src:
        yield src


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    """transformers' dequantized weights and config for the same file (loaded once)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, name = str(gguf_path.parent), gguf_path.name
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    if importlib.util.find_spec("accelerate"):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        state = model.state_dict()
    else:  # from_pretrained insists on accelerate; for llama GGUFs it calls exactly this loader
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    return config, {k: v.float().numpy() for k, v in state.items()}


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.mark.slow
def test_config(source, hf_model):
    cfg = source.config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    expected = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, vocab_size=49152,
                    tie_word_embeddings=True, attention_bias=False, rope_scaling=None, rope_theta=100000.0)
    assert {k: cfg[k] for k in expected} == expected
    hf = hf_model[0]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps)
    meta = source.meta
    assert meta.bos_token_id == 1 and meta.eos_token_ids == [2] and meta.add_bos_token is False
    assert meta.special_tokens["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in meta.chat_template


@pytest.mark.slow
def test_tensor_names_and_shapes(source, hf_model):
    state = hf_model[1]
    names = source.tensor_names()
    assert len(names) == 272 and names[0] == "model.embed_tokens.weight"
    assert set(names) == set(state) - {"lm_head.weight"}     # tied: HF stores no lm_head either
    for name in names:
        assert source.tensor_shape(name) == state[name].shape, name
    assert source.tensor_shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert sum(source.tensor_nbytes(n) for n in names) < 100e6


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.29.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
    "model.layers.7.self_attn.v_proj.weight",
    "model.layers.7.mlp.down_proj.weight",
    "model.layers.7.input_layernorm.weight",
    "model.norm.weight",
])
def test_read_matches_transformers(source, hf_model, name):
    w = source.read(name)
    assert w.dtype == np.float32 and w.flags.writeable and w.flags.c_contiguous
    np.testing.assert_allclose(w, hf_model[1][name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_read_returns_new_arrays(source):
    a = source.read("model.norm.weight")      # an F32 tensor: must not alias the mapped file
    a[:] = 0
    assert np.abs(source.read("model.norm.weight")).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(source, hf_tokenizer, text):
    tok = Tokenizer.from_str(source.meta.tokenizer_json)
    ids = tok.encode(text).ids
    assert ids == hf_tokenizer(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm_splits_digits(source):
    # llama.cpp's smollm pre-tokenizer isolates every digit (expected ids from llama.cpp)
    tok = Tokenizer.from_str(source.meta.tokenizer_json)
    assert tok.encode("Hello world! 123").ids == [19556, 905, 17, 216, 33, 34, 35]
    assert tok.encode("  multiple   spaces").ids == [216, 2701, 256, 5600]


# --- synthetic GGUFs -----------------------------------------------------------------------------
def write_gguf(path, arch="llama", tensors=(), tokenizer=None, extra=None, layers=1, hidden=64, heads=4,
               kv_heads=2, ffn=96):
    """A tiny GGUF: `tensors` is a list of (gguf name, raw array, ggml type or None)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    for key, value in (extra or {}).items():
        getattr(w, f"add_{key}")(value)
    tok = tokenizer or byte_level_vocab()
    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    for key in ("bos_token_id", "eos_token_id", "unk_token_id", "eot_token_id", "add_bos_token", "add_space_prefix"):
        if key in tok:
            getattr(w, f"add_{key}")(tok[key])
    for name, data, qtype in tensors:
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def byte_level_vocab(pre="gpt-2"):
    spelled = list(gguf_mod._bytes_to_unicode().values())
    tokens = ["<|endoftext|>"] + spelled + ["Ġt", "he", "Ġthe"]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": [3] + [1] * (len(tokens) - 1),
            "merges": ["Ġ t", "h e", "Ġt he"], "bos_token_id": 0, "eos_token_id": 0}


def tiny_llama_tensors(rng, hidden=64, kv=32, ffn=96, vocab=260, qtype=None):
    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    out = [("token_embd.weight", f32(vocab, hidden), None), ("output_norm.weight", f32(hidden), None)]
    for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                        ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
                        ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
        w = f32(*shape)
        out.append((f"blk.0.{name}.weight", w if qtype is None else gguf.quants.quantize(w, qtype), qtype))
    out += [("blk.0.attn_norm.weight", f32(hidden), None), ("blk.0.ffn_norm.weight", f32(hidden), None)]
    return out


def test_unsupported_architecture(tmp_path):
    rng = np.random.default_rng(0)
    path = write_gguf(tmp_path / "phi.gguf", arch="phi3", tensors=tiny_llama_tensors(rng)[:1])
    with pytest.raises(UnsupportedModelError, match=r"architecture 'phi3' is not supported; supported: llama"):
        GGUFSource(path)


def test_unknown_pre_tokenizer(tmp_path):
    rng = np.random.default_rng(0)
    path = write_gguf(tmp_path / "m.gguf", tensors=tiny_llama_tensors(rng), tokenizer=byte_level_vocab("bloom"))
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer 'bloom'"):
        GGUFSource(path)


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(1000))
    with pytest.raises(FormatError, match="junk.gguf"):
        GGUFSource(junk)
    with pytest.raises(EdgerunError, match="no such file"):
        GGUFSource(tmp_path / "missing.gguf")
    good = write_gguf(tmp_path / "good.gguf", tensors=tiny_llama_tensors(np.random.default_rng(0)))
    data = good.read_bytes()
    for cut in (6, 200, len(data) // 3, len(data) - 100):   # header, metadata, tensor info/data
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(FormatError, match=short.name):
            GGUFSource(short)


def test_synthetic_llama_unpermutes_q_and_k(tmp_path):
    """llama.cpp's converter permutes q/k rows (convert_hf_to_gguf.py LlamaModel.permute);
    reading must give back the HF rows exactly."""
    rng = np.random.default_rng(1)
    hf_q = rng.standard_normal((64, 64)).astype(np.float32)    # 4 heads x 16
    hf_k = rng.standard_normal((32, 64)).astype(np.float32)    # 2 kv heads x 16

    def permute(w, n_head):  # as convert_hf_to_gguf.py writes it
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    tensors = tiny_llama_tensors(rng)
    tensors = [(n, permute(hf_q, 4) if n == "blk.0.attn_q.weight" else permute(hf_k, 2)
                if n == "blk.0.attn_k.weight" else d, q) for n, d, q in tensors]
    with GGUFSource(write_gguf(tmp_path / "m.gguf", tensors=tensors)) as src:
        np.testing.assert_array_equal(src.read("model.layers.0.self_attn.q_proj.weight"), hf_q)
        np.testing.assert_array_equal(src.read("model.layers.0.self_attn.k_proj.weight"), hf_k)
        np.testing.assert_array_equal(src.read_rows("model.layers.0.self_attn.q_proj.weight", [17, 2]), hf_q[[17, 2]])
    # qwen2 files are not permuted
    tensors = [(n, hf_q if n == "blk.0.attn_q.weight" else d, q) for n, d, q in tensors]
    tensors += [("blk.0.attn_q.bias", np.ones(64, np.float32), None)]
    with GGUFSource(write_gguf(tmp_path / "q.gguf", arch="qwen2", tensors=tensors,
                               tokenizer=byte_level_vocab("qwen2"))) as src:
        np.testing.assert_array_equal(src.read("model.layers.0.self_attn.q_proj.weight"), hf_q)
        assert src.config["architectures"] == ["Qwen2ForCausalLM"] and src.config["attention_bias"] is True
        assert "model.layers.0.self_attn.q_proj.bias" in src.tensor_names()
        assert src.config["tie_word_embeddings"] is True


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1])
def test_dequantize_block_types(tmp_path, monkeypatch, qtype):
    """Each type decodes to the original floats within its quantization step, also when the
    tensor is decoded in several row chunks."""
    monkeypatch.setattr(gguf_mod, "CHUNK_BYTES", 4 * 64 * 7)   # 7 rows per chunk: uneven split
    rng = np.random.default_rng(2)
    tensors = tiny_llama_tensors(rng, qtype=qtype)
    original = {n: d for n, d, _ in tiny_llama_tensors(np.random.default_rng(2))}
    with GGUFSource(write_gguf(tmp_path / "m.gguf", tensors=tensors, heads=4, kv_heads=2)) as src:
        w = src.read("model.layers.0.mlp.up_proj.weight")
        ref = original["blk.0.ffn_up.weight"]
        bits = {QT.F16: 11, QT.BF16: 8, QT.Q8_0: 8, QT.Q5_0: 5, QT.Q5_1: 5, QT.Q4_0: 4, QT.Q4_1: 4}[qtype]
        step = np.abs(ref).max() / 2 ** (bits - 1)
        assert w.shape == ref.shape and np.abs(w - ref).max() <= 1.01 * step
        np.testing.assert_array_equal(w, gguf.quants.dequantize(gguf.quants.quantize(ref, qtype), qtype))
        rows = np.array([5, 0, w.shape[0] - 1, 5, 9])            # any order, repeats
        np.testing.assert_array_equal(src.read_rows("model.layers.0.mlp.up_proj.weight", rows), w[rows])


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K])
def test_k_quants_chunked_equals_whole(tmp_path, monkeypatch, qtype):
    """K-quant blocks (random bytes, 256 columns per block) decode the same in row chunks."""
    monkeypatch.setattr(gguf_mod, "CHUNK_BYTES", 4 * 256 * 3)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (96, 2, size), dtype=np.uint8)       # ffn_up: 96 x 512, 2 blocks a row
    # random bytes would make the f16 super-block scales inf/nan: write real ones (byte offsets
    # of d and dmin in ggml's block_q*_K structs)
    for offset in {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}[qtype]:
        scale = rng.uniform(-0.1, 0.1, (96, 2)).astype(np.float16)
        raw[..., offset:offset + 2] = scale.view(np.uint8).reshape(96, 2, 2)
    raw = raw.reshape(96, 2 * size)
    tensors = tiny_llama_tensors(rng, hidden=512, kv=256, ffn=96)
    tensors = [(n, raw if n == "blk.0.ffn_up.weight" else d, qtype if n == "blk.0.ffn_up.weight" else q)
               for n, d, q in tensors]
    with GGUFSource(write_gguf(tmp_path / "m.gguf", tensors=tensors, hidden=512, heads=4, kv_heads=2)) as src:
        w = src.read("model.layers.0.mlp.up_proj.weight")
        assert w.shape == (96, 512)
        ref = gguf.quants.dequantize(raw, qtype)
        assert np.isfinite(ref).all() and np.abs(ref).max() > 0
        np.testing.assert_array_equal(w, ref)
        rows = np.array([95, 3, 3, 0, 50, 51, 52, 7])            # several chunks of 3 rows
        np.testing.assert_array_equal(src.read_rows("model.layers.0.mlp.up_proj.weight", rows), ref[rows])


def test_rope_scaling_from_metadata(tmp_path):
    rng = np.random.default_rng(4)
    extra = {"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": 4.0}
    with GGUFSource(write_gguf(tmp_path / "m.gguf", tensors=tiny_llama_tensors(rng), extra=extra)) as src:
        assert src.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    # Llama 3.2's published scaling: factor 32, low 1, high 4, original context 8192
    theta, head_dim = 500000.0, 64
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    factors = llama3_rope_factors(scaling, 2 * math.pi / inv_freq).astype(np.float32)
    got = llama3_rope_scaling(factors, theta, head_dim)
    assert got["rope_type"] == "llama3" and got["factor"] == 32.0
    assert got["low_freq_factor"] == pytest.approx(1.0, rel=1e-4)
    assert got["high_freq_factor"] == pytest.approx(4.0, rel=1e-4)
    # the same through a file: rope_freqs is skipped as a tensor, kept in the config
    tensors = tiny_llama_tensors(np.random.default_rng(5), hidden=256, kv=128)
    tensors.append(("rope_freqs.weight", factors, None))
    extra = {"rope_freq_base": theta, "rope_dimension_count": head_dim}
    with GGUFSource(write_gguf(tmp_path / "m.gguf", tensors=tensors, extra=extra, hidden=256, heads=4)) as src:
        assert src.config["rope_scaling"]["factor"] == 32.0
        assert "rope_freqs.weight" not in src.tensor_names()
    with pytest.raises(UnsupportedModelError):
        llama3_rope_scaling(np.linspace(1, 8, 32), theta, head_dim)


def test_eos_ids_include_eot(tmp_path):
    tok = dict(byte_level_vocab(), eos_token_id=1, eot_token_id=2)
    tok["types"] = [3, 3, 3] + tok["types"][3:]
    with GGUFSource(write_gguf(tmp_path / "m.gguf", tensors=tiny_llama_tensors(np.random.default_rng(6)),
                               tokenizer=tok)) as src:
        assert src.meta.eos_token_ids == [1, 2]


# --- tokenizers for other pre-tokenizers and SentencePiece, against transformers ------------------
@pytest.fixture(scope="module")
def smollm_vocab(gguf_path):
    """SmolLM2's first 8000 tokens and the merges among them: real merges, a smaller file."""
    reader = gguf.GGUFReader(gguf_path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:8000]
    known = set(tokens)
    merges = [m for m in reader.fields["tokenizer.ggml.merges"].contents()
              if m.replace(" ", "") in known and set(m.split(" ")) <= known]
    # SmolLM2 has no multi-digit tokens, which would hide how each pre-tokenizer groups digits
    tokens += ["12", "123", "45", "456"]
    merges += ["1 2", "12 3", "4 5", "45 6"]
    types = reader.fields["tokenizer.ggml.token_type"].contents()[:8000] + [1] * 4
    return {"tokens": tokens, "token_type": types, "merges": merges}


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, smollm_vocab, pre):
    transformers = pytest.importorskip("transformers")
    tok = {"model": "gpt2", "pre": pre, "tokens": smollm_vocab["tokens"], "types": smollm_vocab["token_type"],
           "merges": smollm_vocab["merges"], "bos_token_id": 1, "eos_token_id": 2, "add_bos_token": False}
    arch = "qwen2" if pre == "qwen2" else "llama"
    path = write_gguf(tmp_path / "t.gguf", arch=arch, tokenizer=tok,
                      tensors=tiny_llama_tensors(np.random.default_rng(7))[:1])
    ours = Tokenizer.from_str(GGUFSource(path).meta.tokenizer_json)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    for text in TEXTS + ["1234567 digits 456", "x\n\n\ny   \n z"]:
        assert ours.encode(text).ids == ref(text, add_special_tokens=False)["input_ids"], text


def test_smollm_splits_every_digit(smollm_vocab):
    """llama.cpp's smollm pre-tokenizer cuts "\\p{N}" first, so no multi-digit token can form."""
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": smollm_vocab["tokens"],
          "tokenizer.ggml.token_type": smollm_vocab["token_type"], "tokenizer.ggml.merges": smollm_vocab["merges"]}
    for pre, pieces in (("smollm", ["x", "Ġ", "1", "2", "3", "4", "5"]), ("gpt-2", ["x", "Ġ", "123", "45"])):
        kv["tokenizer.ggml.pre"] = pre
        tok = Tokenizer.from_str(build_tokenizer(kv.get)["json"])
        assert tok.encode("x 12345").ids == [tok.token_to_id(p) for p in pieces], pre


def sentencepiece_vocab():
    pieces = ["ab", "bc", "cd", "▁t", "he", "▁the", "▁c", "at", "▁cat", "▁s", "▁sat", "on", "▁on", "▁m", "▁mat", "in", "ing",
              "▁r", "un", "▁run", "▁running", "▁a", "▁"] + list("thecasonmigruébd")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types,
            "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0}


def test_sentencepiece_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = write_gguf(tmp_path / "spm.gguf", tokenizer=sentencepiece_vocab(),
                      tensors=tiny_llama_tensors(np.random.default_rng(8))[:1])
    src = GGUFSource(path)
    assert src.meta.add_bos_token is True and src.meta.bos_token_id == 1
    ours = Tokenizer.from_str(src.meta.tokenizer_json)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["the cat sat on the mat", "running", "héllo 🙂 x", "  two  spaces", "the</s>cat", "zzz", "abc", "abcd bcd"]:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert ids[0] == 1
        assert ours.decode(ids) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True), text


def test_build_tokenizer_needs_vocab():
    with pytest.raises(FormatError):
        build_tokenizer(lambda key, default=None: default)
