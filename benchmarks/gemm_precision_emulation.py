"""What TF32 / bf16 / bf16x3 GEMMs do to the GEMM-form OMP's supports, emulated on the CPU.

    OPENBLAS_NUM_THREADS=1 python benchmarks/gemm_precision_emulation.py            # random up_proj shape
    OPENBLAS_NUM_THREADS=1 python benchmarks/gemm_precision_emulation.py --real     # SmolLM2 layer-10 up_proj

XLA:CPU computes every ``precision`` of ``batch_omp_gemm`` as a full f32 product, so the accelerator modes
cannot be run here. This script replaces the chunk's GEMM α⁰ − X·GD (and only it) by an emulation: both
operands rounded to TF32 (10 explicit mantissa bits, round to nearest) or bf16 (7 bits), or split into
bf16 hi + lo with hi·hi + hi·lo + lo·hi ("bf16x3"), each product then accumulated in f32. It compares each
with the unmodified f32 "highest" run: share of columns with an identical support, share of its atoms
kept, and the change of ‖Y − D·S‖/‖Y‖. Shape: d 576, k 526, s 263 (CR 0.2, ρ 2), ``--columns`` columns;
random: Y Gaussian, D = unit-norm columns of a second Gaussian matrix; ``--real``: the whitened target and
the initial dictionary of tests/test_omp_real.py (needs the embedded SmolLM2, ~35 s to build).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import cospadi_jax.sparse.omp_gemm as og  # noqa: E402
import cospadi_jax.sparse.omp_gemm_chunk as ogc  # noqa: E402

_HI = lax.Precision.HIGHEST


def to_tf32(x: jax.Array) -> jax.Array:
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000)  # keep 10 explicit mantissa bits
    return lax.bitcast_convert_type(bits, jnp.float32)


def to_bf16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def emulated_matmul(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    """jnp.matmul, except for the emulation markers that the patched GEMM_PRECISIONS hand to the chunk GEMM."""
    if precision == "EMUL_TF32":
        return jnp.matmul(to_tf32(a), to_tf32(b), precision=_HI)
    if precision == "EMUL_BF16":
        return jnp.matmul(to_bf16(a), to_bf16(b), precision=_HI)
    if precision == "EMUL_BF16X3":
        ah, bh = to_bf16(a), to_bf16(b)
        al, bl = to_bf16(a - ah), to_bf16(b - bh)
        return jnp.matmul(ah, bh, precision=_HI) + (jnp.matmul(ah, bl, precision=_HI) + jnp.matmul(al, bh, precision=_HI))
    return jnp.matmul(a, b, precision=precision)


def patch_module() -> None:
    """Route the GEMM-form chunk's jnp.matmul through ``emulated_matmul`` and register the emulated precisions."""
    proxy = types.SimpleNamespace(**{name: getattr(jnp, name) for name in dir(jnp) if not name.startswith("__")})
    proxy.matmul = emulated_matmul
    ogc.jnp = proxy
    og.GEMM_PRECISIONS.update({"emul_tf32": "EMUL_TF32", "emul_bf16": "EMUL_BF16", "emul_bf16x3": "EMUL_BF16X3"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--columns", type=int, default=256)
    ap.add_argument("--real", action="store_true")
    args = ap.parse_args()
    d, k, s, n = 576, 526, 263, args.columns
    if args.real:
        jax.config.update("jax_enable_x64", True)
        sys.path.insert(0, str(HERE))
        from _real_problem import build_real_problems, initial_dictionary

        p = build_real_problems(("mlp.up_proj",), nsamples=8, seqlen=256)["mlp.up_proj"]
        D = initial_dictionary(p.Y, p.n_atoms).astype(np.float32)
        Y = p.Y[:, :: max(1, p.Y.shape[1] // n)][:, :n].astype(np.float32)
        source = "real whitened SmolLM2 layer-10 up_proj (tests/test_omp_real.py's D)"
    else:
        rng = np.random.default_rng(0)
        Yall = rng.standard_normal((d, n + k)).astype(np.float32)
        D, Y = Yall[:, n:] / np.linalg.norm(Yall[:, n:], axis=0), Yall[:, :n]
        source = "random (seed 0)"
    patch_module()
    G, C = jnp.asarray(D.T @ D, jnp.float32), jnp.asarray(D.T @ Y, jnp.float32)
    eps = jnp.float32(np.finfo(np.float32).eps)

    def run(precision: str) -> tuple[np.ndarray, np.ndarray]:
        idx, val, cnt = ogc._gemm_chunk(G, C.T, eps, sparsity=s, step_block=og.DEFAULT_STEP_BLOCK, precision=precision,
                                       triangular="inverse")
        S = np.zeros((k, n), np.float64)
        S[np.asarray(idx), np.arange(n)[:, None]] += np.asarray(val)
        return S, np.asarray(cnt)

    err = lambda S: float(np.linalg.norm(Y - D @ S) / np.linalg.norm(Y))  # noqa: E731
    ref, cref = run("highest")
    print(f"# {source}: d {d}, k {k}, s {s}, {n} columns; 'highest': rel. error {err(ref):.6f}, "
          f"mean nnz {cref.mean():.1f}, early stops {int(np.sum(cref < s))}")
    print("| emulated GEMM | identical supports (columns) | atoms kept | Δ rel. error | early stops |")
    print("|---|---|---|---|---|")
    for name, label in (("emul_bf16x3", "bf16x3"), ("emul_tf32", "TF32"), ("emul_bf16", "bf16, 1 pass")):
        S, cnt = run(name)
        cols = np.mean(np.all((S != 0) == (ref != 0), axis=0))
        atoms = np.sum((S != 0) & (ref != 0)) / np.sum(ref != 0)
        print(f"| {label} | {100 * cols:.1f} % | {100 * atoms:.2f} % | {err(S) - err(ref):+.2e} | {int(np.sum(cnt < s))} |")


if __name__ == "__main__":
    main()
