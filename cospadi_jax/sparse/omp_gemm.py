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

import jax

from cospadi_jax.sparse.omp import SparseCodes, check_inputs, check_schedule, run_stepped
from cospadi_jax.sparse.omp_gemm_chunk import GEMM_PRECISIONS, _gemm_chunk

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

TRIANGULAR_FORMS = ("solve", "inverse")


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


def batch_omp_gemm(gram: jax.Array, correlations: jax.Array, sparsity: int, *, dtype=None, chunk_size: int | None = None,
                   memory_budget_bytes: int | None = None, eps: float | None = None, precision: str = "highest",
                   step_block: int = DEFAULT_STEP_BLOCK, triangular: str = "inverse") -> SparseCodes:
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
    sparsity, dtype = check_inputs(sparsity, gram, correlations, dtype)
    precision = _resolve_precision(precision)
    if triangular not in TRIANGULAR_FORMS:
        raise ValueError(f"triangular must be one of {TRIANGULAR_FORMS}, got {triangular!r}.")
    k, n = correlations.shape
    if memory_budget_bytes is None:
        memory_budget_bytes = default_memory_budget()
    if chunk_size is None:
        chunk_size = gemm_chunk_size(k, sparsity, dtype.itemsize, int(memory_budget_bytes), triangular=triangular,
                                     step_block=step_block)
    chunk_size = check_schedule(chunk_size, step_block, n)
    # Balance the chunks (same count, as equal as possible): the last chunk is padded to the chunk size and
    # every padded column costs a full GEMM row per step, so 1536 columns in chunks of 1420 would compute
    # 2840 columns; balanced, they compute 2 × 768.
    chunk_size = math.ceil(max(n, 1) / math.ceil(max(n, 1) / chunk_size))
    return run_stepped(partial(_gemm_chunk, precision=precision, triangular=triangular), gram, correlations,
                       sparsity, dtype, chunk_size, step_block, eps)
