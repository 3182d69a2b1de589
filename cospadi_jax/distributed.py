"""Sharded compression across devices and hosts with JAX's own machinery.

* One mesh over all global devices (:func:`make_mesh`), axis ``"data"`` by default.
* One table, :data:`SHARDING_RULES`, maps *logical* axes (columns, matrices, batch,
  atoms, features) onto mesh axes; :func:`logical_sharding` turns logical axis names
  into a ``NamedSharding``. Changing the parallel layout means editing the table only.
* :func:`initialize` wraps ``jax.distributed.initialize`` for multi-host runs
  (TPU pods, multi-node GPU) and multi-process runs on one CPU host (gloo collectives).
* Column parallelism inside one matrix: :func:`sharded_batch_omp` (OMP is independent
  per column: ``shard_map`` over column blocks, Gram replicated, no communication but
  one ``psum`` of a counter) and :func:`sharded_update_dictionary` (the K-SVD update
  needs reductions over columns: the existing jitted update under column shardings, GSPMD
  inserts the all-reduces). :func:`sharded_ksvd` alternates the two.
* Matrix parallelism: :func:`assign_units` / :func:`map_units` spread independent fitting
  units (matrices or shared groups) round-robin over processes.

Results equal the single-device ones: the per-column OMP arithmetic is the same kernel,
so supports are identical and values agree to float roundoff.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from cospadi_jax.sparse.ksvd import KSVDResult, check_ksvd_arguments, init_dictionary, update_dictionary
from cospadi_jax.sparse.omp import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    SparseCodes,
    _check_sparsity,
    batch_omp,
    check_finite,
    resolve_float_dtype,
)

__all__ = [
    "DEFAULT_MESH_AXIS",
    "SHARDING_RULES",
    "assign_units",
    "initialize",
    "is_primary",
    "logical_sharding",
    "logical_spec",
    "make_mesh",
    "map_units",
    "sharded_batch_omp",
    "sharded_ksvd",
    "sharded_update_dictionary",
    "to_host",
]

DEFAULT_MESH_AXIS = "data"

# Logical axis -> mesh axis (None = replicated). The one place that decides the layout:
# columns of a target (OMP and K-SVD are column-parallel), independent matrices/groups and
# evaluation batches go over the data axis; atoms (k) and features (d) stay replicated
# because every column needs the whole dictionary and Gram. Model parameters during evaluation
# ("params": the leading dimension of every parameter array) stay replicated: data-parallel
# evaluation; mapping it to a mesh axis shards them FSDP-style (cospadi_jax/eval/sharded.py).
SHARDING_RULES: dict[str, str | None] = {
    "columns": DEFAULT_MESH_AXIS,
    "batch": DEFAULT_MESH_AXIS,
    "atoms": None,
    "features": None,
    "params": None,
}


def logical_spec(*logical_axes: str | None, rules: dict[str, str | None] | None = None) -> P:
    """PartitionSpec for an array whose dimensions carry the given logical axis names.

    ``None`` in ``logical_axes`` means an unnamed, replicated dimension.
    """
    rules = SHARDING_RULES if rules is None else rules
    mesh_axes = []
    for name in logical_axes:
        if name is None:
            mesh_axes.append(None)
            continue
        if name not in rules:
            raise KeyError(f"unknown logical axis {name!r}; known: {sorted(rules)} (add it to SHARDING_RULES).")
        mesh_axes.append(rules[name])
    return P(*mesh_axes)


def logical_sharding(mesh: Mesh, *logical_axes: str | None, rules: dict[str, str | None] | None = None) -> NamedSharding:
    """NamedSharding on ``mesh`` for logical axes, e.g. ``logical_sharding(mesh, "features", "columns")``
    for a target Y [d, n] split by columns."""
    spec = logical_spec(*logical_axes, rules=rules)
    for axis in spec:
        if axis is not None and axis not in mesh.axis_names:
            raise ValueError(
                f"SHARDING_RULES maps to mesh axis {axis!r} but the mesh has axes {mesh.axis_names}; "
                f"build the mesh with make_mesh(axis_name={axis!r}) or edit the rules."
            )
    return NamedSharding(mesh, spec)


def make_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DEFAULT_MESH_AXIS) -> Mesh:
    """1-D mesh over ``devices`` (default: all global devices of all processes, ``jax.devices()``)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh got an empty device list.")
    return Mesh(np.asarray(devices, dtype=object), (axis_name,))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    *,
    auto_detect: bool = False,
    initialization_timeout: int = 300,
) -> bool:
    """Start ``jax.distributed`` when a multi-process run is requested; no-op otherwise.

    A multi-process run is requested by explicit arguments, by the env vars
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, by a
    multi-task SLURM / Open MPI launch, or by ``auto_detect=True`` (TPU pods: JAX finds the
    coordinator itself). Must run before any JAX computation. On CPU the cross-process
    collectives are gloo (``jax_cpu_collectives_implementation``), set here explicitly.

    Returns True if ``jax.distributed`` is (now) initialized.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    launcher_tasks = max(_env_int("SLURM_NTASKS") or 1, _env_int("OMPI_COMM_WORLD_SIZE") or 1)
    requested = (
        auto_detect
        or coordinator_address is not None
        or (num_processes is not None and num_processes > 1)
        or launcher_tasks > 1
    )
    if not requested or num_processes == 1:
        return False
    # Without this, XLA:CPU has no cross-process collectives and any computation over the global
    # mesh fails. gloo is the default in jax 0.10 but set it so a user config cannot silently drop it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=initialization_timeout,
        )
    except RuntimeError as exc:
        if "before any JAX" in str(exc) or "backend" in str(exc).lower():
            raise RuntimeError(
                "jax.distributed could not start because JAX computations already ran in this process; "
                "call cospadi_jax.distributed.initialize() first thing in the program."
            ) from exc
        raise
    return True


def is_primary() -> bool:
    """True on process 0 (the one that writes reports, checkpoints, logs)."""
    return jax.process_index() == 0


def to_host(x: jax.Array | np.ndarray) -> np.ndarray:
    """Full value of a (possibly multi-process sharded) array as NumPy, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# --------------------------------------------------------------------------- placement


def _n_shards(mesh: Mesh, logical_axis: str) -> int:
    axis = SHARDING_RULES[logical_axis]
    return 1 if axis is None else mesh.shape[axis]


def _place(x, sharding: NamedSharding, dtype, pad_to: int | None = None, axis: int = -1) -> jax.Array:
    """Put ``x`` on the mesh with ``sharding``, zero-padding dimension ``axis`` to ``pad_to``.

    Host data (NumPy, or a process-local jax array in a multi-process run) must hold the same
    full value on every process: each process keeps only its own shards. A global jax array
    that is already distributed is padded and resharded by XLA.
    """
    axis = axis % np.ndim(x)
    widths = [(0, 0)] * np.ndim(x)
    if pad_to is not None:
        widths[axis] = (0, pad_to - np.shape(x)[axis])
    if isinstance(x, jax.Array) and (x.is_fully_addressable and jax.process_count() == 1 or not x.is_fully_addressable):
        if not x.is_fully_addressable and pad_to is not None and pad_to != x.shape[axis]:
            raise ValueError(
                f"a multi-process array with {x.shape[axis]} columns must already be padded to a multiple of the "
                f"device count ({pad_to}); pad it before distributing, or pass the host (NumPy) value."
            )
        x = jnp.asarray(x, dtype)
        if pad_to is not None and pad_to != x.shape[axis]:
            x = jnp.pad(x, widths)
        return jax.device_put(x, sharding)
    host = np.asarray(x).astype(dtype, copy=False)
    if pad_to is not None and pad_to != host.shape[axis]:
        host = np.pad(host, widths)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# --------------------------------------------------------------------------- column-parallel OMP


@partial(jax.jit, static_argnames=("mesh", "sparsity", "n", "chunk_size", "memory_budget_bytes", "step_block", "eps"))
def _sharded_omp_padded(gram, alpha, *, mesh, sparsity, n, chunk_size, memory_budget_bytes, step_block, eps):
    """gram [k, k] replicated, alpha = DᵀY [k, n_pad] column-sharded -> padded SparseCodes parts."""
    col_axis = SHARDING_RULES["columns"]
    n_local = alpha.shape[1] // mesh.shape[col_axis]

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

    cols = logical_spec("columns")  # [n] dimension
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(logical_spec("atoms", "atoms"), logical_spec("atoms", "columns")),
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
    """Batch-OMP with the columns sharded over ``mesh`` (``SHARDING_RULES["columns"]``).

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
    n_dev = _n_shards(mesh, "columns")
    n_pad = max(1, math.ceil(n / n_dev)) * n_dev
    gram_g = _place(gram, logical_sharding(mesh, "atoms", "atoms"), dtype)
    alpha_g = _place(correlations, logical_sharding(mesh, "atoms", "columns"), dtype, pad_to=n_pad, axis=1)
    indices, values, n_nonzero, early = _sharded_omp_padded(
        gram_g, alpha_g, mesh=mesh, sparsity=sparsity, n=n,
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


@lru_cache(maxsize=32)  # one jitted wrapper per mesh/settings: no recompilation per call
def _update_fn(mesh: Mesh, method: str, power_iterations: int, unused: str) -> Callable:
    """update_dictionary jitted with Y, S column-sharded and D replicated (GSPMD adds the all-reduces)."""
    y_sh = logical_sharding(mesh, "features", "columns")
    s_sh = logical_sharding(mesh, "atoms", "columns")
    d_sh = logical_sharding(mesh, "features", "atoms")
    rep = NamedSharding(mesh, P())

    def fn(Y, D, S):
        return update_dictionary(Y, D, S, method=method, power_iterations=power_iterations, unused=unused)

    return jax.jit(fn, in_shardings=(y_sh, d_sh, s_sh), out_shardings=(d_sh, s_sh, rep))


def sharded_update_dictionary(
    Y: jax.Array | np.ndarray,
    D: jax.Array | np.ndarray,
    S: jax.Array | np.ndarray,
    mesh: Mesh,
    *,
    method: str = "power",
    power_iterations: int = 8,
    unused: str = "skip",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """K-SVD dictionary update with Y [d, n] and S [k, n] sharded by columns, D [d, k] replicated.

    The column count n must be a multiple of the device count (zero-pad Y and S: zero columns
    with zero codes do not change the update). Returns (D [d, k] replicated, S [k, n]
    column-sharded, n_unused []) equal to :func:`update_dictionary` up to float roundoff.
    """
    n_dev = _n_shards(mesh, "columns")
    if np.shape(Y)[1] % n_dev:
        raise ValueError(
            f"Y has n = {np.shape(Y)[1]} columns, not a multiple of the {n_dev} devices; zero-pad Y and S "
            "(zero columns with zero codes leave the update unchanged) or use sharded_ksvd, which pads."
        )
    dtype = resolve_float_dtype(None, Y, D, S)
    Yg = _place(Y, logical_sharding(mesh, "features", "columns"), dtype)
    Dg = _place(D, logical_sharding(mesh, "features", "atoms"), dtype)
    Sg = _place(S, logical_sharding(mesh, "atoms", "columns"), dtype)
    return _update_fn(mesh, method, int(power_iterations), unused)(Yg, Dg, Sg)


@lru_cache(maxsize=32)  # one jitted wrapper per mesh/settings: no recompilation per call
def _coding_fn(mesh: Mesh) -> Callable:
    """(D, Y) -> (Gram replicated, DᵀY column-sharded) at HIGHEST precision, like ksvd's ``code``."""
    hi = lax.Precision.HIGHEST

    def fn(D, Y):
        return jnp.matmul(D.T, D, precision=hi), jnp.matmul(D.T, Y, precision=hi)

    return jax.jit(
        fn,
        in_shardings=(logical_sharding(mesh, "features", "atoms"), logical_sharding(mesh, "features", "columns")),
        out_shardings=(logical_sharding(mesh, "atoms", "atoms"), logical_sharding(mesh, "atoms", "columns")),
    )


@lru_cache(maxsize=32)  # one jitted wrapper per mesh/settings: no recompilation per call
def _dense_fn(mesh: Mesh, k: int) -> Callable:
    """Per-device scatter of SparseCodes into the dense S [k, n] block of its columns (no communication)."""

    def local(indices, values):
        return SparseCodes(indices, values, None, None).to_dense(k)

    return jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(logical_spec("columns", None),) * 2, out_specs=logical_spec("atoms", "columns"),
        check_vma=False,
    ))


@lru_cache(maxsize=32)  # one jitted wrapper per mesh/settings: no recompilation per call
def _error_fn(mesh: Mesh) -> Callable:
    hi = lax.Precision.HIGHEST

    def fn(Y, D, S):
        return jnp.linalg.norm(Y - jnp.matmul(D, S, precision=hi)) / jnp.linalg.norm(Y)

    return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def sharded_ksvd(
    Y: jax.Array | np.ndarray,
    n_atoms: int,
    sparsity: int,
    n_iterations: int,
    mesh: Mesh,
    *,
    key: jax.Array | int = 0,
    method: str = "power",
    power_iterations: int = 8,
    unused: str = "skip",
    init: jax.Array | np.ndarray | None = None,
    dtype=None,
    omp_chunk_size: int | None = None,
    omp_memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> KSVDResult:
    """:func:`~cospadi_jax.sparse.ksvd.ksvd` with the columns of Y [d, n] sharded over ``mesh``.

    OMP runs per device (:func:`sharded_batch_omp`'s kernel), the dictionary update as
    :func:`sharded_update_dictionary`. Same arguments and result as ``ksvd`` (same seeded
    initial dictionary); ``coefficients`` [k, n] and ``codes`` stay column-sharded, the
    dictionary [d, k] is replicated. n is zero-padded to a multiple of the device count
    internally (zero columns get zero codes and change neither D nor the objective).
    """
    check_ksvd_arguments(Y, n_atoms, sparsity, n_iterations, method, power_iterations, unused)
    dtype = resolve_float_dtype(dtype, Y)
    d, n = np.shape(Y)
    k = int(n_atoms)
    # Initial dictionary exactly as ksvd (same key, unpadded Y), computed on the host value.
    if init is None:
        if isinstance(key, (int, np.integer)):
            key = jax.random.key(int(key))
        D0 = init_dictionary(jnp.asarray(to_host(Y), dtype), k, key)
    else:
        if np.shape(init) != (d, k):
            raise ValueError(f"init must be [d, k] = [{d}, {k}], got {np.shape(init)}.")
        D0 = jnp.asarray(to_host(init), dtype)
        D0 = D0 / jnp.linalg.norm(D0, axis=0)
    n_dev = _n_shards(mesh, "columns")
    n_pad = max(1, math.ceil(n / n_dev)) * n_dev
    Yg = _place(Y, logical_sharding(mesh, "features", "columns"), dtype, pad_to=n_pad, axis=1)
    D = _place(to_host(D0), logical_sharding(mesh, "features", "atoms"), dtype)
    coding, dense, error = _coding_fn(mesh), _dense_fn(mesh, k), _error_fn(mesh)
    update = _update_fn(mesh, method, int(power_iterations), unused)
    eps = float(np.finfo(dtype).eps)

    objective, after_coding, n_unused, n_early = [], [], [], []
    codes = S = None
    for t in range(max(int(n_iterations), 1)):
        gram, alpha = coding(D, Yg)
        idx, val, cnt, early = _sharded_omp_padded(
            gram, alpha, mesh=mesh, sparsity=int(sparsity), n=n, chunk_size=omp_chunk_size,
            memory_budget_bytes=int(omp_memory_budget_bytes), step_block=int(min(32, sparsity)), eps=eps,
        )
        codes = SparseCodes(idx, val, cnt, early)
        S = dense(idx, val)
        err = float(error(Yg, D, S))
        if t == 0:
            objective.append(err)
        if n_iterations == 0:
            break
        after_coding.append(err)
        n_early.append(int(early))
        D, S, unused_count = update(Yg, D, S)
        n_unused.append(int(unused_count))
        objective.append(float(error(Yg, D, S)))
    if n_pad != n:
        S = _strip(S.T, n=n)[0].T
        codes = SparseCodes(*_strip(codes.indices, codes.values, codes.n_nonzero, n=n), codes.n_early_stopped)
    return KSVDResult(
        dictionary=D,
        coefficients=S,
        codes=codes,
        objective=np.asarray(objective),
        objective_after_coding=np.asarray(after_coding),
        n_unused_atoms=np.asarray(n_unused, dtype=np.int32),
        n_early_stopped=np.asarray(n_early, dtype=np.int32),
    )


# --------------------------------------------------------------------------- matrix-parallel units


def assign_units(n_units: int, rank: int | None = None, world: int | None = None) -> list[int]:
    """Indices of the fitting units this rank owns: ``i % world == rank`` (round-robin).

    Defaults: ``rank = jax.process_index()``, ``world = jax.process_count()``. Every unit keeps
    its global index, so its key ``fold_in(key, i)`` and result are those of a sequential run.
    """
    rank = jax.process_index() if rank is None else int(rank)
    world = jax.process_count() if world is None else int(world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}.")
    return [i for i in range(int(n_units)) if i % world == rank]


def map_units(
    fit: Callable[[int, Any], Any],
    units: Sequence[Any],
    *,
    rank: int | None = None,
    world: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    skip: Collection[int] = (),
    progress: bool = False,
    concurrent: bool | None = None,
) -> dict[int, Any]:
    """Fit this rank's share of independent ``units``; returns {unit index: fit(index, unit)}.

    The rank owns units ``i % world == rank`` (:func:`assign_units`), minus ``skip`` (e.g. units a killed run
    already finished). Unit j of the rank runs on ``devices[j % len(devices)]`` (default: this process's local
    devices) under ``jax.default_device``. With ``concurrent`` there is one worker thread per device, so
    independent matrices of different shapes run side by side (XLA releases the GIL while it computes). The
    default is concurrent except on CPU: XLA:CPU devices share one intra-op thread pool (no gain), and in jax
    0.10.2 concurrent batched triangular solves can exhaust that pool and deadlock (docs/distributed.md). Every
    unit keeps its global index, so its key and result are those of a sequential run. Merge the dicts of all
    ranks (e.g. through the artifact directory, as :func:`cospadi_jax.compress.compress` does) to get the
    sequential result.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    if concurrent is None:
        concurrent = devices[0].platform != "cpu"
    todo = [i for i in assign_units(len(units), rank, world) if i not in set(skip)]
    results: dict[int, Any] = {}
    bar = tqdm(total=len(todo), desc=f"units of process {jax.process_index()} on {len(devices)} devices",
               unit="unit", disable=not progress)

    def worker(slot: int) -> None:
        with jax.default_device(devices[slot]):
            for i in todo[slot :: len(devices)]:
                results[i] = fit(i, units[i])
                bar.update()

    slots = range(min(len(devices), len(todo)))
    if concurrent:
        with ThreadPoolExecutor(max_workers=max(1, len(slots))) as pool:
            for future in [pool.submit(worker, slot) for slot in slots]:
                future.result()  # re-raise a worker's error here
    else:
        for slot in slots:
            worker(slot)
    bar.close()
    return results
