"""Matrix parallelism: independent fitting units (matrices or shared groups) spread over processes and devices.

:func:`assign_units` gives each process its round-robin share; :func:`map_units` fits it, one worker per local
device. Every unit keeps its global index, so its key and result are those of a sequential run.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
from tqdm.auto import tqdm

__all__ = ["assign_units", "map_units"]


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
