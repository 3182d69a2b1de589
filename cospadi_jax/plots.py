"""Accuracy-compression and perplexity-compression curves from a set of results.

    python -m cospadi_jax.plots 'results/**/metrics.json' --out results/plots [--wandb-project ENTITY/PROJECT]

One figure per model and metric, one curve per method *and setting*: runs that differ in any other axis (T, ρ,
group size, calibration size, layers, ...) get curves of their own, labelled by the axes that differ; the axes
shared by every curve are in the title. Methods have display names and stable colours; perplexity is on a log
scale. Writes PNG and SVG per figure and ``results.md`` (the same numbers as a Markdown table). Sources: local ``metrics.json`` files written by
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
import numpy as np

from .models.paths import PROJECTION_TYPES

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# Display names and colours, fixed per method so that a method looks the same in every figure.
DISPLAY = {"svd": "SVD", "asvd": "ASVD", "svd_llm": "SVD-LLM", "basis_sharing": "Basis Sharing",
           "cospadi": "CoSpaDi", "cospadi_grouped": "CoSpaDi (grouped)", "cospadi_free": "CoSpaDi†"}
COLOURS = {"svd": "#7f7f7f", "asvd": "#bcbd22", "svd_llm": "#1f77b4", "basis_sharing": "#17becf",
           "cospadi": "#d62728", "cospadi_grouped": "#ff7f0e", "cospadi_free": "#9467bd"}
_KSVD = ("cospadi", "cospadi_free")
# Setting axes that split curves (name in labels, how to read it from a config).
SETTING_AXES = {
    "T": lambda c: c["method"].get("ksvd_iterations") if c["method"]["name"] in _KSVD else None,
    "p": lambda c: c["method"].get("power_iterations") if c["method"]["name"] in _KSVD else None,
    "update": lambda c: c["method"].get("dict_update") if c["method"]["name"] in _KSVD else None,
    "ρ": lambda c: c["method"].get("rho") if c["method"]["name"] in _KSVD else None,
    "m": lambda c: c["method"].get("group_size"),
    "layers": lambda c: _short(c["method"].get("layers")),
    "proj": lambda c: _short(c["method"].get("proj_types")),
    "quant": lambda c: c["method"].get("quantization"),
    "storage": lambda c: c["method"].get("accounting"),
    "calib": lambda c: f"{c['calib']['nsamples']}×{c['calib']['seqlen']}" if "calib" in c else None,
    "calib seed": lambda c: c.get("calib", {}).get("seed"),
    "dtype": lambda c: c["model"].get("dtype"),
    "eval": lambda c: (f"{c['eval'].get('max_windows')}×{c['eval'].get('seqlen')}" if "eval" in c else None),
    "seq": lambda c: c.get("calib", {}).get("sequential") or None,
    "refine": lambda c: c.get("refine", {}).get("steps") or None,
    "budget": lambda c: _allocation(c.get("budget", {})),
}


def _allocation(node: dict[str, Any]) -> str | None:
    """``greedy/spectrum`` for a non-uniform budget, None (no axis) for the paper's uniform one."""
    return None if node.get("allocation", "uniform") == "uniform" else f"{node['allocation']}/{node.get('curve')}"


def _short(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and tuple(value) == PROJECTION_TYPES:
        return "all"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if len(value) <= 4 else f"{value[0]}..{value[-1]} ({len(value)})"
    return value


def display_name(method: str) -> str:
    return DISPLAY.get(method, method)


def row_from_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Flatten one metrics.json into {model, method, ratio, realised_ratio, ppl/<source>..., avg_acc, dense...}."""
    cfg = metrics["config"]
    row = {"model": cfg["model"]["name"], "method": cfg["method"].get("label") or cfg["method"]["name"],
           "ratio": cfg["method"]["ratio"], "realised_ratio": metrics.get("realised_ratio"),
           "setting": {axis: read(cfg) for axis, read in SETTING_AXES.items()}}
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
               "ratio": cfg["method"]["ratio"], "realised_ratio": run.summary.get("realised_ratio"),
               "setting": {axis: read(cfg) for axis, read in SETTING_AXES.items()}}
        row.update({k: v for k, v in run.summary.items() if k.startswith("ppl/")})
        if "zero_shot/average" in run.summary:
            row["avg_acc"] = run.summary["zero_shot/average"]
        rows.append(row)
    return rows


def _curves(rows: list[dict]) -> tuple[dict[tuple, list[dict]], dict[str, Any], list[str]]:
    """Rows grouped into curves: {(method, setting values of the varying axes): rows}; the axes every row
    shares (for the title) and the names of the varying ones (for the labels)."""
    values: dict[str, set] = defaultdict(set)
    for r in rows:
        for axis, v in r.get("setting", {}).items():
            if v is not None:  # an axis a method does not have (T of SVD-LLM) neither varies nor is shared
                values[axis].add(json.dumps(v))
    varying = [a for a in SETTING_AXES if len(values.get(a, ())) > 1]
    shared = {a: json.loads(next(iter(values[a]))) for a in SETTING_AXES if len(values.get(a, ())) == 1}
    curves: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        curves[(r["method"], tuple(r.get("setting", {}).get(a) for a in varying))].append(r)
    return curves, shared, varying


def _label(method: str, key: tuple, varying: list[str]) -> str:
    extra = ", ".join(f"{a}={v}" for a, v in zip(varying, key) if v is not None)
    return display_name(method) + (f" ({extra})" if extra else "")


def setting_title(model: str, shared: dict[str, Any]) -> str:
    return model + "".join(f" · {a} {v}" for a, v in shared.items() if a not in ("m", "storage", "dtype"))


X_LABEL = "storage removed from the compressed matrices (realised CR, Eq. 10/11 bytes)"


def _figure(rows: list[dict], model: str, metric: str, out_dir: Path, *, log_y: bool, ylabel: str) -> list[str]:
    rows = [r for r in rows if r["model"] == model and r.get(metric) is not None]
    if not rows:
        return []
    curves, shared, varying = _curves(rows)
    fig, ax = plt.subplots(figsize=(7, 4.6))
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = defaultdict(int)
    for (method, key), points in sorted(curves.items(), key=lambda kv: (kv[0][0], json.dumps(kv[0][1]))):
        points = sorted(points, key=lambda r: r["realised_ratio"] if r.get("realised_ratio") is not None
                        else r["ratio"])
        xs = [r["realised_ratio"] if r.get("realised_ratio") is not None else r["ratio"] for r in points]
        errors = [r.get(metric + "_stderr") for r in points]
        ax.errorbar(xs, [r[metric] for r in points], marker="o", capsize=3, label=_label(method, key, varying),
                    color=COLOURS.get(method), linestyle=styles[seen[method] % len(styles)],
                    yerr=errors if all(e is not None for e in errors) else None)
        seen[method] += 1
    dense_key = "dense_" + metric if not metric.startswith("ppl/") else "dense_ppl/" + metric[4:]
    dense = [r[dense_key] for r in rows if r.get(dense_key) is not None]
    if dense:
        ax.axhline(dense[0], color="gray", linestyle="--", linewidth=1, label="dense")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(ylabel)
    ax.set_title(setting_title(model, shared), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    stem = out_dir / f"{model}_{metric.replace('/', '_').replace(':', '_')}"
    files = []
    for ext in ("png", "svg"):
        fig.savefig(f"{stem}.{ext}", dpi=150)
        files.append(f"{stem}.{ext}")
    plt.close(fig)
    return files


def plot_allocation(matrices: list[dict], path: str | Path, *, title: str = "") -> Path:
    """Heatmap of each matrix's compression ratio, layer × projection type (a non-uniform budget's allocation).

    matrices: report rows (``metrics.json["matrices"]``) with ``path`` and ``target_ratio``. Writes ``path``."""
    layers = sorted({int(m["path"].split(".")[2]) for m in matrices})
    grid = np.full((len(PROJECTION_TYPES), len(layers)), np.nan)
    for m in matrices:
        grid[PROJECTION_TYPES.index(m["path"].rsplit(".", 1)[1]), layers.index(int(m["path"].split(".")[2]))] = \
            m["target_ratio"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(layers) + 2), 3.2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(PROJECTION_TYPES)), PROJECTION_TYPES)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, label="compression ratio (fraction removed)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def markdown_table(rows: list[dict]) -> str:
    metrics = sorted({k for r in rows for k in r if k.startswith("ppl/")} | ({"avg_acc"} if any(
        "avg_acc" in r for r in rows) else set()))
    _, _, varying = _curves(rows)
    header = ["model", "method", *varying, "CR", "realised CR", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["model"], r["method"], json.dumps([r.get("setting", {}).get(a)
                                                                              for a in varying]), r["ratio"])):
        cells = [r["model"], r["method"], *(str(r.get("setting", {}).get(a)) for a in varying), f"{r['ratio']:g}",
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
