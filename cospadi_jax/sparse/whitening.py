"""Activation-aware whitening: L with LᵀL = G (upper triangular, from Cholesky).

CoSpaDi (method.md §2) minimises ‖X(W − W̃)‖_F = ‖L(W − W̃)‖_F with G = XᵀX = LᵀL,
so dictionary learning runs on W_L = L·W and maps back with D = L⁻¹·D_L.

Precision: the factorisation runs in float64 when JAX x64 is enabled (the
default ``dtype=None`` picks float64 then, float32 otherwise). Calibration
Grams of LLM activations routinely have condition numbers above 1e8, which
float32 Cholesky cannot resolve (it fails or needs a jitter that visibly
changes the objective). TPUs have no fast float64 (it is emulated in software,
~10-100× slower): compute the Gram and this factorisation on the host CPU in
float64 (G is only [d_in, d_in]), then move L to the accelerator as float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from cospadi_jax.sparse.omp import check_finite, resolve_float_dtype

__all__ = ["WhiteningResult", "whiten", "whiten_target", "unwhiten_dictionary", "DEFAULT_JITTER_SCHEDULE"]

# Relative jitters ε (times tr(G)/d) tried in order after a failed plain Cholesky.
DEFAULT_JITTER_SCHEDULE: tuple[float, ...] = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


class WhiteningResult(NamedTuple):
    """Whitening factor and diagnostics.

    L: [d, d] upper triangular, LᵀL = G + jitter·I.
    jitter: float, absolute diagonal shift added (0.0 when plain Cholesky succeeded).
    lambda_min: float, smallest eigenvalue of G (NaN when not computed: plain Cholesky
        succeeded and ``diagnostics=False``).
    condition_number: float, cond(G + jitter·I) = λ_max/λ_min (NaN when not computed).
    attempts: int, Cholesky attempts (1 = no damping needed).
    effective_rank: int | None, eigenvalues of G above λ_max·d·eps (None without the full spectrum). Below d
        the calibration data span fewer directions than the layer has inputs (e.g. one repeated token).
    """

    L: jax.Array
    jitter: float
    lambda_min: float
    condition_number: float
    attempts: int
    effective_rank: int | None = None


def _cholesky_upper(G):
    # jnp.linalg.cholesky returns the lower factor C (C Cᵀ = G) and NaNs on failure.
    C = jnp.linalg.cholesky(G)
    return C.T, bool(jnp.all(jnp.isfinite(C)))


def whiten(
    gram,
    *,
    dtype=None,
    jitter_schedule: tuple[float, ...] = DEFAULT_JITTER_SCHEDULE,
    diagnostics: bool = True,
    exact_spectrum_max_dim: int = 4096,
) -> WhiteningResult:
    """Factor a calibration Gram G = Σ xᵀx: [d, d] into L [d, d] with LᵀL = G (+ damping).

    First a plain Cholesky. If it fails (G not numerically positive definite),
    λ_min is computed (eigvalsh) and G + (max(0, −λ_min) + ε·tr(G)/d)·I is tried for
    each ε of ``jitter_schedule`` in order (the SVD-LLM / Basis-Sharing damping of
    method.md §2.3, with a scale-free ε). Raises ``numpy.linalg.LinAlgError`` if all fail.

    Args:
        gram: G [d, d], symmetric positive (semi-)definite, finite.
        dtype: float64 (default when x64 is on) or float32.
        jitter_schedule: increasing relative jitters ε.
        diagnostics: compute λ_min and the condition number even when no damping is
            needed: one eigvalsh of G up to ``exact_spectrum_max_dim``; above it (the full
            spectrum of Llama-3-8B's 14336² down_proj Gram takes tens of minutes on a CPU) the two
            extreme eigenvalues by Lanczos (ARPACK), λ_min through the Cholesky factor (shift-invert).

    Not jit-able (it branches on the Cholesky outcome); it runs once per Gram.
    """
    if np.ndim(gram) != 2 or np.shape(gram)[0] != np.shape(gram)[1]:
        raise ValueError(f"gram must be a square [d, d] matrix Σ xᵀx, got shape {np.shape(gram)}.")
    if np.shape(gram)[0] < 1:
        raise ValueError("gram is empty (d = 0).")
    if not jitter_schedule or any(e <= 0 for e in jitter_schedule):
        raise ValueError(f"jitter_schedule must be non-empty and positive, got {jitter_schedule}.")
    if dtype is None and jax.config.jax_enable_x64:
        dtype = jnp.float64
    dtype = resolve_float_dtype(dtype, gram)
    check_finite("gram", gram)
    G = jnp.asarray(gram, dtype)
    asym = float(jnp.max(jnp.abs(G - G.T))) / max(float(jnp.max(jnp.abs(G))), np.finfo(dtype).tiny)
    if asym > 1e3 * np.finfo(dtype).eps:
        raise ValueError(f"gram is not symmetric (relative asymmetry {asym:.2e}); pass Σ xᵀx, not a general matrix.")
    G = 0.5 * (G + G.T)
    d = G.shape[0]

    L, ok = _cholesky_upper(G)
    attempts = 1
    jitter = 0.0
    eigenvalues = None
    if not ok:
        eigenvalues = _eigenvalues(G)
        lambda_min = float(eigenvalues[0])
        scale = float(jnp.trace(G)) / d
        if scale <= 0:
            raise np.linalg.LinAlgError("gram has a non-positive trace; no calibration activations were accumulated.")
        for eps in jitter_schedule:
            attempts += 1
            jitter = max(0.0, -lambda_min) + eps * scale
            L, ok = _cholesky_upper(G + jitter * jnp.eye(d, dtype=dtype))
            if ok:
                break
        if not ok:
            raise np.linalg.LinAlgError(
                f"Cholesky failed even with jitter {jitter:.3e} (λ_min {lambda_min:.3e}, tr/d {scale:.3e}); "
                "the Gram is badly broken (check the calibration capture) or pass a larger jitter_schedule."
            )
    if eigenvalues is None and diagnostics:
        eigenvalues = _eigenvalues(G) if d <= exact_spectrum_max_dim else _extreme_eigenvalues(G, L)
    effective_rank = None
    if eigenvalues is not None and len(eigenvalues) == d:
        effective_rank = int(np.sum(eigenvalues > eigenvalues[-1] * d * np.finfo(dtype).eps))
    if eigenvalues is not None:
        lambda_min = float(eigenvalues[0])
        shifted_min = lambda_min + jitter
        cond = float(eigenvalues[-1] + jitter) / shifted_min if shifted_min > 0 else float("inf")
    else:
        lambda_min = cond = float("nan")
    return WhiteningResult(L=L, jitter=float(jitter), lambda_min=lambda_min, condition_number=cond, attempts=attempts,
                           effective_rank=effective_rank)


def _eigenvalues(G: jax.Array) -> np.ndarray:
    """Ascending eigenvalues of a symmetric G, on the host with LAPACK ?syevd without eigenvectors: jnp's
    eigvalsh also forms the eigenvectors (2.2x slower at d = 2000; minutes at d = 14336, Llama-3-8B's down_proj)."""
    return np.linalg.eigvalsh(np.asarray(G))


def _extreme_eigenvalues(G: jax.Array, L: jax.Array, tol: float = 1e-6) -> np.ndarray:
    """[λ_min, λ_max] of a positive definite G = LᵀL (L upper) by Lanczos: λ_max on G, λ_min as the largest
    eigenvalue of G⁻¹ applied through two triangular solves with L (never an inverse)."""
    from scipy.linalg import cho_solve
    from scipy.sparse.linalg import LinearOperator, eigsh

    # One Fortran-ordered copy of L up front: LAPACK would otherwise copy the (transposed) factor on every solve.
    G_host, L_host = np.asarray(G, np.float64), np.asfortranarray(np.asarray(L, np.float64))
    d = G_host.shape[0]
    start = np.ones(d)  # a fixed start vector: the diagnostics are deterministic
    lam_max = eigsh(G_host, k=1, which="LA", tol=tol, v0=start, return_eigenvectors=False)[0]
    inverse = LinearOperator((d, d), matvec=lambda x: cho_solve((L_host, False), x, check_finite=False),
                             dtype=np.float64)
    lam_min = 1.0 / eigsh(inverse, k=1, which="LA", tol=tol, v0=start, return_eigenvectors=False)[0]
    return np.asarray([lam_min, lam_max])


def whiten_target(L: jax.Array, weight: jax.Array) -> jax.Array:
    """Transformed target Y = L·W. L: [d, d] upper; W: [d, n] (d = d_in). Returns [d, n]."""
    if L.shape[0] != weight.shape[0]:
        raise ValueError(f"L is [{L.shape[0]}, {L.shape[1]}] but W has {weight.shape[0]} rows; W must be [d_in, d_out].")
    return jnp.matmul(L, weight.astype(L.dtype), precision=jax.lax.Precision.HIGHEST)


def unwhiten_dictionary(L: jax.Array, dictionary_whitened: jax.Array) -> jax.Array:
    """Map a whitened dictionary back: D = L⁻¹·D_L by a triangular solve (no inverse).

    L: [d, d] upper triangular; dictionary_whitened: [d, k]. Returns D [d, k].
    """
    if L.shape[0] != dictionary_whitened.shape[0]:
        raise ValueError(f"L is {L.shape} but the dictionary has {dictionary_whitened.shape[0]} rows.")
    return solve_triangular(L, dictionary_whitened.astype(L.dtype), lower=False)
