"""The fused Batch-OMP kernels of :mod:`.cpu_kernel` ("compact B-form": the algorithm, the atom positions and the
stopping rule are described in that module's docstring): one column as one compiled loop, and all columns in
dynamically scheduled blocks over Numba's threads.
"""

from __future__ import annotations

import math

import numpy as np


def build_omp_kernels(numba, opts: dict):
    """Compile (or load from Numba's cache) the Batch-OMP kernels with the njit options ``opts``: returns
    (omp_column, omp_columns)."""
    njit, prange = numba.njit, numba.prange

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

    return omp_column, omp_columns
