"""The fused power update of K-SVD for :mod:`.cpu_kernel` (the algorithm is in that module's docstring): each power
step is one pass over the columns that use the atom, on the residual stored transposed. The ``exact`` update is the
same loop run to convergence, with LAPACK's SVD for an atom that does not converge.
"""

from __future__ import annotations

import math

import numpy as np


def build_power_update(numba, opts: dict):
    """Compile (or load from Numba's cache) the sequential power update with the njit options ``opts``: returns
    power_update (its passes over an atom's columns are compiled with it)."""
    njit = numba.njit

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
    def top_right_singular_vector(Et, cols, slots, values, beg, end, di, u):
        """u ← the top right singular vector of the atom's residual rows r_j = e_j + d_i s_j [m, d] by LAPACK,
        signed to agree with the current u (the exact update's fallback when power steps did not converge)."""
        d = Et.shape[1]
        R = np.empty((end - beg, d), Et.dtype)
        for q in range(beg, end):
            sj = values[cols[q], slots[q]]
            e = Et[cols[q]]
            for c in range(d):
                R[q - beg, c] = e[c] + sj * di[c]
        _, _, vt = np.linalg.svd(R, full_matrices=False)
        dot = vt[0, 0] - vt[0, 0]
        for c in range(d):
            dot += vt[0, c] * u[c]
        sign = -1.0 if dot < 0 else 1.0
        for c in range(d):
            u[c] = sign * vt[0, c]

    @njit(**opts)
    def power_update(Et, Dt, Yt, ptr, cols, slots, values, power_iterations, tol, reseed, taken, one):
        """Sequential K-SVD atom updates in place. Et [n, d], Dt [k, d], Yt [n, d] (reseed only);
        the columns of atom i are cols[ptr[i]:ptr[i+1]] with their coefficient at values[col, slot].
        tol = 0: exactly ``power_iterations`` power steps per atom (the ``power`` update). tol > 0 (``exact``):
        power steps until two successive iterates differ by at most tol, at most ``power_iterations`` of them,
        else the top singular vector by LAPACK. Returns (unused atoms, atoms that took the LAPACK fallback).

        Single-threaded on purpose: a parallel region per pass (~20 µs of work) measured 2x faster on an
        idle machine but 10-100x slower as soon as another process or BLAS's spinning threads held a core."""
        k, d = Dt.shape
        n = Et.shape[0]
        dt = Et.dtype
        zero = one - one
        tiny = np.finfo(dt).tiny * one  # the dtype's smallest normal, as a scalar of the dtype
        u = np.empty(d, dt)
        unew = np.empty(d, dt)
        n_unused, n_fallback = 0, 0
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
            converged = False
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
                if tol > zero:
                    # R Rᵀ is positive semi-definite: from the warm start the iterates keep their sign, so
                    # ‖u_new − u‖ measures convergence (the error left is ≈ (σ₂/σ₁)² times it).
                    change = zero
                    for c in range(d):
                        x = unew[c] * nu
                        change += (x - u[c]) * (x - u[c])
                        u[c] = x
                    if math.sqrt(change) <= tol:
                        converged = True
                        break
                else:
                    for c in range(d):
                        u[c] = unew[c] * nu
            if tol > zero and not converged:
                top_right_singular_vector(Et, cols, slots, values, beg, end, di, u)
                n_fallback += 1
            du = zero
            for c in range(d):
                du += di[c] * u[c]
            refresh_pass(Et, cols, slots, values, beg, end, u, du, di)
            for c in range(d):
                di[c] = u[c]
        return n_unused, n_fallback

    return power_update
