"""Column parallelism inside one matrix: sharded Batch-OMP and K-SVD over a device mesh.

* :func:`sharded_batch_omp`: OMP is independent per column: ``shard_map`` over column blocks, Gram replicated,
  no communication but one ``psum`` of a counter.
* :func:`sharded_update_dictionary`: the K-SVD update needs reductions over columns: the jitted update under
  column shardings, GSPMD inserts the all-reduces. :func:`sharded_ksvd` alternates the two.

Results equal the single-device ones: the per-column OMP arithmetic is the same kernel, so supports are
identical and values agree to float roundoff. Layout: the sharding rules in force
(:func:`cospadi_jax.parallel.mesh.active_rules`, :data:`~cospadi_jax.parallel.mesh.SHARDING_RULES` by default), read
once per call and passed to the cached and jitted kernels as a key, so a kernel never runs under stale rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cospadi_jax.parallel.mesh import (ShardingRules, active_rules, logical_sharding, logical_spec, n_shards, place,
                                       to_host)
from cospadi_jax.sparse.ksvd import (KSVDResult, KSVDSteps, PhaseClock, alternate, check_ksvd_arguments,
                                     initial_dictionary, update_dictionary)
from cospadi_jax.sparse.omp import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    SparseCodes,
    _check_sparsity,
    batch_omp,
    check_finite,
    resolve_float_dtype,
)

__all__ = ["sharded_batch_omp", "sharded_ksvd", "sharded_update_dictionary"]


# --------------------------------------------------------------------------- column-parallel OMP


@partial(jax.jit, static_argnames=("mesh", "rules", "sparsity", "n", "chunk_size", "memory_budget_bytes",
                                   "step_block", "eps"))
def _sharded_omp_padded(gram, alpha, *, mesh, rules, sparsity, n, chunk_size, memory_budget_bytes, step_block, eps):
    """gram [k, k] replicated, alpha = DᵀY [k, n_pad] column-sharded -> padded SparseCodes parts."""
    col_axis = rules["columns"]
    n_local = alpha.shape[1] // n_shards(mesh, "columns", rules)

    def local(gram_l, alpha_l):
        # Same kernel as the single-device path: batch_omp is traceable (its checks are no-ops on tracers).
        codes = batch_omp(
            gram_l, alpha_l, sparsity, dtype=alpha_l.dtype, chunk_size=chunk_size,
            memory_budget_bytes=memory_budget_bytes, step_block=step_block, eps=eps,
        )
        # Padding columns are zero: they stop at step 0 and must not count as early-stopped.
        first = lax.axis_index(col_axis) * n_local
        valid = first + jnp.arange(n_local) < n
        early = jnp.sum((codes.n_nonzero < sparsity) & valid).astype(jnp.int32)
        return codes.indices, codes.values, codes.n_nonzero, lax.psum(early, col_axis)

    cols = logical_spec("columns", rules=rules)  # [n] dimension
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(logical_spec("atoms", "atoms", rules=rules), logical_spec("atoms", "columns", rules=rules)),
        out_specs=(P(cols[0], None), P(cols[0], None), cols, P()),
        # The kernel's while_loop carries start from fresh zeros (device-invariant) and become
        # per-device values; the varying-axis type check would reject that although it is correct.
        check_vma=False,
    )(gram, alpha)


def sharded_batch_omp(
    gram: jax.Array | np.ndarray,
    correlations: jax.Array | np.ndarray,
    sparsity: int,
    mesh: Mesh,
    *,
    dtype=None,
    chunk_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    step_block: int = 32,
    eps: float | None = None,
) -> SparseCodes:
    """Batch-OMP with the columns sharded over ``mesh`` (the ``columns`` sharding rule).

    Args:
        gram: GD = DᵀD [k, k] (replicated on every device).
        correlations: DᵀY [k, n]; n is zero-padded to a multiple of the device count and the
            padding stripped from the result. In a multi-process run pass the same host value
            on every process, or a global jax array.
        sparsity, dtype, chunk_size, memory_budget_bytes, step_block, eps: as :func:`batch_omp`;
            ``chunk_size`` / the budget apply per device.

    Returns:
        SparseCodes with indices/values [n, s] and n_nonzero [n] sharded by columns, and the
        global n_early_stopped [] (psum over devices). Use :func:`to_host` to gather.
    """
    sparsity = _check_sparsity(sparsity, gram, correlations)
    dtype = resolve_float_dtype(dtype, gram, correlations)
    if not isinstance(correlations, jax.Array) or correlations.is_fully_addressable:
        check_finite("gram", gram)
        check_finite("correlations", correlations)
    n = correlations.shape[1]
    if int(step_block) < 1:
        raise ValueError(f"step_block must be >= 1, got {step_block}.")
    rules = active_rules()
    n_dev = n_shards(mesh, "columns", rules)
    n_pad = max(1, math.ceil(n / n_dev)) * n_dev
    gram_g = place(gram, logical_sharding(mesh, "atoms", "atoms", rules=rules), dtype)
    alpha_g = place(correlations, logical_sharding(mesh, "atoms", "columns", rules=rules), dtype, pad_to=n_pad, axis=1)
    indices, values, n_nonzero, early = _sharded_omp_padded(
        gram_g, alpha_g, mesh=mesh, rules=rules, sparsity=sparsity, n=n,
        chunk_size=None if chunk_size is None else int(chunk_size),
        memory_budget_bytes=int(memory_budget_bytes), step_block=int(min(step_block, sparsity)),
        eps=float(np.finfo(dtype).eps) if eps is None else float(eps),
    )
    if n_pad != n:
        indices, values, n_nonzero = _strip(indices, values, n_nonzero, n=n)
    return SparseCodes(indices, values, n_nonzero, early)


@partial(jax.jit, static_argnames=("n",))
def _strip(*arrays, n: int):
    return tuple(a[:n] for a in arrays)


# --------------------------------------------------------------------------- column-parallel K-SVD


@lru_cache(maxsize=32)  # one jitted wrapper per mesh/rules/settings: no recompilation per call
def _update_fn(mesh: Mesh, rules: ShardingRules, dict_update: str, power_iterations: int, unused: str) -> Callable:
    """update_dictionary jitted with Y, S column-sharded and D replicated (GSPMD adds the all-reduces)."""
    y_sh = logical_sharding(mesh, "features", "columns", rules=rules)
    s_sh = logical_sharding(mesh, "atoms", "columns", rules=rules)
    d_sh = logical_sharding(mesh, "features", "atoms", rules=rules)
    rep = NamedSharding(mesh, P())

    def fn(Y, D, S):
        return update_dictionary(Y, D, S, dict_update=dict_update, power_iterations=power_iterations, unused=unused)

    return jax.jit(fn, in_shardings=(y_sh, d_sh, s_sh), out_shardings=(d_sh, s_sh, rep))


def sharded_update_dictionary(
    Y: jax.Array | np.ndarray,
    D: jax.Array | np.ndarray,
    S: jax.Array | np.ndarray,
    mesh: Mesh,
    *,
    dict_update: str = "power",
    power_iterations: int = 8,
    unused: str = "skip",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """K-SVD dictionary update with Y [d, n] and S [k, n] sharded by columns, D [d, k] replicated.

    The column count n must be a multiple of the device count (zero-pad Y and S: zero columns
    with zero codes do not change the update). Returns (D [d, k] replicated, S [k, n]
    column-sharded, n_unused []) equal to :func:`update_dictionary` up to float roundoff.
    """
    rules = active_rules()
    n_dev = n_shards(mesh, "columns", rules)
    if np.shape(Y)[1] % n_dev:
        raise ValueError(
            f"Y has n = {np.shape(Y)[1]} columns, not a multiple of the {n_dev} devices; zero-pad Y and S "
            "(zero columns with zero codes leave the update unchanged) or use sharded_ksvd, which pads."
        )
    dtype = resolve_float_dtype(None, Y, D, S)
    Yg = place(Y, logical_sharding(mesh, "features", "columns", rules=rules), dtype)
    Dg = place(D, logical_sharding(mesh, "features", "atoms", rules=rules), dtype)
    Sg = place(S, logical_sharding(mesh, "atoms", "columns", rules=rules), dtype)
    return _update_fn(mesh, rules, dict_update, int(power_iterations), unused)(Yg, Dg, Sg)


@lru_cache(maxsize=32)  # one jitted wrapper per mesh/rules: no recompilation per call
def _coding_fn(mesh: Mesh, rules: ShardingRules) -> Callable:
    """(D, Y) -> (Gram replicated, DᵀY column-sharded) at HIGHEST precision, like ksvd's ``code``."""
    hi = lax.Precision.HIGHEST

    def fn(D, Y):
        return jnp.matmul(D.T, D, precision=hi), jnp.matmul(D.T, Y, precision=hi)

    return jax.jit(
        fn,
        in_shardings=(logical_sharding(mesh, "features", "atoms", rules=rules),
                      logical_sharding(mesh, "features", "columns", rules=rules)),
        out_shardings=(logical_sharding(mesh, "atoms", "atoms", rules=rules),
                       logical_sharding(mesh, "atoms", "columns", rules=rules)),
    )


@lru_cache(maxsize=32)  # one jitted wrapper per mesh/rules/settings: no recompilation per call
def _dense_fn(mesh: Mesh, rules: ShardingRules, k: int) -> Callable:
    """Per-device scatter of SparseCodes into the dense S [k, n] block of its columns (no communication)."""

    def local(indices, values):
        return SparseCodes(indices, values, None, None).to_dense(k)

    return jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(logical_spec("columns", None, rules=rules),) * 2,
        out_specs=logical_spec("atoms", "columns", rules=rules),
        check_vma=False,
    ))


@lru_cache(maxsize=32)  # one jitted wrapper per mesh/settings: no recompilation per call
def _error_fn(mesh: Mesh) -> Callable:
    hi = lax.Precision.HIGHEST

    def fn(Y, D, S):
        return jnp.linalg.norm(Y - jnp.matmul(D, S, precision=hi)) / jnp.linalg.norm(Y)

    return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def sharded_ksvd(Y: jax.Array | np.ndarray, n_atoms: int, sparsity: int, ksvd_iterations: int, mesh: Mesh, *,
                 key: jax.Array | int = 0, dict_update: str = "power", power_iterations: int = 8, unused: str = "skip",
                 init: jax.Array | np.ndarray | None = None, dtype=None, omp_chunk_size: int | None = None,
                 omp_memory_mb: int | None = None, snapshots: Collection[int] = ()) -> KSVDResult:
    """:func:`~cospadi_jax.sparse.ksvd.ksvd` with the columns of Y [d, n] sharded over ``mesh``.

    The same loop (:func:`~cospadi_jax.sparse.ksvd.alternate`) with sharded steps: OMP per device
    (:func:`sharded_batch_omp`'s kernel), the dictionary update as :func:`sharded_update_dictionary`. Same
    arguments and result as ``ksvd`` (same seeded initial dictionary; ``omp_memory_mb`` None: the XLA Batch-OMP's
    default chunk memory); ``coefficients`` [k, n] and ``codes`` stay
    column-sharded, the dictionary [d, k] is replicated. n is zero-padded to a multiple of the device count
    internally (zero columns get zero codes and change neither D nor the objective).
    """
    check_ksvd_arguments(Y, n_atoms, sparsity, ksvd_iterations, dict_update, power_iterations, unused)
    dtype = resolve_float_dtype(dtype, Y)
    n, k = np.shape(Y)[1], int(n_atoms)
    # Initial dictionary exactly as ksvd (same key, unpadded Y), computed on the host value.
    D0 = initial_dictionary(to_host(Y), k, key, None if init is None else to_host(init), dtype)
    rules = active_rules()
    n_dev = n_shards(mesh, "columns", rules)
    n_pad = max(1, math.ceil(n / n_dev)) * n_dev
    Yg = place(Y, logical_sharding(mesh, "features", "columns", rules=rules), dtype, pad_to=n_pad, axis=1)
    D = place(to_host(D0), logical_sharding(mesh, "features", "atoms", rules=rules), dtype)
    coding, dense, error = _coding_fn(mesh, rules), _dense_fn(mesh, rules, k), _error_fn(mesh)
    update = _update_fn(mesh, rules, dict_update, int(power_iterations), unused)
    eps = float(np.finfo(dtype).eps)
    clock = PhaseClock("xla-sharded")
    memory_bytes = DEFAULT_MEMORY_BUDGET_BYTES if omp_memory_mb is None else int(omp_memory_mb) * 2**20

    def code(D):
        gram, alpha = coding(D, Yg)
        clock.lap("gemm", gram, alpha)
        idx, val, cnt, early = _sharded_omp_padded(
            gram, alpha, mesh=mesh, rules=rules, sparsity=int(sparsity), n=n, chunk_size=omp_chunk_size,
            memory_budget_bytes=memory_bytes, step_block=int(min(32, sparsity)), eps=eps,
        )
        clock.lap("omp", val)
        S = dense(idx, val)
        err = float(error(Yg, D, S))
        clock.lap("gemm")
        return SparseCodes(idx, val, cnt, early), S, err

    def update_step(D, S, codes):
        D, S, unused_count = update(Yg, D, S)
        clock.lap("update", D, S)
        err = float(error(Yg, D, S))
        clock.lap("gemm")
        return D, S, unused_count, err

    result = alternate(D, ksvd_iterations, KSVDSteps(code, update_step), clock=clock, snapshots=snapshots)
    if n_pad == n:
        return result

    def unpad(state):  # a result or a snapshot without the zero columns added for the shard count
        codes = state.codes
        return state._replace(coefficients=_strip(state.coefficients.T, n=n)[0].T, codes=SparseCodes(
            *_strip(codes.indices, codes.values, codes.n_nonzero, n=n), codes.n_early_stopped))

    return unpad(result)._replace(snapshots={t: unpad(snap) for t, snap in result.snapshots.items()})
