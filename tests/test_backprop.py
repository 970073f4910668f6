"""edgerun/backprop.py: its forward is the model's (NLL against the runtime's logits) and its
gradients are the NLL's (directional derivatives against central finite differences, float64)."""
from __future__ import annotations

import numpy as np
import pytest

from edgerun.backprop import LINEARS, layer_dense, linear_gradients


@pytest.fixture(scope="module")
def tiny_f32(tiny_dir, tmp_path_factory):
    from edgerun.convert.pack import pack
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp("backprop") / f"{arch}.ebin"
            pack(tiny_dir(arch), made[arch], dtype="f32")
        return made[arch]
    return get


def _dense_weights(tf, dtype):
    return {(i, f): layer_dense(L, f).astype(dtype) for i, L in enumerate(tf.layers) for f in LINEARS}


def _nll(logits, window):
    """Summed NLL of window[1:] from the (T, vocab) logits."""
    lg = logits[:-1].astype(np.float64)
    top = lg.max(axis=1)
    logz = np.log(np.exp(lg - top[:, None]).sum(axis=1)) + top
    return float(np.sum(logz - lg[np.arange(len(lg)), window[1:]]))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama_tied"])
def test_forward_is_the_models(tiny_f32, arch):
    import edgerun
    windows = np.random.default_rng(1).integers(3, 300, (3, 20))
    with edgerun.load(tiny_f32(arch), context=64) as m:
        got = linear_gradients(m._transformer, windows, lambda *a: None)
        want = sum(_nll(m.logits(win.tolist()), win) for win in windows)
    assert got == pytest.approx(want, rel=2e-4)          # the runtime's KV cache is float16


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gradients_are_the_nlls(tiny_f32, arch):
    """For every linear of every layer, Σ_t g_tᵀ Δ x_t = d/dε NLL(W + εΔ) at ε = 0."""
    import edgerun
    windows = np.random.default_rng(2).integers(3, 300, (2, 12))
    with edgerun.load(tiny_f32(arch), context=64) as m:
        tf = m._transformer
        dense = _dense_weights(tf, np.float64)
        seen = {}

        def visit(i, f, X, G):
            assert X.shape == (windows.size, dense[i, f].shape[1]) and G.shape == (windows.size, dense[i, f].shape[0])
            seen[i, f] = (X.copy(), G.copy())

        linear_gradients(tf, windows, visit, lambda i, f: dense[i, f])
        assert sorted(seen) == sorted(dense)
        rng = np.random.default_rng(3)
        eps = 1e-5
        for (i, f), (X, G) in seen.items():
            delta = rng.standard_normal(dense[i, f].shape)

            def nll(sign):
                moved = dict(dense)
                moved[i, f] = dense[i, f] + sign * eps * delta
                return linear_gradients(tf, windows, lambda *a: None, lambda j, g: moved[j, g])

            numeric = (nll(1) - nll(-1)) / (2 * eps)
            analytic = float(np.sum(G * (X @ delta.T)))
            assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8), (i, f)
