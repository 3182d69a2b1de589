"""CoSpaDi: whiten with the calibration Gram, learn a sparse dictionary by K-SVD, map the dictionary back.

W ≈ D_a·S with D_a = L⁻¹·D_L, where LᵀL = G and (D_L, S) = K-SVD(L·W, k, s) (paper Eq. 5-6). CoSpaDi† (data-free)
is the same with L = I. The grouped variant shares one dictionary across m same-type projections with the shared
metric Ḡ = mean of their Grams and the concatenated columns L̄·[W_1 … W_m] (Eq. 30-32), then slices S per layer.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..sparse.ksvd import ksvd
from .base import DictFactors, Method, UnitStats, unwhiten, whitening_factor


class CoSpaDi(Method):
    """Data-aware CoSpaDi (whitened K-SVD); its knobs are the K-SVD engine's, under the configs' names."""

    name = "cospadi"
    data_aware = True
    budget_kind = "cospadi"
    supports_groups = True

    def __init__(self, *, ksvd_iterations: int = 60, power_iterations: int = 8, dict_update: str = "power",
                 reseed_unused: bool = False, parallel: str = "none", omp_memory_mb: int | None = None,
                 omp_backend: str = "auto", sparse_coder: str = "omp"):
        self.ksvd_iterations = ksvd_iterations
        self.power_iterations = power_iterations
        self.dict_update = dict_update
        self.reseed_unused = reseed_unused
        self.parallel = parallel  # "columns": one matrix's columns sharded over all devices
        self.omp_memory_mb = omp_memory_mb  # per device
        self.omp_backend = omp_backend
        self.sparse_coder = sparse_coder  # omp (the paper) | ormp

    @classmethod
    def from_config(cls, config: Any) -> "CoSpaDi":
        return cls(ksvd_iterations=config.ksvd_iterations, power_iterations=config.power_iterations,
                   dict_update=config.dict_update, reseed_unused=config.reseed_unused, parallel=config.parallel,
                   omp_memory_mb=config.omp_memory_mb, omp_backend=config.omp_backend,
                   sparse_coder=config.sparse_coder)

    def ksvd_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~cospadi_jax.sparse.ksvd.ksvd` (besides the key) this method passes."""
        return dict(dict_update=self.dict_update, power_iterations=self.power_iterations,
                    unused="reseed" if self.reseed_unused else "skip", omp_backend=self.omp_backend,
                    sparse_coder=self.sparse_coder,
                    omp_memory_budget_bytes=None if self.omp_memory_mb is None else int(self.omp_memory_mb) * 2**20)

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
        if self.parallel == "columns":
            from ..parallel import make_mesh
            from ..sparse.sharded import sharded_ksvd

            if options["omp_memory_budget_bytes"] is None:
                options.pop("omp_memory_budget_bytes")  # the sharded XLA path's own default
            options = {k: v for k, v in options.items() if k not in ("omp_backend", "sparse_coder")}
            result = sharded_ksvd(Y, budget.n_atoms, budget.sparsity, self.ksvd_iterations, make_mesh(), key=key,
                                  **options)
        else:
            result = ksvd(Y, budget.n_atoms, budget.sparsity, self.ksvd_iterations, key=key, **options)
        t0 = time.perf_counter()
        D = np.asarray(result.dictionary, np.float64)
        D_a = unwhiten(L, D) if L is not None else D
        whitening_s += time.perf_counter() - t0
        phases = dict(result.seconds or {})
        backend = phases.pop("backend", "xla")
        # S after the last dictionary update (same supports as the last OMP pass, refitted values).
        S = np.asarray(result.coefficients, np.float64)
        indices = np.asarray(result.codes.indices, np.int32)
        filled = np.arange(indices.shape[1])[None, :] < np.asarray(result.codes.n_nonzero)[:, None]
        values = np.where(filled, S[indices, np.arange(indices.shape[0])[:, None]], 0.0)
        info.update(early_stopped_columns=int(result.codes.n_early_stopped),
                    unused_atoms=int(result.n_unused_atoms[-1]) if len(result.n_unused_atoms) else 0,
                    objective=[float(x) for x in np.asarray(result.objective)],
                    omp_backend=backend if self.sparse_coder == "omp" else "xla-ormp", phase_seconds={"whitening": whitening_s, **phases})
        cuts = np.cumsum([0, *[w.shape[1] for w in Ws]])
        return [DictFactors(D_a, indices[a:b], values[a:b], dict(info)) for a, b in zip(cuts[:-1], cuts[1:])]


class CoSpaDiFree(CoSpaDi):
    """CoSpaDi† (data-free): the same K-SVD on W itself, L = I."""

    name = "cospadi_free"
    data_aware = False
