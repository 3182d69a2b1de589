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

from .omp import SparseCodes, check_inputs, run_chunks

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


@partial(jax.jit, static_argnames=("s", "tol"))
def _ormp_chunk(gram, alpha, s, tol):
    return jax.vmap(lambda a: _ormp_column(gram, a, s, tol))(alpha)


def batch_ormp(gram, correlations, sparsity: int, *, dtype=None, chunk_size: int | None = None,
               memory_budget_bytes: int = 16 * 2**20, tol: float | None = None) -> SparseCodes:
    """ORMP codes of every column: gram G = DᵀD [k, k], correlations Dᵀy [k, n] -> SparseCodes [n, s].

    dtype: float32 or float64 (default: the inputs' widest). chunk_size: columns per vmapped chunk (default:
    as many as fit ``memory_budget_bytes`` of per-column state Q [s, k]). tol: relative ν below which an atom
    counts as inside the selected span (default 100·eps of the dtype).
    """
    sparsity, dtype = check_inputs(sparsity, gram, correlations, dtype)
    k, n = correlations.shape
    if chunk_size is None:
        per_column = (sparsity * k + 4 * k) * jnp.dtype(dtype).itemsize
        chunk_size = memory_budget_bytes // per_column
    chunk_size = int(max(1, min(chunk_size, max(n, 1))))
    tol = float(100 * np.finfo(dtype).eps) if tol is None else float(tol)
    gram = jnp.asarray(gram, dtype)
    return run_chunks(lambda alpha: _ormp_chunk(gram, alpha, sparsity, tol), jnp.asarray(correlations, dtype).T,
                      chunk_size, sparsity)
