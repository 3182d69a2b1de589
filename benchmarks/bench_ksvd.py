"""One representative K-SVD iteration (OMP + sequential power update, 8 steps) on real whitened SmolLM2 weights.

    python benchmarks/bench_ksvd.py [--projection mlp.up_proj] [--rounds 2]

Starts from the dictionary after 2 K-SVD iterations (the inputs of ``bench_omp.py``, same cache), so no
column is an atom. Ours is the library call ``ksvd(Y, k, s, 1, init=D)`` (OMP, update, both objectives,
DᵀD, DᵀY and the residual included) with ``omp_backend`` xla and cpu_kernel, in float64 and float32; the
reference is the NumPy + sklearn iteration written below (sklearn ``orthogonal_mp_gram`` for the codes,
then a per-atom loop over Ω_i with a warm-started 8-step power iteration on E[:, Ω_i] + d_i s_i(Ω_i)ᵀ).
Each core count runs in its own process pinned with ``taskset`` (references with 1 BLAS thread, ours on
all pinned cores), implementations interleaved, median of ``--rounds``. The last line is the summary.
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
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
IMPLS = ("numpy+sklearn f64", "ours xla f64", "ours xla f32", "ours cpu_kernel f64", "ours cpu_kernel f32")


def reference_iteration(Y, D, s, power_iterations=8):
    """NumPy + sklearn K-SVD iteration (the readable baseline). Returns D, S, seconds of the OMP."""
    from sklearn.linear_model import orthogonal_mp_gram

    D = D.copy()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        S = orthogonal_mp_gram(D.T @ D, D.T @ Y, n_nonzero_coefs=s)
    t_omp = time.perf_counter() - t
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


def worker(args) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    from cospadi_jax.sparse import ksvd

    import sklearn.linear_model  # noqa: F401  (imported before timing)

    cores = len(os.sched_getaffinity(0))
    data = np.load(args.cache)
    Y, D = data[f"{args.projection}/Y"], data[f"{args.projection}/representative"]
    k, s = (int(x) for x in data[f"{args.projection}/ks"])

    def ours(backend, dt):
        r = ksvd(Y.astype(dt), k, s, 1, init=D.astype(dt), dtype=dt, omp_backend=backend, threads=cores
                 if backend == "cpu_kernel" else None)
        return float(r.objective[-1]), r.seconds

    def reference():
        Dr, Sr, t_omp = reference_iteration(Y, D, s)
        return float(np.linalg.norm(Y - Dr @ Sr) / np.linalg.norm(Y)), {"omp": t_omp}

    runners = {"numpy+sklearn f64": reference}
    for backend in ("xla", "cpu_kernel"):
        for dt, tag in ((np.float64, "f64"), (np.float32, "f32")):
            runners[f"ours {backend} {tag}"] = lambda b=backend, d=dt: ours(b, d)
    for name in IMPLS[1:]:
        runners[name]()  # compile (not timed)
    times = {name: [] for name in IMPLS}
    res = {}
    for _ in range(args.rounds):
        for name in IMPLS:
            t = time.perf_counter()
            err, phases = runners[name]()
            times[name].append(time.perf_counter() - t)
            res[name] = {"rel_error": err, "phases": phases}
    out = {"cores": cores, "k": k, "s": s, "shape": list(Y.shape)}
    for name in IMPLS:
        out[name] = {**res[name], "seconds": float(np.median(times[name])), "rounds": times[name]}
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--projection", default="mlp.up_proj")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", default=".cache/bench_omp_inputs.npz")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if not Path(args.cache).exists():
        sys.path.insert(0, str(HERE))
        from bench_omp import build_inputs

        Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
        build_inputs(Path(args.cache), [args.projection])
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}  cpus={os.cpu_count()}  "
          "references with 1 BLAS thread; 'N cores' = taskset to cpus 0..N-1")
    # BLAS single-threaded for the references; not OMP_NUM_THREADS, which would also cap Numba's OpenMP pool.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    results = {}
    for cores, cpus in ((1, "0"), (2, "0,1")):
        cmd = ["taskset", "-c", cpus, sys.executable, __file__, "--worker", "--projection", args.projection,
               "--rounds", str(args.rounds), "--cache", args.cache]
        text = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        r = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
        results[cores] = r
        base = r[IMPLS[0]]["seconds"]
        print(f"\n{args.projection} {r['shape'][0]}x{r['shape'][1]}, k {r['k']}, s {r['s']}, {cores} core(s)")
        print(f"{'implementation':22s} {'total s':>8s} {'OMP s':>7s} {'update s':>8s} {'GEMMs s':>7s} "
              f"{'speed-up':>8s} {'rel.err after':>13s}")
        for name in IMPLS:
            x = r[name]
            ph = x["phases"]
            upd = ph.get("update", x["seconds"] - ph["omp"])
            print(f"{name:22s} {x['seconds']:8.2f} {ph['omp']:7.2f} {upd:8.2f} {ph.get('gemm', float('nan')):7.2f} "
                  f"{base / x['seconds']:8.1f} {x['rel_error']:13.6f}", flush=True)
    r = results[2]
    short = args.projection.split(".")[-1]
    print(f"summary: ksvd iteration {short} f32 2 cores: "
          f"{r[IMPLS[0]]['seconds'] / r['ours cpu_kernel f32']['seconds']:.1f}x over numpy+sklearn "
          f"(rel. error after {r['ours cpu_kernel f32']['rel_error']:.6f} vs {r[IMPLS[0]]['rel_error']:.6f})")


if __name__ == "__main__":
    main()
