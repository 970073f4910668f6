"""The GPTQ factor every calibrated encoder uses: U with Uᵀ U = (H' + damp·I)⁻¹, checked against
the textbook computation (Cholesky, inverse, product, Cholesky)."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from edgerun import kernels
from edgerun.codecs import gptq
from edgerun.codecs.gptq import BLOCK, inverse_cholesky, shared_factors


def textbook(H, percdamp):
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += percdamp * np.mean(np.abs(np.diag(H)))
    Linv = np.linalg.inv(np.linalg.cholesky(H))
    return np.linalg.cholesky(Linv.T @ Linv).T, dead


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,size", [(7, 7), (BLOCK, BLOCK), (BLOCK + 45, BLOCK + 51), (2 * BLOCK + 1, 2 * BLOCK + 1)])
def test_inverse_cholesky_matches_textbook(n, size, threads):
    kernels.set_threads(threads)                      # panels on threads (threaded_map)
    rng = np.random.default_rng(n)
    X = rng.standard_normal((2 * n, n)) * rng.uniform(0.1, 3, n)
    X[:, 3] = 0                                       # a dead input
    H = (X.T @ X / len(X)).astype(np.float32)
    perm = rng.permutation(n)
    Hp = np.zeros((size, size))                       # permuted, padded with dead inputs
    Hp[:n, :n] = np.asarray(H, np.float64)[np.ix_(perm, perm)]
    U0, dead0 = textbook(Hp, 0.01)
    try:
        U, dead = inverse_cholesky(H, 0.01, perm=perm, size=size)
    finally:
        kernels.set_threads(1)
    assert U.dtype == np.float32 and U.shape == (size, size)
    np.testing.assert_array_equal(dead, dead0)
    assert not np.tril(U, -1).any()
    assert np.abs(U - U0).max() <= 1e-6 * np.abs(U0).max()


def test_shared_factors_reuse_per_array_and_arguments():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 20))
    H = (X.T @ X / 64).astype(np.float32)
    perm = rng.permutation(20)
    fresh, _ = inverse_cholesky(H, 0.01, perm=perm)
    with shared_factors():
        U, dead = inverse_cholesky(H, 0.01, perm=perm)
        np.testing.assert_array_equal(U, fresh)
        assert inverse_cholesky(H, 0.01, perm=perm.copy())[0] is U            # same array, same arguments
        assert not U.flags.writeable and not dead.flags.writeable
        assert inverse_cholesky(H, 0.02, perm=perm)[0] is not U                # other damping
        assert inverse_cholesky(H, 0.01)[0] is not U                           # other order
        H2 = H.copy()                                                          # equal values, another array
        assert inverse_cholesky(H2, 0.01, perm=perm)[0] is not U
        memo = gptq._shared.memo
        held = len(memo)
        del H2
        gc.collect()
        assert len(memo) == held - 1                                           # freed with its Hessian
    assert getattr(gptq._shared, "memo", None) is None
    assert inverse_cholesky(H, 0.01, perm=perm)[0].flags.writeable             # outside: a new array


@pytest.mark.parametrize("n", [12, 700])          # one column block of H, three
def test_output_error_is_the_trace_of_e_h_et(n):
    rng = np.random.default_rng(5)
    E = rng.standard_normal((157, n)).astype(np.float32)
    X = rng.standard_normal((40, n))
    H = X.T @ X
    assert gptq.output_error(E, H) == pytest.approx(float(np.trace(E @ H @ E.T)), rel=1e-12)
    assert gptq.output_error(E, H) == pytest.approx(float(np.sum((X @ E.T.astype(np.float64)) ** 2)), rel=1e-10)
    assert gptq.output_error(E, None) == pytest.approx(float(np.sum(E.astype(np.float64) ** 2)), rel=1e-12)
    kernels.set_threads(2)                       # rows split over two threads
    try:
        assert gptq.output_error(E, H) == pytest.approx(float(np.trace(E @ H @ E.T)), rel=1e-12)
    finally:
        kernels.set_threads(1)
