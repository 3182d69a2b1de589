"""The K-SVD dictionary update with the supports of S fixed (:func:`update_dictionary`): ``power`` (sequential rank-1
atom updates by warm-started power iteration), ``exact`` (the same with the exact top singular pair) and ``mod`` (all
atoms at once by least squares). The variants are described in :mod:`.ksvd`'s docstring.

The exact pair comes from the same warm-started power steps run until two successive iterates differ by at most
``EXACT_TOLERANCE_EPS`` machine epsilons, with an SVD of the atom's residual for an atom still moving after
``EXACT_MAX_STEPS`` steps. Each step shrinks the error by (σ₂/σ₁)², and on SmolLM2's whitened projections σ₂/σ₁ stayed
below about 0.5 (``benchmarks/bench_exact_update.py``): a handful of steps, where an SVD of the masked [d, n] residual
per atom costs a hundred times more. The fused CPU kernel (:mod:`.cpu_kernel`) follows the same rule.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["update_dictionary"]

_HI = lax.Precision.HIGHEST
# The exact update's stopping rule: successive iterates within a few dozen roundoffs of a unit vector (the change's
# floor measured ~1 eps at d = 1536 in float32), and the steps allowed before an SVD takes over.
EXACT_TOLERANCE_EPS = 32
EXACT_MAX_STEPS = 100


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


def _rank1_exact(R_v_fn, R_t_u_fn, R_fn, u0, max_steps: int):
    """The top singular triplet of a masked residual, exactly (to working precision).

    Power steps from u0 until two successive iterates differ by at most EXACT_TOLERANCE_EPS·eps (R Rᵀ is positive
    semi-definite, so from a warm start the iterates keep their sign), at most ``max_steps``; else the top left
    singular vector of R_fn() [d, n] by SVD, signed like the last iterate. Returns (u [d], g = Rᵀu [n]).
    """
    tiny = jnp.finfo(u0.dtype).tiny
    tol = EXACT_TOLERANCE_EPS * jnp.finfo(u0.dtype).eps

    def moving(state):
        step, _, change = state
        return (step < max_steps) & (change > tol)

    def body(state):
        step, u, _ = state
        v = R_t_u_fn(u)
        v = v / jnp.maximum(jnp.linalg.norm(v), tiny)
        u_new = R_v_fn(v)
        u_new = u_new / jnp.maximum(jnp.linalg.norm(u_new), tiny)
        return step + 1, u_new, jnp.linalg.norm(u_new - u)

    _, u, change = lax.while_loop(moving, body, (0, u0, jnp.asarray(jnp.inf, u0.dtype)))

    def by_svd(u):
        top = jnp.linalg.svd(R_fn(), full_matrices=False)[0][:, 0]
        return jnp.where(jnp.dot(top, u) < 0, -top, top)

    u = lax.cond(change > tol, by_svd, lambda u: u, u)
    return u, R_t_u_fn(u)


@partial(jax.jit, static_argnames=("dict_update", "power_iterations", "unused", "exact_max_steps"))
def update_dictionary(Y, D, S, *, dict_update: str = "power", power_iterations: int = 8, unused: str = "skip",
                      exact_max_steps: int = EXACT_MAX_STEPS):
    """One dictionary update with the supports of S fixed.

    Y: [d, n]; D: [d, k] unit-norm; S: [k, n] dense coefficients. ``exact_max_steps``: the exact update's power
    steps per atom before its SVD fallback (module docstring; 0: an SVD for every atom).
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
        # Residual without atom i, restricted to Ω_i: R = (E + d_i s_iᵀ) ⊙ mask (materialised only by the SVD).
        R_v = lambda v: jnp.matmul(E, v * fmask, precision=_HI) + d_i * jnp.dot(s_i, v, precision=_HI)
        R_t_u = lambda u: (jnp.matmul(u, E, precision=_HI) + s_i * jnp.dot(d_i, u, precision=_HI)) * fmask
        if dict_update == "power":
            u, g = _rank1_power(R_v, R_t_u, d_i, power_iterations)
        else:
            u, g = _rank1_exact(R_v, R_t_u, lambda: (E + jnp.outer(d_i, s_i)) * fmask, d_i, exact_max_steps)
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
