"""Batch-OMP in GEMM form, for GPUs and TPUs: one shared Gram product per step, Cholesky state per column.

Same problem, same stopping rule and same result type as :func:`cospadi_jax.sparse.omp.batch_omp`
(the "B-form"): every column y_j of Y [d, n] is sparse-coded over D [d, k] (unit-norm atoms) from the
Gram GD = DᵀD [k, k] and the correlations α⁰ = DᵀY [k, n] alone, with exactly s non-zeros unless the
column stops early by scikit-learn's rule (``_gram_omp``, eps = machine epsilon of the working dtype):

* the atom a = argmax |α| is already active, or α[a]² < eps;
* the new Cholesky pivot GD[a, a] − ‖L⁻¹ GD[I, a]‖² is ≤ eps.

A stopped column keeps its coefficients and never changes again; nothing becomes NaN.

Formulation
-----------
Per column we keep only Cholesky state of the selected atoms I (|I| = t ≤ s), never the B-form's s×k
matrix B = GD[:, I]·L⁻ᵀ: the factor (L⁻¹ by default, or L), z = L⁻¹ α⁰_I [s] (one new entry per step),
γ [s], indices [s], the active mask [k] and α [k]; for the whole chunk of m columns the coefficients
X [m, k] (γ scattered densely). A step, with g = GD[I, a]:

    a   = argmax_i |α_i|                                  (per column)
    w   = L⁻¹ g                                           (the new row of L)
    p   = √(GD[a, a] − w·w)                               (pivot; stop if p² ≤ eps)
    z_t = (α⁰_a − w·z) / p
    γ   = L⁻ᵀ z                                           (the least-squares coefficients on I ∪ {a})
    X   = scatter(γ at I)                                 [m, k]
    α   = α⁰ − X·GD                                       (one GEMM [m, k] × [k, k] for the whole chunk)

which is sklearn's arithmetic (forward solve for w, ``potrs`` for γ, α = α⁰ − GD[:, I] γ), except that
GD[:, I] γ is computed for all m columns at once as a dense product with the one shared Gram. Two ways
to do the per-column triangular work (``triangular``):

* ``"inverse"`` (default): keep L⁻¹, stored as its lower block-triangle (block-rows of ``step_block``
  rows, block-row i holding columns [0, (i+1)·block)). w = L⁻¹ g and u = L⁻ᵀ w = GD[I, I]⁻¹ g are two
  batched matrix-vector products over the stored blocks; the new row of L⁻¹ is (e_t − u)/p and γ is
  updated in place, γ += z_t·(e_t − u)/p (earlier rows of L⁻¹ never change). No sequential triangular
  solve (matrix-vector products are what GPUs and TPUs run at full bandwidth), only the lower triangle is
  stored and read, and growing the factor appends a block-row instead of copying the factor.
* ``"solve"``: keep L (an [e, e] array, identity rows beyond t) and do two triangular solves per step
  (``lax.linalg.triangular_solve``: cuBLAS trsm on GPU, a blocked expansion on TPU, Eigen on CPU).

Both give sklearn's supports and coefficients in f64 (≈ 5e-14 relative on the real whitened SmolLM2
up_proj, tests/test_omp_real.py). The s steps are split into static blocks of ``step_block`` steps (as in
omp.py): inside block [start, end) the factor covers e = end slots, so the work at step t touches only
the first ⌈(t+1)/block⌉·block rows. Each block is a ``lax.while_loop`` that exits as soon as every column
of the chunk has stopped.

Work per column and step (k atoms, t selected, e = end of the step's block, e − t ≤ block):

* GEMM: 2·k² flops (the row of X·GD; X is dense, its zeros are multiplied too). For the chunk it is one
  [m, k] × [k, k] product reading the k×k Gram once per step for all m columns: ≈ m/2 flop per byte of
  Gram, compute-bound (tensor cores / MXU) once m is in the hundreds, unlike the B-form's per-column GEMV
  over its own s×k matrix (0.5 flop per byte, bandwidth-bound).
* Triangular work: two passes over the column's stored factor, ≈ e·(e + block)/2 values ("inverse") or the
  e²/2 lower triangle ("solve"): ≈ 2·e² flops and ≈ 4·e² bytes (f32). The factors are per column, so this
  stays matrix-vector work at 0.5 flop per byte, at memory bandwidth. Summed over the steps it is ≈ (2/3)·(s/k)
  of the B-form's bytes (≈ 0.4× at the paper's s = k/2, 1.9 MB per column-step at the Llama-3.2-1B gate/up
  shape): on an accelerator it is *not* negligible next to the GEMM (projected, it is the larger part on an
  A100 even with the FP32 non-tensor GEMM; benchmarks/projection.py, docs/benchmarks.md).
* O(k) vector work: argmax, the mask, the zero-fill and scatter of X, α⁰ − (·).

Per column this is ≈ 2·k²·s flops of GEMM (4× the B-form's whole ≈ k·s² at s = k/2) plus ≈ (2/3)·s³ of
triangular work: the GEMM form buys compute-bound work with extra flops. On this project's CPU (2-core Zen
3 VM, XLA float32 GEMM 60-160 GFLOP/s) that does not pay: the B-form's 16 MiB chunks stream from L3 at
40-65 GB/s, the 2·k² GEMM rows alone cost 0.2-1× the B-form's whole pass, and XLA:CPU runs the
batched per-column matrix-vector products and triangular solves far below its streaming rate (measured on
the up_proj shape, d 576, n 1536, k 526, s 263, f32, 2026-12-03, benchmarks/bench_omp_gemm.py, load
average 0.1-5: B-form 2.7-7.4 s, GEMM form 11.7-12.3 s "inverse" (of which 1.3-2.8 s GEMM) and 46 s
"solve"; docs/benchmarks.md, "GEMM alternative" and "Projected compression time on accelerators"). On a
GPU or TPU, whose matrix units deliver 10-300 flops per byte of memory bandwidth, the GEMM part is cheap
and the form is the faster one (projected 1.5-2.1× faster than the B-form for Llama-3.2-1B).

Precision of the GEMM (float32 only; float64 always runs a full f64 product)
---------------------------------------------------------------------------
``precision`` sets how α⁰ − X·GD is computed; the triangular work is always at full working precision
(it is bandwidth-bound, a lower precision would buy nothing).

* ``"highest"`` (default, ``lax.Precision.HIGHEST``): full f32 on GPU (non-tensor-core FP32: 19.5
  TFLOP/s on an A100, 67 on an H100/H200), 6 bf16 passes on TPU. Supports as close to sklearn (f64) as
  the B-form's in f32 (tests: ≥ 99.5 % of atoms, measured 100 % of columns on a random up_proj-shaped
  problem; 98.4 % of columns on the real up_proj, equal to the B-form).
* ``"bf16x3"`` (``lax.DotAlgorithmPreset.BF16_BF16_F32_X3``): each f32 operand split as hi + lo in bf16,
  hi·hi + hi·lo + lo·hi with f32 accumulation (≈ 16 mantissa bits), on bf16 tensor cores / the MXU at ≈ 1/3
  of the bf16 rate (104 TFLOP/s on an A100, 330 on an H100). (``lax.Precision.HIGH`` is not used for it: on
  GPUs HIGH means TF32; only on TPUs does it mean 3 bf16 passes.)
* ``"tf32"`` / ``"default"`` (``lax.Precision.DEFAULT``): TF32 tensor cores on Ampere and newer (operands
  rounded to 10 mantissa bits, f32 accumulation: 156 TFLOP/s on an A100, 495 on an H100), one bf16 pass
  on TPU (7 bits).

Why supports move: α = α⁰ − X·GD then carries an absolute error of order u·Σ_i |x_i·GD[i, ·]| (u ≈ 2⁻¹¹
for TF32, 2⁻⁸ for bf16, ≈ 2⁻¹⁷ for bf16x3), so whenever the two largest |α| of a step are closer than
that, the argmax can differ from the f32 one, and from then on the column follows a different greedy
path; the approximation ‖Y − D·S‖ barely moves, since either atom was nearly as good. Emulated on the CPU
(operands of X·GD rounded to TF32 / bf16 / hi+lo bf16, f32 accumulation; benchmarks/gemm_precision_emulation.py,
2026-12-03), 256 columns of the up_proj shape (k 526, s 263), share of columns whose support equals the
``"highest"`` one / share of its atoms kept / change of the relative error:

    ======================  ===================================  ======================================
    emulated GEMM           random Y, D = columns of random Y    real whitened SmolLM2 up_proj (D init)
    ======================  ===================================  ======================================
    bf16x3                  99.6 % / 99.99 % / +1.8e-6           93.8 % / 99.3 % / −3.4e-6
    TF32                    57.4 % / 95.8 %  / −3.8e-5           14.1 % / 81.8 % / −1.2e-4
    bf16 (1 pass; TPU tf32) 1.2 %  / 84.2 %  / +5.0e-4           15.6 % / 75.1 % / −3.7e-4
    ======================  ===================================  ======================================

(relative errors 0.4577 and 0.1825; the early-stop count on the real problem is unchanged, 96 of 256).
So "tf32" is a different but equally good greedy path, not sklearn's; use "highest" (or "bf16x3") where
results are compared with the f32/f64 implementations or with sklearn.

On the CPU every setting computes a full-f32 product (XLA:CPU ignores the precision and the bf16 dot
algorithms; tests/test_omp_gemm.py checks that the results are identical), so the table above is an
emulation; benchmarks/device_check.py measures each setting's supports against "highest" on a GPU.

Memory per column (itemsize each): the factor, ≈ s·(s + block)/2 values for "inverse" (≈ s²/2) or 2·s²
for "solve" (the s×s L, held twice while it is copied into its grown shape between blocks), plus
≈ 6·k (α, α⁰, X, the GEMM output, the mask) and ≈ 4·s (z, γ, indices, w): not the B-form's s·k
(:func:`gemm_chunk_size`). The default chunk budget (``memory_budget_bytes=None``) is 25 % of the device's
memory where ``memory_stats()`` reports ``bytes_limit`` (GPU, TPU: e.g. ≈ 26 GiB on an H200 with JAX's
default 75 % preallocation), else 256 MiB (the CPU): large chunks make the shared GEMM efficient and cut
the number of sequential steps. Chunks are balanced (equal sizes) so that padding stays below one column
per chunk.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cospadi_jax.sparse.omp import SparseCodes, _check_sparsity, check_finite, resolve_float_dtype, run_chunks

__all__ = [
    "DEFAULT_CPU_MEMORY_BUDGET_BYTES",
    "DEFAULT_STEP_BLOCK",
    "GEMM_PRECISIONS",
    "TRIANGULAR_FORMS",
    "batch_omp_gemm",
    "default_memory_budget",
    "gemm_chunk_size",
]

# Fixed chunk budget where the device reports no memory (the CPU): chunks of a few hundred columns keep
# the shared [m, k] × [k, k] product in the efficient range of XLA:CPU's GEMM.
DEFAULT_CPU_MEMORY_BUDGET_BYTES = 256 * 1024 * 1024
# Share of the device memory one chunk may use on accelerators (the rest: Gram, inputs, outputs, XLA).
DEVICE_MEMORY_FRACTION = 0.25
# Steps per static block. Larger than omp.py's 32: every block is one more compiled while-loop body
# (compile time grows with s/block), and the factor's overshoot (e − t ≤ block) costs ≈ 1.5·block/s of
# the triangular bytes, under 10 % at the Llama shapes.
DEFAULT_STEP_BLOCK = 64
# Columns per chunk at most (bounds the unrolled work per call and the GEMM's m).
MAX_CHUNK_COLUMNS = 16384

# Public precision name -> what the chunk's GEMM is given (see module docstring).
GEMM_PRECISIONS: dict[str, object] = {
    "highest": lax.Precision.HIGHEST,
    "tf32": lax.Precision.DEFAULT,
    "default": lax.Precision.DEFAULT,
    "bf16x3": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
}
TRIANGULAR_FORMS = ("solve", "inverse")
_HI = lax.Precision.HIGHEST


def default_memory_budget(device: jax.Device | None = None) -> int:
    """Chunk budget in bytes: 25 % of ``device``'s memory (default: the first device) if JAX reports it.

    GPUs and TPUs report ``memory_stats()["bytes_limit"]``; the CPU reports nothing and gets
    :data:`DEFAULT_CPU_MEMORY_BUDGET_BYTES`.
    """
    device = device if device is not None else jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some PJRT plugins raise instead of returning None
        stats = None
    limit = (stats or {}).get("bytes_limit")
    if not limit:
        return DEFAULT_CPU_MEMORY_BUDGET_BYTES
    return int(DEVICE_MEMORY_FRACTION * float(limit))


def gemm_chunk_size(
    k: int,
    sparsity: int,
    itemsize: int,
    memory_budget_bytes: int,
    *,
    triangular: str = "inverse",
    step_block: int = DEFAULT_STEP_BLOCK,
) -> int:
    """Columns per chunk so that the per-column state of the GEMM form fits ``memory_budget_bytes``.

    Per column: the factor ("inverse": the lower block-triangle of L⁻¹, s·(s + block)/2 values;
    "solve": the s×s L, twice while it is copied into its grown shape between blocks: 2·s²), plus
    α, α⁰, X, the GEMM output and the mask (≈ 6 k-vectors) and z, γ, indices, w (≈ 4 s-vectors).
    Not the B-form's s·k (:func:`cospadi_jax.sparse.omp.omp_chunk_size`).
    """
    block = max(1, min(int(step_block), int(sparsity)))
    factor = sparsity * (sparsity + block) // 2 if triangular == "inverse" else 2 * sparsity * sparsity
    per_column = itemsize * (factor + 6 * k + 4 * sparsity)
    return int(max(1, min(MAX_CHUNK_COLUMNS, memory_budget_bytes // max(per_column, 1))))


def _resolve_precision(precision: str) -> str:
    if not isinstance(precision, str) or precision not in GEMM_PRECISIONS:
        raise ValueError(
            f"precision must be one of {tuple(GEMM_PRECISIONS)} (the GEMM α⁰ − X·GD: 'highest' = full f32, "
            f"'tf32'/'default' = TF32 on GPU / 1-pass bf16 on TPU, 'bf16x3' = 3 bf16 passes), got {precision!r}."
        )
    return precision


class _State(NamedTuple):
    # The per-column factor. "solve": L as one array [m, e, e] (lower; identity rows ≥ n_active).
    # "inverse": L⁻¹ as a tuple of block-rows, block i = rows [i·b, (i+1)·b) and columns [0, c_i) with
    # c_i = min(s, (i+1)·b), each [m, b_i, c_i] (zero rows ≥ n_active): only the lower block-triangle is
    # stored, read and allocated, and growing it appends a block instead of copying the factor.
    F: jax.Array | tuple[jax.Array, ...]
    z: jax.Array  # [m, s] L⁻¹ α⁰_I, zero beyond n_active
    gamma: jax.Array  # [m, s] coefficients of the slots ("inverse": progressive; "solve": unused zeros)
    alpha: jax.Array  # [m, k] current correlations α⁰ − X·GD
    active: jax.Array  # [m, k] bool, atom already selected
    indices: jax.Array  # [m, s] int32, atom of each slot (0 beyond n_active)
    n_active: jax.Array  # [m] int32
    stopped: jax.Array  # [m] bool


def _select(t, F, z, gamma, alpha, active, indices, n_active, stopped, gram, alpha0, eps, *, triangular: str,
            block_start: int):
    """Per-column part of step ``t`` (vmapped): pick the atom, extend the factor, return the slots' γ.

    ``block_start``: first step of the current static block (the "inverse" form writes its block-row).
    Returns (F, z, gamma, active, indices, n_active, stopped, gamma_e) with gamma_e [e] the coefficients
    of slots 0..e-1 after this step (zero beyond n_active), e = end of the current block.
    """
    e = F.shape[0] if triangular == "solve" else F[-1].shape[1]
    atom = jnp.argmax(jnp.abs(alpha)).astype(jnp.int32)
    alpha_atom = alpha[atom]
    slot = jnp.arange(e, dtype=jnp.int32)
    valid = slot < n_active  # slots holding a selected atom (== slot < t while the column runs)
    g = jnp.where(valid, gram[atom, indices[:e]], 0)  # GD[I, a], zero-padded to e
    if triangular == "solve":
        # L has identity rows beyond n_active, so w = g = 0 there.
        w = lax.linalg.triangular_solve(F, g[:, None], left_side=True, lower=True)[:, 0]
    else:
        # w = L⁻¹ g block-row by block-row (L⁻¹ has zero rows beyond n_active, so w = 0 there).
        w_blocks = [jnp.matmul(Fi, g[: Fi.shape[1]], precision=_HI) for Fi in F]
        w = jnp.concatenate(w_blocks)
    pivot_sq = gram[atom, atom] - jnp.dot(w, w, precision=_HI)
    # sklearn's stopping rule (module docstring); once stopped a column never changes again.
    stop = stopped | active[atom] | (alpha_atom * alpha_atom < eps) | (pivot_sq <= eps)
    keep = ~stop
    pivot = jnp.sqrt(jnp.where(stop, jnp.ones((), pivot_sq.dtype), pivot_sq))
    z_t = (alpha0[atom] - jnp.dot(w, z[:e], precision=_HI)) / pivot
    z_t = jnp.where(keep, z_t, 0)
    z = z.at[t].set(z_t)
    at_t = slot == t
    if triangular == "solve":
        row = jnp.where(at_t, pivot, w)  # [w_0..w_{t-1}, p, 0, ...]: the new row of L
        F = F.at[t].set(jnp.where(keep, row, F[t]))
        # γ = L⁻ᵀ z (sklearn's potrs second half); z = 0 and identity rows beyond n_active give γ = 0 there.
        gamma_e = lax.linalg.triangular_solve(F, z[:e, None], left_side=True, lower=True, transpose_a=True)[:, 0]
    else:
        # u = L⁻ᵀ w = GD[I, I]⁻¹ GD[I, a], from the same block-rows (zero beyond n_active).
        u = jnp.zeros((e,), w.dtype)
        for Fi, wi in zip(F, w_blocks):
            u = u.at[: Fi.shape[1]].add(jnp.matmul(wi, Fi, precision=_HI))
        row = jnp.where(keep, (at_t.astype(w.dtype) - u) / pivot, 0)  # new row of L⁻¹: [−uᵀ/p, 1/p, 0, ...]
        F = (*F[:-1], F[-1].at[t - block_start].set(row))
        # γ = L⁻ᵀ z = Σ_j z_j·(row j of L⁻¹): earlier rows of L⁻¹ never change, so γ is updated in place.
        gamma = gamma.at[:e].add(z_t * row)
        gamma_e = gamma[:e]
    return (
        F,
        z,
        gamma,
        active.at[atom].set(active[atom] | keep),
        indices.at[t].set(jnp.where(keep, atom, indices[t])),
        n_active + keep.astype(jnp.int32),
        stop,
        gamma_e,
    )


def _grow(F, m: int, start: int, end: int, triangular: str, dtype):
    """The factor for the block [start, end): L padded to [m, end, end] with identity rows ("solve"), or
    one more zero block-row [m, end − start, end] of L⁻¹ ("inverse")."""
    if triangular == "inverse":
        return (*F, jnp.zeros((m, end - start, end), dtype))
    e = F.shape[1]
    F = jnp.pad(F, ((0, 0), (0, end - e), (0, end - e)))
    return F + jnp.diag((jnp.arange(end) >= e).astype(dtype))[None]


@partial(jax.jit, static_argnames=("sparsity", "step_block", "precision", "triangular"))
def _gemm_chunk(gram, alpha0, eps, *, sparsity: int, step_block: int, precision: str, triangular: str):
    """GEMM-form OMP for one chunk. gram: [k, k]; alpha0: [m, k] (DᵀY transposed).

    Returns indices [m, s] int32, values [m, s], n_active [m] int32.
    """
    m, k = alpha0.shape
    s = sparsity
    dtype = alpha0.dtype
    # float64 always gets a full f64 product: the reduced-precision modes exist for f32 on accelerators.
    prec = GEMM_PRECISIONS[precision] if dtype == jnp.float32 else _HI
    rows = jnp.arange(m, dtype=jnp.int32)[:, None]

    def step(t, st: _State, block_start: int) -> _State:
        select = jax.vmap(partial(_select, triangular=triangular, block_start=block_start),
                          in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0, None, 0, None))
        F, z, gamma, active, indices, n_active, stopped, gamma_e = select(
            t, st.F, st.z, st.gamma, st.alpha, st.active, st.indices, st.n_active, st.stopped, gram, alpha0, eps
        )
        e = gamma_e.shape[1]
        # X: γ scattered densely; slots beyond n_active hold (atom 0, value 0), so add (not set) is exact.
        X = jnp.zeros((m, k), dtype).at[rows, indices[:, :e]].add(gamma_e)
        # The one shared-Gram GEMM of the step (GD is symmetric: X·GD = (GD·Xᵀ)ᵀ). A stopped column's X
        # is unchanged, so its α is recomputed to the same values and its (sticky) stop is unaffected.
        alpha = alpha0 - jnp.matmul(X, gram, precision=prec)
        return _State(F, z, gamma, alpha, active, indices, n_active, stopped)

    state = _State(
        F=() if triangular == "inverse" else jnp.zeros((m, 0, 0), dtype),
        z=jnp.zeros((m, s), dtype),
        gamma=jnp.zeros((m, s), dtype),
        alpha=alpha0,
        active=jnp.zeros((m, k), bool),
        indices=jnp.zeros((m, s), jnp.int32),
        n_active=jnp.zeros((m,), jnp.int32),
        stopped=jnp.zeros((m,), bool),
    )
    # Static blocks of steps; each is a while_loop that exits as soon as every column has stopped.
    for start in range(0, s, step_block):
        end = min(s, start + step_block)

        def cond(carry, end=end):
            t, st = carry
            return (t < end) & ~jnp.all(st.stopped)

        def body(carry, start=start):
            t, st = carry
            return t + 1, step(t, st, start)

        state = state._replace(F=_grow(state.F, m, start, end, triangular, dtype))
        _, state = lax.while_loop(cond, body, (jnp.int32(start), state))
    if triangular == "solve":
        # Final γ = L⁻ᵀ z (also for columns that stopped early: their L and z are frozen).
        F = _grow(state.F, m, state.F.shape[1], s, triangular, dtype)
        gamma = lax.linalg.triangular_solve(F, state.z[..., None], left_side=True, lower=True, transpose_a=True)[..., 0]
    else:
        gamma = state.gamma
    return state.indices, gamma, state.n_active


def batch_omp_gemm(
    gram: jax.Array,
    correlations: jax.Array,
    sparsity: int,
    *,
    dtype=None,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    eps: float | None = None,
    precision: str = "highest",
    step_block: int = DEFAULT_STEP_BLOCK,
    triangular: str = "inverse",
) -> SparseCodes:
    """Batch-OMP over all columns in GEMM form (module docstring); same contract as ``batch_omp``.

    Args:
        gram: GD = DᵀD, [k, k], for a dictionary with unit-norm atoms.
        correlations: DᵀY, [k, n].
        sparsity: s (static), 1 ≤ s ≤ k; non-zeros per column.
        dtype: working dtype (float32/float64); default: that of the inputs.
        chunk_size: columns per chunk (one GEMM of [chunk, k] × [k, k] per step); default from
            ``memory_budget_bytes``.
        memory_budget_bytes: bound on the per-chunk state (:func:`gemm_chunk_size`: ≈ chunk·(s²/2 + 6·k)·itemsize
            for "inverse"); None: 25 % of the device memory where JAX reports it, else 256 MiB
            (:func:`default_memory_budget`).
        eps: stopping threshold (default: machine epsilon of ``dtype``, as sklearn).
        precision: GEMM precision for float32: "highest", "tf32" (= "default"), "bf16x3" (module docstring).
        step_block: steps per static block of the triangular schedule.
        triangular: "solve" (keep L, two triangular solves per step) or "inverse" (keep L⁻¹, two batched
            matrix-vector products per step).

    Returns:
        SparseCodes with indices/values [n, s], n_nonzero [n], n_early_stopped [].
    """
    sparsity = _check_sparsity(sparsity, gram, correlations)
    dtype = resolve_float_dtype(dtype, gram, correlations)
    precision = _resolve_precision(precision)
    if triangular not in TRIANGULAR_FORMS:
        raise ValueError(f"triangular must be one of {TRIANGULAR_FORMS}, got {triangular!r}.")
    check_finite("gram", gram)
    check_finite("correlations", correlations)
    k, n = correlations.shape
    if memory_budget_bytes is None:
        memory_budget_bytes = default_memory_budget()
    if chunk_size is None:
        chunk_size = gemm_chunk_size(k, sparsity, dtype.itemsize, int(memory_budget_bytes), triangular=triangular,
                                     step_block=step_block)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if int(step_block) < 1:
        raise ValueError(f"step_block must be >= 1, got {step_block}.")
    chunk_size = int(min(chunk_size, max(n, 1)))
    # Balance the chunks (same count, as equal as possible): the last chunk is padded to the chunk size and
    # every padded column costs a full GEMM row per step, so 1536 columns in chunks of 1420 would compute
    # 2840 columns; balanced, they compute 2 × 768.
    chunk_size = math.ceil(max(n, 1) / math.ceil(max(n, 1) / chunk_size))
    eps_value = float(np.finfo(dtype).eps) if eps is None else float(eps)

    step_block = int(min(step_block, sparsity))
    eps_arr = jnp.asarray(eps_value, dtype)
    gram = jnp.asarray(gram, dtype)
    return run_chunks(lambda alpha: _gemm_chunk(gram, alpha, eps_arr, sparsity=sparsity, step_block=step_block,
                                                precision=precision, triangular=triangular),
                      jnp.asarray(correlations, dtype).T, chunk_size, sparsity)
