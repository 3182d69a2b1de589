"""The K-SVD dictionary update with the supports of S fixed (:func:`update_dictionary`): ``power`` (sequential rank-1
atom updates by warm-started power iteration), ``exact`` (the same with an SVD) and ``mod`` (all atoms at once by
least squares). The variants are described in :mod:`.ksvd`'s docstring.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["update_dictionary"]

_HI = lax.Precision.HIGHEST


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
