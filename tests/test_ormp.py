"""ORMP against SPAMS (``spams.omp`` is ORMP), in f64 and f32, and inside K-SVD."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cospadi_jax.sparse.ksvd import ksvd
from cospadi_jax.sparse.ormp import batch_ormp

spams = pytest.importorskip("spams", reason="spams-bin is in the [test] extra")


def _problem(seed, d, k, n):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((d, k))
    D /= np.linalg.norm(D, axis=0)
    return D, rng.standard_normal((d, n))


def _spams(D, X, s):
    return spams.omp(np.asfortranarray(X), np.asfortranarray(D), L=s, eps=0.0, return_reg_path=False).toarray()


@pytest.mark.parametrize("seed,d,k,n,s", [(0, 40, 60, 50, 12), (1, 64, 128, 80, 32), (2, 30, 30, 40, 30)])
def test_ormp_equals_spams_f64(seed, d, k, n, s):
    D, X = _problem(seed, d, k, n)
    with jax.enable_x64(True):
        codes = batch_ormp(D.T @ D, D.T @ X, s, dtype=np.float64, chunk_size=7)  # chunks that do not divide n
        S = np.asarray(codes.to_dense(k))
    ref = _spams(D, X, s)
    for j in range(n):
        assert set(np.flatnonzero(S[:, j])) == set(np.flatnonzero(ref[:, j])), j
    np.testing.assert_allclose(S, ref, atol=1e-9)


def test_ormp_f32_supports_match_spams():
    D, X = _problem(3, 48, 96, 200)
    S = np.asarray(batch_ormp((D.T @ D).astype(np.float32), (D.T @ X).astype(np.float32), 16).to_dense(96))
    ref = _spams(D, X, 16)
    same = np.mean([set(np.flatnonzero(S[:, j])) == set(np.flatnonzero(ref[:, j])) for j in range(200)])
    assert same >= 0.98
    np.testing.assert_allclose(S, ref, atol=1e-3)


def test_ormp_stops_when_the_span_is_full():
    """s above d: after d atoms the span is the whole space, the residual is 0 and the column stops."""
    D, X = _problem(4, 10, 20, 6)
    with jax.enable_x64(True):
        codes = batch_ormp(D.T @ D, D.T @ X, 15, dtype=np.float64)
        S = np.asarray(codes.to_dense(20))
    assert np.all(np.asarray(codes.n_nonzero) == 10) and int(codes.n_early_stopped) == 6
    np.testing.assert_allclose(D @ S, X, atol=1e-9)  # exact reconstruction with the d atoms


def test_ormp_leaves_less_error_than_omp_and_works_in_ksvd():
    from cospadi_jax.sparse.omp import batch_omp

    D, X = _problem(5, 48, 96, 300)
    with jax.enable_x64(True):
        err = {}
        for name, coder in (("omp", batch_omp), ("ormp", batch_ormp)):
            S = np.asarray(coder(D.T @ D, D.T @ X, 12, dtype=np.float64).to_dense(96))
            err[name] = np.linalg.norm(X - D @ S)
    assert err["ormp"] < err["omp"]
    Y = np.random.default_rng(6).standard_normal((32, 200)).astype(np.float32)
    result = ksvd(Y, 48, 8, 4, key=0, sparse_coder="ormp")
    assert np.all(np.diff(result.objective) <= 1e-6)  # K-SVD with ORMP coding: monotone objective
    with pytest.raises(ValueError, match="sparse_coder must be one of"):
        ksvd(Y, 48, 8, 1, sparse_coder="lasso")


def test_bad_ormp_inputs():
    with pytest.raises(ValueError, match="sparsity"):
        batch_ormp(np.eye(4), np.ones((4, 3)), 5)
    with pytest.raises(ValueError, match="correlations"):
        batch_ormp(np.eye(4), np.ones((3, 3)), 2)
