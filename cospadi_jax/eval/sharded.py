"""Data-parallel (sharded) evaluation over a device mesh, in one process or across processes.

A :class:`ShardedScorer` holds a model's parameters placed on a mesh by the ``params`` sharding rule
(replicated by default) and one jitted scoring function whose fixed-shape int32 inputs ids, mask [B, T] are
split over the ``"batch"`` logical axis (:func:`~cospadi_jax.parallel.logical_sharding`); every output
[B, ...] comes back to the host with :func:`~cospadi_jax.parallel.to_host`. B must be a multiple of the
number of batch shards (:meth:`ShardedScorer.round_batch`); callers fill the extra rows with padding they drop.

With a mesh over several processes (``jax.distributed``) every process must launch the same jitted computations
in the same order. Perplexity needs nothing more: every process builds the same windows and calls the scorer. lm-eval
runs on process 0 only (the *driver*), so the other processes (*followers*) mirror it, each message going
through ``multihost_utils.broadcast_one_to_all`` (a collective of all processes):

* driver, per batch: header int32 [3] = (SCORE, B, T), then (ids, mask) int32 [B, T], then the scorer;
* followers, in a loop (:meth:`ShardedScorer.follow`): receive the header, then the arrays, run the same
  scorer; a header (STOP, 0, 0) from :meth:`ShardedScorer.release_followers` ends the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental.multihost_utils import broadcast_one_to_all
from jax.sharding import Mesh, NamedSharding

from ..parallel.mesh import ShardingRules, active_rules, is_primary, logical_sharding, n_shards, place, to_host
from ..models.transformer import CausalLM

__all__ = ["ShardedScorer", "param_sharding"]

# Follower protocol: the first header field.
_STOP, _SCORE = 0, 1

ScoreFn = Callable[[CausalLM, jax.Array, jax.Array], Any]


def param_sharding(mesh: Mesh, shape: tuple[int, ...], rules: ShardingRules | None = None) -> NamedSharding:
    """Sharding of one parameter array of ``shape`` on ``mesh``: its leading dimension is the ``"params"`` logical
    axis.

    The rule ``params=None`` (the default, :data:`~cospadi_jax.parallel.mesh.SHARDING_RULES`) replicates every
    parameter; a mesh axis splits dimension 0 of each parameter over it (FSDP-style; GSPMD gathers the pieces where
    they are used). ``rules``: default the rules in force (:func:`~cospadi_jax.parallel.mesh.use_rules`).
    """
    rules = active_rules() if rules is None else rules
    if len(shape) == 0:
        return logical_sharding(mesh, rules=rules)
    n = n_shards(mesh, "params", rules)
    if shape[0] % n:
        raise ValueError(
            f"a parameter of shape {shape} cannot be split over {n} devices along dimension 0 "
            f"(sharding rule params={rules.params!r}); use rules with params=None to replicate parameters."
        )
    return logical_sharding(mesh, "params", *([None] * (len(shape) - 1)), rules=rules)


def _apply(fn: ScoreFn, graphdef: nnx.GraphDef, params: nnx.State, ids: jax.Array, mask: jax.Array) -> Any:
    return fn(nnx.merge(graphdef, params), ids, mask)


class ShardedScorer:
    """``fn(model, ids, mask)`` jitted over ``mesh`` with the batch split across devices.

    Args:
        fn: traceable scorer, (model, ids [B, T] int32, mask [B, T] int32) -> array or tuple of arrays, each
            [B, ...] (rows independent of each other, as every causal-LM scorer here).
        model: the model; its parameters are copied onto the mesh once, the model itself is left as it is.
        mesh: mesh whose ``batch`` rule axis splits the batch: over the local devices of one process, or over the
            devices of every process (:func:`~cospadi_jax.parallel.make_mesh`). The sharding rules in force when the
            scorer is built (:func:`~cospadi_jax.parallel.mesh.active_rules`) place batch and parameters.

    Attributes:
        params: the model's ``nnx.State`` placed by :func:`param_sharding`: a copy, the model keeps its own
            arrays (one extra copy of the weights on their device while the scorer lives).
        batch_sharding: ``logical_sharding(mesh, "batch", None)``, the sharding of ids and mask; the outputs are
            sharded over ``"batch"`` too.
        n_shards: number of pieces the batch is split into.
        spans_processes: the mesh holds devices of several processes: scoring is a collective of all of them.
    """

    def __init__(self, fn: ScoreFn, model: CausalLM, mesh: Mesh):
        processes = {d.process_index for d in mesh.devices.flat}
        if 1 < len(processes) < jax.process_count():
            # broadcast_one_to_all and process_allgather are collectives over every process.
            raise ValueError(
                f"the mesh holds devices of processes {sorted(processes)} out of {jax.process_count()}; use a mesh "
                "over all processes (cospadi_jax.parallel.make_mesh()) or over one process' local devices."
            )
        self.mesh = mesh
        self.spans_processes = len(processes) > 1
        rules = active_rules()  # read once: every sharding of this scorer follows the same rules
        self.n_shards = n_shards(mesh, "batch", rules)
        self.batch_sharding = logical_sharding(mesh, "batch", None, rules=rules)
        graphdef, state = nnx.split(model)
        shardings = jax.tree.map(lambda x: param_sharding(mesh, x.shape, rules), state)
        self.params = jax.tree.map(lambda x, s: place(x, s, x.dtype), state, shardings)
        # fn and the graph definition are static arguments of one module-level function, so a new scorer for the
        # same model structure and mesh (the next perplexity source) reuses the compiled executable.
        self._fn, self._graphdef = fn, graphdef
        self._jitted = jax.jit(
            _apply,
            static_argnums=(0, 1),
            in_shardings=(shardings, self.batch_sharding, self.batch_sharding),
            # A prefix for every output: dimension 0 over "batch", the rest replicated, whatever the rank.
            out_shardings=logical_sharding(mesh, "batch", rules=rules),
        )

    def lower(self, ids: jax.Array, mask: jax.Array) -> jax.stages.Lowered:
        """The scorer lowered for global arrays ids, mask [B, T] placed with ``batch_sharding`` (ahead-of-time
        compilation and inspection: ``.compile().input_shardings``, ``.compile().as_text()``)."""
        return self._jitted.lower(self._fn, self._graphdef, self.params, ids, mask)

    def round_batch(self, batch_size: int) -> int:
        """Smallest multiple of the batch shard count >= ``batch_size`` (the global batch the scorer takes)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return -(-batch_size // self.n_shards) * self.n_shards

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> Any:
        """Score one batch: ids, mask [B, T] host arrays (the same value on every process) -> host outputs.

        A collective when the mesh spans several processes: each of them must call it with the same batch.
        """
        if ids.shape != mask.shape or ids.ndim != 2:
            raise ValueError(f"ids and mask must both be [B, T], got {ids.shape} and {mask.shape}")
        if ids.shape[0] % self.n_shards:
            raise ValueError(
                f"batch of {ids.shape[0]} rows is not a multiple of the {self.n_shards} batch shards; "
                f"pad it to round_batch({ids.shape[0]}) = {self.round_batch(ids.shape[0])} rows."
            )
        out = self._jitted(
            self._fn, self._graphdef, self.params,
            place(ids, self.batch_sharding, np.int32), place(mask, self.batch_sharding, np.int32),
        )
        return jax.tree.map(to_host, out)

    # ------------------------------------------------------------------ driver / follower protocol
    def drive(self, ids: np.ndarray, mask: np.ndarray) -> Any:
        """Score a batch that only this process knows: with a mesh over several processes, process 0 sends it to
        the followers first (header, then arrays); otherwise this is just ``self(ids, mask)``."""
        if self.spans_processes:
            if not is_primary():
                raise RuntimeError("only process 0 drives the evaluation; the other processes call follow().")
            broadcast_one_to_all(np.asarray([_SCORE, *ids.shape], np.int32))
            broadcast_one_to_all((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
        return self(ids, mask)

    def follow(self) -> int:
        """On processes other than 0: score every batch process 0 drives until it releases the followers.

        Returns the number of batches served.
        """
        if not self.spans_processes or is_primary():
            raise RuntimeError(
                "follow() runs on processes other than 0, with a mesh over all processes; process 0 drives."
            )
        served = 0
        while True:
            op, rows, length = (int(v) for v in broadcast_one_to_all(np.zeros(3, np.int32)))
            if op == _STOP:
                return served
            if op != _SCORE:
                raise RuntimeError(f"follower got header op {op}; process 0 runs a different protocol version.")
            blank = np.zeros((rows, length), np.int32)
            ids, mask = broadcast_one_to_all((blank, blank))
            self(ids, mask)
            served += 1

    def release_followers(self) -> None:
        """Process 0 with a mesh over several processes: end the followers' loops (no-op anywhere else)."""
        if self.spans_processes and is_primary():
            broadcast_one_to_all(np.asarray([_STOP, 0, 0], np.int32))
