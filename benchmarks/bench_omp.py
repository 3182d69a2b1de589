"""OMP pass on real whitened SmolLM2 layer-10 weights: ours (JAX Batch-OMP) vs sklearn orthogonal_mp_gram.

    python benchmarks/bench_omp.py [--projections mlp.up_proj self_attn.q_proj mlp.down_proj]

Same inputs (GD = DᵀD, DᵀY with D = k random normalised columns of Y, seed 42) for both.
Prints a table and a one-line summary. GFLOP/s use the minimal Batch-OMP count
Σ_j (k·t_j²/2 + 2·t_j³/3) (t_j = realised non-zeros of column j; = d2·(k·s²/2 + 2s³/3)
without early stops), counted as multiply-adds ×2, against the measured SGEMM rate.
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
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _real_problem import build_real_problems, initial_dictionary  # noqa: E402

from cospadi_jax.sparse import batch_omp  # noqa: E402


def sgemm_gflops(n=2048, reps=5):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def timed(fn, reps=1):
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return out, (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--projections", nargs="+", default=["mlp.up_proj", "self_attn.q_proj", "mlp.down_proj"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    from sklearn.linear_model import orthogonal_mp_gram

    peak = sgemm_gflops()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.processor() or platform.machine()}  "
          f"cpus={os.cpu_count()}  jax {jax.__version__}  SGEMM(numpy 2048³) {peak:.0f} GFLOP/s")
    problems = build_real_problems(tuple(args.projections), nsamples=args.nsamples, seqlen=args.seqlen)
    hdr = (f"{'projection':18s} {'d×n':>9s} {'k/s':>8s} {'sk nnz':>7s} {'sklearn s':>9s} {'ours f64':>9s} "
           f"{'x f64':>6s} {'ours f32':>9s} {'x f32':>6s} {'supp f64':>8s} {'supp f32':>8s} "
           f"{'Δerr f32':>9s} {'GF/s f32':>8s} {'%SGEMM':>6s} {'compile':>7s}")
    print(hdr)
    rows = []
    for name, p in problems.items():
        D = initial_dictionary(p.Y, p.n_atoms)
        G, C = D.T @ D, D.T @ p.Y
        k, s = p.n_atoms, p.sparsity
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            (ref, n_iter), t_sk = timed(lambda: orthogonal_mp_gram(G, C, n_nonzero_coefs=s, return_n_iter=True))
        n_iter = np.asarray(n_iter)
        res = {}
        for dt in (np.float64, np.float32):
            run = lambda: batch_omp(G.astype(dt), C.astype(dt), s, dtype=dt).values.block_until_ready()
            _, t_first = timed(run)
            _, t_run = timed(run, reps=2)
            codes = batch_omp(G.astype(dt), C.astype(dt), s, dtype=dt)
            S = np.asarray(codes.to_dense(k), np.float64)
            res[dt] = dict(t=t_run, compile=t_first - t_run, supp=np.mean(np.all((S != 0) == (ref != 0), axis=0)),
                           err=np.linalg.norm(p.Y - D @ S) / np.linalg.norm(p.Y), nnz=np.asarray(codes.n_nonzero))
        err_ref = np.linalg.norm(p.Y - D @ ref) / np.linalg.norm(p.Y)
        t_cols = res[np.float32]["nnz"].astype(np.float64)
        flops = 2 * np.sum(k * t_cols**2 / 2 + 2 * t_cols**3 / 3)
        gf = flops / res[np.float32]["t"] / 1e9
        row = dict(name=name, sk=t_sk, f64=res[np.float64]["t"], f32=res[np.float32]["t"],
                   supp64=res[np.float64]["supp"], supp32=res[np.float32]["supp"])
        rows.append(row)
        print(f"{name:18s} {p.Y.shape[0]:>4d}×{p.Y.shape[1]:<4d} {k:>4d}/{s:<3d} {n_iter.mean():7.1f} {t_sk:9.2f} "
              f"{row['f64']:9.2f} {t_sk / row['f64']:6.1f} {row['f32']:9.2f} {t_sk / row['f32']:6.1f} "
              f"{row['supp64']:8.1%} {row['supp32']:8.1%} {res[np.float32]['err'] - err_ref:+9.1e} {gf:8.1f} "
              f"{100 * gf / peak:6.1f} {res[np.float32]['compile']:7.1f}", flush=True)
    up = rows[0]
    print(f"SUMMARY OMP pass ({up['name']}): sklearn {up['sk']:.2f} s, ours f64 {up['f64']:.2f} s "
          f"({up['sk'] / up['f64']:.1f}x, identical supports {up['supp64']:.1%}), ours f32 {up['f32']:.2f} s "
          f"({up['sk'] / up['f32']:.1f}x, identical supports {up['supp32']:.1%})")


if __name__ == "__main__":
    main()
