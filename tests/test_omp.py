"""Batch-OMP against sklearn's orthogonal_mp_gram (float64) and its bad-input errors."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64  # noqa: F401  (fixture)
from sklearn.linear_model import orthogonal_mp_gram

from cospadi_jax.sparse import SparseCodes, batch_omp, omp

pytestmark = pytest.mark.usefixtures("x64")  # float64 for this module only


def _problem(d, k, n, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((d, k))
    D /= np.linalg.norm(D, axis=0)
    Y = rng.standard_normal((d, n))
    return D, Y


def _sklearn(G, C, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "stopped prematurely" is expected in some cases
        coef, n_iter = orthogonal_mp_gram(G, C, n_nonzero_coefs=s, return_n_iter=True)
    return coef.reshape(G.shape[0], -1), np.atleast_1d(n_iter)


def _assert_parity(codes: SparseCodes, G, C, s, rtol=1e-8):
    ref, n_iter = _sklearn(G, C, s)
    ours = np.asarray(codes.to_dense(G.shape[0]))
    assert np.all(np.isfinite(ours))
    np.testing.assert_array_equal(np.asarray(codes.n_nonzero), n_iter)
    np.testing.assert_array_equal(ours != 0, ref != 0)  # identical supports
    scale = np.abs(ref).max(axis=0, keepdims=True)
    assert np.max(np.abs(ours - ref) / np.where(scale > 0, scale, 1)) < rtol
    assert int(codes.n_early_stopped) == int(np.sum(n_iter < s))
    return n_iter


@pytest.mark.parametrize(
    "d,k,n,s",
    [
        (24, 16, 50, 6),  # k < d
        (24, 24, 50, 12),  # k = d
        (16, 40, 50, 10),  # k > d (overcomplete)
        (24, 30, 50, 1),  # s = 1
        (32, 20, 30, 20),  # s = k (k < d: all atoms, full least squares)
    ],
)
def test_matches_sklearn_on_random_problems(d, k, n, s):
    D, Y = _problem(d, k, n)
    G, C = D.T @ D, D.T @ Y
    codes = batch_omp(G, C, s, chunk_size=7, step_block=4)  # odd sizes: padding and several blocks
    n_iter = _assert_parity(codes, G, C, s)
    assert np.all(n_iter == s)
    assert codes.indices.dtype == jnp.int32 and codes.indices.shape == (n, s)


def test_s_equals_k_overcomplete_stops_like_sklearn():
    # k > d and s = k: after d atoms the residual is zero, so columns must stop early, never NaN.
    D, Y = _problem(10, 25, 40, seed=3)
    G, C = D.T @ D, D.T @ Y
    codes = batch_omp(G, C, 25)
    n_iter = _assert_parity(codes, G, C, 25, rtol=1e-6)
    assert np.all(n_iter <= 10) and int(codes.n_early_stopped) == 40


def near_dependent_problem() -> tuple[np.ndarray, np.ndarray]:
    """G, C of 28 atoms in d = 30: atoms 12..23 are copies of 0..11 up to 1e-9 (near-dependent; exact copies would
    make the argmax a tie that sklearn breaks by its internal swap order), 24..27 exact combinations of 0..2."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((30, 12))
    combos = base[:, :3] @ rng.standard_normal((3, 4))
    D = np.concatenate([base, base + 1e-9 * rng.standard_normal(base.shape), combos], axis=1)
    D /= np.linalg.norm(D, axis=0)
    Y = D[:, :6] @ rng.standard_normal((6, 40)) + 1e-3 * rng.standard_normal((30, 40))
    return D.T @ D, D.T @ Y


def test_near_dependent_atoms_stop_cleanly_like_sklearn():
    G, C = near_dependent_problem()
    codes = batch_omp(G, C, 20, chunk_size=16)
    n_iter = _assert_parity(codes, G, C, 20, rtol=1e-7)
    assert np.all(n_iter <= 12) and int(codes.n_early_stopped) == 40


def test_chunking_and_blocking_do_not_change_results():
    D, Y = _problem(20, 30, 37, seed=5)
    G, C = D.T @ D, D.T @ Y
    a = batch_omp(G, C, 9, chunk_size=37, step_block=9)
    b = batch_omp(G, C, 9, chunk_size=5, step_block=2)
    c = batch_omp(G, C, 9, memory_budget_bytes=1)  # budget smaller than one column -> chunk of 1
    for other in (b, c):
        np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(other.indices))
        np.testing.assert_allclose(np.asarray(a.values), np.asarray(other.values), rtol=1e-12, atol=1e-14)


def test_omp_wrapper_and_float32_path():
    D, Y = _problem(24, 30, 20, seed=7)
    codes64 = omp(D, Y, 8)
    _assert_parity(codes64, D.T @ D, D.T @ Y, 8)
    codes32 = omp(D.astype(np.float32), Y.astype(np.float32), 8, dtype=jnp.float32)
    assert codes32.values.dtype == jnp.float32
    S32, S64 = np.asarray(codes32.to_dense(30)), np.asarray(codes64.to_dense(30))
    err = lambda S: np.linalg.norm(Y - D @ S) / np.linalg.norm(Y)
    assert abs(err(S32) - err(S64)) < 1e-4


def test_jit_and_vmap_compatible_core():
    D, Y = _problem(16, 20, 8)
    G, C = jnp.asarray(D.T @ D), jnp.asarray(D.T @ Y)
    from cospadi_jax.sparse.omp import _omp_chunk

    idx, val, cnt = jax.jit(lambda g, a: _omp_chunk(g, a, 1e-16, sparsity=5, step_block=2))(G, C.T)
    ref = batch_omp(G, C, 5)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref.indices))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["xla", "cpu_kernel", "gemm"])
def test_bad_inputs_raise_clear_errors(backend):
    """Every Batch-OMP backend refuses the same bad inputs with the same messages."""
    from cospadi_jax.sparse.backend import sparse_code

    fn = lambda *a, **kw: sparse_code(*a, backend=backend, **kw)
    D, Y = _problem(12, 10, 6)
    G, C = D.T @ D, D.T @ Y
    with pytest.raises(ValueError, match="s must be >= 1"):
        fn(G, C, 0)
    with pytest.raises(ValueError, match="exceeds the number of atoms"):
        fn(G, C, 11)
    with pytest.raises(ValueError, match="no atoms"):
        fn(np.zeros((0, 0)), np.zeros((0, 6)), 1)
    with pytest.raises(TypeError, match="static"):
        fn(G, C, 2.0)
    with pytest.raises(ValueError, match="square"):
        fn(G[:, :9], C, 2)
    with pytest.raises(ValueError, match="DᵀY"):
        fn(G, C.T, 2)
    bad = C.copy()
    bad[0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        fn(G, bad, 2)
    badg = G.copy()
    badg[1, 2] = np.inf
    with pytest.raises(FloatingPointError, match="gram"):
        fn(badg, C, 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        fn(G, C, 2, dtype=jnp.float16)
    with jax.enable_x64(False), pytest.raises(TypeError, match="jax_enable_x64"):
        fn(G, C, 2, dtype=np.float64)
    if backend != "cpu_kernel":  # chunked backends
        with pytest.raises(ValueError, match="chunk_size"):
            fn(G, C, 2, chunk_size=0)


def test_omp_wrapper_refuses_mismatched_shapes():
    D, Y = _problem(12, 10, 6)
    with pytest.raises(ValueError, match="share d"):
        omp(D, Y[:5], 2)
