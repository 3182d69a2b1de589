"""The device mesh and the sharding rules, multi-host start-up, and array placement.

* One mesh over all global devices (:func:`make_mesh`), axis ``"data"`` by default.
* The rules are a value, :class:`ShardingRules`: a frozen dataclass that maps *logical* axes (columns, batch,
  atoms, features, params) onto mesh axes, as jax-llm-examples' ``ShardingRules``. :data:`SHARDING_RULES` is the
  default layout; :func:`use_rules` swaps in another one for a scope (e.g. FSDP-style parameters). Changing the
  parallel layout means changing the rules only.
* :func:`logical_spec` / :func:`logical_sharding` turn logical axis names into a ``PartitionSpec`` /
  ``NamedSharding``, and refuse a spec that would put two dimensions of one array on the same mesh axis
  (collision check) or a rule that names a mesh axis the mesh lacks.
* :func:`initialize` wraps ``jax.distributed.initialize`` for multi-host runs (TPU pods, multi-node GPU) and
  multi-process runs on one CPU host (gloo collectives); :func:`is_primary` is process 0.
* :func:`place` puts host data on the mesh (padding one axis to the shard count); :func:`to_host` brings a
  sharded array back.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DEFAULT_MESH_AXIS", "SHARDING_RULES", "MeshAxes", "ShardingRules", "active_rules", "initialize",
           "is_primary", "logical_sharding", "logical_spec", "make_mesh", "n_shards", "place", "to_host",
           "use_rules"]

DEFAULT_MESH_AXIS = "data"

# What one logical axis maps to: a mesh axis, several mesh axes (the dimension split over their product), or None
# (replicated).
MeshAxes = str | tuple[str, ...] | None


def _flat(axes: MeshAxes) -> tuple[str, ...]:
    """The mesh axes of one rule as a tuple (a non-tuple value counts as one axis, for the type check)."""
    return () if axes is None else axes if isinstance(axes, tuple) else (axes,)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axes: the one place that decides the parallel layout.

    The defaults: columns of a target (OMP and K-SVD are column-parallel) and evaluation batches go over the data
    axis; atoms (k) and features (d) stay replicated because every column needs the whole dictionary and Gram.
    Model parameters during evaluation (``params``: the leading dimension of every parameter array) stay
    replicated: data-parallel evaluation; mapping it to a mesh axis shards them FSDP-style
    (cospadi_jax/eval/sharded.py). Frozen, hence hashable: a static jit argument or a cache key.
    """

    columns: MeshAxes = DEFAULT_MESH_AXIS
    batch: MeshAxes = DEFAULT_MESH_AXIS
    atoms: MeshAxes = None
    features: MeshAxes = None
    params: MeshAxes = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            axes = _flat(getattr(self, field.name))
            if not all(isinstance(a, str) and a for a in axes):
                raise TypeError(f"sharding rule {field.name}={getattr(self, field.name)!r}: expected a mesh axis "
                                "name, a tuple of them, or None.")
            if len(set(axes)) != len(axes):
                raise ValueError(f"sharding rule {field.name}={getattr(self, field.name)!r} repeats a mesh axis.")

    def __getitem__(self, logical_axis: str) -> MeshAxes:
        """The mesh axes of ``logical_axis`` (``rules["columns"]``, as the table was indexed before it was a
        value); a clear KeyError for an unknown name."""
        names = [f.name for f in dataclasses.fields(self)]
        if logical_axis not in names:
            raise KeyError(f"unknown logical axis {logical_axis!r}; known: {sorted(names)} "
                           "(add a field to ShardingRules).")
        return getattr(self, logical_axis)


SHARDING_RULES = ShardingRules()

# The rules in force; a context variable, not a mutable module global, so that use_rules() is scoped and a
# value once built (a cached jit, a scorer's shardings) keeps the rules it was built with.
_ACTIVE: contextvars.ContextVar[ShardingRules] = contextvars.ContextVar("sharding_rules", default=SHARDING_RULES)


def active_rules() -> ShardingRules:
    """The rules in force: :data:`SHARDING_RULES` unless inside :func:`use_rules`."""
    return _ACTIVE.get()


@contextmanager
def use_rules(rules: ShardingRules) -> Iterator[ShardingRules]:
    """Make ``rules`` the rules in force inside the ``with`` block, e.g. FSDP-style evaluation:
    ``with use_rules(dataclasses.replace(SHARDING_RULES, params="data")): windows_perplexity(..., mesh=mesh)``.

    Whatever reads the rules while the block runs (shardings, scorers, jitted sharded kernels) keeps them.
    """
    if not isinstance(rules, ShardingRules):
        raise TypeError(f"use_rules takes a ShardingRules, got {type(rules).__name__}.")
    token = _ACTIVE.set(rules)
    try:
        yield rules
    finally:
        _ACTIVE.reset(token)


def logical_spec(*logical_axes: str | None, rules: ShardingRules | None = None) -> P:
    """PartitionSpec for an array whose dimensions carry the given logical axis names (one per dimension).

    ``None`` in ``logical_axes`` means an unnamed, replicated dimension. ``rules``: default the rules in force
    (:func:`active_rules`). Raises ValueError when two dimensions would land on the same mesh axis (an array
    cannot be split twice over one axis), naming both logical axes and the mesh axis.
    """
    rules = active_rules() if rules is None else rules
    mesh_axes: list[MeshAxes] = []
    owner: dict[str, str] = {}  # mesh axis -> the logical axis that took it
    for name in logical_axes:
        axes = None if name is None else rules[name]
        for axis in _flat(axes):
            if axis in owner:
                raise ValueError(
                    f"logical axes {owner[axis]!r} and {name!r} both map to mesh axis {axis!r} in "
                    f"logical_spec{tuple(logical_axes)}; one array can be split over a mesh axis once: "
                    "map one of them elsewhere (or to None) in the ShardingRules."
                )
            owner[axis] = name
        mesh_axes.append(axes)
    return P(*mesh_axes)


def _check_mesh(mesh: Mesh, logical_axis: str, axes: MeshAxes) -> None:
    missing = [a for a in _flat(axes) if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"the sharding rules map logical axis {logical_axis!r} to mesh axis {missing[0]!r} but the mesh has "
            f"axes {mesh.axis_names}; build the mesh with make_mesh(axis_name={missing[0]!r}) or change the rules."
        )


def logical_sharding(mesh: Mesh, *logical_axes: str | None, rules: ShardingRules | None = None) -> NamedSharding:
    """NamedSharding on ``mesh`` for logical axes, e.g. ``logical_sharding(mesh, "features", "columns")``
    for a target Y [d, n] split by columns. Checks as :func:`logical_spec`, and that every mesh axis the rules
    name exists in ``mesh`` (ValueError naming the logical axis and the missing mesh axis)."""
    rules = active_rules() if rules is None else rules
    spec = logical_spec(*logical_axes, rules=rules)
    for name, axes in zip(logical_axes, spec, strict=True):
        _check_mesh(mesh, name, axes)
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
    # Connect the cross-process collectives now, while every process is in step (initialize returns together).
    # gloo connects lazily at the first collective and gives up after 30 s: a process that first spends longer
    # on its own work (the primary's fitting-time probe, say) would make that first collective fail.
    on_every_process(True)
    return True


def is_primary() -> bool:
    """True on process 0 (the one that writes reports, checkpoints, logs)."""
    return jax.process_index() == 0


def on_every_process(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (a collective in a multi-process run: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def to_host(x: jax.Array | np.ndarray) -> np.ndarray:
    """Full value of a (possibly multi-process sharded) array as NumPy, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_exact(x: np.ndarray) -> np.ndarray:
    """Every process's ``x`` (same shape and dtype on each) stacked in process order: [processes, *x.shape].

    Bit-exact for any dtype: the bytes travel as uint32 words, so float64 survives JAX's default float32
    canonicalization (``jax_enable_x64`` off). A collective in a multi-process run: every process must call it.
    """
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    words = np.frombuffer(x.tobytes() + b"\0" * (-x.nbytes % 4), np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words))
    return np.stack([np.frombuffer(row.tobytes()[: x.nbytes], x.dtype).reshape(x.shape) for row in gathered])


# --------------------------------------------------------------------------- placement


def n_shards(mesh: Mesh, logical_axis: str, rules: ShardingRules | None = None) -> int:
    """How many pieces ``logical_axis`` is split into on ``mesh`` (1 if replicated); ``rules``: default the rules
    in force. The same missing-mesh-axis check as :func:`logical_sharding`."""
    axes = (active_rules() if rules is None else rules)[logical_axis]
    _check_mesh(mesh, logical_axis, axes)
    return math.prod(mesh.shape[a] for a in _flat(axes))


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
