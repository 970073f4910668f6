"""Every registered codec, each with the params its class declares (`example_params`): encode,
decode with its NumPy reference, and the kernels' matvec / matmul / row against that reference
at 1 and 2 threads (as gguf-py's tests/test_quants.py loops over its registry: a new codec is
tested the day it is registered)."""
import numpy as np
import pytest

from edgerun import kernels
from edgerun.codecs import all_codecs, codec_class, codec_names, get_codec, parse_rule
from edgerun.codecs.base import REGISTRY, Codec, Linear
from edgerun.errors import EdgerunError

CODECS = all_codecs()
CASES = [(name, i) for name, cls in sorted(CODECS.items()) for i in range(len(cls.example_params))]
SHAPES = [(37, 70), (21, 300)]


def _matrix(d, n, seed):
    rng = np.random.default_rng(seed)
    w = (0.05 * rng.standard_normal((d, n))).astype(np.float32)
    X = rng.standard_normal((4 * n, n)).astype(np.float32) * rng.uniform(0.3, 2.0, n).astype(np.float32)
    return w, (X.T @ X / X.shape[0]).astype(np.float64)


_ENCODED = {}


def _encoded(name, i, shape):
    key = (name, i, shape)
    if key not in _ENCODED:
        w, H = _matrix(*shape, seed=sum(map(ord, name)) + 7 * i + shape[0])
        params = CODECS[name].example_params[i]
        parts = get_codec(name).encode(w, params, H)
        _ENCODED[key] = (w, params, parts)
    return _ENCODED[key]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    kernels.set_threads(request.param)
    if request.param > 1:
        # small test shapes: take each codec's prange kernels anyway
        for name in CODECS:
            mod = __import__(f"edgerun.codecs.{name}.kernels", fromlist=["_"])
            for attr in ("PAR_MIN_WEIGHTS", "PAR_MIN_MACS"):
                if hasattr(mod, attr):
                    monkeypatch.setattr(mod, attr, 0)
    yield request.param
    kernels.set_threads(1)


def _close(got, ref, what, tol=2e-4):
    err = float(np.max(np.abs(got - ref))) / max(1e-6, float(np.max(np.abs(ref))))
    assert err < tol, f"{what}: relative error {err:.3g}"


def test_registry_lists_every_codec_package():
    assert {"dense", "spqr", "cluster", "bitstack"} <= set(codec_names()) == set(CODECS)
    for name, cls in CODECS.items():
        assert issubclass(cls, Codec) and REGISTRY[name] is cls and cls.name == name
        assert get_codec(name).name == name
        assert cls.example_params, f"{name} declares no example_params for the registry tests"


def test_the_reader_knows_every_feature_a_codec_declares():
    """A file feature a codec writes (`Codec.file_features`) is in the reader's list
    (edgerun/ebin.py keeps its own, so that it does not import the codecs)."""
    from edgerun.ebin import FEATURES
    for name, cls in CODECS.items():
        assert set(cls.file_features) <= FEATURES, name


@pytest.mark.parametrize("name,i", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=["37x70", "21x300"])
def test_codec_kernels_match_reference(name, i, shape, threads):
    w, params, parts = _encoded(name, i, shape)
    codec = get_codec(name)
    d, n = shape
    W = codec.decode(parts, params)
    assert W.shape == (d, n) and W.dtype == np.float32
    assert np.all(np.isfinite(W))
    # a lossy codec still approximates w (catches a decode that ignores the parts)
    assert np.linalg.norm(W - w) < 0.9 * np.linalg.norm(w)
    ref_mod = __import__(f"edgerun.codecs.{name}.reference", fromlist=["_"])
    rng = np.random.default_rng(d * n)
    x = rng.standard_normal(n).astype(np.float32)
    # reference.matvec is what the kernels compute (int8 activations for some codecs): close to W @ x
    ref_mv = lambda v: ref_mod.matvec(parts, params, v)       # noqa: E731
    _close(ref_mv(x), W @ x, f"{name} reference.matvec", 0.1)

    lin = codec.load(parts, params)
    assert isinstance(lin, Linear) and lin.codec == name and lin.shape == (d, n)
    assert lin.nbytes == codec.nbytes(parts) == sum(int(p.nbytes) for p in parts.values())
    assert lin.bits_per_weight == pytest.approx(lin.nbytes * 8 / (d * n))

    out = np.full(d, np.nan, np.float32)
    lin.matvec(x, out)
    _close(out, ref_mv(x), f"{name} {params} matvec")
    for T in (1, 3, 17):
        X = rng.standard_normal((T, n)).astype(np.float32)
        out = np.full((T, d), np.nan, np.float32)
        lin.matmul(X, out)
        if T < lin.matmul_min_t:                # below: matvecs
            want = np.stack([ref_mv(v) for v in X])
        else:                                   # reference.matmul where the batched kernel quantizes x
            want = ref_mod.matmul(parts, params, X) if hasattr(ref_mod, "matmul") else X @ W.T
        _close(out, want, f"{name} {params} matmul T={T}")
    row = np.full(n, np.nan, np.float32)
    for r in (0, d // 2, d - 1):
        lin.row(r, row)
        _close(row, W[r], f"{name} {params} row {r}")


@pytest.mark.parametrize("name,i", CASES)
def test_stacked_linears_compute_their_members(name, i, threads):
    # q/k/v and gate/up share an input (one Hessian) and are joined by rows at load (model.StackedLinear)
    codec, params = get_codec(name), CODECS[name].example_params[i]
    n = 300
    _, H = _matrix(64, n, seed=3)
    rng = np.random.default_rng(5 + i)
    members = [codec.load(codec.encode((0.05 * rng.standard_normal((d, n))).astype(np.float32), params, H), params)
               for d in (128, 64, 64)]
    cls = type(members[0])
    if cls.stack.__func__ is Linear.stack.__func__:
        pytest.skip(f"{name} does not join rows (Linear.stack)")         # e.g. BitStack: resized per matrix, live
    joined = cls.stack(members)
    assert joined is not None, f"{name} {params}: rows not joined"
    assert joined.shape == (256, n) and joined.codec == name
    x = rng.standard_normal(n).astype(np.float32)
    parts = [np.empty(m.shape[0], np.float32) for m in members]
    for m, o in zip(members, parts):
        m.matvec(x, o)
    out = np.full(256, np.nan, np.float32)
    joined.matvec(x, out)
    _close(out, np.concatenate(parts), f"{name} {params} stacked matvec", 1e-6)
    X = rng.standard_normal((9, n)).astype(np.float32)
    outs = [np.empty((9, m.shape[0]), np.float32) for m in members]
    for m, o in zip(members, outs):
        m.matmul(X, o)
    out = np.full((9, 256), np.nan, np.float32)
    joined.matmul(X, out)
    _close(out, np.concatenate(outs, axis=1), f"{name} {params} stacked matmul", 1e-5)
    row, want = np.empty(n, np.float32), np.empty(n, np.float32)
    joined.row(130, row)
    members[1].row(2, want)
    np.testing.assert_array_equal(row, want)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_recipe_rules_from_the_registry(name):
    cls = codec_class(name)
    rule = parse_rule(f"{name}:{cls.default_arg}")
    assert rule["codec"] == name and rule["params"][cls.arg] == cls.default_arg
    assert parse_rule(name) == rule                     # no argument: the codec's default
    assert cls.describe(rule["params"]) == f"{name}:{cls.default_arg}"
    for s in cls.shorthands:
        assert parse_rule(s)["codec"] == name
    bad = "nope" if isinstance(cls.arg_range[0], str) else cls.arg_range[1] + 1
    with pytest.raises(EdgerunError, match=name):
        parse_rule(f"{name}:{bad}")


def test_unknown_codec():
    with pytest.raises(EdgerunError, match="unknown codec"):
        parse_rule("nope:3")
    with pytest.raises(EdgerunError, match="not supported"):
        get_codec("nope")


def test_a_new_codec_registers_itself():
    class Halve(Codec, name="test-halve"):
        arg, default_arg, arg_range = "bits", 8, (8, 8)

    try:
        assert "test-halve" in codec_names() and codec_class("test-halve") is Halve
        assert parse_rule("test-halve") == {"codec": "test-halve", "params": {"bits": 8}}
        with pytest.raises(TypeError, match="registered twice"):
            class Other(Codec, name="test-halve"):
                pass
    finally:
        REGISTRY.pop("test-halve", None)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_has_a_cuda_module(name):
    # the CUDA upload finds the codec's kernels by its registered name (edgerun/codecs/<name>/cuda.py)
    import importlib.util
    assert importlib.util.find_spec(f"edgerun.codecs.{name}.cuda") is not None


def test_to_device_without_cuda_module():
    class NoGpu(Codec, name="test-nogpu"):
        pass

    try:
        with pytest.raises(EdgerunError, match="no CUDA kernel for the test-nogpu codec"):
            NoGpu.to_device(None)
    finally:
        REGISTRY.pop("test-nogpu", None)
