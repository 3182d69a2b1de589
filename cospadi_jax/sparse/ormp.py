"""Batch ORMP (order-recursive matching pursuit) in the Gram form of Batch-OMP, jitted and vmapped.

OMP picks the atom most correlated with the residual, argmax_j |d_jᵀr|. ORMP picks the atom that most reduces the
residual *after re-projection*: argmax_j |d_jᵀr|² / ν_j, where ν_j = ‖P⊥d_j‖² is the squared norm of the part of
d_j orthogonal to the atoms already selected. Both then refit every coefficient by least squares on the support.
This is SPAMS' ``spams.omp`` (tested against it in ``tests/test_ormp.py``).

Per column, with G = DᵀD [k, k] and α⁰ = Dᵀy [k] (unit-norm atoms not required), the state is Q [s, k] with
Q[t] = e_tᵀD for the t-th orthonormal direction e_t of the selected span, the correlations α = Dᵀr and ν. Adding
atom p:

    q = (G[p] − Q[:, p]ᵀQ) / √ν_p,   z_t = α_p / √ν_p,   α ← α − z_t q,   ν ← ν − q²

so a step costs O(s·k) per column. Q restricted to the support is Lᵀ, the transposed Cholesky factor of G_SS, and
the coefficients are x_S = L⁻ᵀz by one triangular solve. A column stops early when no unselected atom has a
component left outside the span (ν_j ≤ tol·G_jj) or the residual is zero.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from .omp import SparseCodes, check_finite, resolve_float_dtype

__all__ = ["batch_ormp"]


def _ormp_column(gram: jax.Array, alpha0: jax.Array, s: int, tol: float):
    k = gram.shape[0]
    diag = jnp.diagonal(gram)
    dtype = gram.dtype

    def step(t, state):
        Q, alpha, nu, selected, idx, z, n_active, active = state
        usable = (~selected) & (nu > tol * diag)
        score = jnp.where(usable, alpha * alpha / jnp.where(usable, nu, 1), -1)
        p = jnp.argmax(score)
        active = active & (score[p] > 0)
        root = jnp.sqrt(jnp.where(active, nu[p], 1))
        q = jnp.where(active, (gram[p] - Q[:, p] @ Q) / root, 0)
        z_t = jnp.where(active, alpha[p] / root, 0)
        return (Q.at[t].set(q), alpha - z_t * q, nu - q * q, selected.at[p].set(selected[p] | active),
                idx.at[t].set(jnp.where(active, p, 0).astype(jnp.int32)), z.at[t].set(z_t), n_active + active.astype(jnp.int32),
                active)

    state = (jnp.zeros((s, k), dtype), alpha0, diag, jnp.zeros(k, bool), jnp.zeros(s, jnp.int32),
             jnp.zeros(s, dtype), jnp.int32(0), jnp.bool_(True))
    Q, _, _, _, idx, z, n, _ = jax.lax.fori_loop(0, s, step, state)
    filled = jnp.arange(s) < n
    # Lᵀ on the support; unfilled slots become identity rows with z = 0, so their coefficients are 0.
    upper = jnp.where(filled[:, None] & filled[None, :], Q[:, idx], 0) + jnp.diag(jnp.where(filled, 0, 1).astype(dtype))
    values = solve_triangular(upper, jnp.where(filled, z, 0), lower=False)
    return idx, jnp.where(filled, values, 0), n


@partial(jax.jit, static_argnames=("s", "chunk_size", "tol"))
def _batch(gram, corr, s, chunk_size, tol):
    n = corr.shape[1]
    pad = (-n) % chunk_size
    chunks = jnp.pad(corr, ((0, 0), (0, pad))).T.reshape(-1, chunk_size, corr.shape[0])
    column = jax.vmap(lambda a: _ormp_column(gram, a, s, tol))
    idx, values, nnz = jax.lax.map(column, chunks)
    return idx.reshape(-1, s)[:n], values.reshape(-1, s)[:n], nnz.reshape(-1)[:n]


def batch_ormp(gram, correlations, sparsity: int, *, dtype=None, chunk_size: int | None = None,
               memory_budget_bytes: int = 16 * 2**20, tol: float | None = None) -> SparseCodes:
    """ORMP codes of every column: gram G = DᵀD [k, k], correlations Dᵀy [k, n] -> SparseCodes [n, s].

    dtype: float32 or float64 (default: the inputs' widest). chunk_size: columns per vmapped chunk (default:
    as many as fit ``memory_budget_bytes`` of per-column state Q [s, k]). tol: relative ν below which an atom
    counts as inside the selected span (default 100·eps of the dtype).
    """
    dtype = resolve_float_dtype(dtype, gram, correlations)
    check_finite("gram", gram)
    check_finite("correlations", correlations)
    gram, correlations = jnp.asarray(gram, dtype), jnp.asarray(correlations, dtype)
    k = gram.shape[0]
    if gram.shape != (k, k) or correlations.ndim != 2 or correlations.shape[0] != k:
        raise ValueError(f"gram must be [k, k] and correlations [k, n]; got {gram.shape} and {correlations.shape}")
    if not isinstance(sparsity, (int, np.integer)) or not 1 <= sparsity <= k:
        raise ValueError(f"sparsity s must be an int with 1 <= s <= k = {k}, got {sparsity!r}")
    n = correlations.shape[1]
    if chunk_size is None:
        per_column = (sparsity * k + 4 * k) * jnp.dtype(dtype).itemsize
        chunk_size = int(max(1, min(n, memory_budget_bytes // per_column)))
    tol = float(100 * np.finfo(dtype).eps) if tol is None else float(tol)
    idx, values, nnz = _batch(gram, correlations, int(sparsity), int(chunk_size), tol)
    return SparseCodes(idx, values, nnz, jnp.sum(nnz < sparsity).astype(jnp.int32))
