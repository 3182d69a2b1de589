"""GEMM-form Batch-OMP against sklearn's orthogonal_mp_gram (float64), the B-form, and its bad-input errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64  # noqa: F401  (fixture)
from test_omp import _assert_parity, _problem, _sklearn, near_dependent_problem

from cospadi_jax.sparse import batch_omp
from cospadi_jax.sparse.omp_gemm import (
    DEFAULT_CPU_MEMORY_BUDGET_BYTES,
    GEMM_PRECISIONS,
    batch_omp_gemm,
    default_memory_budget,
    gemm_chunk_size,
)
from cospadi_jax.sparse.omp_gemm_chunk import _gemm_chunk

pytestmark = pytest.mark.usefixtures("x64")  # float64 for this module only
FORMS = ("inverse", "solve")



RANDOM_CASES = [
    (24, 16, 50, 6),  # k < d
    (24, 24, 50, 12),  # k = d
    (16, 40, 50, 10),  # k > d (overcomplete)
    (24, 30, 50, 1),  # s = 1
    (32, 20, 30, 20),  # s = k (k < d: all atoms, full least squares)
]


# The default "inverse" form on every case; "solve" (the sklearn-arithmetic variant) on the overcomplete and
# s = k cases (each case is one more compile: the file stays under a minute on 2 cores).
@pytest.mark.parametrize(
    "d,k,n,s,triangular",
    [(*c, "inverse") for c in RANDOM_CASES] + [(*RANDOM_CASES[2], "solve"), (*RANDOM_CASES[4], "solve")],
)
def test_matches_sklearn_on_random_problems(d, k, n, s, triangular):
    D, Y = _problem(d, k, n)
    G, C = D.T @ D, D.T @ Y
    # Odd sizes: 50 columns in chunks of 7 pads the last chunk; blocks of 4 make several grown factors.
    codes = batch_omp_gemm(G, C, s, chunk_size=7, step_block=4, triangular=triangular)
    n_iter = _assert_parity(codes, G, C, s)
    assert np.all(n_iter == s)
    assert codes.indices.dtype == jnp.int32 and codes.indices.shape == (n, s)
    assert codes.values.dtype == jnp.float64


@pytest.mark.parametrize("triangular", FORMS)
def test_s_equals_k_overcomplete_stops_like_sklearn(triangular):
    # k > d and s = k: after d atoms the residual is zero, so columns must stop early, never NaN.
    D, Y = _problem(10, 25, 40, seed=3)
    G, C = D.T @ D, D.T @ Y
    codes = batch_omp_gemm(G, C, 25, step_block=8, triangular=triangular)
    n_iter = _assert_parity(codes, G, C, 25, rtol=1e-6)
    assert np.all(n_iter <= 10) and int(codes.n_early_stopped) == 40


@pytest.mark.parametrize("triangular", FORMS)
def test_near_dependent_atoms_stop_cleanly_like_sklearn(triangular):
    G, C = near_dependent_problem()
    codes = batch_omp_gemm(G, C, 20, chunk_size=16, step_block=7, triangular=triangular)
    n_iter = _assert_parity(codes, G, C, 20, rtol=1e-7)
    assert np.all(n_iter <= 12) and int(codes.n_early_stopped) == 40


@pytest.mark.parametrize("triangular", FORMS)
def test_equals_b_form_and_chunking_does_not_change_results(triangular):
    D, Y = _problem(20, 30, 37, seed=5)
    G, C = D.T @ D, D.T @ Y
    ref = batch_omp(G, C, 9)  # the B-form of omp.py
    runs = [batch_omp_gemm(G, C, 9, chunk_size=5, step_block=3, triangular=triangular)]
    if triangular == "inverse":
        runs += [
            batch_omp_gemm(G, C, 9, chunk_size=37, step_block=9),
            batch_omp_gemm(G, C, 9, memory_budget_bytes=1),  # budget < one column -> chunks of 1
        ]
    for other in runs:
        np.testing.assert_array_equal(np.asarray(other.indices), np.asarray(ref.indices))
        np.testing.assert_array_equal(np.asarray(other.n_nonzero), np.asarray(ref.n_nonzero))
        np.testing.assert_allclose(np.asarray(other.values), np.asarray(ref.values), rtol=1e-10, atol=1e-13)


def test_float32_realistic_shape_keeps_sklearn_supports():
    # The SmolLM2 up_proj shape (d 576, k 526, s 263) on 64 random columns; D = unit-norm columns of a
    # random Y (as K-SVD initialises). f32 against sklearn in f64; the B-form keeps 99.6 % on real data.
    rng = np.random.default_rng(11)
    d, k, n, s = 576, 526, 64, 263
    Yall = rng.standard_normal((d, n + k))
    D = Yall[:, n:] / np.linalg.norm(Yall[:, n:], axis=0)
    Y = Yall[:, :n]
    G, C = D.T @ D, D.T @ Y
    ref, n_iter = _sklearn(G, C, s)
    assert np.all(n_iter == s)
    codes = batch_omp_gemm(G.astype(np.float32), C.astype(np.float32), s, dtype=jnp.float32)
    assert codes.values.dtype == jnp.float32
    ours = np.asarray(codes.to_dense(k), np.float64)
    assert np.all(np.isfinite(ours))
    # Atom-level: share of sklearn's selected atoms that we select too; column-level: whole support equal.
    atoms = np.sum((ours != 0) & (ref != 0)) / np.sum(ref != 0)
    columns = np.mean(np.all((ours != 0) == (ref != 0), axis=0))
    assert atoms >= 0.995, atoms
    assert columns >= 0.95, columns  # measured 1.0 on the project's CPU
    err = lambda S: np.linalg.norm(Y - D @ S) / np.linalg.norm(Y)
    assert abs(err(ours) - err(ref)) < 1e-5


def test_precision_settings_are_full_f32_on_cpu():
    # The module docstring says XLA:CPU computes every precision setting as a full f32 product.
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only property; on GPU/TPU the settings differ by design")
    D, Y = _problem(24, 30, 20, seed=7)
    G, C = (D.T @ D).astype(np.float32), (D.T @ Y).astype(np.float32)
    runs = {p: batch_omp_gemm(G, C, 8, precision=p) for p in GEMM_PRECISIONS}
    for p, codes in runs.items():
        assert codes.values.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(codes.indices), np.asarray(runs["highest"].indices), err_msg=p)
        np.testing.assert_array_equal(np.asarray(codes.values), np.asarray(runs["highest"].values), err_msg=p)


def test_each_step_is_one_chunk_wide_gemm_with_the_shared_gram():
    # The form's point: the Gram product is one [m, k] × [k, k] GEMM for the whole chunk, and no dot reads a
    # per-column [·, k] matrix (that would be the B-form's bandwidth-bound GEMV).
    m, k, s = 6, 10, 4
    D, Y = _problem(12, k, m)
    fn = jax.jit(lambda g, a: _gemm_chunk(g, a, 1e-16, sparsity=s, step_block=2, precision="highest",
                                          triangular="inverse"))
    hlo = fn.lower(jnp.asarray(D.T @ D), jnp.asarray((D.T @ Y).T)).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert any(f"(tensor<{m}x{k}xf64>, tensor<{k}x{k}xf64>)" in line for line in dots), dots
    assert not any(re.search(rf"tensor<{m}x\d+x{k}xf64>", line) for line in dots), dots


def test_memory_budget_and_chunk_size():
    # CPU: memory_stats() reports nothing, so the fixed default applies.
    if jax.default_backend() == "cpu":
        assert default_memory_budget() == DEFAULT_CPU_MEMORY_BUDGET_BYTES

    class FakeGPU:
        def memory_stats(self):
            return {"bytes_limit": 80 * 2**30, "bytes_in_use": 0}

    assert default_memory_budget(FakeGPU()) == 20 * 2**30
    # Llama-3.2-1B gate/up (k 2184, s 1092), f32, 20 GiB: state ≈ s²/2 per column, not s·k.
    k, s, budget = 2184, 1092, 20 * 2**30
    chunk = gemm_chunk_size(k, s, 4, budget)
    per_col = 4 * (s * (s + 64) // 2 + 6 * k + 4 * s)
    assert chunk * per_col <= budget < (chunk + 1) * per_col
    assert gemm_chunk_size(k, s, 4, budget, triangular="solve") < chunk  # the grown square L costs 2·s²
    assert gemm_chunk_size(k, s, 4, 1) == 1


# ---------------------------------------------------------------- bad input
def test_bad_gemm_options_raise_clear_errors():
    """The inputs every backend refuses are tested in test_omp.py; these are the GEMM form's own options."""
    D, Y = _problem(12, 10, 6)
    G, C = D.T @ D, D.T @ Y
    with pytest.raises(ValueError, match="step_block"):
        batch_omp_gemm(G, C, 2, step_block=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        batch_omp_gemm(G, C, 2, precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        batch_omp_gemm(G, C, 2, precision=jax.lax.Precision.HIGHEST)  # strings only: one documented meaning
    with pytest.raises(ValueError, match="triangular must be one of"):
        batch_omp_gemm(G, C, 2, triangular="qr")
