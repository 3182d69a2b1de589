"""The SVD-family baselines: truncated SVD, SVD-LLM (whitening step), ASVD and Basis Sharing.

All work in float64 on the host (one SVD per matrix or group, no iteration), in the paper's orientation
W: [d_in, d_out], and return ``LowRankFactors`` W ≈ A·B. Whitening is the shared Cholesky factor with escalating
damping from :mod:`cospadi_jax.sparse.whitening`, mapped back with triangular solves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import LowRankFactors, Method, MethodConfig, UnitStats, check_number, unwhiten, whitening_factor


@dataclass
class LowRankConfig(MethodConfig):
    """SVD, SVD-LLM and Basis Sharing: the common knobs only (the rank follows from the ratio)."""

    name: str = "svd_llm"


@dataclass
class ASVDConfig(MethodConfig):
    """ASVD: the common knobs and the activation-scaling exponent α (S_ii = mean |x_i|^α; ASVD uses 0.5)."""

    name: str = "asvd"
    alpha: float = 0.5

    def validate(self, n_layers: int | None = None) -> None:
        super().validate(n_layers)
        check_number(self, "alpha")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0 = plain SVD), got {self.alpha}")


def _truncated_svd(Y: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD of Y [m, n] in float64: U_r [m, r], σ_r [r], V_rᵀ [r, n]."""
    if not 1 <= rank <= min(Y.shape):
        raise ValueError(f"rank {rank} is outside [1, {min(Y.shape)}] for a {Y.shape} matrix")
    U, sigma, Vt = np.linalg.svd(np.asarray(Y, np.float64), full_matrices=False)
    return U[:, :rank], sigma[:rank], Vt[:rank]


def _split_sqrt(U: np.ndarray, sigma: np.ndarray, Vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Balance √σ into both factors, as SVD-LLM does."""
    root = np.sqrt(sigma)
    return U * root, root[:, None] * Vt


class TruncatedSVD(Method):
    """Data-free baseline: W ≈ U_r Σ_r V_rᵀ (Eckart-Young in weight space)."""

    name = "svd"
    config_class = LowRankConfig
    data_aware = False
    budget_kind = "low_rank"

    def fit_group(self, Ws: list[np.ndarray], grams: list[np.ndarray | None], budget: Any, key: Any = None,
                  stats: UnitStats = UnitStats()) -> list[LowRankFactors]:
        W, _ = self._single(Ws, grams)
        A, B = _split_sqrt(*_truncated_svd(W, budget.rank))
        return [LowRankFactors(A, B, {"rank": budget.rank})]


class SVDLLM(Method):
    """SVD-LLM's truncation-aware whitening step only (no parameter update), as in its repository.

    L = chol(G)ᵀ (upper), SVD of L·W, keep r, A = L⁻¹·U_r·√Σ_r, B = √Σ_r·V_rᵀ.
    """

    name = "svd_llm"
    config_class = LowRankConfig
    data_aware = True
    budget_kind = "low_rank"

    def fit_group(self, Ws: list[np.ndarray], grams: list[np.ndarray], budget: Any, key: Any = None,
                  stats: UnitStats = UnitStats()) -> list[LowRankFactors]:
        W, gram = self._single(Ws, grams)
        L, info = whitening_factor(gram)
        A_l, B = _split_sqrt(*_truncated_svd(L @ np.asarray(W, np.float64), budget.rank))
        return [LowRankFactors(unwhiten(L, A_l), B, {"rank": budget.rank, **info})]


class ASVD(Method):
    """ASVD with a uniform rank: diagonal scaling S_ii = (mean |x_i|)^α, SVD of S·W, W̃ = S⁻¹·trunc(S·W).

    ASVD's sensitivity-based per-layer rank search is not used: every matrix gets the budget's rank, so the
    comparison with the other methods is at equal per-matrix budget.
    """

    name = "asvd"
    config_class = ASVDConfig
    data_aware = True
    budget_kind = "low_rank"
    needs_mean_abs = True
    config: ASVDConfig

    def fit_group(self, Ws: list[np.ndarray], grams: list[np.ndarray | None], budget: Any, key: Any = None,
                  stats: UnitStats = UnitStats()) -> list[LowRankFactors]:
        W, _ = self._single(Ws, grams)
        if stats.mean_abs is None:
            raise ValueError("ASVD scales by the calibration mean |x|: pass stats=UnitStats(mean_abs=...)")
        scale = np.asarray(stats.mean_abs, np.float64) ** self.config.alpha
        # Dead input channels would make S singular; give them the smallest positive scale instead.
        positive = scale[scale > 0]
        if positive.size == 0:
            raise ValueError("ASVD: every input channel has zero mean |x|; the calibration data never reached it")
        scale = np.where(scale > 0, scale, positive.min())
        A_s, B = _split_sqrt(*_truncated_svd(scale[:, None] * np.asarray(W, np.float64), budget.rank))
        return [LowRankFactors(A_s / scale[:, None], B, {"rank": budget.rank, "alpha": self.config.alpha})]


class BasisSharing(Method):
    """Basis Sharing: one whitened-SVD basis for a group of same-type projections of consecutive layers.

    Ḡ = mean of the group's Grams = L̄ᵀL̄; SVD of L̄·[W_1 … W_m] (d_in × m·d_out); shared basis L̄⁻¹·U_r·Σ_r,
    per-layer coefficients = the layer's columns of V_rᵀ (as in TUDa-HWAI/Basis_Sharing ``group.py``).
    """

    name = "basis_sharing"
    config_class = LowRankConfig
    data_aware = True
    budget_kind = "low_rank"
    supports_groups = True

    def fit_group(self, Ws: list[np.ndarray], grams: list[np.ndarray], budget: Any, key: Any = None,
                  stats: UnitStats = UnitStats()) -> list[LowRankFactors]:
        L, info = whitening_factor(np.mean([np.asarray(g, np.float64) for g in grams], axis=0))
        widths = [w.shape[1] for w in Ws]
        U, sigma, Vt = _truncated_svd(L @ np.concatenate(Ws, axis=1).astype(np.float64), budget.rank)
        basis = unwhiten(L, U * sigma)
        cuts = np.cumsum([0, *widths])
        return [LowRankFactors(basis, Vt[:, a:b], {"rank": budget.rank, "group_size": len(Ws), **info})
                for a, b in zip(cuts[:-1], cuts[1:])]
