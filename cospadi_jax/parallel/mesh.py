"""The device mesh and the one table of sharding rules, multi-host start-up, and array placement.

* One mesh over all global devices (:func:`make_mesh`), axis ``"data"`` by default.
* One table, :data:`SHARDING_RULES`, maps *logical* axes (columns, batch, atoms, features, params) onto mesh
  axes; :func:`logical_sharding` turns logical axis names into a ``NamedSharding``. Changing the parallel layout
  means editing the table only.
* :func:`initialize` wraps ``jax.distributed.initialize`` for multi-host runs (TPU pods, multi-node GPU) and
  multi-process runs on one CPU host (gloo collectives); :func:`is_primary` is process 0.
* :func:`place` puts host data on the mesh (padding one axis to the shard count); :func:`to_host` brings a
  sharded array back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DEFAULT_MESH_AXIS", "SHARDING_RULES", "initialize", "is_primary", "logical_sharding", "logical_spec",
           "make_mesh", "n_shards", "place", "to_host"]

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
                "call cospadi_jax.parallel.initialize() first thing in the program."
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


def n_shards(mesh: Mesh, logical_axis: str) -> int:
    axis = SHARDING_RULES[logical_axis]
    return 1 if axis is None else mesh.shape[axis]


def place(x, sharding: NamedSharding, dtype, pad_to: int | None = None, axis: int = -1) -> jax.Array:
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
