"""The fused CPU kernels (Numba): Batch-OMP against sklearn and the XLA path, the power update against the JAX
reference, thread-count independence, the host K-SVD loop, backend selection and bad inputs."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import exact_update_by_svd, x64  # noqa: F401  (fixture)
from test_omp import _assert_parity, _problem, _sklearn, near_dependent_problem

from cospadi_jax.sparse import batch_omp, ksvd, update_dictionary
from cospadi_jax.sparse import backend as backend_mod
from cospadi_jax.sparse import cpu_kernel
from cospadi_jax.sparse.backend import resolve_omp_backend, sparse_code
from cospadi_jax.sparse.cpu_kernel import batch_omp_cpu, power_update_cpu
from cospadi_jax.sparse.ksvd_host import dense_codes

pytestmark = pytest.mark.usefixtures("x64")
numba = pytest.importorskip("numba")
POOL = numba.config.NUMBA_NUM_THREADS


@pytest.mark.parametrize(
    "d,k,n,s",
    [(24, 16, 50, 6), (24, 24, 50, 12), (16, 40, 50, 10), (24, 30, 50, 1), (32, 20, 30, 20)],
)
def test_kernel_matches_sklearn_on_random_problems(d, k, n, s):
    D, Y = _problem(d, k, n)
    G, C = D.T @ D, D.T @ Y
    codes = batch_omp_cpu(G, C, s)
    n_iter = _assert_parity(codes, G, C, s)
    assert np.all(n_iter == s)
    assert codes.indices.dtype == np.int32 and codes.indices.shape == (n, s)


def test_kernel_stops_early_like_sklearn_when_s_equals_k_overcomplete():
    D, Y = _problem(10, 25, 40, seed=3)
    G, C = D.T @ D, D.T @ Y
    codes = batch_omp_cpu(G, C, 25)
    n_iter = _assert_parity(codes, G, C, 25, rtol=1e-6)
    assert np.all(n_iter <= 10) and int(codes.n_early_stopped) == 40


def test_kernel_near_dependent_atoms_stop_like_sklearn():
    G, C = near_dependent_problem()
    codes = batch_omp_cpu(G, C, 20)
    n_iter = _assert_parity(codes, G, C, 20, rtol=1e-7)
    assert np.all(n_iter <= 12) and int(codes.n_early_stopped) == 40


def test_exact_ties_are_broken_in_sklearns_order():
    # Duplicated atoms make |α| tie exactly; sklearn takes the first maximum in its swap order.
    rng = np.random.default_rng(4)
    base = rng.standard_normal((20, 8))
    D = np.concatenate([base, base[:, ::-1]], axis=1)
    D /= np.linalg.norm(D, axis=0)
    Y = rng.standard_normal((20, 30))
    G, C = D.T @ D, D.T @ Y
    ref, n_iter = _sklearn(G, C, 6)
    ours = batch_omp_cpu(G, C, 6)
    np.testing.assert_array_equal(np.asarray(ours.n_nonzero), n_iter)
    np.testing.assert_array_equal(dense_codes(ours, 16) != 0, ref != 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernel_equals_xla_path(dtype):
    D, Y = _problem(64, 96, 80, seed=11)
    G, C = (D.T @ D).astype(dtype), (D.T @ Y).astype(dtype)
    ours, xla = batch_omp_cpu(G, C, 40), batch_omp(G, C, 40)
    assert ours.values.dtype == dtype
    same = np.all(np.sort(ours.indices, 1) == np.sort(np.asarray(xla.indices), 1), axis=1)
    a, b = dense_codes(ours, 96), np.asarray(xla.to_dense(96))
    if dtype == np.float64:
        assert same.all()
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
    else:
        assert same.mean() >= 0.95
        err = lambda S: np.linalg.norm(Y - D @ S) / np.linalg.norm(Y)
        assert abs(err(a) - err(b)) < 1e-5


@pytest.mark.skipif(POOL < 2, reason="needs a Numba pool of >= 2 threads")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_results_do_not_depend_on_the_number_of_threads(dtype):
    D, Y = _problem(48, 70, 301, seed=2)
    G, C = (D.T @ D).astype(dtype), (D.T @ Y).astype(dtype)
    one, two = batch_omp_cpu(G, C, 30, threads=1), batch_omp_cpu(G, C, 30, threads=2)
    for x, y in zip(one[:3], two[:3]):
        np.testing.assert_array_equal(x, y)  # bit-identical
    # The whole host K-SVD (kernel, single-threaded update, BLAS GEMMs) too.
    a = ksvd(Y.astype(dtype), 70, 30, 2, omp_backend="cpu_kernel", threads=1)
    b = ksvd(Y.astype(dtype), 70, 30, 2, omp_backend="cpu_kernel", threads=2)
    np.testing.assert_array_equal(np.asarray(a.dictionary), np.asarray(b.dictionary))
    np.testing.assert_array_equal(np.asarray(a.coefficients), np.asarray(b.coefficients))


@pytest.mark.parametrize("unused", ["skip", "reseed"])
def test_power_update_equals_the_jax_reference(unused):
    D, Y = _problem(40, 30, 90, seed=6)
    codes = batch_omp_cpu(D.T @ D, D.T @ Y, 7)
    if unused == "reseed":  # force unused atoms: drop atoms 0-2 from every support
        keep = ~np.isin(codes.indices, [0, 1, 2])
        codes = codes._replace(values=np.where(keep, codes.values, 0.0))
        codes = codes._replace(indices=np.where(keep, codes.indices, 5))
        order = np.argsort(~keep, axis=1, kind="stable")
        codes = codes._replace(indices=np.take_along_axis(codes.indices, order, 1),
                               values=np.take_along_axis(codes.values, order, 1),
                               n_nonzero=keep.sum(1).astype(np.int32))
    S = dense_codes(codes, 30)
    D_ref, S_ref, n_unused_ref = update_dictionary(jnp.asarray(Y), jnp.asarray(D), jnp.asarray(S), unused=unused)
    E_t, D_t = np.ascontiguousarray((Y - D @ S).T), np.ascontiguousarray(D.T)
    values, n_unused, n_lapack = power_update_cpu(E_t, D_t, codes, unused=unused, Y_t=np.ascontiguousarray(Y.T))
    assert n_unused == int(n_unused_ref) and (n_unused > 0) == (unused == "reseed") and n_lapack == 0
    np.testing.assert_allclose(D_t.T, np.asarray(D_ref), atol=1e-10)
    S_new = dense_codes(codes._replace(values=values), 30)
    np.testing.assert_allclose(S_new, np.asarray(S_ref), atol=1e-10)
    np.testing.assert_allclose(E_t.T, Y - D_t.T @ S_new, atol=1e-10)  # the residual was kept up to date


@pytest.mark.parametrize("dtype,atol", [(np.float64, 1e-9), (np.float32, 2e-5)])
@pytest.mark.parametrize("max_steps", [cpu_kernel.EXACT_MAX_STEPS, 1])
def test_exact_update_equals_the_svd_reference(max_steps, dtype, atol, monkeypatch):
    # Power steps to convergence, or LAPACK where they stop short (forced for every atom by a one-step cap): the
    # top singular pair of each atom's residual, as a plain SVD loop gives it.
    monkeypatch.setattr(cpu_kernel, "EXACT_MAX_STEPS", max_steps)
    D, Y = (a.astype(dtype) for a in _problem(40, 30, 90, seed=6))
    codes = batch_omp_cpu(D.T @ D, D.T @ Y, 7, dtype=dtype)
    S = dense_codes(codes, 30)
    D_ref, S_ref = exact_update_by_svd(Y, D, S)
    E_t, D_t = np.ascontiguousarray((Y - D @ S).T), np.ascontiguousarray(D.T)
    values, n_unused, n_lapack = power_update_cpu(E_t, D_t, codes, power_iterations=1, exact=True)
    assert n_unused == 0
    assert n_lapack == 30 if max_steps == 1 else n_lapack < 30
    assert D_t.dtype == values.dtype == dtype
    np.testing.assert_allclose(D_t.T, D_ref, atol=atol)
    S_new = dense_codes(codes._replace(values=values), 30)
    np.testing.assert_allclose(S_new, S_ref, atol=atol * np.abs(S_ref).max())  # |S| up to ~3
    np.testing.assert_allclose(E_t.T, Y - D_t.T @ S_new, atol=atol / 10)
    # power steps stop at the fixed count: p = 1 is not the exact pair on this problem
    D1_t = np.ascontiguousarray(D.T)
    power_update_cpu(np.ascontiguousarray((Y - D @ S).T), D1_t, codes, power_iterations=1)
    assert np.max(np.abs(np.abs(np.sum(D1_t.T * D_ref, axis=0)) - 1)) > 100 * atol


def test_host_ksvd_equals_xla_ksvd_and_decreases():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((40, 120))
    a = ksvd(Y, 30, 8, 6, omp_backend="xla")
    b = ksvd(Y, 30, 8, 6, omp_backend="cpu_kernel")
    np.testing.assert_allclose(b.objective, a.objective, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(b.dictionary), np.asarray(a.dictionary), atol=1e-9)
    np.testing.assert_allclose(np.asarray(b.coefficients), np.asarray(a.coefficients), atol=1e-9)
    assert np.all(np.diff(b.objective) <= 1e-12)
    assert b.seconds["backend"] == "cpu_kernel" and b.seconds["omp"] > 0 and b.seconds["update"] > 0
    # exact: on the host; mod: the kernel codes, JAX updates
    for update in ("exact", "mod"):
        c = ksvd(Y, 30, 8, 3, omp_backend="cpu_kernel", dict_update=update)
        d = ksvd(Y, 30, 8, 3, omp_backend="xla", dict_update=update)
        np.testing.assert_allclose(c.objective, d.objective, rtol=1e-9)


def test_auto_picks_the_kernel_on_cpu_and_falls_back_without_numba(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert resolve_omp_backend("auto") == "cpu_kernel"

    def missing():
        raise ImportError(f"the cpu_kernel backend needs Numba: {cpu_kernel._INSTALL_HINT}")

    monkeypatch.setattr(cpu_kernel, "require_numba", missing)
    with pytest.warns(RuntimeWarning, match="pip install numba"):
        assert resolve_omp_backend("auto") == "xla"
    with pytest.raises(ImportError, match="pip install numba"):
        resolve_omp_backend("cpu_kernel")
    monkeypatch.setattr(backend_mod.jax, "default_backend", lambda: "gpu")
    assert resolve_omp_backend("auto") == "gemm"


def test_bad_kernel_options_raise_clear_errors():
    """The inputs every backend refuses are tested in test_omp.py; these are the backend's and kernel's own."""
    D, Y = _problem(12, 10, 6)
    G, C = D.T @ D, D.T @ Y
    with pytest.raises(ValueError, match="omp_backend must be one of"):
        sparse_code(G, C, 2, backend="fast")
    with pytest.raises(ValueError, match="threads"):
        batch_omp_cpu(G, C, 2, threads=0)
    with pytest.raises(ValueError, match="NUMBA_NUM_THREADS"):
        batch_omp_cpu(G, C, 2, threads=POOL + 1)


def test_float32_inputs_stay_float32_and_empty_columns_work():
    D, Y = _problem(16, 20, 5)
    codes = batch_omp_cpu((D.T @ D).astype(np.float32), (D.T @ Y).astype(np.float32), 4)
    assert codes.values.dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = batch_omp_cpu(D.T @ D, np.zeros((20, 0)), 4)
    assert empty.indices.shape == (0, 4) and int(empty.n_early_stopped) == 0
    zero = batch_omp_cpu(D.T @ D, np.zeros((20, 3)), 4)  # zero columns stop at step 0, as in sklearn
    assert np.all(zero.n_nonzero == 0) and np.all(zero.values == 0)
