"""Scale-out: the device mesh and its sharding rules (:mod:`.mesh`) and matrix-parallel units (:mod:`.units`).
Column-parallel OMP / K-SVD inside one matrix is in :mod:`cospadi_jax.sparse.sharded`."""

from cospadi_jax.parallel.mesh import (
    DEFAULT_MESH_AXIS,
    SHARDING_RULES,
    ShardingRules,
    active_rules,
    gather_exact,
    initialize,
    is_primary,
    logical_sharding,
    logical_spec,
    make_mesh,
    on_every_process,
    to_host,
    use_rules,
)
from cospadi_jax.parallel.units import assign_units, map_units

__all__ = ["DEFAULT_MESH_AXIS", "SHARDING_RULES", "ShardingRules", "active_rules", "assign_units", "gather_exact",
           "initialize", "is_primary", "logical_sharding", "logical_spec", "make_mesh", "map_units", "on_every_process",
           "to_host", "use_rules"]
