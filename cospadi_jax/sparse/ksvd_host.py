"""K-SVD with the power or exact update entirely on the host (``omp_backend="cpu_kernel"``): BLAS GEMMs and the fused
Numba Batch-OMP and atom update of :mod:`.cpu_kernel`, as the two :class:`~.ksvd_loop.KSVDSteps` of the shared loop.
"""

from __future__ import annotations

import logging

import numpy as np

from cospadi_jax.sparse.ksvd_loop import KSVDSteps
from cospadi_jax.sparse.omp import SparseCodes

__all__ = ["dense_codes", "host_steps"]

log = logging.getLogger(__name__)


def dense_codes(codes: SparseCodes, n_atoms: int) -> np.ndarray:
    """S [k, n] (NumPy) from SparseCodes [n, s]; atoms within a column are distinct, so no accumulation."""
    indices, values = np.asarray(codes.indices), np.asarray(codes.values)
    n, s = indices.shape
    col, slot = np.nonzero(np.arange(s)[None, :] < np.asarray(codes.n_nonzero)[:, None])
    S = np.zeros((n_atoms, n), values.dtype)
    S[indices[col, slot], col] = values[col, slot]
    return S


def host_steps(Y, n_atoms, sparsity, clock, *, dict_update, power_iterations, unused, threads) -> KSVDSteps:
    """K-SVD steps with the ``power`` or ``exact`` update entirely on the host: BLAS GEMMs, fused Numba OMP and
    update (:func:`.cpu_kernel.power_update_cpu`).

    Y: [d, n] in the working dtype; D arrives as a NumPy [d, k] (unit-norm). The residual is kept transposed,
    Eᵀ [n, d], and updated in place by the atom updates, so the objective after an update is ‖E‖ with no
    extra GEMM.
    """
    from cospadi_jax.sparse.cpu_kernel import batch_omp_cpu, power_update_cpu

    Y_t = np.ascontiguousarray(Y.T)
    y_norm = float(np.linalg.norm(Y_t))
    residual = {}

    def code(D):
        gram, corr = D.T @ D, D.T @ Y
        clock.lap("gemm")
        codes = batch_omp_cpu(gram, corr, sparsity, dtype=Y.dtype, threads=threads)
        clock.lap("omp")
        S = dense_codes(codes, n_atoms)
        residual["E_t"] = E_t = Y_t - S.T @ D.T  # [n, d]
        err = float(np.linalg.norm(E_t)) / y_norm
        clock.lap("gemm")
        return codes, S, err

    def update(D, S, codes):
        E_t, D_t = residual["E_t"], np.ascontiguousarray(D.T)
        values, unused_count, n_lapack = power_update_cpu(E_t, D_t, codes, power_iterations=power_iterations,
                                                          exact=dict_update == "exact", unused=unused, Y_t=Y_t)
        if n_lapack:
            log.debug("exact update: %d of %d atoms did not converge by power steps and took LAPACK's SVD",
                      n_lapack, n_atoms)
        S = dense_codes(codes._replace(values=values), n_atoms)
        err = float(np.linalg.norm(E_t)) / y_norm
        clock.lap("update")
        return np.ascontiguousarray(D_t.T), S, unused_count, err

    return KSVDSteps(code, update)
