"""CUDA offload (edgerun/cuda, issue #7) under numba-cuda's simulator (NUMBA_ENABLE_CUDASIM=1).

The simulator must be switched on before numba.cuda is imported, so each check runs this file
as a script in a subprocess (`python tests/test_cuda.py <case>`). Kernel checks run the real GPU
geometry (32 lanes per row, warp reductions) on tiny shapes; the whole-model checks run the same
code with 1 lane per row (EDGERUN_CUDA_LANES=1: no barriers, ~10x faster in the simulator).
Every CUDA kernel is compared with its CPU kernel; the tiny model's logits with the CPU run's.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
needs_numba_cuda = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                                      reason="numba-cuda is not installed (pip install 'edgerun[cuda]')")


def _run(case: str, *args: str, lanes: int = 32, sim: bool = True) -> str:
    env = dict(os.environ, EDGERUN_CUDA_LANES=str(lanes), PYTHONPATH=str(HERE.parents[1]))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    p = subprocess.run([sys.executable, str(HERE), case, *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"{case} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout


# --- pytest side ----------------------------------------------------------------------------

@needs_numba_cuda
def test_op_kernels_match_cpu():
    assert "ops ok" in _run("ops")


@needs_numba_cuda
@pytest.mark.parametrize("codec", ["dense", "cluster", "spqr", "bitstack", "vq"])
def test_codec_kernels_match_cpu(codec):
    # bitstack's shared-memory LUT needs block barriers: 8 lanes keep the simulator quick while
    # still splitting rank lanes and chunks across threads
    assert f"{codec} ok" in _run("codec", codec, lanes=8 if codec == "bitstack" else 32)


@needs_numba_cuda
@pytest.mark.parametrize("layers", ["all", "1"])
def test_tiny_model_offload_matches_cpu(tiny_dir, tmp_path, layers):
    from edgerun.convert.pack import pack
    out = tmp_path / "tiny.ebin"
    pack(tiny_dir("llama"), out, dtype="f32")
    assert "model ok" in _run("model", str(out), layers, lanes=1)


@needs_numba_cuda
def test_no_device_errors_clearly():
    # no simulator, no GPU here: "cuda" must raise a clear CudaError, "auto" must fall back
    out = _run("nodevice", sim=False)
    assert "nodevice ok" in out


def test_missing_numba_cuda(monkeypatch):
    from edgerun import cuda as ecuda
    from edgerun.errors import EdgerunError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "numba_cuda" else real(n, *a))
    with pytest.raises(EdgerunError, match="numba-cuda is not installed.*pip install"):
        ecuda.resolve_device("cuda")
    device, why = ecuda.resolve_device("auto")
    assert device == "cpu" and "numba-cuda" in why
    assert ecuda.resolve_device("cpu")[0] == "cpu"


# --- subprocess side (NUMBA_ENABLE_CUDASIM=1 set by _run before numba is imported) ------------

def _close(a, b, tol=1e-4, what=""):
    err = float(np.max(np.abs(a - b))) / max(1e-6, float(np.max(np.abs(b))))
    assert err < tol, f"{what}: relative error {err:.3g}"


def _check_linear(cpu, name, rng, Wref, ref_matvec=None, ref_matmul=None):
    """CUDA matvec (T = 1) and matmul (T = 5: a full and a partial token tile) vs the codec's
    NumPy decode `Wref` (the format spec), with bias and with the residual accumulate; the CPU
    Linear vs the same, or for its one-token matvecs vs `ref_matvec` and its batched matmul vs
    `ref_matmul` (the codec's reference.matvec / matmul where the CPU kernels quantize the
    activations; the device kernels do not)."""
    from numba import cuda

    from edgerun.cuda.codecs import to_device
    d, n = cpu.shape
    dev = to_device(cpu)
    assert dev.nbytes > 0
    bias = rng.standard_normal(d).astype(np.float32)
    for T in (1, 5):
        X = rng.standard_normal((T, n)).astype(np.float32)
        ref = X @ Wref.T
        got = np.empty((T, d), np.float32)
        if T == 1:
            cpu.matvec(X[0], got[0])
        else:
            cpu.matmul(X, got)
        one_token = T == 1 or T < cpu.matmul_min_t
        want = (np.stack([ref_matvec(x) for x in X]) if one_token and ref_matvec
                else ref_matmul(X) if not one_token and ref_matmul else ref)
        _close(got, want, what=f"{name} T={T}: the CPU kernel vs its reference")
        out = cuda.to_device(np.zeros((T, d), np.float32))
        dev.matmul(cuda.to_device(X), out, cuda.to_device(bias))
        _close(out.copy_to_host(), ref + bias, what=f"{name} T={T}")
        base = rng.standard_normal((T, d)).astype(np.float32)
        out = cuda.to_device(base)
        dev.matmul(cuda.to_device(X), out, accumulate=True)
        _close(out.copy_to_host(), ref + base, what=f"{name} T={T} accumulate")
    return dev


def case_codec(codec):
    from edgerun.codecs import get_codec
    rng = np.random.default_rng(0)
    d, n = 6, 40          # 6 rows: a full and a partial block of 4; 40 columns: a 32-block + tail
    W = (0.1 * rng.standard_normal((d, n))).astype(np.float32)
    c = get_codec(codec)
    reference = importlib.import_module(f"edgerun.codecs.{codec}.reference")
    if codec == "dense":
        for dt in ("f32", "f16", "bf16"):
            parts = c.encode(W, {"dtype": dt})
            _check_linear(c.load(parts, {"dtype": dt}), f"dense {dt}", rng, c.decode(parts, {"dtype": dt}))
    elif codec == "cluster":
        for bits, g, outl in ((3, 1, 0.05), (4, 2, 0), (8, 4, 0)):
            p = {"bits": bits, "group_rows": g, "outliers": outl}
            parts = c.encode(W, p)
            _check_linear(c.load(parts, p), f"cluster {p}", rng, c.decode(parts, p),
                          lambda x: reference.matvec(parts, p, x), lambda X: reference.matmul(parts, p, X))
    elif codec == "vq":
        for p in ({"bits": 3, "group_rows": 4}, {"code_bits": 5}, {"bits": 4}):
            parts = c.encode(W[:, :39], p)         # odd n: a padded pair
            _check_linear(c.load(parts, p), f"vq {p}", rng, c.decode(parts, p))
    elif codec == "spqr":
        W[1, 5] = 2.0      # an outlier
        for bits in (2, 3, 4):
            p = {"bits": bits}
            parts = c.encode(W, p)
            _check_linear(c.load(parts, p), f"spqr {bits}", rng, c.decode(parts, p),
                          lambda x: reference.matvec(parts, p, x), lambda X: reference.matmul(parts, p, X))
        assert parts["outlier_rowptr"][-1] > 0, "the test should exercise outliers"
    elif codec == "bitstack":
        p = {"blocks": 3, "rank": 4}
        parts = c.encode(W, p)
        cpu = c.load(parts, p, blocks=2)
        dev = _check_linear(cpu, "bitstack 2 blocks", rng, c.decode(parts, p, blocks=2))
        cpu.set_blocks(3, parts)           # a host resize: the device copy follows
        _check_linear(cpu, "bitstack 3 blocks", rng, c.decode(parts, p))
        assert dev.blocks == 2
        dev.matmul(*[__import__("numba").cuda.to_device(a) for a in
                     (np.ones((1, n), np.float32), np.zeros((1, d), np.float32))])
        assert dev.blocks == 3
    print(f"{codec} ok")


def case_ops():
    from numba import cuda

    from edgerun import kernels
    from edgerun.cuda import kernels as K
    rng = np.random.default_rng(1)
    up = cuda.to_device
    # rmsnorm over rows
    X = rng.standard_normal((3, 40)).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    ref = np.empty_like(X)
    kernels.rmsnorm_rows(X, w, 1e-5, ref)
    out = cuda.device_array(X.shape, np.float32)
    K.launch_rmsnorm(up(X), up(w), 1e-5, out)
    _close(out.copy_to_host(), ref, what="rmsnorm")
    # silu_mul
    g, u = rng.standard_normal((2, 37)).astype(np.float32), rng.standard_normal((2, 37)).astype(np.float32)
    ref = np.empty_like(g)
    kernels.silu_mul(g, u, ref)
    out = cuda.device_array(g.shape, np.float32)
    K.launch_silu_mul(up(g), up(u), out)
    _close(out.copy_to_host(), ref, what="silu_mul")
    # rope at positions start..start+T-1 (llama3 scaled tables)
    T, H, Hkv, D, C, start = 3, 4, 2, 8, 8, 2
    cos, sin = kernels.rope_tables(D, C, 10000.0)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    ref = q.copy()
    kernels.rope(ref, start, cos, sin)
    qd = up(q)
    K.launch_rope(qd, start, up(cos), up(sin))
    _close(qd.copy_to_host(), ref, what="rope")
    # KV write + causal GQA attention: cache already holds positions 0..start-1
    k = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    kc = np.zeros((Hkv, C, D), np.float32)
    vc = np.zeros((Hkv, C, D), np.float32)
    kc[:, :start] = rng.standard_normal((Hkv, start, D))
    vc[:, :start] = rng.standard_normal((Hkv, start, D))
    kcd, vcd = up(kc), up(vc)
    kc[:, start:start + T] = k.transpose(1, 0, 2)
    vc[:, start:start + T] = v.transpose(1, 0, 2)
    K.launch_kv_write(up(k), up(v), kcd, vcd, start)
    _close(kcd.copy_to_host(), kc, what="kv_write k")
    _close(vcd.copy_to_host(), vc, what="kv_write v")
    ref = np.empty((T, H, D), np.float32)
    kernels.attention(ref * 0 + q, kc, vc, start, ref)
    out = cuda.device_array((T, H, D), np.float32)
    K.launch_attention(up(q), kcd, vcd, start, out, cuda.device_array((T * H, C), np.float32))
    _close(out.copy_to_host(), ref, what="attention")
    print("ops ok")


def case_model(path, layers):
    """The tiny model's logits (a 4-token prefill chunk, then 2 decoded tokens) loaded through
    `edgerun.load(device="cuda", gpu_layers=...)` (every layer and the head, or only layer 0),
    against the CPU run."""
    import edgerun
    ids = [5, 17, 33, 2, 9, 40]

    def run(m):
        tf = m._transformer
        out = [tf.forward(ids[:4], 0, all_logits=True)]
        out += [tf.forward([t], 4 + k)[None].copy() for k, t in enumerate(ids[4:])]
        return np.concatenate(out)

    with edgerun.load(path, context=16, device="cpu", kv_dtype="f32") as m:
        ref = run(m)
    with edgerun.load(path, context=16, device="cuda", gpu_layers=layers, kv_dtype="f32") as m:
        assert m.device == "cuda"
        on_device = [ops.name == "cuda" for ops in m._transformer.ops]
        assert on_device == ([True] * len(on_device) if layers == "all" else [True] + [False] * (len(on_device) - 1))
        got = run(m)
    err = float(np.max(np.abs(got - ref)))
    assert err < 1e-4, f"offload {layers}: max |logit diff| {err:.3g}"
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    print("model ok", err)


def case_nodevice():
    from edgerun import cuda as ecuda
    try:
        ecuda.resolve_device("cuda")
    except ecuda.CudaError as e:
        assert "CUDA" in str(e), str(e)
    else:
        raise AssertionError("device='cuda' without a device must raise CudaError")
    device, why = ecuda.resolve_device("auto")
    assert device == "cpu" and why.startswith("running on the CPU"), why
    print("nodevice ok", why)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    case, *rest = sys.argv[1:]
    globals()[f"case_{case}"](*rest)
