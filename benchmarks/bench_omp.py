"""One OMP pass on real whitened SmolLM2 layer-10 weights: sklearn, SPAMS and our two CPU paths, side by side.

    python benchmarks/bench_omp.py [--projections mlp.up_proj] [--rounds 3] [--sklearn-stride 4]

Inputs (built once, cached in ``--cache``): Y = L·W of the projection (32×256 calibration tokens, float64
Cholesky whitening), k and s from ``budget`` (CR 0.2, ρ 2, Eq. 11), and two dictionaries:

* **iteration 0**: D = k random normalised columns of Y (seed 42), the K-SVD initialisation. Those k columns
  of Y *are* atoms, so they stop after one atom: this pass is cheaper than any later one.
* **representative**: D after 2 K-SVD iterations (float64, power update); every column runs to s.

Each (iteration, core count) is measured in a fresh worker process pinned with ``taskset`` to 1 core
(cpu 0) or 2 cores (cpus 0-1), with single-threaded BLAS for the references and all pinned cores for ours;
within a worker the implementations run interleaved, ``--rounds`` times, on identical GD = DᵀD and DᵀY, and
the median is reported. sklearn is timed on every ``--sklearn-stride``-th column (its cost per column is
uniform once no column stops early) and scaled to all columns; supports are compared on those columns.
SPAMS' ``omp`` is ORMP (another selection rule: its supports are not expected to match) and needs ``eps=0``
in float32. The last line is the summary for the representative iteration, float32, 2 cores.
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
IMPLS = ("sklearn f64", "sklearn f32", "spams ormp f64", "spams ormp f32", "ours xla f64", "ours xla f32",
         "ours cpu_kernel f64", "ours cpu_kernel f32")


def build_inputs(path: Path, projections: list[str]) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, str(HERE))
    from _real_problem import build_real_problems, initial_dictionary

    from cospadi_jax.sparse import ksvd

    arrays = {}
    for name, p in build_real_problems(tuple(projections)).items():
        D0 = initial_dictionary(p.Y, p.n_atoms)
        D2 = np.asarray(ksvd(p.Y, p.n_atoms, p.sparsity, 2, init=D0, dtype=np.float64, omp_backend="cpu_kernel")
                        .dictionary)
        arrays.update({f"{name}/Y": p.Y, f"{name}/iteration 0": D0, f"{name}/representative": D2,
                       f"{name}/ks": np.array([p.n_atoms, p.sparsity])})
    np.savez(path, **arrays)


def dense_codes(codes, k: int) -> np.ndarray:
    from cospadi_jax.sparse.ksvd_host import dense_codes as host_dense_codes

    return host_dense_codes(codes, k)


def worker(args) -> None:
    """Times every implementation on one (projection, iteration) in this (pinned) process; prints JSON."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from sklearn.linear_model import orthogonal_mp_gram

    from cospadi_jax.sparse import batch_omp
    from cospadi_jax.sparse.cpu_kernel import batch_omp_cpu

    import spams  # imported before timing

    cores = len(os.sched_getaffinity(0))
    data = np.load(args.cache)
    Y, D = data[f"{args.projection}/Y"], data[f"{args.projection}/{args.iteration}"]
    k, s = (int(x) for x in data[f"{args.projection}/ks"])
    G64, C64 = D.T @ D, D.T @ Y
    inputs = {np.float64: (G64, C64), np.float32: (G64.astype(np.float32), C64.astype(np.float32))}
    cols = np.arange(0, Y.shape[1], args.sklearn_stride)

    def sklearn(dt):
        G, C = inputs[dt]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return orthogonal_mp_gram(G, C[:, cols], n_nonzero_coefs=s)

    def spams_ormp(dt):
        # spams.omp takes the signals and the dictionary (not the Gram), in Fortran order.
        X, Dd = np.asfortranarray(Y.astype(dt)), np.asfortranarray(D.astype(dt))
        return spams.omp(X, Dd, L=s, eps=0.0, numThreads=cores).toarray()

    def xla(dt):
        codes = batch_omp(*inputs[dt], s, dtype=dt)
        codes.values.block_until_ready()
        return codes

    runners = {
        "sklearn f64": lambda: sklearn(np.float64),
        "sklearn f32": lambda: sklearn(np.float32),
        "spams ormp f64": lambda: spams_ormp(np.float64),
        "spams ormp f32": lambda: spams_ormp(np.float32),
        "ours xla f64": lambda: xla(np.float64),
        "ours xla f32": lambda: xla(np.float32),
        "ours cpu_kernel f64": lambda: batch_omp_cpu(*inputs[np.float64], s, threads=cores),
        "ours cpu_kernel f32": lambda: batch_omp_cpu(*inputs[np.float32], s, threads=cores),
    }
    # warm-up: compile every path on this shape (not timed)
    for name in ("ours xla f64", "ours xla f32", "ours cpu_kernel f64", "ours cpu_kernel f32"):
        runners[name]()
    times = {name: [] for name in IMPLS}
    outputs = {}
    for _ in range(args.rounds):
        for name in IMPLS:
            t = time.perf_counter()
            out = runners[name]()
            times[name].append(time.perf_counter() - t)
            outputs[name] = out
    ref = outputs["sklearn f64"] != 0
    result = {"cores": cores, "k": k, "s": s, "n": int(Y.shape[1]), "n_sklearn": int(len(cols))}
    err_ref = None
    for name in IMPLS:
        out = outputs[name]
        S = out if isinstance(out, np.ndarray) else dense_codes(out, k)
        S = np.asarray(S, np.float64)
        full = S.shape[1] == Y.shape[1]
        t = float(np.median(times[name])) * (len(cols) / Y.shape[1]) ** -1 if name.startswith("sklearn") else \
            float(np.median(times[name]))
        S_sub = S[:, cols] if full else S
        err = float(np.linalg.norm(Y[:, cols] - D @ S_sub) / np.linalg.norm(Y[:, cols]))
        if name == "sklearn f64":
            err_ref = err
        result[name] = {"seconds": t, "rounds": [float(x) for x in times[name]],
                        "identical_supports": float(np.mean(np.all((S_sub != 0) == ref, axis=0))),
                        "rel_error": err, "nnz_per_column": float(np.mean(np.sum(S_sub != 0, axis=0)))}
    for name in IMPLS:
        result[name]["rel_error_vs_sklearn_f64"] = result[name]["rel_error"] - err_ref
    print("RESULT " + json.dumps(result))


def run_worker(script_args: list[str], cpus: str) -> dict:
    # BLAS single-threaded for the references; not OMP_NUM_THREADS, which would also cap Numba's OpenMP pool.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ["taskset", "-c", cpus, sys.executable, __file__, "--worker", *script_args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--projections", nargs="+", default=["mlp.up_proj"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sklearn-stride", type=int, default=4)
    ap.add_argument("--cache", default=".cache/bench_omp_inputs.npz")
    ap.add_argument("--json", default=None, help="also write all results here")
    ap.add_argument("--cores", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--projection", help=argparse.SUPPRESS)
    ap.add_argument("--iteration", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    cache = Path(args.cache)
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        print(f"building inputs into {cache} (calibration + 2 K-SVD iterations) ...", flush=True)
        build_inputs(cache, args.projections)
    import jax

    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}  cpus={os.cpu_count()}  jax "
          f"{jax.__version__}  references with 1 BLAS thread; 'N cores' = taskset to cpus 0..N-1")
    results = {}
    for proj in args.projections:
        for iteration in ("iteration 0", "representative"):
            for cores, cpus in ((c, ",".join(map(str, range(c)))) for c in args.cores):
                r = run_worker(["--cache", str(cache), "--projection", proj, "--iteration", iteration,
                                "--rounds", str(args.rounds), "--sklearn-stride", str(args.sklearn_stride)], cpus)
                results[(proj, iteration, cores)] = r
                base = r["sklearn f64"]["seconds"]
                print(f"\n{proj} {iteration}, {cores} core(s): k {r['k']}, s {r['s']}, n {r['n']} "
                      f"(sklearn on {r['n_sklearn']} columns, scaled)")
                print(f"{'implementation':22s} {'seconds':>8s} {'x sk f64':>8s} {'same supp':>9s} "
                      f"{'nnz/col':>7s} {'Δ rel.err':>10s}")
                for name in IMPLS:
                    x = r[name]
                    print(f"{name:22s} {x['seconds']:8.3f} {base / x['seconds']:8.1f} {x['identical_supports']:9.1%} "
                          f"{x['nnz_per_column']:7.1f} {x['rel_error_vs_sklearn_f64']:+10.2e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({" | ".join(map(str, k)): v for k, v in results.items()}, indent=1))
    r = results[(args.projections[0], "representative", max(args.cores))]
    ours = r["ours cpu_kernel f32"]
    short = args.projections[0].split(".")[-1]
    print(f"summary: omp {short} representative f32 {r['cores']} cores: "
          f"{r['sklearn f64']['seconds'] / ours['seconds']:.1f}x "
          f"over sklearn f64, {100 * ours['identical_supports']:.1f}% identical supports")


if __name__ == "__main__":
    main()
