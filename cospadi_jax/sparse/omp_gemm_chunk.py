"""One chunk of Batch-OMP in GEMM form (:mod:`.omp_gemm`, whose docstring has the formulation, the two triangular
forms and the precision settings): the per-column step (atom, factor, γ), the growth of the factor between static
blocks of steps, and the jitted chunk with its one shared-Gram GEMM per step.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cospadi_jax.sparse.omp import fresh_columns, run_blocks

__all__ = ["GEMM_PRECISIONS"]


# Public precision name -> what the chunk's GEMM is given (see module docstring).
GEMM_PRECISIONS: dict[str, object] = {
    "highest": lax.Precision.HIGHEST,
    "tf32": lax.Precision.DEFAULT,
    "default": lax.Precision.DEFAULT,
    "bf16x3": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
}
TRIANGULAR_FORMS = ("solve", "inverse")
_HI = lax.Precision.HIGHEST


class _State(NamedTuple):
    # The per-column factor. "solve": L as one array [m, e, e] (lower; identity rows ≥ n_active).
    # "inverse": L⁻¹ as a tuple of block-rows, block i = rows [i·b, (i+1)·b) and columns [0, c_i) with
    # c_i = min(s, (i+1)·b), each [m, b_i, c_i] (zero rows ≥ n_active): only the lower block-triangle is
    # stored, read and allocated, and growing it appends a block instead of copying the factor.
    F: jax.Array | tuple[jax.Array, ...]
    z: jax.Array  # [m, s] L⁻¹ α⁰_I, zero beyond n_active
    gamma: jax.Array  # [m, s] coefficients of the slots ("inverse": progressive; "solve": unused zeros)
    alpha: jax.Array  # [m, k] current correlations α⁰ − X·GD
    active: jax.Array  # [m, k] bool, atom already selected
    indices: jax.Array  # [m, s] int32, atom of each slot (0 beyond n_active)
    n_active: jax.Array  # [m] int32
    stopped: jax.Array  # [m] bool


def _select(t, F, z, gamma, alpha, active, indices, n_active, stopped, gram, alpha0, eps, *, triangular: str,
            block_start: int):
    """Per-column part of step ``t`` (vmapped): pick the atom, extend the factor, return the slots' γ.

    ``block_start``: first step of the current static block (the "inverse" form writes its block-row).
    Returns (F, z, gamma, active, indices, n_active, stopped, gamma_e) with gamma_e [e] the coefficients
    of slots 0..e-1 after this step (zero beyond n_active), e = end of the current block.
    """
    e = F.shape[0] if triangular == "solve" else F[-1].shape[1]
    atom = jnp.argmax(jnp.abs(alpha)).astype(jnp.int32)
    alpha_atom = alpha[atom]
    slot = jnp.arange(e, dtype=jnp.int32)
    valid = slot < n_active  # slots holding a selected atom (== slot < t while the column runs)
    g = jnp.where(valid, gram[atom, indices[:e]], 0)  # GD[I, a], zero-padded to e
    if triangular == "solve":
        # L has identity rows beyond n_active, so w = g = 0 there.
        w = lax.linalg.triangular_solve(F, g[:, None], left_side=True, lower=True)[:, 0]
    else:
        # w = L⁻¹ g block-row by block-row (L⁻¹ has zero rows beyond n_active, so w = 0 there).
        w_blocks = [jnp.matmul(Fi, g[: Fi.shape[1]], precision=_HI) for Fi in F]
        w = jnp.concatenate(w_blocks)
    pivot_sq = gram[atom, atom] - jnp.dot(w, w, precision=_HI)
    # sklearn's stopping rule (module docstring); once stopped a column never changes again.
    stop = stopped | active[atom] | (alpha_atom * alpha_atom < eps) | (pivot_sq <= eps)
    keep = ~stop
    pivot = jnp.sqrt(jnp.where(stop, jnp.ones((), pivot_sq.dtype), pivot_sq))
    z_t = (alpha0[atom] - jnp.dot(w, z[:e], precision=_HI)) / pivot
    z_t = jnp.where(keep, z_t, 0)
    z = z.at[t].set(z_t)
    at_t = slot == t
    if triangular == "solve":
        row = jnp.where(at_t, pivot, w)  # [w_0..w_{t-1}, p, 0, ...]: the new row of L
        F = F.at[t].set(jnp.where(keep, row, F[t]))
        # γ = L⁻ᵀ z (sklearn's potrs second half); z = 0 and identity rows beyond n_active give γ = 0 there.
        gamma_e = lax.linalg.triangular_solve(F, z[:e, None], left_side=True, lower=True, transpose_a=True)[:, 0]
    else:
        # u = L⁻ᵀ w = GD[I, I]⁻¹ GD[I, a], from the same block-rows (zero beyond n_active).
        u = jnp.zeros((e,), w.dtype)
        for Fi, wi in zip(F, w_blocks):
            u = u.at[: Fi.shape[1]].add(jnp.matmul(wi, Fi, precision=_HI))
        row = jnp.where(keep, (at_t.astype(w.dtype) - u) / pivot, 0)  # new row of L⁻¹: [−uᵀ/p, 1/p, 0, ...]
        F = (*F[:-1], F[-1].at[t - block_start].set(row))
        # γ = L⁻ᵀ z = Σ_j z_j·(row j of L⁻¹): earlier rows of L⁻¹ never change, so γ is updated in place.
        gamma = gamma.at[:e].add(z_t * row)
        gamma_e = gamma[:e]
    return (
        F,
        z,
        gamma,
        active.at[atom].set(active[atom] | keep),
        indices.at[t].set(jnp.where(keep, atom, indices[t])),
        n_active + keep.astype(jnp.int32),
        stop,
        gamma_e,
    )


def _grow(F, m: int, start: int, end: int, triangular: str, dtype):
    """The factor for the block [start, end): L padded to [m, end, end] with identity rows ("solve"), or
    one more zero block-row [m, end − start, end] of L⁻¹ ("inverse")."""
    if triangular == "inverse":
        return (*F, jnp.zeros((m, end - start, end), dtype))
    e = F.shape[1]
    F = jnp.pad(F, ((0, 0), (0, end - e), (0, end - e)))
    return F + jnp.diag((jnp.arange(end) >= e).astype(dtype))[None]


@partial(jax.jit, static_argnames=("sparsity", "step_block", "precision", "triangular"))
def _gemm_chunk(gram, alpha0, eps, *, sparsity: int, step_block: int, precision: str, triangular: str):
    """GEMM-form OMP for one chunk. gram: [k, k]; alpha0: [m, k] (DᵀY transposed).

    Returns indices [m, s] int32, values [m, s], n_active [m] int32.
    """
    m, k = alpha0.shape
    s = sparsity
    dtype = alpha0.dtype
    # float64 always gets a full f64 product: the reduced-precision modes exist for f32 on accelerators.
    prec = GEMM_PRECISIONS[precision] if dtype == jnp.float32 else _HI
    rows = jnp.arange(m, dtype=jnp.int32)[:, None]

    def step(t, st: _State, block_start: int) -> _State:
        select = jax.vmap(partial(_select, triangular=triangular, block_start=block_start),
                          in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0, None, 0, None))
        F, z, gamma, active, indices, n_active, stopped, gamma_e = select(
            t, st.F, st.z, st.gamma, st.alpha, st.active, st.indices, st.n_active, st.stopped, gram, alpha0, eps
        )
        e = gamma_e.shape[1]
        # X: γ scattered densely; slots beyond n_active hold (atom 0, value 0), so add (not set) is exact.
        X = jnp.zeros((m, k), dtype).at[rows, indices[:, :e]].add(gamma_e)
        # The one shared-Gram GEMM of the step (GD is symmetric: X·GD = (GD·Xᵀ)ᵀ). A stopped column's X
        # is unchanged, so its α is recomputed to the same values and its (sticky) stop is unaffected.
        alpha = alpha0 - jnp.matmul(X, gram, precision=prec)
        return _State(F, z, gamma, alpha, active, indices, n_active, stopped)

    state = _State(F=() if triangular == "inverse" else jnp.zeros((m, 0, 0), dtype), gamma=jnp.zeros((m, s), dtype),
                   **fresh_columns(alpha0, s))
    # Static blocks of steps; each is a while_loop that exits as soon as every column has stopped.
    state = run_blocks(state, s, step_block,
                       lambda st, start, end: st._replace(F=_grow(st.F, m, start, end, triangular, dtype)), step)
    if triangular == "solve":
        # Final γ = L⁻ᵀ z (also for columns that stopped early: their L and z are frozen).
        F = _grow(state.F, m, state.F.shape[1], s, triangular, dtype)
        gamma = lax.linalg.triangular_solve(F, state.z[..., None], left_side=True, lower=True, transpose_a=True)[..., 0]
    else:
        gamma = state.gamma
    return state.indices, gamma, state.n_active
