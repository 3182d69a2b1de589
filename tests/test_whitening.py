"""Whitening: LᵀL = G, damping escalation and its diagnostics, triangular map-back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64  # noqa: F401  (fixture)

from cospadi_jax.sparse import unwhiten_dictionary, whiten, whiten_target

pytestmark = pytest.mark.usefixtures("x64")  # float64 for this module only


def _gram(d, n_tokens, seed=0, scales=None):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_tokens, d))
    if scales is not None:
        X = X * scales
    return X.T @ X


def test_spd_gram_plain_cholesky():
    G = _gram(40, 400)
    res = whiten(G)
    L = np.asarray(res.L)
    assert L.dtype == np.float64
    np.testing.assert_allclose(L, np.triu(L))  # upper triangular
    np.testing.assert_allclose(L.T @ L, G, rtol=1e-12, atol=1e-10 * np.abs(G).max())
    assert res.jitter == 0.0 and res.attempts == 1
    eig = np.linalg.eigvalsh(G)
    assert res.lambda_min == pytest.approx(eig[0], rel=1e-8)
    assert res.condition_number == pytest.approx(eig[-1] / eig[0], rel=1e-6)


def test_rank_deficient_gram_escalates_damping_and_reports():
    G = _gram(50, 10, seed=1)  # rank 10 < d = 50: plain Cholesky fails
    res = whiten(G)
    L = np.asarray(res.L)
    assert res.attempts >= 2 and res.jitter > 0
    assert res.lambda_min < 1e-8 * np.trace(G) / 50  # reported λ_min is ~0 (or negative by roundoff)
    np.testing.assert_allclose(L.T @ L, G + res.jitter * np.eye(50), rtol=1e-10, atol=1e-9 * np.abs(G).max())
    assert np.isfinite(res.condition_number) and res.condition_number > 1e6
    # The smallest schedule entry that works is used: a 100x smaller jitter must have failed.
    assert res.jitter <= max(0.0, -res.lambda_min) + 1e-2 * np.trace(G) / 50


def test_indefinite_gram_is_shifted_past_lambda_min():
    G = _gram(20, 200, seed=2)
    G = G - 1.5 * np.linalg.eigvalsh(G)[0] * np.eye(20)  # λ_min < 0
    res = whiten(G)
    assert res.lambda_min < 0 and res.jitter > -res.lambda_min
    assert np.all(np.isfinite(np.asarray(res.L)))


def test_ill_conditioned_llm_like_gram():
    # A few outlier channels 1e4x larger, as in LLM activations: cond ~1e8-1e9.
    scales = np.ones(64)
    scales[:3] = 1e4
    G = _gram(64, 2000, seed=3, scales=scales)
    res = whiten(G)
    L = np.asarray(res.L)
    np.testing.assert_allclose(L.T @ L, G, rtol=1e-9, atol=1e-12 * np.abs(G).max())
    assert res.condition_number > 1e7


def test_map_back_with_triangular_solve():
    G = _gram(30, 300, seed=4)
    L = whiten(G).L
    rng = np.random.default_rng(0)
    W, D = rng.standard_normal((30, 12)), rng.standard_normal((30, 8))
    Y = np.asarray(whiten_target(L, jnp.asarray(W)))
    np.testing.assert_allclose(Y, np.asarray(L) @ W, rtol=1e-12)
    D_back = np.asarray(unwhiten_dictionary(L, jnp.asarray(np.asarray(L) @ D)))
    np.testing.assert_allclose(D_back, D, rtol=1e-9, atol=1e-10)
    # The objective identity behind the method: ‖L Δ‖² = tr(Δᵀ G Δ).
    delta = rng.standard_normal((30, 5))
    assert np.linalg.norm(np.asarray(L) @ delta) ** 2 == pytest.approx(np.trace(delta.T @ G @ delta), rel=1e-10)


def test_bad_inputs():
    G = _gram(6, 20)
    with pytest.raises(ValueError, match="square"):
        whiten(G[:, :5])
    bad = G.copy()
    bad[0, 1] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        whiten(bad)
    asym = G.copy()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        whiten(asym)
    with pytest.raises(TypeError, match="float32 or float64"):
        whiten(G, dtype=jnp.bfloat16)
    with pytest.raises(np.linalg.LinAlgError, match="trace"):
        whiten(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="rows"):
        whiten_target(whiten(G).L, np.ones((5, 3)))
    with jax.enable_x64(False), pytest.raises(TypeError, match="jax_enable_x64"):
        whiten(G, dtype=np.float64)
    with jax.enable_x64(False):
        res = whiten(G)  # default with x64 off: float32
    assert res.L.dtype == jnp.float32


def test_large_gram_diagnostics_by_lanczos_match_the_full_spectrum():
    """Above ``exact_spectrum_max_dim`` λ_min and cond come from Lanczos on G and on G⁻¹ (through L)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((900, 300)) * np.logspace(0, -3, 300)  # spread spectrum, cond ~1e6
    G = X.T @ X
    eig = np.linalg.eigvalsh(G)
    with jax.enable_x64(True):
        res = whiten(G, dtype=np.float64, exact_spectrum_max_dim=100)
    assert res.lambda_min == pytest.approx(eig[0], rel=1e-6)
    assert res.condition_number == pytest.approx(eig[-1] / eig[0], rel=1e-6)
