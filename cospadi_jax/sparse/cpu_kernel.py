"""Fused CPU kernels for the sparse engine: Batch-OMP and the sequential power (or exact) update of K-SVD.

Why a separate CPU path. XLA:CPU runs the jitted Batch-OMP (:mod:`.omp`) as a while loop of ~25 small
fusions per step over a chunk of columns; the per-step state of a chunk does not stay in L2 and the step
runs at a fraction of the cache bandwidth (docs/benchmarks.md). Here each column is one compiled loop whose
whole state is reused from column to column by the same thread, so it stays in the core's L2.

Why Numba. It installs as a wheel on Linux, macOS and Windows (x86-64 and Arm) with its own LLVM, so
users need no compiler; it compiles typed NumPy loops to SIMD code, has a work-sharing ``prange`` with
dynamic chunking, and caches compiled code on disk. Alternatives considered: a C/C++ extension (needs a
compiler at install time or a wheel build matrix of our own), Cython (same), Pallas (no CPU backend
for this kind of kernel), ``jax.pure_callback`` around NumPy (no fusion: NumPy's per-call overhead at
~30 µs per step is the problem being solved).

Batch-OMP, "compact B-form". Per column y with correlations α⁰ = Dᵀy [k] and Gram GD = DᵀD [k, k]
(unit-norm atoms), after t steps with active set I (|I| = t) and Cholesky factor L of GD[I, I]:

    B = L⁻¹ GD[I, :]   [t, k]  (row r is b_r = Dᵀq_r, q_r the r-th orthonormalised atom)
    z = L⁻¹ α⁰_I       [t]
    α = α⁰ − Bᵀ z      [k]     (correlations of the residual)

A new atom a = argmax |α| gives w = B[:, a] (the new row of L, a gather: no triangular solve),
Lₜₜ = √(GD[a, a] − w·w), zₜ = (α⁰[a] − w·z)/Lₜₜ, bₜ = (GD[a, :] − wᵀB)/Lₜₜ and α ← α − zₜ bₜ.
The atom positions are permuted as sklearn's ``_gram_omp`` permutes its Gram, mirrored: position q
here holds what sklearn keeps at position k − 1 − q, so the m = k − t inactive atoms occupy positions
[0, m) (every loop over them starts at 0 and vectorises) and the selected atom is swapped to position
m − 1. The step's GEMV ``wᵀB`` then runs only over the inactive positions: t·(k − t − 1) multiply-adds
instead of t·k ("compact"), rows taken eight at a time so each pass over the accumulator serves eight
rows of B. The active block of B becomes L in place (B[r, k − 1 − j] = L[j, r] for r ≤ j), which the
final back substitution γ = L⁻ᵀ z reads along rows of B. The working set of one step, t·(k − t)
values, is at most k²/4 (277 KiB in f32 for k = 526): it stays in the core's L2.

Stopping rule: sklearn's (see :mod:`.omp`): stop when max |α|² < eps or the new pivot Lₜₜ² ≤ eps,
eps the machine epsilon of the working dtype. The correlations of active atoms are exactly zero in
exact arithmetic and are not computed here, so sklearn's third rule ("the argmax is an already active
atom", which only fires when every inactive correlation is below the active atoms' rounding noise)
becomes the first one. Ties in |α| go to the last maximal position here, which is sklearn's first
(tested with duplicated atoms).

Determinism: a column is computed by one thread from its own inputs in a fixed order, so its result is
bit-identical whatever the number of threads or the schedule (tested).

The power update fuses each power step into one pass over the columns that use the atom: with
r_j = e_j + d_i s_ij (the residual without atom i, never materialised), v_j = r_j·u and
u ← Σ_j v_j r_j = R Rᵀ u, reading each residual column once per power step (half the passes of
separate Rᵀu and R v GEMVs). The residual E is stored transposed, Eᵀ [n, d], so a column is contiguous.

The kernels themselves are in :mod:`.cpu_kernel_omp` and :mod:`.cpu_kernel_power`, compiled on first use; this
module holds the entry points, Numba's import and threads, and the CSR of the supports the update walks.
"""

from __future__ import annotations

import os

import numpy as np

from .cpu_kernel_omp import build_omp_kernels
from .cpu_kernel_power import build_power_update
from .ksvd_update import EXACT_MAX_STEPS, EXACT_TOLERANCE_EPS
from .omp import SparseCodes

__all__ = ["batch_omp_cpu", "numba_available", "power_update_cpu", "require_numba", "set_threads"]

_INSTALL_HINT = "pip install numba (a wheel; no compiler needed), or use omp_backend=xla"
_numba = None
CACHE = os.environ.get("COSPADI_NUMBA_CACHE", "1") != "0"
_kernels = None


def numba_available() -> bool:
    try:
        require_numba()
    except ImportError:
        return False
    return True


def require_numba():
    """Import Numba or raise ImportError naming the install command."""
    global _numba
    if _numba is None:
        try:
            import numba
        except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in tests
            raise ImportError(f"the cpu_kernel backend needs Numba: {_INSTALL_HINT}") from exc
        _numba = numba
    return _numba


def set_threads(threads: int | None) -> int:
    """Use ``threads`` worker threads for the kernels (None: all of Numba's pool). Returns the count used."""
    numba = require_numba()
    pool = numba.config.NUMBA_NUM_THREADS
    if threads is None:
        threads = pool
    if not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}.")
    if threads > pool:
        raise ValueError(
            f"threads={threads} exceeds Numba's pool of {pool} threads; set NUMBA_NUM_THREADS={threads} "
            "before importing numba, or ask for fewer."
        )
    numba.set_num_threads(int(threads))
    return int(threads)


def _build_kernels():
    numba = require_numba()
    # fastmath lets LLVM vectorise the small reductions; results stay deterministic per compiled code.
    opts = dict(cache=CACHE, fastmath=True, nogil=True, boundscheck=False, error_model="numpy")
    omp_column, omp_columns = build_omp_kernels(numba, opts)
    return omp_column, omp_columns, build_power_update(numba, opts)


def _get_kernels():
    global _kernels
    if _kernels is None:
        _kernels = _build_kernels()
    return _kernels


# Columns handed to a thread at a time: small enough to balance early-stopping columns, large enough
# that the scheduler's cost (~µs) is nothing next to a column (~0.1-1 ms).
_BLOCK = 4


def batch_omp_cpu(gram, correlations, sparsity: int, *, dtype=None, eps: float | None = None,
                  threads: int | None = None) -> SparseCodes:
    """Batch-OMP of every column on the CPU, fused per column (see module docstring).

    Args:
        gram: GD = DᵀD, [k, k], unit-norm atoms.
        correlations: DᵀY, [k, n].
        sparsity: s, 1 ≤ s ≤ k.
        dtype: float32 / float64 working dtype (default: that of the inputs, as :func:`.omp.batch_omp`).
        eps: stopping threshold (default: machine epsilon of ``dtype``, as sklearn).
        threads: worker threads (default: all of Numba's pool); results do not depend on it.

    Returns:
        SparseCodes (NumPy arrays) with indices/values [n, s] in selection order, n_nonzero [n],
        n_early_stopped [].
    """
    from .omp import check_inputs

    sparsity, dtype = check_inputs(sparsity, gram, correlations, dtype)
    _, omp_columns, _ = _get_kernels()
    numba = require_numba()
    pool, numba_parallel_chunksize = numba.config.NUMBA_NUM_THREADS, numba.parallel_chunksize
    set_threads(threads)
    G = np.ascontiguousarray(np.asarray(gram), dtype=dtype)
    A0T = np.ascontiguousarray(np.asarray(correlations, dtype=dtype).T)
    n = A0T.shape[0]
    eps_value = float(np.finfo(dtype).eps) if eps is None else float(eps)
    indices = np.zeros((n, sparsity), np.int32)
    values = np.zeros((n, sparsity), dtype)
    counts = np.zeros((n,), np.int32)
    if n:
        # Blocks handed out one at a time (dynamic): a thread slowed by another process does not hold the rest.
        with numba_parallel_chunksize(1):
            omp_columns(G, A0T, sparsity, dtype.type(eps_value), dtype.type(1), indices, values, counts, _BLOCK, pool)
    return SparseCodes(indices, values, counts, np.int32(np.sum(counts < sparsity)))


def atom_columns(indices: np.ndarray, n_nonzero: np.ndarray, n_atoms: int):
    """CSR of the supports by atom: for atom i, columns cols[ptr[i]:ptr[i+1]] (ascending) and their slots.

    indices: [n, s] int, n_nonzero: [n]. Returns ptr [k+1], cols [nnz], slots [nnz] (int64).
    """
    n, s = indices.shape
    filled = np.arange(s)[None, :] < np.asarray(n_nonzero)[:, None]
    col, slot = np.nonzero(filled)  # row-major: columns ascending
    atom = np.asarray(indices)[col, slot]
    order = np.argsort(atom, kind="stable")
    ptr = np.zeros(n_atoms + 1, np.int64)
    np.cumsum(np.bincount(atom, minlength=n_atoms), out=ptr[1:])
    return ptr, col[order].astype(np.int64), slot[order].astype(np.int64)


def power_update_cpu(E_t: np.ndarray, D_t: np.ndarray, codes: SparseCodes, *, power_iterations: int = 8,
                     exact: bool = False, unused: str = "skip",
                     Y_t: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """K-SVD's sequential atom update (paper default: ``power_iterations`` power steps), in place, supports fixed.

    Args:
        E_t: residual (Y − D S) transposed, [n, d], C-contiguous; updated in place.
        D_t: dictionary transposed, [k, d], C-contiguous, unit-norm rows; updated in place.
        codes: the supports and values of S (values [n, s] are read; new values are returned).
        power_iterations: power steps per atom (≥ 1); ignored when ``exact``.
        exact: the exact rank-1 update (``dict_update="exact"``), by :mod:`.ksvd_update`'s rule: power steps until
            successive iterates differ by at most ``EXACT_TOLERANCE_EPS`` machine epsilons, at most
            ``EXACT_MAX_STEPS`` of them, else LAPACK's SVD of the atom's residual.
        unused: "skip" (paper) or "reseed" (needs ``Y_t`` [n, d]).

    Returns:
        (values [n, s] after the update, number of unused atoms, atoms the exact update sent to LAPACK).
    """
    _, _, update = _get_kernels()
    k = D_t.shape[0]
    ptr, cols, slots = atom_columns(np.asarray(codes.indices), np.asarray(codes.n_nonzero), k)
    values = np.array(codes.values, dtype=E_t.dtype, copy=True)
    reseed = unused == "reseed"
    if reseed and Y_t is None:
        raise ValueError("unused='reseed' needs the target Y_t [n, d] to draw new atoms from.")
    Yt = Y_t if reseed else E_t[:0]
    taken = np.zeros(E_t.shape[0], np.bool_)
    one = E_t.dtype.type(1)
    steps, tol = (EXACT_MAX_STEPS, EXACT_TOLERANCE_EPS * np.finfo(E_t.dtype).eps) if exact else (power_iterations, 0)
    n_unused, n_fallback = update(E_t, D_t, Yt, ptr, cols, slots, values, int(steps), one * tol, reseed, taken, one)
    return values, int(n_unused), int(n_fallback)
