"""CoSpaDi: whiten with the calibration Gram, learn a sparse dictionary by K-SVD, map the dictionary back.

W ≈ D_a·S with D_a = L⁻¹·D_L, where LᵀL = G and (D_L, S) = K-SVD(L·W, k, s) (paper Eq. 5-6). CoSpaDi† (data-free)
is the same with L = I. The grouped variant shares one dictionary across m same-type projections with the shared
metric Ḡ = mean of their Grams and the concatenated columns L̄·[W_1 … W_m] (Eq. 30-32), then slices S per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..budget import ACCOUNTINGS
from ..sparse.backend import check_omp_backend
from ..sparse.ksvd import DICT_UPDATES, SPARSE_CODERS, ksvd
from ..sparse.ksvd_loop import check_snapshots
from .base import DictFactors, Method, MethodConfig, UnitStats, check_int, check_number, unwhiten, whitening_factor


@dataclass
class CoSpaDiConfig(MethodConfig):
    """CoSpaDi's knobs (paper Table 8 defaults): the budget's k/s and accounting, and the K-SVD engine's."""

    name: str = "cospadi"
    rho: float = 2.0  # k / s
    accounting: str = "eq11"  # storage accounting: eq11 (14-bit values) | eq10 (bitmask)
    ksvd_iterations: int = 60
    power_iterations: int = 8
    dict_update: str = "power"  # power | exact | mod
    reseed_unused: bool = False  # paper: unused atoms are skipped; True re-seeds them (K-SVD original)
    # one OMP chunk's working memory per device; null = the backend's default (xla: 16 MiB, an L3-sized chunk;
    # gemm: 25 % of the device's memory)
    omp_memory_mb: Optional[int] = None
    omp_backend: str = "auto"  # Batch-OMP: auto (cpu_kernel on CPU, gemm on GPU/TPU) | xla | cpu_kernel | gemm
    sparse_coder: str = "omp"  # omp (the paper's Batch-OMP) | ormp (order-recursive MP: lower error at the same s)
    # iteration counts t < ksvd_iterations whose factors are also kept, each as the artifact of a run at T = t
    # (snapshots/T<t>/, evaluated like the run): one run gives the paper's accuracy-versus-T curve (Fig. 4 left)
    ksvd_snapshots: list[int] = field(default_factory=list)

    def budget_options(self) -> dict[str, Any]:
        return {**super().budget_options(), "rho": self.rho, "accounting": self.accounting}

    def validate(self, n_layers: int | None = None) -> None:
        super().validate(n_layers)
        check_number(self, "rho")
        for name in ("ksvd_iterations", "power_iterations"):
            check_int(self, name)
        if self.rho < 1.0:
            raise ValueError(f"rho = k/s must be >= 1 (s <= k), got {self.rho}")
        for name, choices in (("accounting", ACCOUNTINGS), ("dict_update", DICT_UPDATES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.ksvd_iterations < 0 or self.power_iterations < 1:
            raise ValueError("ksvd_iterations must be >= 0 and power_iterations >= 1")
        if self.omp_memory_mb is not None and self.omp_memory_mb < 1:
            raise ValueError(f"omp_memory_mb must be >= 1, got {self.omp_memory_mb}")
        check_omp_backend(self.omp_backend)
        if self.sparse_coder not in SPARSE_CODERS:
            raise ValueError(f"unknown sparse_coder {self.sparse_coder!r}; use one of {SPARSE_CODERS}")
        if self.sparse_coder != "omp" and self.parallel == "columns":
            raise ValueError("parallel='columns' shards Batch-OMP over devices; use sparse_coder=omp with it")
        check_snapshots(self.ksvd_snapshots, self.ksvd_iterations)
        if self.parallel == "columns" and self.omp_backend not in ("auto", "xla"):
            raise ValueError(f"parallel='columns' shards the XLA Batch-OMP over devices; omp_backend="
                             f"{self.omp_backend!r} cannot be sharded: use omp_backend=auto or xla.")


class CoSpaDi(Method):
    """Data-aware CoSpaDi (whitened K-SVD); its knobs (:class:`CoSpaDiConfig`) are the K-SVD engine's."""

    name = "cospadi"
    config_class = CoSpaDiConfig
    data_aware = True
    budget_kind = "cospadi"
    supports_groups = True
    config: CoSpaDiConfig

    def _mesh(self) -> Any:
        """The device mesh of ``parallel=columns``, built once per method (not once per matrix)."""
        if getattr(self, "_columns_mesh", None) is None:
            from ..parallel import make_mesh

            self._columns_mesh = make_mesh()
        return self._columns_mesh

    def ksvd_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~cospadi_jax.sparse.ksvd.ksvd` (besides the key) this method passes."""
        c = self.config
        return dict(dict_update=c.dict_update, power_iterations=c.power_iterations,
                    unused="reseed" if c.reseed_unused else "skip", omp_backend=c.omp_backend,
                    sparse_coder=c.sparse_coder,
                    omp_memory_mb=c.omp_memory_mb, snapshots=c.ksvd_snapshots)

    def fit_group(self, Ws: list[np.ndarray], grams: list[np.ndarray | None], budget: Any, key: Any,
                  stats: UnitStats = UnitStats()) -> list[DictFactors]:
        t0 = time.perf_counter()
        W_cat = np.concatenate([np.asarray(w, np.float64) for w in Ws], axis=1)
        info: dict[str, Any] = {"k": budget.n_atoms, "s": budget.sparsity, "group_size": len(Ws)}
        if self.data_aware:
            L, damping = whitening_factor(np.mean([np.asarray(g, np.float64) for g in grams], axis=0))
            info.update(damping)
            Y = L @ W_cat
        else:
            L, Y = None, W_cat
        whitening_s = time.perf_counter() - t0
        options = self.ksvd_options()
        if self.config.parallel == "columns":
            from ..sparse.sharded import sharded_ksvd

            options = {k: v for k, v in options.items() if k not in ("omp_backend", "sparse_coder")}
            result = sharded_ksvd(Y, budget.n_atoms, budget.sparsity, self.config.ksvd_iterations, self._mesh(),
                                  key=key, **options)
        else:
            result = ksvd(Y, budget.n_atoms, budget.sparsity, self.config.ksvd_iterations, key=key, **options)
        backend = dict(result.seconds or {}).get("backend", "xla")
        info["omp_backend"] = backend if self.config.sparse_coder == "omp" else "xla-ormp"
        t0 = time.perf_counter()
        final = _factors(result, L, Ws, info)
        for t, snap in sorted((result.snapshots or {}).items()):
            for f, g in zip(final, _factors(snap, L, Ws, info)):
                f.snapshots[t] = g
        whitening_s += time.perf_counter() - t0  # the un-whitening of every dictionary kept
        for f in (*final, *(g for f in final for g in f.snapshots.values())):
            f.info["phase_seconds"]["whitening"] = whitening_s
        return final


def _factors(state: Any, L: np.ndarray | None, Ws: list[np.ndarray], info: dict[str, Any]) -> list[DictFactors]:
    """One DictFactors per matrix of the unit from a K-SVD state (the result, or a snapshot of it): D mapped back
    to the input space, S sliced per matrix (the values of S after the last dictionary update)."""
    D = np.asarray(state.dictionary, np.float64)
    D_a = unwhiten(L, D) if L is not None else D
    phases = {k: v for k, v in (state.seconds or {}).items() if k != "backend"}
    S = np.asarray(state.coefficients, np.float64)
    codes = state.codes
    indices = np.asarray(codes.indices, np.int32)
    filled = np.arange(indices.shape[1])[None, :] < np.asarray(codes.n_nonzero)[:, None]
    values = np.where(filled, S[indices, np.arange(indices.shape[0])[:, None]], 0.0)
    info = {**info, "early_stopped_columns": int(codes.n_early_stopped),
            "unused_atoms": int(state.n_unused_atoms[-1]) if len(state.n_unused_atoms) else 0,
            "objective": [float(x) for x in np.asarray(state.objective)]}
    cuts = np.cumsum([0, *[w.shape[1] for w in Ws]])
    return [DictFactors(D_a, indices[a:b], values[a:b], {**info, "phase_seconds": {"whitening": 0.0, **phases}})
            for a, b in zip(cuts[:-1], cuts[1:])]


class CoSpaDiFree(CoSpaDi):
    """CoSpaDi† (data-free): the same K-SVD on W itself, L = I."""

    name = "cospadi_free"
    data_aware = False

    def __init__(self, config: CoSpaDiConfig | None = None):
        super().__init__(config if config is not None else CoSpaDiConfig(name=self.name))
