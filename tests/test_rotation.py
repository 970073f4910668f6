"""Rotated tensors (edgerun/codecs/rotation.py, formats/ebin.md § "Rotated tensors"): the fast
transform against the explicit matrix, a rotated Linear of every codec against its reference,
and packs with `--rotate` end to end."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import edgerun
from edgerun.cli import main
from edgerun.codecs import all_codecs, get_codec, rotation
from edgerun.convert.pack import make_recipe, pack, with_rotation
from edgerun.ebin import EbinFile
from edgerun.errors import EdgerunError
from edgerun.model import load_tensor

from conftest import CORPUS, hf_logits

ROTATABLE = [(name, cls.example_params[0]) for name, cls in sorted(all_codecs().items()) if not cls.stacked]


@pytest.mark.parametrize("n,block", [(576, 64), (96, 64), (40, 16), (12, 64), (7, 64)])
def test_transform_is_the_explicit_orthogonal_matrix(n, block):
    b = rotation.block_for(n, block)
    assert n % b == 0 and b <= block and (b & (b - 1)) == 0 and (n % (2 * b) or 2 * b > block)
    signs = rotation.make_signs(n, "layer.attn_in")
    assert set(np.unique(signs)) <= {-1, 1} and np.array_equal(signs, rotation.make_signs(n, "layer.attn_in"))
    T = rotation.rotation_matrix(signs, b)
    np.testing.assert_allclose(T @ T.T, np.eye(n), atol=1e-12)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, n)).astype(np.float32)
    np.testing.assert_allclose(rotation.rotate(x, signs, b), x.astype(np.float64) @ T.T, atol=2e-6)
    np.testing.assert_allclose(rotation.unrotate(rotation.rotate(x, signs, b), signs, b), x, atol=2e-6)
    y = x.copy()
    assert rotation.rotate(y, signs, b, out=y) is y and np.array_equal(y, rotation.rotate(x, signs, b))
    A = rng.standard_normal((n, 2 * n))
    H = (A @ A.T / n).astype(np.float32)
    ref = T @ H.astype(np.float64) @ T.T
    rotation.rotate_hessian(H, signs, b)              # in place
    np.testing.assert_allclose(H, ref, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("name,params", ROTATABLE, ids=[n for n, _ in ROTATABLE])
def test_rotated_linear_matches_its_reference(name, params):
    rng = np.random.default_rng(3)
    d, n = 48, 96
    w = (0.05 * rng.standard_normal((d, n))).astype(np.float32)
    signs = rotation.make_signs(n, "x")
    block = rotation.block_for(n)
    codec = get_codec(name)
    parts = codec.encode(rotation.rotate(w, signs, block), params)
    entry = {"codec": name, "params": params, "shape": [d, n], "rotation": {"block": block}}
    lin = load_tensor(entry, {**parts, rotation.SIGNS_PART: signs})
    stored = codec.decode(parts, params).astype(np.float64)           # W' = W·Tᵀ as decoded
    T = rotation.rotation_matrix(signs, block)
    W = stored @ T                                                    # the weight it stands for
    X = rng.standard_normal((6, n)).astype(np.float32)
    out, inner = np.empty((6, d), np.float32), np.empty((6, d), np.float32)
    XT = rotation.rotate(X, signs, block)
    # the codec's own kernels on T x (their int8 activations included: within 2 % of W x)
    lin.matvec(X[0], out[0])
    lin.inner.matvec(XT[0], inner[0])
    np.testing.assert_allclose(out[0], inner[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[0], W @ X[0], atol=0.02 * np.abs(W @ X[0]).max())
    lin.matmul(X, out)
    lin.inner.matmul(XT, inner)
    np.testing.assert_allclose(out, inner, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, X @ W.T, atol=0.02 * np.abs(X @ W.T).max())
    row = np.empty(n, np.float32)
    lin.row(5, row)
    np.testing.assert_allclose(row, W[5], atol=1e-5)
    assert lin.shape == (d, n) and lin.nbytes == sum(p.nbytes for p in parts.values()) + n
    # joined with a sharer of its input (same signs) exactly when the codec joins the stored rows
    other = load_tensor(entry, {**parts, rotation.SIGNS_PART: signs})
    joined = type(lin).stack([lin, other])
    assert (joined is None) == (type(lin.inner).stack([lin.inner, other.inner]) is None)
    if joined is not None:
        both = np.empty((2, 2 * d), np.float32)
        joined.matmul(X[:2], both)
        np.testing.assert_allclose(both, np.hstack([out[:2]] * 2), rtol=1e-5, atol=1e-5)
    flipped = load_tensor(entry, {**parts, rotation.SIGNS_PART: -signs})
    assert type(lin).stack([lin, flipped]) is None          # other signs: another input


def test_prompt_rows_rotate_on_every_thread_as_on_one():
    """A prompt chunk's inputs are rotated on all the threads: the same floats as on one."""
    from edgerun import kernels
    n = 1536
    signs = rotation.make_signs(n, "x")
    X = np.random.default_rng(4).standard_normal((rotation.ROTATE_PAR_MIN // n + 5, n)).astype(np.float32)
    params = {"dtype": "f32"}
    entry = {"codec": "dense", "params": params, "shape": [8, n], "rotation": {"block": rotation.BLOCK}}
    lin = load_tensor(entry, {**get_codec("dense").encode(np.zeros((8, n), np.float32), params),
                              rotation.SIGNS_PART: signs})
    one, two = np.empty_like(X), np.empty_like(X)
    lin._rotated(X, one)
    kernels.set_threads(2)
    try:
        lin._rotated(X, two)
    finally:
        kernels.set_threads(1)
    np.testing.assert_array_equal(two, one)
    np.testing.assert_array_equal(one, rotation.rotate(X, signs, rotation.BLOCK))


def _calib():
    return CORPUS * 8


@pytest.fixture(scope="module")
def rotated_pack(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rot") / "spqr3r.ebin"
    pack(tiny_dir("qwen2"), out, recipe=with_rotation(make_recipe("f16", "spqr", 3), rotation.BLOCK),
         calib_text=_calib(), calib_tokens=512)
    return out


def test_pack_rotates_every_compressed_matrix_with_shared_signs(rotated_pack):
    with EbinFile(rotated_pack) as f:
        tensors = f.manifest["tensors"]
        L0 = "model.layers.0."
        rotated = sorted(n for n, e in tensors.items() if "rotation" in e)
        assert rotated == sorted(n for n, e in tensors.items() if len(e["shape"]) == 2)   # embedding too
        assert tensors["model.embed_tokens.weight"]["codec"] == "cluster"
        assert tensors[L0 + "mlp.down_proj.weight"]["rotation"] == {"block": 32}        # 96 columns
        assert tensors[L0 + "self_attn.q_proj.weight"]["rotation"] == {"block": 64}
        signs = {n: f.read(tensors[L0 + n]["parts"][rotation.SIGNS_PART])
                 for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                           "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight")}
    q = signs["self_attn.q_proj.weight"]
    assert np.array_equal(q, signs["self_attn.k_proj.weight"]) and np.array_equal(q, signs["self_attn.v_proj.weight"])
    assert np.array_equal(signs["mlp.gate_proj.weight"], signs["mlp.up_proj.weight"])
    assert not np.array_equal(q, signs["self_attn.o_proj.weight"])


@pytest.mark.parametrize("arch", ["qwen2", "llama"])          # tied; untied (the embedding's rows mapped)
def test_rotated_pack_runs_close_to_transformers(arch, rotated_pack, tiny_dir, tmp_path):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir(arch)).eval()
    plain, rotated = tmp_path / "spqr3.ebin", rotated_pack
    pack(tiny_dir(arch), plain, recipe=make_recipe("f16", "spqr", 3), calib_text=_calib(), calib_tokens=512)
    if arch != "qwen2":
        rotated = tmp_path / "spqr3r.ebin"
        pack(tiny_dir(arch), rotated, recipe=with_rotation(make_recipe("f16", "spqr", 3), rotation.BLOCK),
             calib_text=_calib(), calib_tokens=512)
    errors = {}
    for label, path in (("rotated", rotated), ("plain", plain)):
        m = edgerun.load(path)
        assert m._transformer.layers[0].stacked             # q/k/v and gate/up still joined
        ids = m.tokenizer.encode("Once upon a time, in a land far away")
        ref = hf_logits(hf, ids)
        got = np.asarray(m.logits(ids))
        errors[label] = float(np.abs(got - ref).mean() / np.abs(ref).mean())
    # 3-bit codes on random weights: the rotated pack is as close to the float model as the plain one
    assert errors["rotated"] < 1.5 * errors["plain"] and errors["rotated"] < 0.6, errors


def test_cli_rotate_refusals(tiny_dir, tmp_path):
    src = str(tiny_dir("qwen2"))
    run = lambda *a: CliRunner().invoke(main, ["pack", src, "-o", str(tmp_path / "x.ebin"), *a])   # noqa: E731
    for args, says in ((["--rotate"], "give --codec, --recipe or --bpw"),
                       (["--rotate", "--codec", "spqr", "--layout", "flash"], "--layout flash"),
                       (["--rotate", "--codec", "bitstack"], "cannot be rotated")):
        r = run(*args)
        assert isinstance(r.exception, EdgerunError) and says in str(r.exception), (args, r.exception)
    assert "--rotate" in CliRunner().invoke(main, ["pack", "--help"]).output
    assert not (tmp_path / "x.ebin").exists() and not (tmp_path / "x.ebin.tmp").exists()
    with pytest.raises(EdgerunError):
        with_rotation(make_recipe("f16"), rotation.BLOCK)


def test_recipe_size_counts_the_signs(tiny_dir, tmp_path):
    from edgerun.config import ModelConfig
    from edgerun.convert.budget import recipe_size
    out = tmp_path / "c3r.ebin"
    recipe = with_rotation(make_recipe("f16", "cluster", 3), rotation.BLOCK)
    s = pack(tiny_dir("qwen2"), out, recipe=recipe, calib_text=_calib(), calib_tokens=512)
    with EbinFile(out) as f:
        cfg = ModelConfig.from_dict(f.manifest["config"])
        assert f.manifest["format"]["features"] == ["cluster-planes-2", "rotation"]
    planned = recipe_size(json.loads(json.dumps(recipe)), cfg)
    assert planned.group_bytes["attention"] == s.group_bytes["attention"]
    assert planned.group_bytes["ffn"] == s.group_bytes["ffn"]


def test_auto_device_keeps_rotated_packs_on_the_cpu(rotated_pack, monkeypatch):
    from edgerun import cuda as ecuda
    from edgerun.api import Model
    monkeypatch.setattr(ecuda, "resolve_device", lambda device: ("cuda", "a GPU"))
    with EbinFile(rotated_pack) as f:
        manifest = f.manifest
    assert "rotation" in manifest["format"]["features"]
    said = []
    assert Model._device("auto", manifest, said.append, True) == "cpu" and "rotated" in said[0]
    assert Model._device("cuda", manifest, said.append, True) == "cuda"     # asked for: cuda.codecs refuses it
