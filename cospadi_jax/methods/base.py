"""What every compression method returns, and the one interface they share.

Orientation (paper §3, used everywhere in cospadi-jax): W = HF ``weight.T`` with shape [d_in, d_out]; columns are
output neurons. A low-rank method returns W ≈ A·B with A: [d_in, r], B: [r, d_out]. CoSpaDi returns W ≈ D·S with
the dictionary D: [d_in, k] and a column-sparse S: [k, d_out] stored per output column as ``indices``
[d_out, s] (atom ids) and ``values`` [d_out, s].
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import jax
import numpy as np

from ..sparse.whitening import unwhiten_dictionary, whiten


@dataclass
class LowRankFactors:
    """W ≈ A @ B.  A: [d_in, r], B: [r, d_out]."""

    A: np.ndarray
    B: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.A.shape[0], self.B.shape[1]

    def dense(self) -> np.ndarray:
        """Reconstructed W̃ [d_in, d_out] (float64)."""
        return np.asarray(self.A, np.float64) @ np.asarray(self.B, np.float64)

    def n_params(self) -> int:
        return int(self.A.size + self.B.size)


@dataclass
class DictFactors:
    """W ≈ D @ S.  D: [d_in, k]; S column-sparse, column j = Σ_t values[j, t] · e_{indices[j, t]}.

    indices: [d_out, s] int32 (a padded slot of an early-stopped column has value 0), values: [d_out, s].
    """

    D: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.D.shape[1])

    @property
    def s(self) -> int:
        return int(self.indices.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.D.shape[0], self.indices.shape[0]

    def coefficients(self) -> np.ndarray:
        """Dense S [k, d_out] (float64)."""
        d_out = self.indices.shape[0]
        S = np.zeros((self.k, d_out), np.float64)
        cols = np.broadcast_to(np.arange(d_out)[:, None], self.indices.shape)
        np.add.at(S, (self.indices, cols), np.asarray(self.values, np.float64))
        return S

    def dense(self) -> np.ndarray:
        """Reconstructed W̃ [d_in, d_out] (float64)."""
        return np.asarray(self.D, np.float64) @ self.coefficients()

    def n_params(self) -> int:
        """Dictionary entries plus stored non-zeros (indices are counted in bytes by the budget, not here)."""
        return int(self.D.size + self.values.size)


Factors = LowRankFactors | DictFactors


@dataclass(frozen=True)
class UnitStats:
    """Calibration statistics of a fitting unit beyond its Grams (what a method with ``needs_mean_abs`` reads).

    mean_abs: [d_in] float64, mean |x| of the unit's input over the calibration tokens (ASVD's scaling).
    """

    mean_abs: np.ndarray | None = None


class Method(ABC):
    """A compression method: the whole contract that the orchestrator (:mod:`cospadi_jax.compress`) relies on.

    Class attributes:
        name: the registry key (``method.name`` in the configs).
        data_aware: fits on the calibration Grams (False: ``grams`` are None and never needed).
        budget_kind: ``"low_rank"`` (the budget gives ``rank``) or ``"cospadi"`` (``n_atoms`` k and
            ``sparsity`` s) — the :func:`cospadi_jax.budget.budget` kind the orchestrator draws the unit's
            budget with; a method never computes its own budget.
        supports_groups: m > 1 same-shaped matrices may share one basis (grouped units).
        needs_mean_abs: ``stats.mean_abs`` must be given.

    A single matrix is a group of one: :meth:`fit_group` is the only fitting entry point. Build a method from a
    compression config with :func:`cospadi_jax.methods.build`.
    """

    name: ClassVar[str]
    data_aware: ClassVar[bool]
    budget_kind: ClassVar[str]
    supports_groups: ClassVar[bool] = False
    needs_mean_abs: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: Any) -> "Method":
        """The method with its knobs from a compression config (methods without knobs ignore it)."""
        return cls()

    @abstractmethod
    def fit_group(self, Ws: list[np.ndarray], grams: list[np.ndarray | None], budget: Any, key: Any,
                  stats: UnitStats = UnitStats()) -> list[Factors]:
        """Fit one unit: m weights Ws, each [d_in, d_out] (float32 or float64); their calibration Grams Σxᵀx
        [d_in, d_in] float64 (None entries for data-free methods); the unit's ``budget`` (group size m); a JAX
        PRNG ``key``; ``stats`` as :class:`UnitStats`. Returns one Factors per W (sharing the basis when m > 1),
        float64 or float32 arrays in the paper's orientation."""

    def _single(self, Ws: list[np.ndarray], grams: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray | None]:
        """The one matrix of a unit, for methods without groups."""
        if len(Ws) != 1 or len(grams) != 1:
            raise ValueError(f"{self.name} fits one matrix at a time, got a group of {len(Ws)}; use group_size=1")
        return Ws[0], grams[0]


def functional_error(W: np.ndarray, W_hat: np.ndarray, gram: np.ndarray) -> float:
    """Relative output error ‖X(W − W̃)‖_F / ‖XW‖_F from the Gram G = XᵀX alone: sqrt(tr(ΔᵀGΔ) / tr(WᵀGW))."""
    W = np.asarray(W, np.float64)
    delta = W - np.asarray(W_hat, np.float64)
    num = np.einsum("ij,ij->", delta, gram @ delta)
    den = np.einsum("ij,ij->", W, gram @ W)
    return float(np.sqrt(max(num, 0.0) / den))


def weight_error(W: np.ndarray, W_hat: np.ndarray) -> float:
    """Relative weight error ‖W − W̃‖_F / ‖W‖_F."""
    W = np.asarray(W, np.float64)
    return float(np.linalg.norm(W - W_hat) / np.linalg.norm(W))


_WHITENING_CACHE: OrderedDict[str, tuple[np.ndarray, dict[str, float]]] = OrderedDict()
_WHITENING_CACHE_SIZE = 8
_WHITENING_LOCK = threading.Lock()


def clear_whitening_cache() -> None:
    """Drop the memoised whitening factors (a Llama-3-8B down_proj factor alone is 1.6 GiB in float64): the
    layer-by-layer streaming calls it after each layer, whose Grams never come back."""
    with _WHITENING_LOCK:
        _WHITENING_CACHE.clear()


def whitening_factor(gram: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Upper-triangular L [d_in, d_in] with LᵀL = G (+ damping if needed), in float64, and the damping report.

    Whitening always runs in float64 (x64 enabled for this call only): calibration Grams of LLM activations
    have condition numbers far beyond float32's reach. q/k/v (and gate/up) share one Gram, so the last few
    factors are memoised by the Gram's content hash: the Cholesky and its eigen-diagnostics run once per input.
    """
    gram = np.ascontiguousarray(gram, np.float64)
    digest = hashlib.sha1(gram.data).hexdigest() + str(gram.shape)
    with _WHITENING_LOCK:  # parallel="matrices" fits units from several threads
        if digest in _WHITENING_CACHE:
            _WHITENING_CACHE.move_to_end(digest)
            L, info = _WHITENING_CACHE[digest]
            return L, dict(info)
    with jax.enable_x64(True):
        result = whiten(gram, dtype=np.float64)
        L = np.asarray(result.L, np.float64)
    info = {"jitter": result.jitter, "lambda_min": result.lambda_min, "condition_number": result.condition_number,
            "effective_rank": result.effective_rank}
    L.setflags(write=False)  # shared between callers
    with _WHITENING_LOCK:
        _WHITENING_CACHE[digest] = (L, info)
        while len(_WHITENING_CACHE) > _WHITENING_CACHE_SIZE:
            _WHITENING_CACHE.popitem(last=False)
    return L, dict(info)


def unwhiten(L: np.ndarray, X: np.ndarray) -> np.ndarray:
    """L⁻¹·X [d_in, m] by a float64 triangular solve (never an explicit inverse)."""
    with jax.enable_x64(True):
        return np.asarray(unwhiten_dictionary(np.asarray(L, np.float64), np.asarray(X, np.float64)), np.float64)
