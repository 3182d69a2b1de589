"""The paper's setting on the embedded SmolLM2-135M (issue 15): figures, tables and the claims of method.md §8.

    python experiments/paper_setting.py [--root experiments/results/paper_setting] [--requantize]

Reads every ``<root>/<deliverable>/**/metrics.json`` written by ``python -m cospadi_jax.run
experiment=paper_smollm2_<deliverable>`` (and, for the K-SVD-iterations curve, the ``snapshots/T*/metrics.json``
under a run directory: each a normal metrics.json whose ``config.method.ksvd_iterations`` is the snapshot's T; and
the ``same_run.json`` links to a run of the same name in another deliverable), groups them by deliverable (the
directory under the root), adds the bit-width points (the methods deliverable's CoSpaDi runs re-scored with
``task=evaluate eval.requantize=<width>``, which ``--requantize`` runs first: one fit per CR serves every width)
and writes, deterministically:

- ``<root>/figures/<deliverable>.png``: one figure per deliverable that has points. Every title states the K-SVD
  T and calibration size of its points; a figure whose points differ in either is refused (:class:`MixedTError`,
  :class:`MixedCalibrationError`) unless that is its axis;
- ``<root>/results.md``: a table per deliverable and the claims table (with links to the figures);
- ``<root>/claims.json``: ``[{"claim", "paper", "ours", "holds"}]``, one row per claim of method.md §8 (claim 4
  in four rows). ``ours`` and ``holds`` are computed from the metrics present; with none (or too few) ``holds`` is
  null and ``ours`` says "not measured yet"; claim 7 is "not testable on SmolLM2".

Runs with no results (claims all null, no figure) and with partial results. The functions are what
``notebooks/paper_setting.ipynb`` calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The sibling modules import by name whether this runs as a script or is loaded from a notebook or a test.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_setting_claims import CLAIMS, evaluate_claims  # noqa: E402
from paper_setting_data import (  # noqa: E402,F401  (re-exported for the notebook and the tests)
    BITS, COLOURS, DELIVERABLES, DISPLAY, PPL_SOURCE, ROOT, SAME_RUN, TASK, MixedCalibrationError, MixedTError,
    Point, bits_table, figure_setting, fmt, group, ksvd_curve, load_points, point_from_metrics, ug_table, unique)

# ----------------------------------------------------------------------------------------------- figures


def _wrap_titles(fig: Any) -> None:
    """Wrap every title wider than its room (the figure for a suptitle, its axes for an axes title): matplotlib
    would cut it at the edge, and our titles carry the setting (T, calibration) that a reader must see."""
    renderer = fig.canvas.get_renderer()
    for text, room in [(t, fig.bbox.width) for t in fig.texts] + [(ax.title, ax.bbox.width) for ax in fig.axes]:
        width = text.get_window_extent(renderer).width
        if width > room:
            line = text.get_text().replace("\n", " ")
            text.set_text(textwrap.fill(line, max(20, int(len(line) * room / width * 0.95))))


def _save(fig: Any, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    _wrap_titles(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version string: the same bytes on every run
    plt.close(fig)
    return str(path)


def _err(p: Point) -> float:
    return p.acc_stderr or 0.0


def _dense_lines(axes: Any, points: list[Point]) -> None:
    dense = next((p for p in points if p.dense_ppl), None)
    if dense:
        axes[0].axhline(dense.dense_ppl, color="k", ls=":", lw=1, label="dense")
        if dense.dense_acc is not None:
            axes[1].axhline(dense.dense_acc, color="k", ls=":", lw=1, label="dense")


def _plain_log_y(ax: Any) -> None:
    """A log y axis labelled with plain numbers (27, 30), not 2.7x10^1: a perplexity axis often spans less than a
    decade, where the default labels only one or two ticks."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))


def _ppl_acc_axes(title: str, xlabel: str) -> tuple[Any, Any]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].set(xlabel=xlabel, ylabel=f"held-out perplexity ({PPL_SOURCE})")
    _plain_log_y(axes[0])
    axes[1].set(xlabel=xlabel, ylabel=f"{TASK} accuracy (± stderr)")
    fig.suptitle(title)
    return fig, axes


def _log2_x(axes: Any) -> None:
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4, not 2^0


def _curves(axes: Any, lines: dict[str, list[tuple[float, Point]]], colours: dict[str, str] | None = None,
            skip_ppl: set[str] = frozenset()) -> None:
    for label, xs in lines.items():
        xs = sorted(xs, key=lambda t: t[0])
        c = (colours or {}).get(label)
        if label not in skip_ppl:
            axes[0].plot([x for x, _ in xs], [p.ppl for _, p in xs], marker="o", label=label, color=c)
        acc = [(x, p) for x, p in xs if p.acc is not None]
        axes[1].errorbar([x for x, _ in acc], [p.acc for _, p in acc], yerr=[_err(p) for _, p in acc], marker="o",
                         capsize=3, label=label, color=c)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


COLLAPSED = 100.0  # a method whose every perplexity exceeds this many times the dense one has collapsed


def collapsed_methods(points: list[Point]) -> dict[str, tuple[float, float]]:
    """Methods whose every point's perplexity is over ``COLLAPSED`` x the dense model's: method -> (min, max) PPL.

    Plain SVD scores 1e6-1e8 on SmolLM2; on one log axis with it, a 27 against 45 PPL gap between the methods that
    work is a few pixels, so the methods figure names the collapsed ones in a note instead of drawing them."""
    by: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        by[p.method].append(p)
    return {m: (min(p.ppl for p in ps), max(p.ppl for p in ps)) for m, ps in sorted(by.items())
            if all(p.dense_ppl and p.ppl > COLLAPSED * p.dense_ppl for p in ps)}


def plot_methods(points: list[Point], out: Path) -> str | None:
    """Perplexity and kjv_lambada accuracy against CR, one line per method (collapsed methods: accuracy only)."""
    if not points:
        return None
    unique(points, lambda p: (p.method, p.ratio), "methods")
    fig, axes = _ppl_acc_axes(f"{DELIVERABLES['methods']}, SmolLM2-135M, {figure_setting(points, 'methods')}",
                              "compression ratio (fraction removed)")
    collapsed = collapsed_methods(points)
    lines: dict[str, list] = defaultdict(list)
    for p in points:
        lines[DISPLAY.get(p.method, p.method)].append((p.ratio, p))
    _dense_lines(axes, points)
    _curves(axes, dict(sorted(lines.items())), {DISPLAY.get(k, k): v for k, v in COLOURS.items()},
            skip_ppl={DISPLAY.get(m, m) for m in collapsed})
    if collapsed:
        note = "off scale (collapsed): " + "; ".join(
            f"{DISPLAY.get(m, m)} PPL {lo:.1e}-{hi:.1e}" for m, (lo, hi) in collapsed.items())
        axes[0].set_title(note, fontsize=9)
    return _save(fig, out, "methods")


def plot_ksvd(points: list[Point], out: Path) -> str | None:
    """Perplexity and accuracy against T (the axis: mixed T allowed), with the mean objective per iteration."""
    curve = ksvd_curve(points)
    if not curve:
        return None
    ts = sorted({t for c in curve.values() for t in c})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    fig.suptitle(f"{DELIVERABLES['ksvd_iterations']}, SmolLM2-135M, K-SVD T = {ts[0]}..{ts[-1]} (the x axis), "
                 f"{figure_setting(points, 'ksvd_iterations', axis='T')}")
    for ratio, by_t in curve.items():
        lab = f"CR {ratio:g}"
        axes[0].plot(list(by_t), [p.ppl for p in by_t.values()], marker="o", label=lab)
        acc = [(t, p) for t, p in by_t.items() if p.acc is not None]
        axes[1].errorbar([t for t, _ in acc], [p.acc for _, p in acc], yerr=[_err(p) for _, p in acc], marker="o",
                         capsize=3, label=lab)
        longest = max(by_t.values(), key=lambda p: (len(p.objective), p.path))
        if longest.objective:
            # objective[t] is the error after t iterations; [0] after the first OMP on the initial dictionary.
            axes[2].plot(range(len(longest.objective)), longest.objective, label=f"{lab} (T = {longest.T})")
    axes[0].set(xlabel="K-SVD iterations T", ylabel=f"held-out perplexity ({PPL_SOURCE})")
    _plain_log_y(axes[0])
    axes[1].set(xlabel="K-SVD iterations T", ylabel=f"{TASK} accuracy (± stderr)")
    # Linear: the objective spans about 2x, where a log axis labels one or two ticks.
    axes[2].set(xlabel="K-SVD iteration t", ylabel="mean K-SVD objective over matrices")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out, "ksvd_iterations")


def _axis_plot(points: list[Point], out: Path, name: str, axis: str, xlabel: str, log2: bool = False) -> str | None:
    if not points:
        return None
    unique(points, lambda p: (p.method, p.ratio, getattr(p, axis)), name)
    fig, axes = _ppl_acc_axes(f"{DELIVERABLES[name]}, SmolLM2-135M, {figure_setting(points, name)}", xlabel)
    lines: dict[str, list] = defaultdict(list)
    for p in points:
        lines[f"{DISPLAY.get(p.method, p.method)}, CR {p.ratio:g}"].append((getattr(p, axis), p))
    _dense_lines(axes, points)
    _curves(axes, dict(sorted(lines.items())))
    if log2:
        _log2_x(axes)
    return _save(fig, out, name)


def plot_power(points: list[Point], out: Path) -> str | None:
    return _axis_plot(points, out, "power_iterations", "power_iterations", "power iterations", log2=True)


def plot_rho(points: list[Point], out: Path) -> str | None:
    """One dual-axis figure: perplexity (left, solid) and accuracy (right, dashed) against ρ, one colour per CR."""
    if not points:
        return None
    unique(points, lambda p: (p.ratio, p.rho), "rho")
    fig, left = plt.subplots(figsize=(8, 4.5))
    right = left.twinx()
    for i, ratio in enumerate(sorted({p.ratio for p in points})):
        xs = sorted((p for p in points if p.ratio == ratio), key=lambda p: p.rho)
        c = f"C{i}"
        left.plot([p.rho for p in xs], [p.ppl for p in xs], marker="o", color=c, label=f"perplexity, CR {ratio:g}")
        acc = [p for p in xs if p.acc is not None]
        right.errorbar([p.rho for p in acc], [p.acc for p in acc], yerr=[_err(p) for p in acc], marker="s",
                       ls="--", capsize=3, color=c, label=f"accuracy, CR {ratio:g}")
    left.set(xlabel="ρ = k/s", ylabel="held-out perplexity (solid)")
    _plain_log_y(left)
    right.set_ylabel(f"{TASK} accuracy ± stderr (dashed)")
    handles = left.get_legend_handles_labels(), right.get_legend_handles_labels()
    left.legend(handles[0][0] + handles[1][0], handles[0][1] + handles[1][1], fontsize=7, loc="upper center")
    left.grid(alpha=0.3)
    left.set_title(f"{DELIVERABLES['rho']}, CoSpaDi on SmolLM2-135M, {figure_setting(points, 'rho')}")
    return _save(fig, out, "rho")


def plot_dict_update(points: list[Point], out: Path) -> str | None:
    """Stacked fitting time per phase for each solver, perplexity and accuracy in the labels."""
    if not points:
        return None
    pts = sorted(unique(points, lambda p: (p.ratio, p.dict_update), "dict_update").values(),
                 key=lambda p: (p.ratio, p.dict_update or ""))
    phases = sorted({k for p in pts for k in p.phase_seconds})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{p.dict_update}, CR {p.ratio:g}\nppl {fmt(p.ppl)}, acc {fmt(p.acc, 3)}" for p in pts]
    bottom = [0.0] * len(pts)
    for phase in phases:
        h = [p.phase_seconds.get(phase, 0.0) for p in pts]
        ax.bar(labels, h, bottom=bottom, label=phase)
        bottom = [b + x for b, x in zip(bottom, h)]
    ax.set(ylabel="fitting time per phase, summed over matrices (s)")
    ax.legend(fontsize=8)
    ax.set_title(f"{DELIVERABLES['dict_update']}, SmolLM2-135M, {figure_setting(pts, 'dict_update')}")
    return _save(fig, out, "dict_update")


def plot_calib(points: list[Point], out: Path) -> str | None:
    if not points:
        return None
    unique(points, lambda p: (p.method, p.ratio, p.nsamples, p.seqlen), "calib_size")
    fig, axes = _ppl_acc_axes(f"{DELIVERABLES['calib_size']}, SmolLM2-135M, "
                              f"{figure_setting(points, 'calib_size', axis='calib')}", "calibration windows (nsamples)")
    lines: dict[str, list] = defaultdict(list)
    for p in points:
        lines[f"{DISPLAY.get(p.method, p.method)}, seqlen {p.seqlen}, CR {p.ratio:g}"].append((p.nsamples, p))
    _dense_lines(axes, points)
    _curves(axes, dict(sorted(lines.items())))
    _log2_x(axes)
    return _save(fig, out, "calib_size")


def plot_bits(points: list[Point], out: Path) -> str | None:
    """Perplexity and accuracy relative to the 16-bit (bf16) values, against the bit width, one line per CR."""
    rows = [r for r in bits_table(points) if r["rel_ppl"] is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fig.suptitle(f"{DELIVERABLES['bits']}, CoSpaDi on SmolLM2-135M, {figure_setting(points, 'bits')}; "
                 "relative to 16-bit")
    for ratio in sorted({r["ratio"] for r in rows}):
        # The mantissa truncations (and float32) are one line; int8, a per-column scale, is another scheme: its own
        # marker, so that the 8-to-10 segment does not read as a trend.
        for ax, key in zip(axes, ("rel_ppl", "rel_acc")):
            rs = [r for r in rows if r["ratio"] == ratio and r[key] is not None]
            line = [r for r in rs if r["quantization"] != "int8"]
            (drawn,) = ax.plot([r["bits"] for r in line], [r[key] for r in line], marker="o", label=f"CR {ratio:g}")
            int8 = [r for r in rs if r["quantization"] == "int8"]
            ax.plot([r["bits"] for r in int8], [r[key] for r in int8], linestyle="none", marker="s", mfc="none",
                    markersize=8, color=drawn.get_color(), label=f"CR {ratio:g}, int8" if int8 else None)
    for ax, ylabel in zip(axes, ("perplexity / 16-bit's", "accuracy / 16-bit's")):
        ax.set(xlabel="bits per coefficient value (bf16 truncated; square: int8; 32 = float32)", ylabel=ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks([8, 10, 12, 14, 16, 32], ["8", "10", "12", "14", "16", "32"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out, "bits")


def plot_ug(points: list[Point], out: Path) -> str | None:
    rows = [r for r in ug_table(points) if r["uniform_ppl"] is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fig.suptitle(f"{DELIVERABLES['ug']}, SmolLM2-135M, {figure_setting(points, 'ug')}")
    labels = [f"{DISPLAY.get(r['method'], r['method'])}\nUG {r['ug_ratio']:g} / global {r['global_ratio']:.3f}"
              for r in rows]
    x = range(len(rows))
    for i, (key, lab) in enumerate((("", "UG only"), ("uniform_", "uniform"))):
        axes[0].bar([j + 0.4 * i for j in x], [r[f"{key}ppl"] for r in rows], width=0.4, label=lab)
        axes[1].bar([j + 0.4 * i for j in x], [r[f"{key}acc"] or 0 for r in rows], width=0.4, label=lab,
                    yerr=[r[f"{key}acc_stderr"] or 0 for r in rows], capsize=3)
    _dense_lines(axes, points)
    axes[0].set(ylabel="held-out perplexity")  # linear: on a log axis a bar's length is not its value
    axes[1].set(ylabel=f"{TASK} accuracy (± stderr)")
    for ax in axes:
        ax.set_xticks([j + 0.2 for j in x], labels, fontsize=7)
        ax.legend(fontsize=8)
    return _save(fig, out, "ug")


PLOTS: dict[str, Callable[[list[Point], Path], str | None]] = {
    "methods": plot_methods, "ksvd_iterations": plot_ksvd, "power_iterations": plot_power, "rho": plot_rho,
    "dict_update": plot_dict_update, "calib_size": plot_calib, "bits": plot_bits, "ug": plot_ug}


def draw_figures(by: dict[str, list[Point]], out: Path) -> dict[str, str]:
    """Deliverable -> the PNG written (deliverables without points are left out)."""
    written = {name: PLOTS[name](by.get(name, []), Path(out)) for name in DELIVERABLES}
    return {k: v for k, v in written.items() if v}


# ----------------------------------------------------------------------------------------------- tables


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _acc(acc: float | None, stderr: float | None) -> str:
    return "–" if acc is None else f"{acc:.3f} ± {stderr or 0:.3f}"


def tables_markdown(by: dict[str, list[Point]], claims: list[dict[str, Any]], figures: dict[str, str],
                    root: Path) -> str:
    """results.md: one table per deliverable with points, then the claims table."""
    lines = ["# The paper's setting on SmolLM2-135M (issue 15)", "",
             "Written by `python experiments/paper_setting.py` from the metrics.json files under this directory. "
             f"Perplexity: `{PPL_SOURCE}`; accuracy: `{TASK}` (acc ± its standard error).", ""]
    for name, points in by.items():
        if not points:
            continue
        lines += [f"## {DELIVERABLES[name]}", ""]
        if name in figures:
            lines += [f"![{name}]({Path(figures[name]).relative_to(root).as_posix()})", ""]
        if name == "bits":
            lines += _table(["CR", "quantization", "bits", "perplexity", "accuracy", "ppl / 16-bit", "acc / 16-bit"],
                            [[f"{r['ratio']:g}", str(r["quantization"]), str(r["bits"]), fmt(r["ppl"]),
                              _acc(r["acc"], r["acc_stderr"]), fmt(r["rel_ppl"], 4), fmt(r["rel_acc"], 4)]
                             for r in bits_table(points)])
        elif name == "ug" and ug_table(points):  # else (uniform runs only, so far) the plain table
            lines += _table(["method", "UG CR", "global CR", "UG perplexity", "UG accuracy", "uniform CR",
                             "uniform perplexity", "uniform accuracy"],
                            [[r["method"], f"{r['ug_ratio']:g}", fmt(r["global_ratio"], 4), fmt(r["ppl"]),
                              _acc(r["acc"], r["acc_stderr"]), fmt(r["uniform_ratio"], 3), fmt(r["uniform_ppl"]),
                              _acc(r["uniform_acc"], r["uniform_acc_stderr"])] for r in ug_table(points)])
        else:
            pts = sorted(points, key=lambda p: (p.method, p.ratio, p.T or 0, p.power_iterations or 0, p.rho or 0,
                                                p.dict_update or "", p.nsamples, p.seqlen, p.path))
            lines += _table(["method", "CR", "realised", "T", "p", "ρ", "update", "calib", "perplexity", "accuracy",
                             "fit s", "OMP / update s"],
                            [[p.method, f"{p.ratio:g}", fmt(p.realised_ratio, 4), str(p.T if p.T is not None else "–"),
                              str(p.power_iterations or "–"), str(p.rho or "–"), p.dict_update or "–",
                              f"{p.nsamples}×{p.seqlen}", fmt(p.ppl), _acc(p.acc, p.acc_stderr),
                              fmt(p.fit_seconds, 0),
                              f"{fmt(p.phase_seconds.get('omp'), 0)} / {fmt(p.phase_seconds.get('update'), 0)}"]
                             for p in pts])
        lines.append("")
    lines += ["## Claims of method.md §8", ""]
    rows = []
    for claim, spec in zip(claims, CLAIMS):
        fig = " ".join(f"[{f}](figures/{f}.png)" for f in spec.figures if f in figures) or "–"
        holds = {True: "holds", False: "does not hold", None: "–"}[claim["holds"]]
        rows.append([claim["claim"], claim["paper"], claim["ours"], holds, fig])
    lines += _table(["claim", "paper", "ours", "holds", "figure"], rows)
    return "\n".join(lines) + "\n"


def write_all(root: Path | str = ROOT) -> dict[str, Any]:
    """Load, draw, evaluate the claims and write figures/, results.md and claims.json under ``root``."""
    root = Path(root)
    by = group(load_points(root))
    figures = draw_figures(by, root / "figures")
    claims = evaluate_claims(by)
    root.mkdir(parents=True, exist_ok=True)
    (root / "claims.json").write_text(json.dumps(claims, indent=1, ensure_ascii=False) + "\n")
    (root / "results.md").write_text(tables_markdown(by, claims, figures, root))
    return {"figures": figures, "claims": claims, "points": sum(len(v) for v in by.values()),
            "table": str(root / "results.md"), "claims_json": str(root / "claims.json")}


BITS_RATIOS = (0.2, 0.3, 0.4)  # the CRs of the bit-width deliverable (paper Fig. 3)


def requantize_jobs(root: Path | str = ROOT) -> list[list[str]]:
    """The ``task=evaluate eval.requantize=<width>`` commands of the bit-width deliverable still to run: every
    width of ``layers.QUANTIZATIONS`` on each float32 CoSpaDi run of the methods deliverable at ``BITS_RATIOS``."""
    from cospadi_jax.layers import QUANTIZATIONS

    jobs = []
    for run in sorted(Path(root).glob("methods/*/metrics.json")):
        method = json.loads(run.read_text())["config"]["method"]
        if (method.get("label") or method["name"]) != "cospadi" or method.get("quantization") \
                or float(method["ratio"]) not in BITS_RATIOS:
            continue
        done = {json.loads(f.read_text()).get("eval", {}).get("requantize") for f in run.parent.glob("evaluation-*.json")}
        jobs += [[sys.executable, "-m", "cospadi_jax.run", "task=evaluate", f"artifact={run.parent}",
                  f"eval.requantize={width}", "logger.mode=disabled"] for width in QUANTIZATIONS[1:] if width not in done]
    return jobs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(ROOT), help="the paper_setting results directory")
    parser.add_argument("--requantize", action="store_true",
                        help="first evaluate the methods deliverable's CoSpaDi runs at every coefficient width "
                             "(task=evaluate eval.requantize=...; minutes each, no refitting)")
    args = parser.parse_args(argv)
    if args.requantize:
        import subprocess

        for job in requantize_jobs(args.root):
            print(" ".join(job[1:]), flush=True)
            subprocess.run(job, check=True)
    out = write_all(args.root)
    print(f"{out['points']} points; figures: {sorted(out['figures']) or 'none'}; {out['table']}; "
          f"{out['claims_json']}")
    for c in out["claims"]:
        print(f"- [{ {True: 'holds', False: 'does not hold', None: 'open'}[c['holds']] }] {c['claim']}: {c['ours']}")


if __name__ == "__main__":
    main()
