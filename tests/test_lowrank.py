"""SVD-family baselines: the formulas of their repositories, and the optimality properties they rely on."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cospadi_jax.methods.base import UnitStats, functional_error, weight_error
from cospadi_jax.methods.lowrank import ASVD, SVDLLM, ASVDConfig, BasisSharing, TruncatedSVD


def _problem(d_in=48, d_out=40, n_tokens=400, seed=0):
    rng = np.random.default_rng(seed)
    # Anisotropic inputs with a few outlier channels, as in real LLM activations.
    X = rng.normal(size=(n_tokens, d_in)) * np.exp(rng.normal(size=d_in))
    W = rng.normal(size=(d_in, d_out))
    return W, X.T @ X, np.abs(X).mean(0)


def test_svd_llm_equals_repository_formula():
    """SVD-LLM repo: S = chol(XXᵀ) lower, SVD(W_torch·S), W_u = U√Σ, W_v = √Σ Vᵀ S⁻¹ (W_torch = Wᵀ [out, in])."""
    W, G, _ = _problem()
    r = 12
    f = SVDLLM().fit_group([W], [G], SimpleNamespace(rank=r), None)[0]
    S = np.linalg.cholesky(G)
    U, sig, Vt = np.linalg.svd(W.T @ S, full_matrices=False)
    w_u = U[:, :r] * np.sqrt(sig[:r])
    w_v = (np.sqrt(sig[:r])[:, None] * Vt[:r]) @ np.linalg.inv(S)
    np.testing.assert_allclose(f.dense(), (w_u @ w_v).T, rtol=1e-8, atol=1e-8)
    assert f.A.shape == (48, r) and f.B.shape == (r, 40)


def test_svd_llm_is_optimal_in_the_functional_norm():
    """Among rank-r maps, whitened SVD minimises ‖X(W − W̃)‖ (Eckart-Young in whitened space)."""
    W, G, mean_abs = _problem(seed=1)
    budget = SimpleNamespace(rank=10)
    errs = {m.name: functional_error(W, f.dense(), G) for m, f in (
        (SVDLLM(), SVDLLM().fit_group([W], [G], budget, None)[0]),
        (TruncatedSVD(), TruncatedSVD().fit_group([W], [None], budget, None)[0]),
        (ASVD(), ASVD().fit_group([W], [G], budget, None, UnitStats(mean_abs=mean_abs))[0]),
    )}
    assert errs["svd_llm"] < errs["asvd"] < errs["svd"]
    # and plain SVD is the optimum in weight space
    assert weight_error(W, TruncatedSVD().fit_group([W], [None], budget, None)[0].dense()) < weight_error(
        W, SVDLLM().fit_group([W], [G], budget, None)[0].dense())


def test_svd_llm_truncation_loss_equals_dropped_singular_values():
    """SVD-LLM's theorem: the functional loss² of truncation is the sum of the dropped σ_i² of the whitened W."""
    W, G, _ = _problem(seed=2)
    r = 7
    L = np.linalg.cholesky(G).T
    sig = np.linalg.svd(L @ W, compute_uv=False)
    f = SVDLLM().fit_group([W], [G], SimpleNamespace(rank=r), None)[0]
    delta = W - f.dense()
    loss2 = np.einsum("ij,ij->", delta, G @ delta)
    np.testing.assert_allclose(loss2, (sig[r:] ** 2).sum(), rtol=1e-8)


def test_asvd_scaling_formula():
    W, G, mean_abs = _problem(seed=3)
    f = ASVD(ASVDConfig(alpha=0.5)).fit_group([W], [G], SimpleNamespace(rank=9), None, UnitStats(mean_abs=mean_abs))[0]
    s = mean_abs**0.5
    U, sig, Vt = np.linalg.svd(s[:, None] * W, full_matrices=False)
    expected = (U[:, :9] * sig[:9]) @ Vt[:9] / s[:, None]
    np.testing.assert_allclose(f.dense(), expected, rtol=1e-8, atol=1e-10)


def test_basis_sharing_shares_one_basis_and_equals_repository_formula():
    W1, G1, _ = _problem(seed=4)
    W2, G2, _ = _problem(seed=5)
    r = 15
    f1, f2 = BasisSharing().fit_group([W1, W2], [G1, G2], SimpleNamespace(rank=r), None)
    assert f1.A is f2.A  # one stored basis for the group
    L = np.linalg.cholesky(G1 + G2).T  # the repo sums Grams; the mean gives the same factors
    U, sig, Vt = np.linalg.svd(L @ np.concatenate([W1, W2], 1), full_matrices=False)
    basis = np.linalg.solve(L, U[:, :r] * sig[:r])
    np.testing.assert_allclose(f1.dense(), basis @ Vt[:r, :40], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(f2.dense(), basis @ Vt[:r, 40:], rtol=1e-7, atol=1e-9)


def test_rank_out_of_range_raises():
    W, G, _ = _problem()
    with pytest.raises(ValueError, match="rank 0 is outside"):
        TruncatedSVD().fit_group([W], [None], SimpleNamespace(rank=0), None)[0]
