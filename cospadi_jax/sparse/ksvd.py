"""K-SVD dictionary learning (Aharon, Elad & Bruckstein 2006) on a target Y [d, n].

T alternations of Batch-OMP (:mod:`cospadi_jax.sparse.omp`) and a dictionary
update. Update variants:

* ``power`` (paper default): sequential rank-1 atom updates, each by warm-started
  power iteration (default 8 iterations) on the residual restricted to the
  columns that use the atom;
* ``exact``: the same sequential updates with the rank-1 term from an SVD;
* ``mod``: all atoms at once by least squares, D = Y Sᵀ (S Sᵀ)⁻¹ (Engan 1999),
  then atoms renormalised (the norms move into S).

Inside K-SVD the coefficients are stored densely, S [k, n] (k·n is small next to
the OMP state), so that "the columns using atom i" is a mask and the masked
rank-1 updates are GEMVs over the global residual E = Y − D S, which is kept
up to date. All data-dependent control flow is masks inside ``lax.fori_loop``.
"""

from __future__ import annotations

import time
from functools import partial
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cospadi_jax.sparse.backend import resolve_omp_backend, sparse_code
from cospadi_jax.sparse.ormp import batch_ormp
from cospadi_jax.sparse.omp import (
    SparseCodes,
    check_finite,
    resolve_float_dtype,
)

SPARSE_CODERS = ("omp", "ormp")

__all__ = ["DICT_UPDATES", "SPARSE_CODERS", "KSVDResult", "KSVDSteps", "PhaseClock", "alternate", "check_ksvd_arguments",
           "init_dictionary", "initial_dictionary", "ksvd", "relative_error", "update_dictionary"]

DICT_UPDATES = ("power", "exact", "mod")
_UNUSED = ("skip", "reseed")
_HI = lax.Precision.HIGHEST


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
    """

    dictionary: jax.Array
    coefficients: jax.Array
    codes: SparseCodes
    objective: np.ndarray
    objective_after_coding: np.ndarray
    n_unused_atoms: np.ndarray
    n_early_stopped: np.ndarray
    seconds: dict | None = None


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


def _rank1_power(R_v_fn, R_t_u_fn, u0, n_iter: int):
    """Warm-started power iteration for the top singular triplet of a masked residual.

    R_v_fn(v) = R v, R_t_u_fn(u) = Rᵀ u. Returns (u [d], g = Rᵀu [n]) with ‖u‖ = 1.
    """
    tiny = jnp.finfo(u0.dtype).tiny

    def body(_, u):
        v = R_t_u_fn(u)
        v = v / jnp.maximum(jnp.linalg.norm(v), tiny)
        u_new = R_v_fn(v)
        return u_new / jnp.maximum(jnp.linalg.norm(u_new), tiny)

    u = lax.fori_loop(0, n_iter, body, u0)
    return u, R_t_u_fn(u)


@partial(jax.jit, static_argnames=("dict_update", "power_iterations", "unused"))
def update_dictionary(Y, D, S, *, dict_update: str = "power", power_iterations: int = 8, unused: str = "skip"):
    """One dictionary update with the supports of S fixed.

    Y: [d, n]; D: [d, k] unit-norm; S: [k, n] dense coefficients.
    Returns (D [d, k], S [k, n], n_unused []) with unit-norm atoms (re-seeded atoms
    get a zero coefficient row; the next OMP pass uses them).
    """
    k = D.shape[1]
    usage = jnp.sum(S != 0, axis=1)  # [k]
    n_unused = jnp.sum(usage == 0).astype(jnp.int32)
    if dict_update == "mod":
        return (*_mod_update(Y, D, S, usage), n_unused)

    E = Y - jnp.matmul(D, S, precision=_HI)
    tiny = jnp.finfo(D.dtype).tiny

    def atom_update(i, carry):
        D, S, E, taken = carry
        d_i, s_i = D[:, i], S[i]
        mask = s_i != 0  # Ω_i as a mask over the n columns
        used = jnp.any(mask)
        fmask = mask.astype(D.dtype)
        # Residual without atom i, restricted to Ω_i: R = (E + d_i s_iᵀ) ⊙ mask (never materialised).
        if dict_update == "power":
            R_v = lambda v: jnp.matmul(E, v * fmask, precision=_HI) + d_i * jnp.dot(s_i, v, precision=_HI)
            R_t_u = lambda u: (jnp.matmul(u, E, precision=_HI) + s_i * jnp.dot(d_i, u, precision=_HI)) * fmask
            u, g = _rank1_power(R_v, R_t_u, d_i, power_iterations)
        else:  # exact rank-1 by SVD
            R = (E + jnp.outer(d_i, s_i)) * fmask
            U, sv, Vt = jnp.linalg.svd(R, full_matrices=False)
            u = U[:, 0]
            g = sv[0] * Vt[0] * fmask  # exact zeros off Ω_i (the SVD leaves roundoff there)
        new_d = jnp.where(used, u, d_i)
        new_s = jnp.where(used, g, s_i)
        if unused == "reseed":
            # Re-seed with the worst-represented column not taken yet in this update.
            col_err = jnp.where(taken, -jnp.inf, jnp.sum(E * E, axis=0))
            worst = jnp.argmax(col_err)
            seed = Y[:, worst] / jnp.maximum(jnp.linalg.norm(Y[:, worst]), tiny)
            new_d = jnp.where(used, new_d, seed)
            taken = taken.at[worst].set(taken[worst] | ~used)
        # E changes only on Ω_i: E_new = R − d_new s_newᵀ = E + d_i s_iᵀ − d_new s_newᵀ.
        E = E + jnp.outer(d_i, s_i) - jnp.outer(new_d, new_s)
        return D.at[:, i].set(new_d), S.at[i].set(new_s), E, taken

    taken = jnp.zeros((Y.shape[1],), bool)
    D, S, _, _ = lax.fori_loop(0, k, atom_update, (D, S, E, taken))
    return D, S, n_unused


def _mod_update(Y, D, S, usage):
    """MOD: D = Y Sᵀ (S Sᵀ)⁻¹ by Cholesky solves; unused atoms keep their old value."""
    k = D.shape[1]
    used = usage > 0
    SSt = jnp.matmul(S, S.T, precision=_HI)
    rhs = jnp.matmul(Y, S.T, precision=_HI)  # [d, k]
    # Unused atoms: identity row/column with the old atom as right-hand side => unchanged.
    SSt = jnp.where(used[:, None] & used[None, :], SSt, jnp.diag(jnp.where(used, 0.0, 1.0).astype(S.dtype)))
    rhs = jnp.where(used[None, :], rhs, D)
    # Ridge at roundoff level keeps the factorisation defined when used atoms are collinear in S.
    ridge = jnp.finfo(S.dtype).eps * jnp.trace(SSt) / k
    chol = jax.scipy.linalg.cho_factor(SSt + ridge * jnp.eye(k, dtype=S.dtype), lower=True)
    D_new = jax.scipy.linalg.cho_solve(chol, rhs.T).T  # solves (S Sᵀ) Dᵀ = S Yᵀ
    norms = jnp.linalg.norm(D_new, axis=0)
    ok = norms > 0
    D_new = jnp.where(ok[None, :], D_new / jnp.where(ok, norms, 1.0)[None, :], D)
    S_new = S * jnp.where(ok, norms, 1.0)[:, None]  # keep D·S: the atom norms move into S
    return D_new, S_new


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


class KSVDSteps(NamedTuple):
    """The two halves of one K-SVD iteration on a fixed target Y, as closures (how and where they run is theirs).

    code(D) -> (codes, S, error): the sparse codes of Y on D [d, k], their dense S [k, n] and ‖Y − DS‖/‖Y‖.
    update(D, S, codes) -> (D, S, n_unused, error): the dictionary update with the supports of S fixed.
    """

    code: Callable
    update: Callable


def alternate(D: jax.Array, ksvd_iterations: int, steps: KSVDSteps, *, clock: "PhaseClock | None" = None,
              progress: bool = False, desc: str = "K-SVD") -> KSVDResult:
    """The K-SVD loop, shared by every engine: T alternations of ``steps.code`` and ``steps.update`` from D.

    T = 0 is the initial dictionary and one coding pass. The result's ``seconds`` are ``clock``'s, if given.
    """
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
        if ksvd_iterations == 0:
            break
        after_coding.append(err)
        n_early.append(int(codes.n_early_stopped))
        D, S, unused_count, err = steps.update(D, S, codes)
        n_unused.append(int(unused_count))
        objective.append(err)
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
    )


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
    omp_memory_budget_bytes: int | None = None,
    omp_backend: str = "auto",
    threads: int | None = None,
    progress: bool = False,
    sparse_coder: str = "omp",
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
        omp_chunk_size, omp_memory_budget_bytes: passed to the xla / gemm Batch-OMP (None: the backend's default
            budget, 16 MiB for xla, a quarter of the device's memory for gemm).
        omp_backend: "auto" | "xla" | "cpu_kernel" | "gemm" (:mod:`.backend`). With ``cpu_kernel`` and
            the power update the whole iteration runs on the host in fused Numba kernels
            (:func:`_host_steps`); the other updates stay in JAX.
        threads: CPU threads of the ``cpu_kernel`` backend (default: all); results do not depend on it.
        progress: show a tqdm bar with ETA over the iterations.
        sparse_coder: "omp" (Batch-OMP, the paper) or "ormp" (order-recursive matching pursuit, :mod:`.ormp`:
            the atom that most reduces the residual after re-projection; XLA, whatever ``omp_backend`` says).
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
    if backend == "cpu_kernel" and dict_update == "power":
        steps = _host_steps(np.asarray(Y), k, s, clock, power_iterations=int(power_iterations), unused=unused,
                            threads=threads)
        result = alternate(np.asarray(D), ksvd_iterations, steps, clock=clock, progress=progress,
                           desc=f"K-SVD (power, {backend})")
        for name, value in (("dictionary", result.dictionary), ("coefficients", result.coefficients)):
            check_finite(name, value)
        return result._replace(dictionary=jnp.asarray(result.dictionary), coefficients=jnp.asarray(result.coefficients))

    memory = {} if omp_memory_budget_bytes is None else {"memory_budget_bytes": omp_memory_budget_bytes}

    def code(D):
        gram = jnp.matmul(D.T, D, precision=_HI)
        corr = jnp.matmul(D.T, Y, precision=_HI)
        clock.lap("gemm", gram, corr)
        if sparse_coder == "ormp":
            codes = batch_ormp(gram, corr, s, dtype=dtype, chunk_size=omp_chunk_size, **memory)
        else:
            codes = sparse_code(gram, corr, s, backend=backend, dtype=dtype, chunk_size=omp_chunk_size,
                                memory_budget_bytes=omp_memory_budget_bytes, threads=threads)
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
                     desc=f"K-SVD ({dict_update}, {backend})")


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


def _dense_codes(codes: SparseCodes, n_atoms: int) -> np.ndarray:
    """S [k, n] (NumPy) from SparseCodes [n, s]; atoms within a column are distinct, so no accumulation."""
    indices, values = np.asarray(codes.indices), np.asarray(codes.values)
    n, s = indices.shape
    col, slot = np.nonzero(np.arange(s)[None, :] < np.asarray(codes.n_nonzero)[:, None])
    S = np.zeros((n_atoms, n), values.dtype)
    S[indices[col, slot], col] = values[col, slot]
    return S


def _host_steps(Y, n_atoms, sparsity, clock, *, power_iterations, unused, threads) -> KSVDSteps:
    """K-SVD steps with the power update entirely on the host: BLAS GEMMs, fused Numba OMP and update.

    Y: [d, n] in the working dtype; D arrives as a NumPy [d, k] (unit-norm). The residual is kept transposed,
    Eᵀ [n, d], and updated in place by the atom updates, so the objective after an update is ‖E‖ with no
    extra GEMM.
    """
    from cospadi_jax.sparse.cpu_kernel import batch_omp_cpu, power_update_cpu

    Y_t = np.ascontiguousarray(Y.T)
    y_norm = float(np.linalg.norm(Y_t))
    residual = {}

    def code(D):
        gram, corr = D.T @ D, D.T @ Y
        clock.lap("gemm")
        codes = batch_omp_cpu(gram, corr, sparsity, dtype=Y.dtype, threads=threads)
        clock.lap("omp")
        S = _dense_codes(codes, n_atoms)
        residual["E_t"] = E_t = Y_t - S.T @ D.T  # [n, d]
        err = float(np.linalg.norm(E_t)) / y_norm
        clock.lap("gemm")
        return codes, S, err

    def update(D, S, codes):
        E_t, D_t = residual["E_t"], np.ascontiguousarray(D.T)
        values, unused_count = power_update_cpu(E_t, D_t, codes, power_iterations=power_iterations, unused=unused,
                                                Y_t=Y_t)
        S = _dense_codes(codes._replace(values=values), n_atoms)
        err = float(np.linalg.norm(E_t)) / y_norm
        clock.lap("update")
        return np.ascontiguousarray(D_t.T), S, unused_count, err

    return KSVDSteps(code, update)
