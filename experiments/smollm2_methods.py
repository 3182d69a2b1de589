"""Every method on the real SmolLM2-135M weights at CR 0.2 / 0.3 / 0.4: held-out perplexity, realised ratio,
functional errors and wall time; then a check of the paper's claims against what we measured.

    python experiments/smollm2_methods.py [--ratios 0.2 0.3 0.4] [--methods SVD-LLM CoSpaDi ...]
        [--ksvd-iterations T] [--out experiments/results/smollm2_methods.json]

Every (CR, method) job is one ``python -m cospadi_jax.run`` on the setting of ``experiment=smollm2_methods``
(``cospadi_jax/conf/experiment/smollm2_methods.yaml``: T = 1 for the CoSpaDi variants, 32 x 512 calibration
tokens, held-out Grams on 16 x 512 tokens, perplexity on 16 x 512 held-out windows), into
``<out without .json>/<method>[-T<T>]-cr<CR>/`` (``experiments/results/smollm2_methods/`` by default). A job whose
``metrics.json`` exists is not rerun, and a killed job resumes from its artifact. The script then reads every
finished job's ``metrics.json`` into ``--out`` (smollm2_methods.json), the table ``.md`` (copied into the README
by scripts/update_readme_results.py) and the figure ``.png``. Rows already in ``--out`` on the same setting whose
job directory is absent (the committed table predates the job directories) are kept.

``--methods`` with no label (or ``--ratios`` with no ratio) runs nothing and only rewrites the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cospadi_jax.config import compose_config, experiment_overrides
from cospadi_jax.fileio import atomic_write_json
from cospadi_jax.plots import DISPLAY

EXPERIMENT = "smollm2_methods"  # conf/experiment/smollm2_methods.yaml: the table's setting, in one place
# The conf/method options of the table, the pairs the paper's claims compare first; labels are the plots' names.
OPTIONS = ("svd_llm", "cospadi", "cospadi_free", "cospadi_grouped", "basis_sharing", "asvd", "svd")
METHODS = {DISPLAY[option]: option for option in OPTIONS}  # label -> conf/method option
OUT = Path(__file__).parent / "results"
# The CRs of the committed table (the script's own choice; the app's default is a single method.ratio).
RATIOS = (0.2, 0.3, 0.4)


@functools.cache
def takes_ksvd(option: str) -> bool:
    """Whether the method option runs K-SVD (its config has ``ksvd_iterations``); the low-rank ones do not."""
    return "ksvd_iterations" in compose_config([f"method={option}"]).method


def job_dir(jobs: Path, option: str, ratio: float, ksvd_iterations: int) -> Path:
    """One directory per job; T is in the CoSpaDi names, so runs at another T never share a directory."""
    return jobs / (f"{option}-T{ksvd_iterations}-cr{ratio}" if takes_ksvd(option) else f"{option}-cr{ratio}")


def job_overrides(option: str, ratio: float, ksvd_iterations: int, out: Path) -> list[str]:
    """The app's overrides of one job: the experiment's setting restated for this method, then the job's own."""
    own = [f"method.ratio={ratio}", "logger.mode=disabled", f"output_dir={out}"]
    if takes_ksvd(option):
        own.append(f"method.ksvd_iterations={ksvd_iterations}")
    return experiment_overrides(EXPERIMENT, option, *own)


def run_job(option: str, ratio: float, ksvd_iterations: int, jobs: Path) -> None:
    """``python -m cospadi_jax.run`` for one job (a subprocess, so that each job's memory is freed), unless done."""
    out = job_dir(jobs, option, ratio, ksvd_iterations)
    if (out / "metrics.json").exists():
        print(f"{out.name}: done", flush=True)
        return
    cmd = [sys.executable, "-m", "cospadi_jax.run", *job_overrides(option, ratio, ksvd_iterations, out)]
    print(f"{out.name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"{out.name}: finished in {time.perf_counter() - t0:.0f} s", flush=True)


def _machine(metrics: dict) -> str:
    host = metrics.get("host") or {}
    kind = host.get("device_kind", "cpu")
    return (f"{host.get('machine', '?')}, {host.get('cpu_count', '?')} CPUs, "
            + ("CPU-only JAX" if kind == "cpu" else f"JAX on {kind}"))


def record(metrics: dict) -> dict[str, Any]:
    """One row of the table from a job's metrics.json (per-matrix held-out functional errors from its
    ``matrices`` rows)."""
    method, source = metrics["config"]["method"], metrics["config"]["eval"]["ppl_sources"][0]
    rows = metrics["matrices"]
    per_matrix = {m["path"]: m["functional_error_heldout"] for m in rows}
    if any(v is None for v in per_matrix.values()):
        raise ValueError(f"{method['label']} at CR {method['ratio']}: a matrix has no held-out functional error "
                         "(the job ran without held-out Grams: calib.heldout_source is null)")
    row = {"ratio": method["ratio"], "label": DISPLAY[method["label"]], "method": method["name"],
           "perplexity": metrics["compressed"]["perplexity"][source]["perplexity"],
           "realised_ratio": metrics["realised_ratio"], "seconds": metrics["timings"]["compress_s"],
           "functional_error_calib": float(np.mean([m["functional_error_calib"] for m in rows])),
           "functional_error_heldout": float(np.mean(list(per_matrix.values()))),
           "per_matrix_heldout": per_matrix}
    if method["group_size"] != 1:
        row["group_size"] = method["group_size"]
    return row


def meta_of(metrics: dict, ksvd_iterations: int) -> dict[str, Any]:
    """The table's setting as one job ran it (the keys of the committed json's ``meta``)."""
    config = metrics["config"]
    return {"ksvd_iterations": ksvd_iterations,
            "power_iterations": config["method"].get("power_iterations",
                                                     compose_config([f"experiment={EXPERIMENT}"]).method
                                                     .power_iterations),
            "nsamples": config["calib"]["nsamples"], "seqlen": config["calib"]["seqlen"],
            "heldout_nsamples": config["calib"]["heldout_nsamples"], "eval_seqlen": config["eval"]["seqlen"],
            "eval_windows": config["eval"]["max_windows"], "machine": _machine(metrics)}


def aggregate(jobs: Path, out: Path, ksvd_iterations: int) -> dict[str, Any]:
    """Every finished job under ``jobs`` (CoSpaDi jobs at this T) as the table's json, with the rows of an
    existing ``out`` on the same setting that no job directory replaces."""
    finished = [json.loads(p.read_text()) for p in sorted(jobs.glob("*/metrics.json"))]
    finished = [m for m in finished if m["config"]["method"].get("ksvd_iterations", ksvd_iterations)
                == ksvd_iterations]
    if not finished:
        raise SystemExit(f"no finished job under {jobs} at T = {ksvd_iterations}: run some first "
                         "(--ratios ... --methods ...)")
    metas = [meta_of(m, ksvd_iterations) for m in finished]
    setting = {k: v for k, v in metas[0].items() if k != "machine"}
    for meta, metrics in zip(metas[1:], finished[1:]):
        if {k: v for k, v in meta.items() if k != "machine"} != setting:
            raise SystemExit(f"the jobs under {jobs} ran on different settings ({setting} vs {meta}, "
                             f"{metrics['config']['output_dir']}): move one set elsewhere or pass another --out")
    if len({m["machine"] for m in metas}) > 1:
        print(f"note: the jobs ran on different machines: {sorted({m['machine'] for m in metas})}", flush=True)
    runs = [record(m) for m in finished]
    source = finished[0]["config"]["eval"]["ppl_sources"][0]
    dense = next((m["dense"]["perplexity"][source] for m in finished if "dense" in m), None)
    results = {"meta": metas[0], "calibration_key": finished[0]["calibration_key"], "runs": runs}
    old = json.loads(out.read_text()) if out.exists() else {}
    same = old.get("meta") and all(setting.get(k) == v for k, v in old["meta"].items() if k != "machine")
    if same:
        have = {(r["ratio"], r["label"]) for r in runs}
        kept = [r for r in old.get("runs", []) if (r["ratio"], r["label"]) not in have]
        if kept:
            print(f"kept {len(kept)} rows of {out} (same setting, no job directory)", flush=True)
        results["runs"] = kept + runs
        dense = dense or old.get("dense")
    if dense is None:
        raise SystemExit("no dense perplexity: run a job with eval.dense_baseline=true (the default)")
    results["dense"] = dense
    return results


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to f32), all 210 projections compressed, ρ = 2, Eq. 11 "
        f"accounting, K-SVD T = {meta['ksvd_iterations']} with {meta['power_iterations']} power iterations; "
        f"calibration {meta['nsamples']} × {meta['seqlen']} tokens of the shipped KJV calibration part; perplexity "
        f"on {meta['eval_windows']} × {meta['eval_seqlen']}-token windows of the held-out part (dense: "
        f"{results['dense']['perplexity']:.2f}). Functional error = mean over matrices of ‖X(W−Ŵ)‖/‖XW‖ on the "
        "held-out Gram. Machine: " + meta["machine"] + ".",
        "",
        "| CR | method | held-out PPL | realised CR | mean functional error (held-out) | compression time (s) |",
        "|---|---|---|---|---|---|",
    ]
    order = list(METHODS)
    for row in sorted(results["runs"], key=lambda r: (r["ratio"], order.index(r["label"]))):
        lines.append(f"| {row['ratio']} | {row['label']} | {row['perplexity']:.2f} | {row['realised_ratio']:.4f} | "
                     f"{row['functional_error_heldout']:.4f} | {row['seconds']:.0f} |")
    lines += ["", "Claims of the paper, checked on these runs (T = 1 is far from the paper's T = 60: the dictionary has "
              "had a single update; see the note under the table):", ""]
    lines += [f"- {c}" for c in claims(results)]
    return "\n".join(lines) + "\n"


# The methods within a factor of a few of dense; SVD, ASVD and CoSpaDi† collapse by orders of magnitude and would
# squeeze these into one band on a shared axis.
COMPETITIVE = ("SVD-LLM", "Basis Sharing", "CoSpaDi", "CoSpaDi (grouped)")


def figure(results: dict, path: Path) -> None:
    """Held-out perplexity against realised CR for every method (log), the competitive methods alone (linear),
    and the mean functional error; display names and colours from cospadi_jax.plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cospadi_jax.plots import COLOURS, DISPLAY, X_LABEL

    config_name = {shown: name for name, shown in DISPLAY.items()}  # METHODS' labels are the display names

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for label in METHODS:
        runs = sorted((r for r in results["runs"] if r["label"] == label), key=lambda r: r["realised_ratio"])
        if not runs:
            continue
        x = [r["realised_ratio"] for r in runs]
        style = dict(marker="o", label=label, color=COLOURS.get(config_name.get(label)))
        axes[0].plot(x, [r["perplexity"] for r in runs], **style)
        if label in COMPETITIVE:
            axes[1].plot(x, [r["perplexity"] for r in runs], **style)
        axes[2].plot(x, [r["functional_error_heldout"] for r in runs], **style)
    for ax in axes[:2]:
        ax.axhline(results["dense"]["perplexity"], color="gray", ls="--", label="dense")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("held-out perplexity (log scale)")
    axes[0].set_title("all methods", fontsize=9)
    axes[1].set_ylabel("held-out perplexity")
    axes[1].set_title("the competitive methods", fontsize=9)
    axes[2].set_ylabel("mean functional error (held-out Gram)")
    for ax in axes:
        ax.set_xlabel(X_LABEL, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(f"SmolLM2-135M · K-SVD T = {meta['ksvd_iterations']} · calib {meta.get('nsamples')}×"
                 f"{meta.get('seqlen')} · eval {meta.get('eval_windows')} windows")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def claims(results: dict) -> list[str]:
    by = {(r["ratio"], r["label"]): r for r in results["runs"]}
    out = []
    for cr in sorted({r["ratio"] for r in results["runs"]}):
        def ppl(label):
            return by[(cr, label)]["perplexity"] if (cr, label) in by else None
        pairs = [("CoSpaDi", "SVD-LLM", "CoSpaDi < SVD-LLM in perplexity"),
                 ("CoSpaDi", "CoSpaDi†", "data-aware CoSpaDi ≪ data-free CoSpaDi†"),
                 ("CoSpaDi (grouped)", "CoSpaDi", "grouped ≤ per-layer CoSpaDi")]
        for a, b, text in pairs:
            if ppl(a) is not None and ppl(b) is not None:
                verdict = "holds" if ppl(a) <= ppl(b) else "does NOT hold"
                out.append(f"CR {cr}: {text}: {verdict} ({ppl(a):.2f} vs {ppl(b):.2f})")
        if (cr, "CoSpaDi") in by and (cr, "SVD-LLM") in by:
            a, b = by[(cr, "CoSpaDi")]["per_matrix_heldout"], by[(cr, "SVD-LLM")]["per_matrix_heldout"]
            wins = sum(a[p] < b[p] for p in a)
            out.append(f"CR {cr}: per-matrix functional error CoSpaDi < SVD-LLM at equal budget on {wins}/{len(a)} "
                       "matrices (held-out Gram)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ksvd-iterations", type=int, default=None,
                        help=f"K-SVD T of the CoSpaDi variants (default: experiment={EXPERIMENT}'s)")
    parser.add_argument("--out", type=Path, default=OUT / "smollm2_methods.json",
                        help="the table's json; its .md and .png beside it, the jobs in its stem's directory")
    args = parser.parse_args()
    if args.out.suffix != ".json":
        parser.error(f"--out {args.out} must end in .json (the .md, .png and the job directory are named after it)")
    ksvd_iterations = (args.ksvd_iterations if args.ksvd_iterations is not None
                       else compose_config([f"experiment={EXPERIMENT}"]).method.ksvd_iterations)
    jobs = args.out.with_suffix("")
    for ratio in args.ratios:
        for label in args.methods:
            run_job(METHODS[label], ratio, ksvd_iterations, jobs)
    results = aggregate(jobs, args.out, ksvd_iterations)
    atomic_write_json(args.out, results)
    args.out.with_suffix(".md").write_text(markdown(results))
    figure(results, args.out.with_suffix(".png"))
    print(markdown(results))


if __name__ == "__main__":
    main()
