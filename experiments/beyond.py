"""Beyond the paper (issue 13): each lever alone and together, on SmolLM2-135M, through the Hydra app.

    python experiments/beyond.py [--ratios 0.3] [--methods cospadi svd_llm] [--variants plain refine ...]
        [--ksvd-iterations 4] [--refine-steps 50] [--only-summary]

Every job is one ``python -m cospadi_jax.run`` on the committed sweep's setting (32 × 512 calibration tokens,
perplexity on 16 × 512 held-out windows, the shipped ``kjv_lambada`` task), with the same K-SVD T for every
CoSpaDi row, into ``experiments/results/beyond/<method>-<variant>-cr<ratio>/``. A job whose ``metrics.json``
exists is not rerun (the script resumes; a killed job resumes from its artifact). Then the table is written
to ``experiments/results/beyond/summary.json`` (one record per job), tabulated in ``summary.md`` and drawn in
``beyond.png``.

Variants (the issue's levers; ``all`` is every lever the engine has):
  plain       the paper's setting
  sequential  calib.sequential=true: each layer's Grams on the compressed prefix
  refine      refine.steps=N: block-output refinement with Adam (supports fixed), lr 1e-2 relative to each
              tensor's RMS
  refine_absolute  the same with plain Adam at lr 1e-3 (the first measurement)
  ormp        method.sparse_coder=ormp (CoSpaDi only)
  allocation  budget.allocation=greedy: per-matrix ratios at the uniform byte budget (spectrum curve);
              its layer × type heatmap is drawn in ``<job>/allocation.png``
  all         sequential + refine + allocation (+ ormp for CoSpaDi)

summary.json and the figure hold every finished job under the output directory, whichever were asked for.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cospadi_jax.plots import plot_allocation

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "beyond"
SETTING = ["calib.nsamples=32", "calib.seqlen=512", "eval.max_windows=16", "eval.tasks=[kjv_lambada]",
           "eval.task_batch_size=16", "eval.dense_baseline=false", "logger.mode=disabled"]


VARIANTS = ["plain", "sequential", "refine_absolute", "refine", "ormp", "allocation", "all"]


def levers(variant: str, method: str, refine_steps: int) -> list[str]:
    """The overrides of one variant."""
    refine = [f"refine.steps={refine_steps}", "refine.lr=1e-2", "refine.scale=rms"]
    # refine_absolute: the first measurement's plain Adam at lr 1e-3 (diverges for CoSpaDi: docs/beyond.md)
    table = {"plain": [], "sequential": ["calib.sequential=true"], "refine": refine,
             "refine_absolute": [f"refine.steps={refine_steps}", "refine.lr=1e-3", "refine.scale=absolute"],
             "ormp": ["method.sparse_coder=ormp"], "allocation": ["budget.allocation=greedy"],
             "all": ["calib.sequential=true", *refine, "budget.allocation=greedy",
                     *(["method.sparse_coder=ormp"] if method == "cospadi" else [])]}
    if variant not in table:
        raise SystemExit(f"unknown variant {variant!r}; use one of {sorted(table)}")
    if variant == "ormp" and method != "cospadi":
        raise SystemExit("ormp is CoSpaDi's sparse coder; SVD-LLM has no ormp variant")
    return table[variant]


def job_dir(method: str, variant: str, ratio: float) -> Path:
    return OUT / f"{method}-{variant}-cr{ratio}"


def run_job(method: str, variant: str, ratio: float, args: argparse.Namespace) -> None:
    out = job_dir(method, variant, ratio)
    if (out / "metrics.json").exists():
        print(f"{out.name}: done", flush=True)
        return
    ksvd = [f"method.ksvd_iterations={args.ksvd_iterations}"] if method == "cospadi" else []  # SVD-LLM has none
    cmd = [sys.executable, "-m", "cospadi_jax.run", f"method={method}", f"method.ratio={ratio}", *ksvd, *SETTING,
           *levers(variant, method, args.refine_steps), f"output_dir={out}"]
    print(f"{out.name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"{out.name}: finished in {time.perf_counter() - t0:.0f} s", flush=True)


def record(method: str, variant: str, ratio: float) -> dict | None:
    path = job_dir(method, variant, ratio) / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    task = m["compressed"]["zero_shot"]["tasks"]["kjv_lambada"]
    errors = [r["functional_error_heldout"] for r in m["matrices"] if r["functional_error_heldout"] is not None]
    return {"method": method, "variant": variant, "ratio": ratio, "realised_ratio": m["realised_ratio"],
            "ppl": m["compressed"]["perplexity"]["embedded:heldout"]["perplexity"], "acc": task["acc"],
            "acc_stderr": task["acc_stderr"], "functional_error": float(np.mean(errors)),
            "ksvd_iterations": m["config"]["method"]["ksvd_iterations"] if method == "cospadi" else None,
            "refine_steps": m["config"].get("refine", {}).get("steps", 0),
            "compress_s": m["timings"]["compress_s"], "eval_s": m["timings"]["eval_s"],
            "dense_ppl": m.get("dense", {}).get("perplexity", {}).get("embedded:heldout", {}).get("perplexity")}


def plot(records: list[dict], path: Path) -> None:
    """Perplexity (top) and kjv_lambada accuracy ± stderr (bottom) per variant, one column per CR, CoSpaDi and
    SVD-LLM side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in records})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in records)]
    fig, axes = plt.subplots(2, len(ratios), figsize=(4.2 * len(ratios) + 1, 6.5), squeeze=False, sharey="row")
    x = np.arange(len(variants))
    for col, ratio in enumerate(ratios):
        for shift, (method, colour) in zip((-0.2, 0.2), (("cospadi", "C0"), ("svd_llm", "C1"))):
            rows = {r["variant"]: r for r in records if r["ratio"] == ratio and r["method"] == method}
            at = [i for i, v in enumerate(variants) if v in rows]
            got = [rows[variants[i]] for i in at]
            axes[0, col].bar(x[at] + shift, [r["ppl"] for r in got], 0.4, color=colour, label=method)
            axes[1, col].bar(x[at] + shift, [r["acc"] for r in got], 0.4, yerr=[r["acc_stderr"] for r in got],
                             capsize=2, color=colour, label=method)
        axes[0, col].set_title(f"CR {ratio}", fontsize=10)
        for ax in axes[:, col]:
            ax.set_xticks(x, variants, rotation=45, ha="right", fontsize=7)
            ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("held-out perplexity (16 × 512)")
    axes[1, 0].set_ylabel("kjv_lambada accuracy ± stderr")
    axes[0, 0].legend(fontsize=8)
    t = sorted({r["ksvd_iterations"] for r in records if r["ksvd_iterations"] is not None})
    fig.suptitle(f"SmolLM2-135M, levers beyond the paper\n(CoSpaDi K-SVD T = {', '.join(map(str, t))}; "
                 "calibration 32 × 512)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(records: list[dict]) -> str:
    """The table of every finished job, PPL change against the plain row of the same method and CR."""
    plain = {(r["method"], r["ratio"]): r["ppl"] for r in records if r["variant"] == "plain"}
    lines = ["| CR | method | variant | held-out PPL | vs plain | kjv_lambada acc ± stderr | mean held-out functional "
             "error | realised CR | compress s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["ratio"], r["method"], VARIANTS.index(r["variant"]))):
        base = plain.get((r["method"], r["ratio"]))
        change = f"{100 * (r['ppl'] / base - 1):+.1f} %" if base and r["variant"] != "plain" else ""
        method = f"CoSpaDi T={r['ksvd_iterations']}" if r["method"] == "cospadi" else "SVD-LLM"
        lines.append(f"| {r['ratio']} | {method} | {r['variant']} | {r['ppl']:.2f} | {change} | {r['acc']:.3f} ± "
                     f"{r['acc_stderr']:.3f} | {r['functional_error']:.3f} | {r['realised_ratio']:.4f} | "
                     f"{r['compress_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="*", default=[0.3])
    p.add_argument("--methods", nargs="*", default=["svd_llm", "cospadi"])
    p.add_argument("--variants", nargs="*", default=["plain", "refine_absolute", "refine"])
    p.add_argument("--ksvd-iterations", type=int, default=4)
    p.add_argument("--refine-steps", type=int, default=50)
    p.add_argument("--only-summary", action="store_true", help="write summary.json and the figure from what exists")
    args = p.parse_args()
    jobs = [(m, v, r) for r in args.ratios for m in args.methods for v in args.variants
            if not (v == "ormp" and m != "cospadi")]
    if not args.only_summary:
        for job in jobs:
            run_job(*job, args)
    variants = VARIANTS
    finished = sorted((float(d.name.rsplit("-cr", 1)[1]), d.name.split("-")[0], d.name.split("-")[1])
                      for d in OUT.glob("*-cr*") if (d / "metrics.json").exists())
    records = [record(m, v, r) for r, m, v in sorted(finished, key=lambda j: (j[0], j[1], variants.index(j[2])))]
    for r in records:
        if r["variant"] in ("allocation", "all"):
            path = job_dir(r["method"], r["variant"], r["ratio"])
            metrics = json.loads((path / "metrics.json").read_text())
            plot_allocation(metrics["matrices"], path / "allocation.png",
                            title=f"{r['method']} {r['variant']}, CR {r['ratio']} (realised "
                                  f"{r['realised_ratio']:.4f}): per-matrix compression ratio")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(records, indent=1))
    (OUT / "summary.md").write_text(markdown(records))
    if records:
        plot(records, OUT / "beyond.png")
    for r in records:
        print(f"{r['method']:8s} {r['variant']:10s} CR {r['ratio']}: ppl {r['ppl']:.3f}  acc {r['acc']:.4f} ± "
              f"{r['acc_stderr']:.4f}  functional error {r['functional_error']:.4f}  realised {r['realised_ratio']:.4f}")


if __name__ == "__main__":
    main()
