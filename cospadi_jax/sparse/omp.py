"""Batch-OMP (Rubinstein, Zibulevsky & Elad 2008) in JAX.

Sparse-codes every column y_j of a target Y [d, n] over a dictionary D [d, k]
with unit-norm atoms, using only the Gram GD = DᵀD [k, k] and the
correlations DᵀY [k, n]. The sparsity s is static; each column gets exactly s
non-zeros unless the next atom is numerically dependent on the selected ones,
in which case the column stops early with the *same rule as scikit-learn's
``_gram_omp``* (so that results are comparable with ``orthogonal_mp_gram``):

* the atom with the largest |alpha| is already active, or alpha[atom]² < eps;
* the new Cholesky pivot Lkk = GD[a, a] − ‖L⁻¹ GD[I, a]‖² is ≤ eps,

with eps the machine epsilon of the working dtype (sklearn uses the epsilon of
the Gram's dtype). A stopped column keeps its coefficients; nothing becomes NaN.

Formulation ("progressive Cholesky, B-form"). Per column we keep
    B = GD[:, I] L⁻ᵀ   [s, k] (row t = b_t, stored row-major for contiguous axpys)
    z = L⁻¹ α⁰_I       [s]
where L is the Cholesky factor of GD[I, I]. A new atom a gives
    w   = B[:, a]            (the new row of L, gathered, no triangular solve)
    Lkk = GD[a, a] − w·w
    b_t = (GD[a, :] − wᵀB) / √Lkk   (one GEMV of size t·k, the only O(t·k) work)
    z_t = (α⁰[a] − w·z) / √Lkk
    α  ← α − z_t · b_t      (rank-1, O(k))
and at the end γ = L⁻ᵀ z (one triangular solve per column). This is the same
FLOP count as Batch-OMP (≈ k·t per step) with no per-step triangular solves.
The s steps are split into static blocks so that step t only touches the first
⌈t/block⌉·block rows of B (about half the work of a fixed [s, k] GEMV).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "SparseCodes",
    "batch_omp",
    "check_inputs",
    "omp",
    "omp_chunk_size",
    "resolve_float_dtype",
]

# Working-memory budget of one OMP chunk (per-column state ≈ s·k values). 16 MiB keeps
# the chunk in a typical L3 cache: the B-form GEMV is bandwidth-bound (docs/benchmarks.md).
DEFAULT_MEMORY_BUDGET_BYTES = 16 * 1024 * 1024
# Steps per static block of the triangular schedule (see module docstring).
DEFAULT_STEP_BLOCK = 32


class SparseCodes(NamedTuple):
    """Column-sparse coefficients S [k, n] stored per column.

    indices: [n, s] int32, atom index of each slot. Slots at or beyond
        ``n_nonzero[j]`` hold index 0 and value 0 (harmless for gathers and
        scatter-adds).
    values: [n, s] coefficient of each slot (working dtype).
    n_nonzero: [n] int32, number of selected atoms per column (== s unless the
        column stopped early on a dependent atom).
    n_early_stopped: [] int32, number of columns with n_nonzero < s.
    """

    indices: jax.Array
    values: jax.Array
    n_nonzero: jax.Array
    n_early_stopped: jax.Array

    def to_dense(self, k: int) -> jax.Array:
        """Dense coefficient matrix S: [k, n] (column j has the codes of column j)."""
        n, s = self.indices.shape
        cols = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, s))
        dense = jnp.zeros((k, n), dtype=self.values.dtype)
        return dense.at[self.indices, cols].add(self.values)


def resolve_float_dtype(dtype, *arrays) -> jnp.dtype:
    """Working dtype: ``dtype`` if given, else the widest float dtype of ``arrays``.

    Only float32 and float64 are accepted (Cholesky / triangular solves are not
    provided for bf16/f16 and would be meaningless at that precision). float64
    requires ``jax.config.update("jax_enable_x64", True)``; on TPUs f64 is
    emulated and slow, use float32 there (see docs/benchmarks.md).
    """
    if dtype is None:
        kinds = [np.dtype(getattr(a, "dtype", np.float64)) for a in arrays]
        dtype = np.float64 if any(k == np.float64 for k in kinds) else np.float32
        if dtype == np.float64 and not jax.config.jax_enable_x64:
            dtype = np.float32  # inputs were f64 numpy but x64 is off: compute in f32
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:  # e.g. a non-dtype object
        raise TypeError(f"dtype={dtype!r} is not a NumPy/JAX dtype; use jnp.float32 or jnp.float64.") from exc
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(
            f"dtype {dtype} is not supported by the sparse engine: use float32 or float64 "
            "(bf16/f16 have no Cholesky/triangular solve and too little precision for OMP)."
        )
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        raise TypeError(
            "float64 was requested but JAX x64 is disabled, so JAX would silently compute in "
            'float32. Enable it with jax.config.update("jax_enable_x64", True) (or the env '
            "var JAX_ENABLE_X64=1) before creating arrays, or pass dtype=jnp.float32."
        )
    return dtype


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_finite(name: str, x) -> None:
    """Raise FloatingPointError if a concrete array holds NaN/Inf (no-op under jit)."""
    if _is_concrete(x) and not bool(np.all(np.isfinite(np.asarray(x)))):
        raise FloatingPointError(
            f"{name} contains NaN or Inf; the sparse engine needs finite inputs "
            "(check the Gram accumulation / whitening upstream)."
        )


def omp_chunk_size(k: int, sparsity: int, itemsize: int, memory_budget_bytes: int) -> int:
    """Columns per chunk so that the per-column OMP state fits the budget.

    Per column: B [s, k], L [s, s], alpha/alpha0/active [k], z/indices [s].
    """
    per_column = itemsize * (sparsity * k + sparsity * sparsity + 3 * k + 3 * sparsity)
    return int(max(1, min(4096, memory_budget_bytes // max(per_column, 1))))


class _ColumnState(NamedTuple):
    B: jax.Array  # [rows, k] rows b_t of GD[:, I] L⁻ᵀ (only the first n_active are non-zero)
    z: jax.Array  # [s] L⁻¹ α⁰_I
    alpha: jax.Array  # [k] current correlations DᵀR
    active: jax.Array  # [k] bool, atom already selected
    indices: jax.Array  # [s] int32
    n_active: jax.Array  # [] int32
    stopped: jax.Array  # [] bool


def _omp_step(t, state: _ColumnState, gram, alpha0, eps):
    """One greedy step for one column (vmapped over the chunk). ``t``: step index."""
    B, z, alpha, active, indices, n_active, stopped = state
    atom = jnp.argmax(jnp.abs(alpha)).astype(jnp.int32)
    alpha_atom = alpha[atom]
    w = B[:, atom]  # = L⁻¹ GD[I, atom] (the new row of L), zero beyond t
    pivot_sq = gram[atom, atom] - jnp.dot(w, w)
    # sklearn's stopping rule (see module docstring); a stopped column never changes again.
    stop = stopped | active[atom] | (alpha_atom * alpha_atom < eps) | (pivot_sq <= eps)
    keep = ~stop
    pivot = jnp.sqrt(jnp.where(stop, jnp.ones((), pivot_sq.dtype), pivot_sq))
    b_new = (gram[atom] - w @ B) / pivot  # [k]; the only O(t·k) operation
    z_new = (alpha0[atom] - jnp.dot(w, z[: w.shape[0]])) / pivot
    b_new = jnp.where(keep, b_new, 0)
    z_new = jnp.where(keep, z_new, 0)
    return _ColumnState(
        B=B.at[t].set(b_new),
        z=z.at[t].set(z_new),
        alpha=alpha - z_new * b_new,
        active=active.at[atom].set(active[atom] | keep),
        indices=indices.at[t].set(jnp.where(keep, atom, 0)),
        n_active=n_active + keep.astype(jnp.int32),
        stopped=stop,
    )


def _cholesky_from_b(B, indices, n_active):
    """L [s, s] from B: B[i, a_j] = L[j, i] (exactly, in exact arithmetic).

    Rows at or beyond n_active are set to the identity so that L⁻ᵀz stays finite.
    """
    s = indices.shape[0]
    L = B[:, indices].T  # [s, s]; L[j, i] = B[i, a_j]
    valid = jnp.arange(s) < n_active
    mask = jnp.tril(jnp.ones((s, s), bool)) & valid[:, None] & valid[None, :]
    return jnp.where(mask, L, jnp.eye(s, dtype=B.dtype))


@partial(jax.jit, static_argnames=("sparsity", "step_block"))
def _omp_chunk(gram, alpha0, eps, *, sparsity: int, step_block: int):
    """OMP for a chunk of columns. gram: [k, k]; alpha0: [m, k] (DᵀY, transposed).

    Returns indices [m, s] int32, values [m, s], n_active [m] int32.
    """
    m, k = alpha0.shape
    s = sparsity
    dtype = alpha0.dtype
    state = _ColumnState(B=jnp.zeros((m, 0, k), dtype), **fresh_columns(alpha0, s))
    step = jax.vmap(_omp_step, in_axes=(None, 0, None, 0, None))

    def grow(st: _ColumnState, start: int, end: int) -> _ColumnState:
        # A step in block [start, end) only reads rows [0, end) of B.
        return st._replace(B=jnp.concatenate([st.B, jnp.zeros((m, end - st.B.shape[1], k), dtype)], axis=1))

    state = run_blocks(state, s, step_block, grow, lambda t, st, start: step(t, st, gram, alpha0, eps))
    B = jnp.concatenate([state.B, jnp.zeros((m, s - state.B.shape[1], k), dtype)], axis=1)
    L = jax.vmap(_cholesky_from_b)(B, state.indices, state.n_active)
    # γ = L⁻ᵀ z; z = 0 beyond n_active, so γ = 0 there.
    gamma = lax.linalg.triangular_solve(L, state.z[..., None], left_side=True, lower=True, transpose_a=True)[..., 0]
    return state.indices, gamma, state.n_active


def batch_omp(
    gram: jax.Array,
    correlations: jax.Array,
    sparsity: int,
    *,
    dtype=None,
    chunk_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    step_block: int = DEFAULT_STEP_BLOCK,
    eps: float | None = None,
) -> SparseCodes:
    """Batch-OMP over all columns.

    Args:
        gram: GD = DᵀD, [k, k], for a dictionary with unit-norm atoms.
        correlations: DᵀY, [k, n].
        sparsity: s (static), 1 ≤ s ≤ k; non-zeros per column.
        dtype: working dtype (float32/float64); default: that of the inputs.
        chunk_size: columns per vmapped chunk; default from ``memory_budget_bytes``.
        memory_budget_bytes: bound on the per-chunk OMP state (≈ chunk·s·k·itemsize).
        step_block: steps per static block of the triangular schedule.
        eps: stopping threshold (default: machine epsilon of ``dtype``, as sklearn).

    Returns:
        SparseCodes with indices/values [n, s], n_nonzero [n], n_early_stopped [].
    """
    sparsity, dtype = check_inputs(sparsity, gram, correlations, dtype)
    k, n = correlations.shape
    if chunk_size is None:
        chunk_size = omp_chunk_size(k, sparsity, dtype.itemsize, memory_budget_bytes)
    chunk_size = check_schedule(chunk_size, step_block, n)
    return run_stepped(_omp_chunk, gram, correlations, sparsity, dtype, chunk_size, step_block, eps)


def check_inputs(sparsity, gram, correlations, dtype) -> tuple[int, np.dtype]:
    """(sparsity, working dtype) of a sparse coder's call on gram [k, k] and correlations [k, n], after every
    check of its inputs: shapes and sparsity, the dtype (:func:`resolve_float_dtype`), finite values."""
    sparsity = _check_sparsity(sparsity, gram, correlations)
    dtype = resolve_float_dtype(dtype, gram, correlations)
    check_finite("gram", gram)
    check_finite("correlations", correlations)
    return sparsity, dtype


def check_schedule(chunk_size, step_block, n: int) -> int:
    """The chunk size (columns per chunk, at most the n columns) of a stepped coder, after checking it and
    ``step_block`` (steps per static block)."""
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if int(step_block) < 1:
        raise ValueError(f"step_block must be >= 1, got {step_block}.")
    return int(min(chunk_size, max(n, 1)))


def run_stepped(code_chunk, gram, correlations, sparsity: int, dtype, chunk_size: int, step_block: int,
                eps: float | None) -> SparseCodes:
    """Code all columns with a stepped chunk coder, ``code_chunk(gram, alpha [chunk, k], eps, *, sparsity,
    step_block) -> (indices, values, n_nonzero)`` (:func:`_omp_chunk` and the GEMM form's), chunk by chunk
    (:func:`run_chunks`). eps: stopping threshold (None: machine epsilon of ``dtype``, as sklearn)."""
    eps_value = float(np.finfo(dtype).eps) if eps is None else float(eps)

    step_block = int(min(step_block, sparsity))
    eps_arr = jnp.asarray(eps_value, dtype)
    gram = jnp.asarray(gram, dtype)
    return run_chunks(lambda alpha: code_chunk(gram, alpha, eps_arr, sparsity=sparsity, step_block=step_block),
                      jnp.asarray(correlations, dtype).T, chunk_size, sparsity)


def fresh_columns(alpha0, sparsity: int) -> dict:
    """The state every stepped coder starts a chunk of columns with, alpha0 = (DᵀY)ᵀ [m, k]: z [m, s] = 0, the
    correlations α = α⁰, no atom active, slots (atom 0), none used, no column stopped."""
    m, k = alpha0.shape
    return dict(
        z=jnp.zeros((m, sparsity), alpha0.dtype),
        alpha=alpha0,
        active=jnp.zeros((m, k), bool),
        indices=jnp.zeros((m, sparsity), jnp.int32),
        n_active=jnp.zeros((m,), jnp.int32),
        stopped=jnp.zeros((m,), bool),
    )


def run_blocks(state, sparsity: int, step_block: int, grow, step):
    """The s steps of a chunk coder in static blocks [start, end) of ``step_block`` steps, each a
    ``lax.while_loop`` that exits as soon as every column of the chunk has stopped (``state.stopped``).

    ``grow(state, start, end)`` readies the state for a block (sizes its factor for e = end slots);
    ``step(t, state, start)`` is step t of the block starting at ``start``. Returns the final state.
    """
    for start in range(0, sparsity, step_block):
        end = min(sparsity, start + step_block)

        def cond(carry, end=end):
            t, st = carry
            return (t < end) & ~jnp.all(st.stopped)

        def body(carry, start=start):
            t, st = carry
            return t + 1, step(t, st, start)

        state = grow(state, start, end)
        _, state = lax.while_loop(cond, body, (jnp.int32(start), state))
    return state


def run_chunks(code_chunk, alpha0: jax.Array, chunk_size: int, sparsity: int) -> SparseCodes:
    """Code the columns chunk by chunk: alpha0 = (DᵀY)ᵀ [n, k] -> SparseCodes [n, s].

    ``code_chunk(alpha [chunk, k]) -> (indices [chunk, s], values [chunk, s], n_nonzero [chunk])``. The last
    chunk is padded with zero columns, which every coder stops at step 0 (α = 0), and cut off afterwards.
    """
    n, k = alpha0.shape
    n_chunks = max(1, math.ceil(n / chunk_size))
    padded = n_chunks * chunk_size
    if padded != n:
        alpha0 = jnp.concatenate([alpha0, jnp.zeros((padded - n, k), alpha0.dtype)], axis=0)
    parts = [code_chunk(alpha0[c * chunk_size : (c + 1) * chunk_size]) for c in range(n_chunks)]
    indices, values, n_nonzero = (jnp.concatenate([p[i] for p in parts])[:n] for i in range(3))
    return SparseCodes(indices, values, n_nonzero, jnp.sum(n_nonzero < sparsity).astype(jnp.int32))


def omp(
    dictionary: jax.Array,
    targets: jax.Array,
    sparsity: int,
    **kwargs,
) -> SparseCodes:
    """Convenience wrapper: OMP of targets Y [d, n] over dictionary D [d, k] (unit-norm atoms).

    Computes GD = DᵀD and DᵀY at HIGHEST precision, then calls :func:`batch_omp`.
    """
    if dictionary.ndim != 2 or targets.ndim != 2 or dictionary.shape[0] != targets.shape[0]:
        raise ValueError(
            f"dictionary [d, k] and targets [d, n] must share d; got {dictionary.shape} and {targets.shape}."
        )
    dtype = resolve_float_dtype(kwargs.pop("dtype", None), dictionary, targets)
    D = jnp.asarray(dictionary, dtype)
    Y = jnp.asarray(targets, dtype)
    hi = lax.Precision.HIGHEST
    return batch_omp(jnp.matmul(D.T, D, precision=hi), jnp.matmul(D.T, Y, precision=hi), sparsity, dtype=dtype, **kwargs)


def _check_sparsity(sparsity, gram, correlations) -> int:
    if not isinstance(sparsity, (int, np.integer)) or isinstance(sparsity, bool):
        raise TypeError(f"sparsity must be a Python int (static), got {type(sparsity).__name__}.")
    if np.ndim(gram) != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square [k, k] matrix DᵀD, got shape {np.shape(gram)}.")
    if np.ndim(correlations) != 2 or correlations.shape[0] != gram.shape[0]:
        raise ValueError(
            f"correlations must be DᵀY with shape [k, n] = [{gram.shape[0]}, n], got {np.shape(correlations)}; "
            "pass DᵀY (not YᵀD) and a Gram of the same dictionary."
        )
    k = gram.shape[0]
    if k < 1:
        raise ValueError("the dictionary has no atoms (k = 0); use k >= 1.")
    if sparsity < 1:
        raise ValueError(f"sparsity s must be >= 1, got {sparsity}.")
    if sparsity > k:
        raise ValueError(f"sparsity s = {sparsity} exceeds the number of atoms k = {k}; use s <= k.")
    return int(sparsity)
