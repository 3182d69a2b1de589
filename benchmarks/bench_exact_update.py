"""The exact K-SVD dictionary update against the power update, on real whitened SmolLM2 weights (Table 2's
"power vs exact"): how far p power steps are from the exact top singular pair, and what each costs.

    python benchmarks/bench_exact_update.py [--projections self_attn.k_proj mlp.up_proj mlp.down_proj] [--rounds 3]

Inputs: the representative state of ``bench_omp.py`` (the dictionary after 2 K-SVD iterations, same cache) and its
Batch-OMP codes, float32. From that one state, for each projection:

* the spectrum gap: σ₂/σ₁ of every atom's restricted residual R_i = E[:, Ω_i] + d_i s_i(Ω_i)ᵀ (float64 SVD).
  Warm-started power steps shrink the error of d_i by (σ₂/σ₁)² each;
* exactness: the dictionary after one sequential update with p = 1, 2, 4, 8, 16 power steps against the exact
  update's (both whole sequential sweeps): max and median ‖d_p − d_exact‖ over atoms (≈ the angle), and the
  objective ‖Y − DS‖/‖Y‖ after the update;
* time of one update (the atom sweep alone, supports fixed): the fused kernel's power update (p = 8, the paper's)
  and its exact update (power steps to convergence, LAPACK where they do not converge), interleaved, median of
  ``--rounds``; once each, JAX's exact update (``update_dictionary(dict_update="exact")``, the same rule in XLA, the
  form a GPU runs) and the exact update by an SVD of the masked [d, n] residual for every atom
  (``exact_max_steps=0``: what an SVD-based K-SVD does, and what ``exact`` did before).

Runs in one process pinned with ``taskset`` to one core (BLAS, Numba and XLA single-threaded). The last line is the
summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
POWER_STEPS = (1, 2, 4, 8, 16)


def _gap(Y, D, S) -> np.ndarray:
    """σ₂/σ₁ of each used atom's restricted residual (0 for an atom with one column), float64."""
    E = Y - D @ S
    out = []
    for i in range(D.shape[1]):
        omega = np.flatnonzero(S[i])
        if omega.size:
            sv = np.linalg.svd(E[:, omega] + np.outer(D[:, i], S[i, omega]), compute_uv=False)
            out.append(sv[1] / sv[0] if sv.size > 1 else 0.0)
    return np.asarray(out)


def worker(args) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from cospadi_jax.sparse import update_dictionary
    from cospadi_jax.sparse.cpu_kernel import batch_omp_cpu, power_update_cpu
    from cospadi_jax.sparse.ksvd_host import dense_codes

    data = np.load(args.cache)
    out = {"cores": len(os.sched_getaffinity(0))}
    for proj in args.projections:
        Y64, D64 = data[f"{proj}/Y"], data[f"{proj}/representative"]
        k, s = (int(x) for x in data[f"{proj}/ks"])
        Y, D = Y64.astype(np.float32), D64.astype(np.float32)
        codes = batch_omp_cpu(D.T @ D, D.T @ Y, s, dtype=np.float32, threads=1)
        S = dense_codes(codes, k)
        gap = _gap(Y64, D64, S.astype(np.float64))
        y_norm = float(np.linalg.norm(Y))

        def kernel(exact, p=8):
            E_t, D_t = np.ascontiguousarray((Y - D @ S).T), np.ascontiguousarray(D.T)
            t = time.perf_counter()
            _, _, n_lapack = power_update_cpu(E_t, D_t, codes, power_iterations=p, exact=exact)
            return time.perf_counter() - t, D_t.T, float(np.linalg.norm(E_t)) / y_norm, n_lapack

        def jax_exact(max_steps):
            Yj, Dj, Sj = jnp.asarray(Y), jnp.asarray(D), jnp.asarray(S)
            t = time.perf_counter()
            Dn, Sn, _ = jax.block_until_ready(update_dictionary(Yj, Dj, Sj, dict_update="exact",
                                                                exact_max_steps=max_steps))
            seconds = time.perf_counter() - t
            return seconds, np.asarray(Dn), float(jnp.linalg.norm(Yj - Dn @ Sn)) / y_norm

        kernel(True), kernel(False)  # compile (not timed)
        _, D_exact, err_exact, n_lapack = kernel(True)
        row = {"shape": list(Y.shape), "k": k, "s": s, "mean_support": float(np.mean(np.sum(S != 0, axis=1))),
               "gap_quantiles": dict(zip(("50", "90", "99", "100"), np.quantile(gap, [.5, .9, .99, 1]).tolist())),
               "exact": {"objective": err_exact, "lapack_atoms": n_lapack}, "power": {}}
        for p in POWER_STEPS:
            _, D_p, err_p, _ = kernel(False, p)
            # ‖d_p − d_exact‖ (≈ the angle; 1 − cos² would floor at ~1e-4 in float32)
            dist = np.linalg.norm(D_p - D_exact, axis=0)
            row["power"][p] = {"objective": err_p, "max_dist": float(dist.max()), "median_dist": float(np.median(dist))}
        for name, max_steps in (("jax_exact", 100), ("jax_svd", 0)):
            jax_exact(max_steps)  # compile (not timed)
            t_jax, D_jax, err_jax = jax_exact(max_steps)
            row[name] = {"seconds": t_jax, "objective": err_jax,
                         "max_abs_diff_to_kernel_exact": float(np.abs(D_jax - D_exact).max())}
        times = {"power p=8": [], "exact": []}
        for _ in range(args.rounds):
            times["power p=8"].append(kernel(False)[0])
            times["exact"].append(kernel(True)[0])
        row["seconds"] = {name: float(np.median(t)) for name, t in times.items()}
        out[proj] = row
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--projections", nargs="+", default=["self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default=".cache/bench_omp_inputs.npz")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    missing = [p for p in args.projections
               if not Path(args.cache).exists() or f"{p}/Y" not in np.load(args.cache).files]
    if missing:
        sys.path.insert(0, str(HERE))
        from bench_omp import build_inputs

        Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
        build_inputs(Path(args.cache), sorted(set(args.projections) | set(_cached(args.cache))))
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}  cpus={os.cpu_count()}  "
          "one process pinned to cpu 0, BLAS / Numba / XLA single-threaded")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
    cmd = ["taskset", "-c", "0", sys.executable, __file__, "--worker", "--rounds", str(args.rounds), "--cache",
           args.cache, "--projections", *args.projections]
    text = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    r = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
    summary = []
    for proj in args.projections:
        x = r[proj]
        q = x["gap_quantiles"]
        print(f"\n{proj} {x['shape'][0]}x{x['shape'][1]}, k {x['k']}, s {x['s']}, mean |Omega_i| "
              f"{x['mean_support']:.0f}; sigma2/sigma1 median {q['50']:.3f}, p90 {q['90']:.3f}, max {q['100']:.3f}")
        print(f"{'update':14s} {'objective after':>15s} {'max |d - d_exact|':>17s} {'median':>8s}")
        for p, v in x["power"].items():
            print(f"{'power p=' + p:14s} {v['objective']:15.7f} {v['max_dist']:17.1e} {v['median_dist']:8.1e}")
        print(f"{'exact':14s} {x['exact']['objective']:15.7f} (LAPACK fallback for {x['exact']['lapack_atoms']} atoms)")
        for name, label in (("jax_exact", "JAX exact"), ("jax_svd", "SVD per atom")):
            j = x[name]
            print(f"{label:14s} {j['objective']:15.7f} (max |D - kernel exact D| "
                  f"{j['max_abs_diff_to_kernel_exact']:.1e})")
        sec, jx, js = x["seconds"], x["jax_exact"]["seconds"], x["jax_svd"]["seconds"]
        print(f"one update, s: kernel power p=8 {sec['power p=8']:.3f}, kernel exact {sec['exact']:.3f}, "
              f"JAX exact {jx:.3f}, SVD per atom (JAX) {js:.2f}")
        summary.append(f"{proj.split('.')[-1]} exact/power8 {sec['exact'] / sec['power p=8']:.2f}x, "
                       f"SVD per atom/exact {js / sec['exact']:.0f}x")
    print("summary: " + "; ".join(summary))


def _cached(cache: str) -> list[str]:
    if not Path(cache).exists():
        return []
    return sorted({name.rsplit("/", 1)[0] for name in np.load(cache).files})


if __name__ == "__main__":
    main()
