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
from .base import DictFactors, unwhiten, whitening_factor


class CoSpaDi:
    supports_groups = True

    def __init__(self, *, data_aware: bool = True, iterations: int = 60, power_iterations: int = 8,
                 update: str = "power", reseed_unused: bool = False, parallel: str = "none", omp_memory_mb: int | None = None,
                 omp_backend: str = "auto", sparse_coder: str = "omp"):
        self.data_aware = data_aware
        self.name = "cospadi" if data_aware else "cospadi_free"
        self.iterations = iterations
        self.power_iterations = power_iterations
        self.update = update
        self.reseed_unused = reseed_unused
        self.parallel = parallel  # "columns": one matrix's columns sharded over all devices
        self.omp_memory_bytes = None if omp_memory_mb is None else int(omp_memory_mb) * 2**20  # per device
        self.omp_backend = omp_backend
        self.sparse_coder = sparse_coder  # omp (the paper) | ormp

    def fit(self, W: np.ndarray, gram: np.ndarray | None, budget: Any, key: Any) -> DictFactors:
        return self.fit_group([W], [gram], budget, key)[0]

    def fit_group(self, Ws: list[np.ndarray], grams: list[np.ndarray | None], budget: Any, key: Any
                  ) -> list[DictFactors]:
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
        kwargs = dict(key=key, method=self.update, power_iterations=self.power_iterations,
                      unused="reseed" if self.reseed_unused else "skip", omp_memory_budget_bytes=self.omp_memory_bytes)
        if self.parallel == "columns":
            from ..parallel import make_mesh
            from ..sparse.sharded import sharded_ksvd

            if kwargs["omp_memory_budget_bytes"] is None:
                kwargs.pop("omp_memory_budget_bytes")  # the sharded XLA path's own default
            result = sharded_ksvd(Y, budget.n_atoms, budget.sparsity, self.iterations, make_mesh(), **kwargs)
        else:
            result = ksvd(Y, budget.n_atoms, budget.sparsity, self.iterations, omp_backend=self.omp_backend,
                          sparse_coder=self.sparse_coder, **kwargs)
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
