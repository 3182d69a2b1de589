"""How long a K-SVD compression will take on this machine, measured before it starts.

A run of T = 60 over hundreds of matrices takes hours on a CPU, and its cost depends on the engine, the
backend, the core count and the shapes. Rather than a table of constants, :func:`estimate_fit_seconds` times one
warm K-SVD iteration per distinct unit shape on random data of that shape (random targets keep every column
running to s non-zeros, as in a middle K-SVD iteration), on at most ``probe_columns`` columns, and scales it
linearly to the unit's columns and to T. Calibration and evaluation are not included. On SmolLM2 (CR 0.2, all
210 matrices, the 2-core VM) it predicts 103 s per iteration against 91 s measured on real weights: random data
keep every column at s non-zeros, real ones stop some columns early. For ``dict_update="exact"`` on the
``cpu_kernel`` backend it is an upper bound, several times too high: random targets have near-equal top singular
values, so every atom runs to the step cap and LAPACK, while real whitened weights converge in a few power steps
(SmolLM2: 530 s per iteration predicted; the run's update was cheaper than the 8-step power update's).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

from .sparse.ksvd import ksvd


def _one_iteration_seconds(d: int, n: int, k: int, s: int, probe_columns: int, **ksvd_kwargs: Any) -> float:
    columns = min(n, probe_columns)
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((d, columns)).astype(np.float32)
    init = rng.standard_normal((d, k)).astype(np.float32)
    ksvd(Y, k, s, 1, init=init, **ksvd_kwargs)  # compiles (XLA) or loads the cached kernel (Numba)
    t0 = time.perf_counter()
    ksvd(Y, k, s, 1, init=init, **ksvd_kwargs)
    return (time.perf_counter() - t0) * n / columns


def estimate_fit_seconds(units: list[tuple[int, int, int, int]], ksvd_iterations: int, *, probe_columns: int = 2048,
                         **ksvd_kwargs: Any) -> dict[str, Any]:
    """Estimated fitting time of K-SVD units.

    units: one ``(d_in, n_columns, k, s)`` per fitting unit (a shared group's columns concatenated).
    ksvd_iterations: T. ``ksvd_kwargs``: as the method will call :func:`~cospadi_jax.sparse.ksvd.ksvd`
    (``dict_update``, ``power_iterations``, ``omp_backend``, ...).
    Returns ``{"seconds": total, "per_iteration_s": ..., "probe_s": time spent measuring}``.
    """
    t0 = time.perf_counter()
    ksvd_kwargs.pop("snapshots", None)  # the probe runs one iteration; snapshots cost nothing to keep
    per_shape = {shape: _one_iteration_seconds(*shape, probe_columns, **ksvd_kwargs) for shape in Counter(units)}
    per_iteration = sum(per_shape[u] for u in units)
    return {"seconds": per_iteration * max(ksvd_iterations, 1), "per_iteration_s": per_iteration,
            "probe_s": time.perf_counter() - t0}
