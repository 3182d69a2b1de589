"""Whole-model K-SVD time: CoSpaDi over all 210 SmolLM2-135M matrices, split by phase.

    OPENBLAS_NUM_THREADS=2 python benchmarks/bench_whole_model.py [--ratio 0.2] [--iterations 1 3]
        [--omp-backend auto] [--nsamples 32 --seqlen 512]

Runs ``compress()`` (the library entry point, nothing re-implemented) once per iteration count with the
Gram cache warm, sums the per-matrix phase times the report carries (whitening, OMP, update, GEMMs) and
the rest of the fitting wall time ("overhead": functional errors, reports, factor packing), and prints
the time of one *representative* iteration as the difference of the two runs divided by the difference
of their iteration counts (iteration 0 runs the first OMP on columns of Y, whose atoms stop early: it is
cheaper than the later ones). The last line is the summary.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np


def phase_totals(report) -> dict[str, float]:
    totals: dict[str, float] = {}
    for row in report.matrices:
        for phase, sec in (row.phase_seconds or {}).items():
            totals[phase] = totals.get(phase, 0.0) + sec / len(row.group)  # a shared group's time is split
    totals["fit"] = sum(row.seconds for row in report.matrices)
    totals["overhead"] = totals["fit"] - sum(v for k, v in totals.items() if k != "fit")
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--iterations", type=int, nargs=2, default=[1, 3])
    ap.add_argument("--omp-backend", default="auto")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--cache-dir", default=".cache/grams")
    args = ap.parse_args()

    from cospadi_jax import load_model
    from cospadi_jax.compress import CalibrationSpec, compress
    from cospadi_jax.methods import method_config

    import jax

    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}  cpus usable "
          f"{len(os.sched_getaffinity(0))}  jax {jax.__version__} ({jax.default_backend()})  "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}  NUMBA_NUM_THREADS="
          f"{os.environ.get('NUMBA_NUM_THREADS')}")
    model, tokenizer = load_model("smollm2-135m")
    calib = CalibrationSpec(nsamples=args.nsamples, seqlen=args.seqlen, cache_dir=args.cache_dir,
                            heldout_source=None)
    runs = {}
    for T in args.iterations:
        config = method_config("cospadi", ratio=args.ratio, ksvd_iterations=T, omp_backend=args.omp_backend)
        t0 = time.perf_counter()
        _, report = compress(model, tokenizer, config=config, calibration=calib, progress=False)
        wall = time.perf_counter() - t0
        totals = phase_totals(report)
        runs[T] = totals
        backends = sorted({row.omp_backend for row in report.matrices})
        print(f"T={T}: {len(report.matrices)} matrices, realised CR {report.realised_ratio:.4f}, backend "
              f"{backends}, compress wall {wall:.1f} s (incl. cached calibration), fitting {totals['fit']:.1f} s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in totals.items() if k != "fit"), flush=True)
    lo, hi = args.iterations
    per_it = {k: (runs[hi][k] - runs[lo][k]) / (hi - lo) for k in runs[hi]}
    print("representative iteration: " + ", ".join(f"{k} {v:.2f} s" for k, v in per_it.items()))
    print(f"summary: whole-model K-SVD iteration smollm2-135m CR {args.ratio} ({len(report.matrices)} matrices): "
          f"{per_it['fit']:.1f} s (omp {per_it.get('omp', np.nan):.1f}, update {per_it.get('update', np.nan):.1f}, "
          f"gemm {per_it.get('gemm', np.nan):.1f}, whitening {per_it.get('whitening', np.nan):.1f}, overhead "
          f"{per_it['overhead']:.1f})")


if __name__ == "__main__":
    main()
