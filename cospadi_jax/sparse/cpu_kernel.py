"""Fused CPU kernels for the sparse engine: Batch-OMP and the sequential power update of K-SVD.

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
"""

from __future__ import annotations

import math
import os

import numpy as np

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
    njit, prange = numba.njit, numba.prange
    # fastmath lets LLVM vectorise the small reductions; results stay deterministic per compiled code.
    opts = dict(cache=CACHE, fastmath=True, nogil=True, boundscheck=False, error_model="numpy")

    @njit(**opts)
    def omp_column(G, alpha0, s, eps, one, B, alpha, perm, z, w, acc, idx_out, val_out):
        """One column: G [k, k], alpha0 [k]; scratch B [s, k], alpha/perm/acc [k], z/w [s]. Returns t.

        ``one`` is 1 in the working dtype: every scalar is derived from it, so float32 stays float32.

        Positions are sklearn's mirrored (position q holds what sklearn keeps at k − 1 − q): inactive
        atoms live in [0, m), so every loop over them starts at 0 and vectorises, and the last maximum
        here is sklearn's first.
        """
        k = G.shape[0]
        zero = one - one
        for q in range(k):
            alpha[q] = alpha0[k - 1 - q]
            perm[q] = k - 1 - q
        best = -one
        p = 0
        for q in range(k):
            v = abs(alpha[q])
            if v >= best:
                best = v
                p = q
        t = 0
        m = k  # inactive positions [0, m)
        while t < s:
            if best * best < eps:
                break
            a = perm[p]
            nrm = zero
            for r in range(t):
                w[r] = B[r, p]
                nrm += w[r] * w[r]
            if t > 0:
                pivot_sq = G[a, a] - nrm
                if pivot_sq <= eps:
                    break
                pivot = math.sqrt(pivot_sq)
            else:
                pivot = math.sqrt(G[a, a])
            m -= 1
            if p != m:  # swap the new atom to position m (rows so far, α, permutation)
                for r in range(t):
                    tmp = B[r, p]
                    B[r, p] = B[r, m]
                    B[r, m] = tmp
                tmp = alpha[p]
                alpha[p] = alpha[m]
                alpha[m] = tmp
                ip = perm[p]
                perm[p] = perm[m]
                perm[m] = ip
            wz = zero
            for r in range(t):
                wz += w[r] * z[r]
            zt = (alpha0[a] - wz) / pivot
            z[t] = zt
            # acc = GD[a, inactive] − wᵀ B[:t, inactive]; rows in fours to cut the passes over acc.
            Ga = G[a]
            for j in range(m):
                acc[j] = Ga[perm[j]]
            r = 0
            while r + 8 <= t:
                w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
                w4, w5, w6, w7 = w[r + 4], w[r + 5], w[r + 6], w[r + 7]
                B0, B1, B2, B3 = B[r], B[r + 1], B[r + 2], B[r + 3]
                B4, B5, B6, B7 = B[r + 4], B[r + 5], B[r + 6], B[r + 7]
                for j in range(m):
                    acc[j] -= ((w0 * B0[j] + w1 * B1[j]) + (w2 * B2[j] + w3 * B3[j])) + (
                        (w4 * B4[j] + w5 * B5[j]) + (w6 * B6[j] + w7 * B7[j]))
                r += 8
            while r < t:
                wr = w[r]
                Br = B[r]
                for j in range(m):
                    acc[j] -= wr * Br[j]
                r += 1
            inv = one / pivot
            Bt = B[t]
            Bt[m] = pivot
            best = zero
            for j in range(m):  # vectorised: the update and max |α| in one pass
                b = acc[j] * inv
                Bt[j] = b
                aj = alpha[j] - zt * b
                alpha[j] = aj
                best = max(best, abs(aj))
            p = m - 1  # the last position holding the maximum (sklearn's first)
            while p > 0 and abs(alpha[p]) != best:
                p -= 1
            t += 1
        # γ = L⁻ᵀ z with L[j, r] = B[r, k − 1 − j] (r ≤ j): back substitution along rows of B.
        for j in range(t - 1, -1, -1):
            acc_j = z[j]
            Bj = B[j]
            for i in range(j + 1, t):
                acc_j -= Bj[k - 1 - i] * val_out[i]
            val_out[j] = acc_j / Bj[k - 1 - j]
            idx_out[j] = perm[k - 1 - j]
        for j in range(t, s):
            val_out[j] = zero
            idx_out[j] = 0
        return t

    @njit(parallel=True, **opts)
    def omp_columns(G, A0T, s, eps, one, idx_out, val_out, cnt_out, block, pool):
        """All columns: A0T [n, k] (DᵀY transposed); blocks of ``block`` columns handed out dynamically."""
        n, k = A0T.shape
        dt = A0T.dtype
        Bs = np.empty((pool, s, k), dt)
        alphas = np.empty((pool, k), dt)
        accs = np.empty((pool, k), dt)
        perms = np.empty((pool, k), np.int32)
        zs = np.empty((pool, s), dt)
        ws = np.empty((pool, s), dt)
        n_blocks = (n + block - 1) // block
        for b in prange(n_blocks):
            tid = numba.get_thread_id()
            for j in range(b * block, min(n, (b + 1) * block)):
                cnt_out[j] = omp_column(G, A0T[j], s, eps, one, Bs[tid], alphas[tid], perms[tid], zs[tid], ws[tid],
                                        accs[tid], idx_out[j], val_out[j])

    @njit(**opts)
    def power_pass(Et, cols, slots, values, beg, end, u, du, unew, zero):
        """unew = Σ_j v_j e_j and (Σ v_j², Σ v_j s_j) with v_j = e_j·u + s_j·du over the atom's columns.

        Eight columns at a time: their dots run as independent chains and their axpys share one pass
        over unew (a single column's dot → axpy dependency halves the throughput)."""
        d = Et.shape[1]
        for c in range(d):
            unew[c] = zero
        nv, vs = zero, zero
        q = beg
        while q + 8 <= end:
            e0, e1, e2, e3 = Et[cols[q]], Et[cols[q + 1]], Et[cols[q + 2]], Et[cols[q + 3]]
            e4, e5, e6, e7 = Et[cols[q + 4]], Et[cols[q + 5]], Et[cols[q + 6]], Et[cols[q + 7]]
            v0 = v1 = v2 = v3 = v4 = v5 = v6 = v7 = zero
            for c in range(d):
                uc = u[c]
                v0 += e0[c] * uc
                v1 += e1[c] * uc
                v2 += e2[c] * uc
                v3 += e3[c] * uc
                v4 += e4[c] * uc
                v5 += e5[c] * uc
                v6 += e6[c] * uc
                v7 += e7[c] * uc
            s0, s1 = values[cols[q], slots[q]], values[cols[q + 1], slots[q + 1]]
            s2, s3 = values[cols[q + 2], slots[q + 2]], values[cols[q + 3], slots[q + 3]]
            s4, s5 = values[cols[q + 4], slots[q + 4]], values[cols[q + 5], slots[q + 5]]
            s6, s7 = values[cols[q + 6], slots[q + 6]], values[cols[q + 7], slots[q + 7]]
            v0 += s0 * du
            v1 += s1 * du
            v2 += s2 * du
            v3 += s3 * du
            v4 += s4 * du
            v5 += s5 * du
            v6 += s6 * du
            v7 += s7 * du
            nv += ((v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)) + ((v4 * v4 + v5 * v5) + (v6 * v6 + v7 * v7))
            vs += ((v0 * s0 + v1 * s1) + (v2 * s2 + v3 * s3)) + ((v4 * s4 + v5 * s5) + (v6 * s6 + v7 * s7))
            for c in range(d):
                unew[c] += ((v0 * e0[c] + v1 * e1[c]) + (v2 * e2[c] + v3 * e3[c])) + (
                    (v4 * e4[c] + v5 * e5[c]) + (v6 * e6[c] + v7 * e7[c]))
            q += 8
        while q < end:
            e = Et[cols[q]]
            sj = values[cols[q], slots[q]]
            v = zero
            for c in range(d):
                v += e[c] * u[c]
            v += sj * du
            nv += v * v
            vs += v * sj
            for c in range(d):
                unew[c] += v * e[c]
            q += 1
        return nv, vs

    @njit(**opts)
    def refresh_pass(Et, cols, slots, values, beg, end, u, du, di):
        """g_j = r_j·u, e_j ← r_j − u g_j (r_j = e_j + d_i s_j) and the coefficient s_j ← g_j, in place."""
        d = Et.shape[1]
        for q in range(beg, end):
            j, slot = cols[q], slots[q]
            e = Et[j]
            sj = values[j, slot]
            g = sj * du
            for c in range(d):
                g += e[c] * u[c]
            for c in range(d):
                e[c] += sj * di[c] - g * u[c]
            values[j, slot] = g

    @njit(**opts)
    def power_update(Et, Dt, Yt, ptr, cols, slots, values, power_iterations, reseed, taken, one):
        """Sequential K-SVD atom updates in place. Et [n, d], Dt [k, d], Yt [n, d] (reseed only);
        the columns of atom i are cols[ptr[i]:ptr[i+1]] with their coefficient at values[col, slot].
        Returns the number of unused atoms.

        Single-threaded on purpose: a parallel region per pass (~20 µs of work) measured 2x faster on an
        idle machine but 10-100x slower as soon as another process or BLAS's spinning threads held a core."""
        k, d = Dt.shape
        n = Et.shape[0]
        dt = Et.dtype
        zero = one - one
        tiny = np.finfo(dt).tiny * one  # the dtype's smallest normal, as a scalar of the dtype
        u = np.empty(d, dt)
        unew = np.empty(d, dt)
        n_unused = 0
        for i in range(k):
            beg, end = ptr[i], ptr[i + 1]
            di = Dt[i]
            if beg == end:
                n_unused += 1
                if reseed:  # the worst-represented column not taken yet in this update
                    worst, worst_err = -1, -one
                    for j in range(n):
                        if taken[j]:
                            continue
                        e = Et[j]
                        err = zero
                        for c in range(d):
                            err += e[c] * e[c]
                        if err > worst_err:
                            worst_err, worst = err, j
                    if worst >= 0:
                        taken[worst] = True
                        y = Yt[worst]
                        nrm = zero
                        for c in range(d):
                            nrm += y[c] * y[c]
                        nrm = max(math.sqrt(nrm), tiny)
                        for c in range(d):
                            di[c] = y[c] / nrm
                continue
            for c in range(d):
                u[c] = di[c]
            for _ in range(power_iterations):
                # u ← R(Rᵀu / ‖Rᵀu‖), normalised: R Rᵀ u = Σ_j v_j e_j + (Σ_j v_j s_j) d_i.
                du = zero
                for c in range(d):
                    du += di[c] * u[c]
                nv, vs = power_pass(Et, cols, slots, values, beg, end, u, du, unew, zero)
                scale = one / max(math.sqrt(nv), tiny)
                nu = zero
                for c in range(d):
                    x = (unew[c] + vs * di[c]) * scale
                    unew[c] = x
                    nu += x * x
                nu = one / max(math.sqrt(nu), tiny)
                for c in range(d):
                    u[c] = unew[c] * nu
            du = zero
            for c in range(d):
                du += di[c] * u[c]
            refresh_pass(Et, cols, slots, values, beg, end, u, du, di)
            for c in range(d):
                di[c] = u[c]
        return n_unused

    return omp_column, omp_columns, power_update


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
    from .omp import _check_sparsity, check_finite, resolve_float_dtype

    sparsity = _check_sparsity(sparsity, gram, correlations)
    dtype = resolve_float_dtype(dtype, gram, correlations)
    check_finite("gram", gram)
    check_finite("correlations", correlations)
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
                     unused: str = "skip", Y_t: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """K-SVD's sequential power update (paper default), in place, supports fixed.

    Args:
        E_t: residual (Y − D S) transposed, [n, d], C-contiguous; updated in place.
        D_t: dictionary transposed, [k, d], C-contiguous, unit-norm rows; updated in place.
        codes: the supports and values of S (values [n, s] are read; new values are returned).
        power_iterations: power steps per atom (≥ 1).
        unused: "skip" (paper) or "reseed" (needs ``Y_t`` [n, d]).

    Returns:
        (values [n, s] after the update, number of unused atoms).
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
    n_unused = update(E_t, D_t, Yt, ptr, cols, slots, values, int(power_iterations), reseed, taken,
                      E_t.dtype.type(1))
    return values, int(n_unused)
