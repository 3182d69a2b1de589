"""Does ORMP's lower coding error survive K-SVD iterations? One measurement on real SmolLM2 matrices.

    python experiments/ormp_vs_omp.py [--iterations 8] [--projections mlp.up_proj self_attn.q_proj mlp.down_proj]

Per projection of layer 10 (whitened with 32 x 256 calibration tokens, CR 0.2, rho 2, Eq. 11): K-SVD with the
paper's Batch-OMP and with ORMP from the same initial dictionary, float32, power update; the relative objective
||Y - DS|| / ||Y|| after every iteration. Writes experiments/results/ormp_vs_omp.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "ormp_vs_omp"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--projections", nargs="+", default=["mlp.up_proj", "self_attn.q_proj", "mlp.down_proj"])
    args = ap.parse_args(argv)
    import jax

    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _real_problem import build_real_problems, initial_dictionary

    from cospadi_jax.sparse.ksvd import ksvd

    results = {"meta": {"layer": 10, "ratio": 0.2, "rho": 2.0, "calibration": "32x256", "dtype": "float32",
                        "iterations": args.iterations, "update": "power (8 steps)"}, "runs": {}}
    for name, p in build_real_problems(tuple(args.projections)).items():
        Y = p.Y.astype(np.float32)
        D0 = initial_dictionary(p.Y, p.n_atoms).astype(np.float32)
        for coder in ("omp", "ormp"):
            t0 = time.perf_counter()
            r = ksvd(Y, p.n_atoms, p.sparsity, args.iterations, init=D0, dtype=np.float32, sparse_coder=coder)
            results["runs"][f"{name}/{coder}"] = {"objective": [float(x) for x in r.objective],
                                                  "k": p.n_atoms, "s": p.sparsity,
                                                  "seconds": time.perf_counter() - t0}
            print(f"{name} {coder}: objective {r.objective[0]:.4f} -> {r.objective[-1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(results, indent=2))
    figure(results, OUT.with_suffix(".png"))
    return results


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k.rsplit("/", 1)[0] for k in results["runs"]})
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for coder, colour in (("omp", "#d62728"), ("ormp", "#2ca02c")):
            objective = results["runs"][f"{name}/{coder}"]["objective"]
            ax.plot(range(len(objective)), objective, marker="o", color=colour, label=coder.upper())
        ax.set_title(f"layer 10 {name}", fontsize=9)
        ax.set_xlabel("K-SVD iteration")
        ax.set_ylabel("‖Y − DS‖ / ‖Y‖ (whitened)")
        ax.grid(alpha=0.3)
        ax.legend()
    meta = results["meta"]
    fig.suptitle(f"SmolLM2-135M, CR {meta['ratio']}, ρ {meta['rho']}, calib {meta['calibration']}, {meta['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
