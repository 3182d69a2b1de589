"""K-SVD dictionary learning (Aharon, Elad & Bruckstein 2006) on a target Y [d, n].

T alternations of Batch-OMP (:mod:`cospadi_jax.sparse.omp`) and a dictionary
update. Update variants:

* ``power`` (paper default): sequential rank-1 atom updates, each by warm-started
  power iteration (default 8 iterations) on the residual restricted to the
  columns that use the atom;
* ``exact``: the same sequential updates with the exact top singular pair: power steps run to
  convergence at working precision, an SVD where they do not converge (the rule is in :mod:`.ksvd_update`;
  the JAX path and the ``cpu_kernel`` one both follow it);
* ``mod``: all atoms at once by least squares, D = Y Sᵀ (S Sᵀ)⁻¹ (Engan 1999),
  then atoms renormalised (the norms move into S).

Inside K-SVD the coefficients are stored densely, S [k, n] (k·n is small next to
the OMP state), so that "the columns using atom i" is a mask and the masked
rank-1 updates are GEMVs over the global residual E = Y − D S, which is kept
up to date. All data-dependent control flow is masks inside ``lax.fori_loop``.

Modules: the loop every engine shares is :mod:`.ksvd_loop`, the update :mod:`.ksvd_update`, the fused host path
(``omp_backend="cpu_kernel"`` with the power or exact update) :mod:`.ksvd_host`; this one holds the arguments'
checks, the initial dictionary and :func:`ksvd`.
"""

from __future__ import annotations

from collections.abc import Collection

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cospadi_jax.sparse.backend import resolve_omp_backend, sparse_code
from cospadi_jax.sparse.ksvd_host import host_steps
from cospadi_jax.sparse.ksvd_loop import KSVDResult, KSVDSteps, PhaseClock, alternate
from cospadi_jax.sparse.ksvd_update import update_dictionary
from cospadi_jax.sparse.ormp import batch_ormp
from cospadi_jax.sparse.omp import (
    check_finite,
    resolve_float_dtype,
)

SPARSE_CODERS = ("omp", "ormp")

__all__ = ["DICT_UPDATES", "SPARSE_CODERS", "KSVDResult", "KSVDSteps", "PhaseClock", "alternate", "check_ksvd_arguments",
           "init_dictionary", "initial_dictionary", "ksvd", "relative_error", "update_dictionary"]

DICT_UPDATES = ("power", "exact", "mod")
_UNUSED = ("skip", "reseed")
_HI = lax.Precision.HIGHEST


def relative_error(Y: jax.Array, D: jax.Array, S: jax.Array) -> jax.Array:
    """‖Y − D S‖_F / ‖Y‖_F. Y: [d, n], D: [d, k], S: [k, n]."""
    return jnp.linalg.norm(Y - jnp.matmul(D, S, precision=_HI)) / jnp.linalg.norm(Y)


def init_dictionary(Y: jax.Array, n_atoms: int, key: jax.Array) -> jax.Array:
    """k distinct random columns of Y [d, n] (seeded permutation), ℓ2-normalised. Returns [d, k]."""
    n = Y.shape[1]
    if n_atoms > n:
        raise ValueError(
            f"k = {n_atoms} atoms need k distinct columns of the target for initialisation, "
            f"but it has only n = {n}; use k <= {n}."
        )
    cols = jax.random.permutation(key, n)[:n_atoms]
    D = Y[:, cols]
    norms = jnp.linalg.norm(D, axis=0)
    if not isinstance(norms, jax.core.Tracer) and bool(jnp.any(norms == 0)):
        raise ValueError("the initialisation drew an all-zero column of the target; remove zero columns first.")
    return D / norms

def check_ksvd_arguments(Y, n_atoms, sparsity, ksvd_iterations, dict_update, power_iterations, unused) -> None:
    """Raise ValueError naming the bad argument of a K-SVD call (shared by the sharded variant)."""
    if not isinstance(ksvd_iterations, (int, np.integer)) or ksvd_iterations < 0:
        raise ValueError(f"ksvd_iterations must be an int >= 0, got {ksvd_iterations!r}.")
    if dict_update not in DICT_UPDATES:
        raise ValueError(f"dict_update must be one of {DICT_UPDATES}, got {dict_update!r}.")
    if unused not in _UNUSED:
        raise ValueError(f"unused must be one of {_UNUSED}, got {unused!r}.")
    if not isinstance(power_iterations, (int, np.integer)) or power_iterations < 1:
        raise ValueError(f"power_iterations must be an int >= 1, got {power_iterations!r}.")
    if np.ndim(Y) != 2:
        raise ValueError(f"Y must be a [d, n] matrix, got shape {np.shape(Y)}.")
    if not isinstance(n_atoms, (int, np.integer)) or n_atoms < 1:
        raise ValueError(f"n_atoms k must be an int >= 1, got {n_atoms!r}.")
    if not isinstance(sparsity, (int, np.integer)) or not 1 <= sparsity <= n_atoms:
        raise ValueError(f"sparsity s must be an int with 1 <= s <= k = {n_atoms}, got {sparsity!r}.")


def initial_dictionary(Y: jax.Array, n_atoms: int, key: jax.Array | int, init: jax.Array | None, dtype
                       ) -> jax.Array:
    """The starting D [d, k] of a K-SVD on Y [d, n]: ``init`` normalised, else k seeded random columns of Y."""
    if init is None:
        if isinstance(key, (int, np.integer)):
            key = jax.random.key(int(key))
        return init_dictionary(jnp.asarray(Y, dtype), int(n_atoms), key)
    if np.shape(init) != (np.shape(Y)[0], n_atoms):
        raise ValueError(f"init must be [d, k] = [{np.shape(Y)[0]}, {n_atoms}], got {np.shape(init)}.")
    check_finite("init", init)
    D = jnp.asarray(init, dtype)
    return D / jnp.linalg.norm(D, axis=0)

def ksvd(
    Y: jax.Array,
    n_atoms: int,
    sparsity: int,
    ksvd_iterations: int,
    *,
    key: jax.Array | int = 0,
    dict_update: str = "power",
    power_iterations: int = 8,
    unused: str = "skip",
    init: jax.Array | None = None,
    dtype=None,
    omp_chunk_size: int | None = None,
    omp_memory_mb: int | None = None,
    omp_backend: str = "auto",
    threads: int | None = None,
    progress: bool = False,
    sparse_coder: str = "omp",
    snapshots: Collection[int] = (),
) -> KSVDResult:
    """Learn D [d, k] and column-sparse S [k, n] with Y ≈ D S.

    Args:
        Y: target [d, n] (e.g. whitened weights L·W, d = d_in, n = d_out).
        n_atoms: k >= 1, k <= n (initialisation draws k distinct columns of Y).
        sparsity: s, 1 <= s <= k, non-zeros per column.
        ksvd_iterations: T >= 0 alternations (T = 0: initial dictionary + one OMP pass).
        key: jax.random key or int seed for the initialisation.
        dict_update: "power" | "exact" | "mod".
        power_iterations: power steps per atom (``power`` only), >= 1.
        unused: "skip" (paper) or "reseed" (worst-represented column of Y).
        init: optional initial dictionary [d, k] (normalised here) instead of random columns.
        dtype: float32 / float64 (default: float64 if x64 is on and Y is f64, else float32).
        omp_chunk_size, omp_memory_mb: one OMP chunk's columns, or its working memory in MiB, for the xla / gemm
            Batch-OMP and ORMP (None: the backend's default, 16 MiB for xla, a quarter of the device's memory for
            gemm); ``method.omp_memory_mb`` in the configs.
        omp_backend: "auto" | "xla" | "cpu_kernel" | "gemm" (:mod:`.backend`). With ``cpu_kernel`` and
            the power or exact update the whole iteration runs on the host in fused Numba kernels
            (:func:`.ksvd_host.host_steps`); ``mod`` stays in JAX.
        threads: CPU threads of the ``cpu_kernel`` backend (default: all); results do not depend on it.
        progress: show a tqdm bar with ETA over the iterations.
        sparse_coder: "omp" (Batch-OMP, the paper) or "ormp" (order-recursive matching pursuit, :mod:`.ormp`:
            the atom that most reduces the residual after re-projection; XLA, whatever ``omp_backend`` says).
        snapshots: iteration counts t < ksvd_iterations whose result is also kept (``KSVDResult.snapshots``,
            each equal to a run with ``ksvd_iterations = t``; :func:`.ksvd_loop.alternate`).
    """
    if sparse_coder not in SPARSE_CODERS:
        raise ValueError(f"sparse_coder must be one of {SPARSE_CODERS}, got {sparse_coder!r}")
    check_ksvd_arguments(Y, n_atoms, sparsity, ksvd_iterations, dict_update, power_iterations, unused)
    dtype = resolve_float_dtype(dtype, Y)
    check_finite("Y", Y)
    Y = jnp.asarray(Y, dtype)
    D = initial_dictionary(Y, n_atoms, key, init, dtype)
    backend = resolve_omp_backend(omp_backend) if sparse_coder == "omp" else "xla"
    clock = PhaseClock(backend)
    k, s = int(n_atoms), int(sparsity)
    if backend == "cpu_kernel" and dict_update in ("power", "exact"):
        steps = host_steps(np.asarray(Y), k, s, clock, dict_update=dict_update, power_iterations=int(power_iterations),
                           unused=unused, threads=threads)
        result = alternate(np.asarray(D), ksvd_iterations, steps, clock=clock, progress=progress,
                           desc=f"K-SVD ({dict_update}, {backend})", snapshots=snapshots)
        for name, value in (("dictionary", result.dictionary), ("coefficients", result.coefficients)):
            check_finite(name, value)
        return result._replace(dictionary=jnp.asarray(result.dictionary), coefficients=jnp.asarray(result.coefficients))

    memory_bytes = None if omp_memory_mb is None else int(omp_memory_mb) * 2**20
    memory = {} if memory_bytes is None else {"memory_budget_bytes": memory_bytes}

    def code(D):
        gram = jnp.matmul(D.T, D, precision=_HI)
        corr = jnp.matmul(D.T, Y, precision=_HI)
        clock.lap("gemm", gram, corr)
        if sparse_coder == "ormp":
            codes = batch_ormp(gram, corr, s, dtype=dtype, chunk_size=omp_chunk_size, **memory)
        else:
            codes = sparse_code(gram, corr, s, backend=backend, dtype=dtype, chunk_size=omp_chunk_size,
                                memory_budget_bytes=memory_bytes, threads=threads)
        clock.lap("omp", codes.values)
        S = codes.to_dense(k)
        err = float(relative_error(Y, D, S))
        clock.lap("gemm")
        return codes, S, err

    def update(D, S, codes):
        D, S, unused_count = update_dictionary(Y, D, S, dict_update=dict_update,
                                               power_iterations=int(power_iterations), unused=unused)
        clock.lap("update", D, S)
        err = float(relative_error(Y, D, S))
        clock.lap("gemm")
        return D, S, unused_count, err

    return alternate(D, ksvd_iterations, KSVDSteps(code, update), clock=clock, progress=progress,
                     desc=f"K-SVD ({dict_update}, {backend})", snapshots=snapshots)

