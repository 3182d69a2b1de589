"""Accuracy-compression and perplexity-compression curves from a set of results.

    python -m cospadi_jax.plots 'results/**/metrics.json' --out results/plots [--wandb-project ENTITY/PROJECT]

One figure per model and metric, one curve per method; perplexity on a log scale. Writes PNG and SVG per figure
and ``results.md`` (the same numbers as a Markdown table). Sources: local ``metrics.json`` files written by
``python -m cospadi_jax.run``, and optionally the runs of a wandb project.
"""

from __future__ import annotations

import argparse
import glob
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def row_from_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Flatten one metrics.json into {model, method, ratio, realised_ratio, ppl/<source>..., avg_acc, dense...}."""
    cfg = metrics["config"]
    row = {"model": cfg["model"]["name"], "method": cfg["method"].get("label") or cfg["method"]["name"],
           "ratio": cfg["method"]["ratio"], "realised_ratio": metrics.get("realised_ratio")}
    for source, r in metrics.get("compressed", {}).get("perplexity", {}).items():
        row[f"ppl/{source}"] = r["perplexity"]
    for source, r in metrics.get("dense", {}).get("perplexity", {}).items():
        row[f"dense_ppl/{source}"] = r["perplexity"]
    zero_shot = metrics.get("compressed", {}).get("zero_shot")
    if zero_shot:
        row["avg_acc"] = zero_shot.get("average")
        row["acc_tasks"] = ",".join(sorted(zero_shot.get("tasks", {})))
        errors = [t.get(t["headline"] + "_stderr") for t in zero_shot.get("tasks", {}).values() if "headline" in t]
        if errors and None not in errors:  # SE of the mean of independent tasks
            row["avg_acc_stderr"] = float(sum(e * e for e in errors) ** 0.5 / len(errors))
    dense_zs = metrics.get("dense", {}).get("zero_shot")
    if dense_zs:
        row["dense_avg_acc"] = dense_zs.get("average")
    return row


def wandb_rows(project: str) -> list[dict[str, Any]]:
    """Rows from a wandb project's finished runs (needs network and a login)."""
    import wandb

    rows = []
    for run in wandb.Api().runs(project):
        cfg = run.config
        if "method" not in cfg or "model" not in cfg:
            continue
        row = {"model": cfg["model"]["name"], "method": cfg["method"].get("label") or cfg["method"]["name"],
               "ratio": cfg["method"]["ratio"], "realised_ratio": run.summary.get("realised_ratio")}
        row.update({k: v for k, v in run.summary.items() if k.startswith("ppl/")})
        if "zero_shot/average" in run.summary:
            row["avg_acc"] = run.summary["zero_shot/average"]
        rows.append(row)
    return rows


def _figure(rows: list[dict], model: str, metric: str, out_dir: Path, *, log_y: bool, ylabel: str) -> list[str]:
    by_method: dict[str, list[tuple[float, float, float | None]]] = defaultdict(list)
    for r in rows:
        if r["model"] == model and r.get(metric) is not None:
            x = r["realised_ratio"] if r.get("realised_ratio") is not None else r["ratio"]
            by_method[r["method"]].append((x, r[metric], r.get(metric + "_stderr")))
    if not by_method:
        return []
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, points in sorted(by_method.items()):
        points.sort()
        errors = [p[2] for p in points]
        ax.errorbar([p[0] for p in points], [p[1] for p in points], marker="o", label=method, capsize=3,
                    yerr=errors if all(e is not None for e in errors) else None)
    dense_key = "dense_" + metric if not metric.startswith("ppl/") else "dense_ppl/" + metric[4:]
    dense = [r[dense_key] for r in rows if r["model"] == model and r.get(dense_key) is not None]
    if dense:
        ax.axhline(dense[0], color="gray", linestyle="--", linewidth=1, label="dense")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("compression ratio (fraction of parameters removed)")
    ax.set_ylabel(ylabel)
    ax.set_title(model)  # the y label names the metric; a long title is cut off
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    stem = out_dir / f"{model}_{metric.replace('/', '_').replace(':', '_')}"
    files = []
    for ext in ("png", "svg"):
        fig.savefig(f"{stem}.{ext}", dpi=150)
        files.append(f"{stem}.{ext}")
    plt.close(fig)
    return files


def markdown_table(rows: list[dict]) -> str:
    metrics = sorted({k for r in rows for k in r if k.startswith("ppl/")} | ({"avg_acc"} if any(
        "avg_acc" in r for r in rows) else set()))
    header = ["model", "method", "CR", "realised CR", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["model"], r["method"], r["ratio"])):
        cells = [r["model"], r["method"], f"{r['ratio']:g}",
                 f"{r['realised_ratio']:.4f}" if r.get("realised_ratio") is not None else "-"]
        cells += [("-" if r.get(m) is None else f"{r[m]:.4g}" + (f" ± {r[m + '_stderr']:.2g}"
                   if r.get(m + "_stderr") is not None else "")) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(paths: list[str | Path], out_dir: str | Path, *, wandb_project: str | None = None
                 ) -> dict[str, Any]:
    """Draw every figure for the given metrics.json files (and wandb project); returns {'figures', 'table'}."""
    rows = [row_from_metrics(json.loads(Path(p).read_text())) for p in paths]
    if wandb_project:
        rows += wandb_rows(wandb_project)
    if not rows:
        raise FileNotFoundError("no results to plot: no metrics.json matched and no wandb runs were found")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for model in sorted({r["model"] for r in rows}):
        for metric in sorted({k for r in rows for k in r if k.startswith("ppl/")}):
            figures += _figure(rows, model, metric, out_dir, log_y=True, ylabel=f"perplexity ({metric[4:]})")
        tasks = sorted({r["acc_tasks"] for r in rows if r["model"] == model and r.get("acc_tasks")})
        label = "zero-shot accuracy" + (f" ({tasks[0].replace(',', ', ')})" if len(tasks) == 1 else " (average)")
        figures += _figure(rows, model, "avg_acc", out_dir, log_y=False, ylabel=label)
    table = markdown_table(rows)
    (out_dir / "results.md").write_text(table)
    return {"figures": figures, "table": str(out_dir / "results.md"), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patterns", nargs="*", default=["results/**/metrics.json"])
    parser.add_argument("--out", default="results/plots")
    parser.add_argument("--wandb-project", default=None)
    args = parser.parse_args(argv)
    paths = sorted({p for pattern in args.patterns for p in glob.glob(pattern, recursive=True)})
    out = plot_results(paths, args.out, wandb_project=args.wandb_project)
    print("\n".join(out["figures"]))
    print(Path(out["table"]).read_text())


if __name__ == "__main__":
    main()
