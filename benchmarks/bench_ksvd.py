"""One K-SVD iteration (OMP + sequential power update, 8 power steps) on real whitened SmolLM2 weights.

    python benchmarks/bench_ksvd.py [--projections mlp.up_proj]

Ours (JAX) against a straightforward NumPy/sklearn reference written below:
sklearn orthogonal_mp_gram for the codes, then a per-atom loop over Ω_i with
a warm-started 8-step power iteration on E[:, Ω_i] + d_i s_i(Ω_i)ᵀ.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _real_problem import build_real_problems, initial_dictionary  # noqa: E402

from cospadi_jax.sparse import batch_omp, update_dictionary  # noqa: E402


def reference_iteration(Y, D, s, power_iterations=8):
    """NumPy + sklearn K-SVD iteration (the readable baseline)."""
    from sklearn.linear_model import orthogonal_mp_gram

    D = D.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        S = orthogonal_mp_gram(D.T @ D, D.T @ Y, n_nonzero_coefs=s)
    t_omp = time.perf_counter()
    E = Y - D @ S
    for i in range(D.shape[1]):
        omega = np.flatnonzero(S[i])
        if omega.size == 0:
            continue  # unused atom: skipped, as in the paper
        R = E[:, omega] + np.outer(D[:, i], S[i, omega])
        u = D[:, i]
        for _ in range(power_iterations):
            v = R.T @ u
            v /= np.linalg.norm(v)
            u = R @ v
            u /= np.linalg.norm(u)
        g = R.T @ u
        D[:, i], S[i, omega] = u, g
        E[:, omega] = R - np.outer(u, g)
    return D, S, t_omp


def ours_iteration(Y, D, s, dtype):
    G = jnp.matmul(D.T, D, precision="highest")
    C = jnp.matmul(D.T, Y, precision="highest")
    codes = batch_omp(G, C, s, dtype=dtype)
    S = codes.to_dense(D.shape[1]).block_until_ready()
    t_omp = time.perf_counter()
    D, S, _ = update_dictionary(Y, D, S, method="power", power_iterations=8)
    return D.block_until_ready(), S.block_until_ready(), t_omp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--projections", nargs="+", default=["mlp.up_proj"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.processor() or platform.machine()}  "
          f"cpus={os.cpu_count()}  jax {jax.__version__}")
    problems = build_real_problems(tuple(args.projections), nsamples=args.nsamples, seqlen=args.seqlen)
    print(f"{'projection':18s} {'impl':10s} {'total s':>8s} {'OMP s':>7s} {'update s':>8s} {'speedup':>7s} {'rel.err':>9s}")
    summary = []
    for name, p in problems.items():
        D0 = initial_dictionary(p.Y, p.n_atoms)
        t = time.perf_counter()
        Dr, Sr, t_omp = reference_iteration(p.Y, D0, p.sparsity)
        t_ref = time.perf_counter() - t
        err_ref = np.linalg.norm(p.Y - Dr @ Sr) / np.linalg.norm(p.Y)
        print(f"{name:18s} {'numpy+sk':10s} {t_ref:8.2f} {t_omp - t:7.2f} {t_ref - (t_omp - t):8.2f} {1.0:7.1f} {err_ref:9.5f}")
        for dt in (jnp.float64, jnp.float32):
            Y, D = jnp.asarray(p.Y, dt), jnp.asarray(D0, dt)
            ours_iteration(Y, D, p.sparsity, dt)  # compile
            t = time.perf_counter()
            Do, So, t_omp = ours_iteration(Y, D, p.sparsity, dt)
            t_ours = time.perf_counter() - t
            err = float(jnp.linalg.norm(Y - Do @ So) / jnp.linalg.norm(Y))
            print(f"{name:18s} {'ours ' + jnp.dtype(dt).name:10s} {t_ours:8.2f} {t_omp - t:7.2f} {t_ours - (t_omp - t):8.2f} "
                  f"{t_ref / t_ours:7.1f} {err:9.5f}", flush=True)
            summary.append((name, jnp.dtype(dt).name, t_ref, t_ours, err - err_ref))
    n, dtn, tr, to, de = summary[0]
    _, _, _, to32, de32 = summary[1]
    print(f"SUMMARY K-SVD iteration ({n}): numpy+sklearn {tr:.2f} s, ours f64 {to:.2f} s ({tr / to:.1f}x, Δerr {de:+.1e}), "
          f"ours f32 {to32:.2f} s ({tr / to32:.1f}x, Δerr {de32:+.1e})")


if __name__ == "__main__":
    main()
