"""B-form vs GEMM-form Batch-OMP on the up_proj shape, on whatever JAX backend runs it (here: the CPU).

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_omp_gemm.py            # B-form, GEMM form "inverse"
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_omp_gemm.py --solve    # + the "solve" form (~2 min more on the CPU)

Problem: d 576, n 1536, k 526, s 263 (SmolLM2 up_proj, CR 0.2, ρ 2), float32, seeded Gaussian Y and D = unit-norm
columns of a second Gaussian matrix; each time is the second of two calls (the first compiles). Also times the
bare [n, k] × [k, k] GEMM of one GEMM-form step. benchmarks/device_check.py is the GPU counterpart.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cospadi_jax.sparse.omp import batch_omp  # noqa: E402
from cospadi_jax.sparse.omp_gemm import batch_omp_gemm  # noqa: E402


def second_call(fn) -> float:
    jax.block_until_ready(fn())
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solve", action="store_true", help="also time triangular='solve'")
    args = ap.parse_args()
    d, n, k, s = 576, 1536, 526, 263
    rng = np.random.default_rng(0)
    Yall = rng.standard_normal((d, n + k)).astype(np.float32)
    D = Yall[:, n:] / np.linalg.norm(Yall[:, n:], axis=0)
    G, C = jnp.asarray(D.T @ D), jnp.asarray(D.T @ Yall[:, :n])
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}  cpus={os.cpu_count()}  "
          f"jax {jax.__version__} {jax.default_backend()}  loadavg {tuple(round(x, 2) for x in os.getloadavg())}")
    print(f"# up_proj shape d {d}, n {n}, k {k}, s {s}, float32")
    rows = [("B-form batch_omp (16 MiB chunks)", lambda: batch_omp(G, C, s).values),
            ("GEMM form batch_omp_gemm, inverse", lambda: batch_omp_gemm(G, C, s, triangular="inverse").values)]
    if args.solve:
        rows.append(("GEMM form batch_omp_gemm, solve", lambda: batch_omp_gemm(G, C, s, triangular="solve").values))
    X = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    mm = jax.jit(lambda x, g: jnp.matmul(x, g, precision=jax.lax.Precision.HIGHEST))
    t_mm = min(second_call(lambda: mm(X, G)) for _ in range(3))
    print("| implementation | seconds |\n|---|---|")
    for label, fn in rows:
        print(f"| {label} | {second_call(fn):.2f} |", flush=True)
    print(f"| one step's GEMM [{n}, {k}] × [{k}, {k}] | {t_mm * 1e3:.1f} ms ({2 * n * k * k / t_mm / 1e9:.0f} GFLOP/s); "
          f"× {s} steps = {t_mm * s:.2f} s |")
    print(f"# loadavg after {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
