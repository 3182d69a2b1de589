"""The K-SVD loop shared by every engine (:func:`alternate` over :class:`KSVDSteps`), its result and the clock that
times its phases: :func:`~cospadi_jax.sparse.ksvd.ksvd`, the fused host path (:mod:`.ksvd_host`) and
:func:`~cospadi_jax.sparse.sharded.sharded_ksvd` differ only in the steps they hand it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import NamedTuple

import jax
import numpy as np

from cospadi_jax.sparse.omp import SparseCodes

__all__ = ["KSVDResult", "KSVDSnapshot", "KSVDSteps", "PhaseClock", "alternate", "check_snapshots"]


class KSVDResult(NamedTuple):
    """Result of :func:`ksvd`.

    dictionary: [d, k] unit-norm atoms (whitened space if Y was whitened).
    coefficients: [k, n] dense S after the last dictionary update (≤ s non-zeros per column).
    codes: SparseCodes of the last OMP pass (supports of ``coefficients``; its values
        are the OMP values before the last update, use ``coefficients`` for D·S).
    objective: [T+1] ‖Y − D S‖_F / ‖Y‖_F; [0] after the first OMP on the initial
        dictionary, [t] after the dictionary update of iteration t.
    objective_after_coding: [T] the same error right after the OMP of iteration t.
    n_unused_atoms: [T] int, atoms with no column in iteration t (skipped or re-seeded).
    n_early_stopped: [T] int, OMP columns that stopped before s non-zeros.
    seconds: wall time per phase over all iterations: "omp", "update", "gemm" (DᵀD, DᵀY, the residual and
        the objectives) and "backend" (the resolved ``omp_backend``, a string).
    snapshots: {t: KSVDSnapshot} for every t of ``alternate``'s ``snapshots``: the result a run with
        ``ksvd_iterations = t`` returns, bit for bit (empty when none was asked for).
    """

    dictionary: jax.Array
    coefficients: jax.Array
    codes: SparseCodes
    objective: np.ndarray
    objective_after_coding: np.ndarray
    n_unused_atoms: np.ndarray
    n_early_stopped: np.ndarray
    seconds: dict | None = None
    snapshots: dict | None = None


class KSVDSnapshot(NamedTuple):
    """The state after iteration t (t = 0: the initial dictionary and its first coding), copied.

    dictionary [d, k], coefficients [k, n] and codes as in :class:`KSVDResult` (NumPy or JAX, as the engine holds them); objective [t+1] its prefix;
    n_unused_atoms [t]; seconds: the phase clock at that point (what a run stopped at t would have spent).
    """

    dictionary: jax.Array | np.ndarray
    coefficients: jax.Array | np.ndarray
    codes: SparseCodes
    objective: np.ndarray
    n_unused_atoms: np.ndarray
    seconds: dict | None


def check_snapshots(snapshots: Collection[int], ksvd_iterations: int) -> tuple[int, ...]:
    """``snapshots`` as a sorted tuple, after checking each is an iteration count in [0, ksvd_iterations)."""
    out = tuple(sorted(int(t) for t in snapshots))
    bad = [t for t in snapshots if isinstance(t, bool) or not isinstance(t, (int, np.integer))
           or not 0 <= t < ksvd_iterations]
    if bad or len(set(out)) != len(out):
        raise ValueError(f"ksvd_snapshots must be distinct iteration counts in [0, ksvd_iterations = "
                         f"{ksvd_iterations}) (the last iteration is the run's own result), got {list(snapshots)}")
    return out


class KSVDSteps(NamedTuple):
    """The two halves of one K-SVD iteration on a fixed target Y, as closures (how and where they run is theirs).

    code(D) -> (codes, S, error): the sparse codes of Y on D [d, k], their dense S [k, n] and ‖Y − DS‖/‖Y‖.
    update(D, S, codes) -> (D, S, n_unused, error): the dictionary update with the supports of S fixed.
    """

    code: Callable
    update: Callable


def alternate(D: jax.Array, ksvd_iterations: int, steps: KSVDSteps, *, clock: "PhaseClock | None" = None,
              progress: bool = False, desc: str = "K-SVD", snapshots: Collection[int] = ()) -> KSVDResult:
    """The K-SVD loop, shared by every engine: T alternations of ``steps.code`` and ``steps.update`` from D.

    T = 0 is the initial dictionary and one coding pass. The result's ``seconds`` are ``clock``'s, if given.
    ``snapshots``: iteration counts t < T whose state is also kept (``KSVDResult.snapshots``). A run with
    ``ksvd_iterations = t`` executes exactly the first t iterations of this one, so each snapshot *is* that run's
    result, at no extra compute: one run gives the whole accuracy-versus-T curve (paper Fig. 4).
    """
    keep = set(check_snapshots(snapshots, ksvd_iterations))
    kept: dict[int, KSVDSnapshot] = {}

    def snapshot(t: int) -> None:
        # Copies where they live (host or devices, sharding kept): the fused host engine updates D and S in place.
        kept[t] = KSVDSnapshot(D.copy(), S.copy(), SparseCodes(*(a.copy() for a in codes)), np.asarray(objective),
                               np.asarray(n_unused, dtype=np.int32), dict(clock.seconds) if clock else None)

    iterator = range(max(int(ksvd_iterations), 1))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, unit="it")
    objective, after_coding, n_unused, n_early = [], [], [], []
    codes = S = None
    for t in iterator:
        codes, S, err = steps.code(D)
        if t == 0:
            objective.append(err)
            if 0 in keep:
                snapshot(0)
        if ksvd_iterations == 0:
            break
        after_coding.append(err)
        n_early.append(int(codes.n_early_stopped))
        D, S, unused_count, err = steps.update(D, S, codes)
        n_unused.append(int(unused_count))
        objective.append(err)
        if t + 1 in keep:
            snapshot(t + 1)
        if progress:
            iterator.set_postfix(err=f"{err:.4f}")
    return KSVDResult(
        dictionary=D,
        coefficients=S,
        codes=codes,
        objective=np.asarray(objective),
        objective_after_coding=np.asarray(after_coding),
        n_unused_atoms=np.asarray(n_unused, dtype=np.int32),
        n_early_stopped=np.asarray(n_early, dtype=np.int32),
        seconds=clock.seconds if clock is not None else None,
        snapshots=kept,
    )


class PhaseClock:
    """Accumulates wall time per K-SVD phase; ``lap`` waits for the phase's arrays (JAX is asynchronous)."""

    def __init__(self, backend: str):
        self.seconds: dict = {"omp": 0.0, "update": 0.0, "gemm": 0.0, "backend": backend}
        self._last = time.perf_counter()

    def lap(self, phase: str, *arrays) -> None:
        if arrays:
            jax.block_until_ready(arrays)
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

