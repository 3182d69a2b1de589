"""Points of the paper's-setting results (issue 15): one per metrics.json, grouped by deliverable, and the
derived tables (K-SVD curve, bit widths, selective up/gate) that the figures and the claims share.

Used by experiments/paper_setting.py (figures, tables) and experiments/paper_setting_claims.py (method.md §8).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from cospadi_jax.layers import VALUE_BITS
from cospadi_jax.methods import method_class

ROOT = Path(__file__).resolve().parent / "results" / "paper_setting"
# Deliverable (directory under the root, hydra.sweep.dir of experiment=paper_smollm2_<name>) -> figure title.
DELIVERABLES = {
    "methods": "Method sweep (Table 1 / Fig. 5 analogue)",
    "ksvd_iterations": "K-SVD iterations (Fig. 4 left)",
    "power_iterations": "Power iterations (Fig. 4 right)",
    "rho": "rho = k/s (Fig. 2)",
    "dict_update": "Dictionary update solver (Table 2)",
    "calib_size": "Calibration size",
    "bits": "Coefficient bit width (Fig. 3)",
    "ug": "Selective up/gate compression (Tables 6, 14)",
}
# A sweep point whose run another deliverable has already made (the same run name: the same identity config, so
# the same fit) holds this file instead of a second fit: {"run": "<deliverable>/<run name>"}, relative to the root.
# experiments/paper_setting_runs.py writes it.
SAME_RUN = "same_run.json"
PPL_SOURCE = "embedded:heldout"
TASK = "kjv_lambada"
KSVD_METHODS = ("cospadi", "cospadi_free")  # method.name values that run K-SVD (and have a T)
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UG = ("gate_proj", "up_proj")
BITS = VALUE_BITS  # bits per coefficient value of each method.quantization (None = float32)
DISPLAY = {"svd": "SVD", "svd_llm": "SVD-LLM", "basis_sharing": "Basis Sharing", "cospadi": "CoSpaDi",
           "cospadi_grouped": "CoSpaDi (m = 2)", "cospadi_free": "CoSpaDi†"}
COLOURS = {"svd": "#7f7f7f", "svd_llm": "#1f77b4", "basis_sharing": "#17becf", "cospadi": "#d62728",
           "cospadi_grouped": "#ff7f0e", "cospadi_free": "#9467bd"}
NOT_MEASURED = "not measured yet"
# Tolerances of the claims' rules (stated in each claim's text).
SAME_PPL = 0.01  # "≥" / "costs almost nothing": perplexity within 1 %
SATURATED = 0.02  # an axis has saturated where perplexity is within 2 % of its best
UG_KEEPS = 0.05  # UG "keeps quality": perplexity within 5 % of uniform's


class MixedTError(ValueError):
    """One figure would mix points fitted with different K-SVD iteration counts."""


class MixedCalibrationError(ValueError):
    """One figure would mix data-aware points fitted on calibration sets of different sizes."""


@dataclass
class Point:
    """One run (or one K-SVD snapshot of a run): its setting and its scores, from one metrics.json."""

    deliverable: str
    path: str  # relative to the root, '/'-separated
    method: str  # label: svd_llm, cospadi, cospadi_grouped, ...
    name: str  # registry name: cospadi for both CoSpaDi labels
    ratio: float
    realised_ratio: float | None
    T: int | None  # K-SVD iterations (None for low-rank methods)
    power_iterations: int | None
    rho: float | None
    dict_update: str | None
    quantization: str | None
    proj_types: tuple[str, ...]
    nsamples: int
    seqlen: int
    data_aware: bool  # fitted on the calibration Grams (False: nsamples x seqlen never reached the fit)
    ppl: float | None
    acc: float | None
    acc_stderr: float | None
    dense_ppl: float | None
    dense_acc: float | None
    snapshot: bool = False
    objective: list[float] = field(default_factory=list)  # mean K-SVD objective per iteration over matrices
    phase_seconds: dict[str, float] = field(default_factory=dict)
    fit_seconds: float | None = None  # fitting time summed over every attempt (else compress_s)
    # per matrix: path -> (d_in, d_out, dense_params, realised_ratio, functional_error_heldout, k, s, rank)
    matrices: dict[str, tuple] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- loading


def _scores(node: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    ppl = node.get("perplexity", {}).get(PPL_SOURCE, {}).get("perplexity")
    task = node.get("zero_shot", {}).get("tasks", {}).get(TASK, {})
    return ppl, task.get("acc"), task.get("acc_stderr")


def point_from_metrics(metrics: dict[str, Any], deliverable: str, path: str, snapshot: bool = False) -> Point:
    """Flatten one metrics.json (as ``cospadi_jax.run`` writes it) into a :class:`Point`."""
    cfg = metrics["config"]
    method, calib = cfg["method"], cfg["calib"]
    ksvd = method["name"] in KSVD_METHODS
    ppl, acc, stderr = _scores(metrics.get("compressed", {}))
    dense_ppl, dense_acc, _ = _scores(metrics.get("dense", {}))
    rows = metrics.get("matrices") or []
    objectives = [r["objective"] for r in rows if r.get("objective")]
    # mean over the matrices that reached iteration i (an early-stopped matrix has a shorter list)
    objective = [sum(o[i] for o in objectives if len(o) > i) / sum(len(o) > i for o in objectives)
                 for i in range(max((len(o) for o in objectives), default=0))]
    timings = metrics.get("timings", {})
    return Point(
        deliverable=deliverable, path=path, method=method.get("label") or method["name"], name=method["name"],
        ratio=float(method["ratio"]), realised_ratio=metrics.get("realised_ratio"),
        T=method.get("ksvd_iterations") if ksvd else None,
        power_iterations=method.get("power_iterations") if ksvd else None,
        rho=method.get("rho") if ksvd else None, dict_update=method.get("dict_update") if ksvd else None,
        quantization=method.get("quantization"), proj_types=tuple(method.get("proj_types") or ALL_PROJECTIONS),
        nsamples=calib["nsamples"], seqlen=calib["seqlen"], data_aware=method_class(method["name"]).data_aware,
        ppl=ppl, acc=acc, acc_stderr=stderr,
        dense_ppl=dense_ppl, dense_acc=dense_acc, snapshot=snapshot, objective=objective,
        phase_seconds=dict(sorted((metrics.get("engine") or {}).get("phase_seconds", {}).items())),
        fit_seconds=timings.get("fit_s_cumulative", timings.get("compress_s")),
        matrices={r["path"]: (r.get("d_in"), r.get("d_out"), r.get("dense_params"), r.get("realised_ratio"),
                              r.get("functional_error_heldout"), r.get("k"), r.get("s"), r.get("rank"))
                  for r in rows if "path" in r})


def load_points(root: Path | str = ROOT) -> list[Point]:
    """Every metrics.json under ``root/<deliverable>/`` (run directories and their ``snapshots/T*``) and every run
    that a deliverable shares with another (:data:`SAME_RUN`: the other's metrics, this deliverable's point),
    sorted by path. A directory that is not a deliverable is an error (a typo would silently drop its runs)."""
    root = Path(root)
    points = []
    for file in sorted([*root.glob("*/**/metrics.json"), *root.glob(f"*/*/{SAME_RUN}")]):
        rel = file.relative_to(root)
        deliverable = rel.parts[0]
        if deliverable == "figures":
            continue
        if deliverable not in DELIVERABLES:
            raise ValueError(f"{file}: {deliverable!r} is not a deliverable directory; move the run under one of "
                             f"{sorted(DELIVERABLES)} (the hydra.sweep.dir of experiment=paper_smollm2_<name>)")
        if file.name == SAME_RUN and (file.parent / "metrics.json").is_file():
            continue  # the point's own fit, made after the link, wins
        source = same_run(file, root) if file.name == SAME_RUN else file
        snapshot = "snapshots" in rel.parts[:-1]
        point = point_from_metrics(json.loads(source.read_text()), deliverable, rel.as_posix(), snapshot)
        if snapshot and rel.parts[-2] != f"T{point.T}":
            raise ValueError(f"{file}: the snapshot directory says {rel.parts[-2]} but its config has "
                             f"method.ksvd_iterations={point.T}; fix the snapshot's config or its directory name")
        points.append(point)
    return points + requantized_points(root)


def same_run(file: Path, root: Path) -> Path:
    """The metrics.json that a :data:`SAME_RUN` file names: a finished run of the same name in another deliverable
    under ``root`` (any other is an error: a renamed or removed run would silently change a figure)."""
    run = Path(json.loads(file.read_text())["run"])
    metrics = root / run / "metrics.json"
    elsewhere = len(run.parts) == 2 and run.parts[0] != file.parent.parent.name and run.name == file.parent.name
    if run.is_absolute() or not elsewhere or not metrics.is_file():
        raise ValueError(f"{file}: names {run.as_posix()!r}, which is not a finished run of the same name in another "
                         f"deliverable under {root}; delete {file.name} and rerun experiments/paper_setting_runs.py "
                         "(it links the run again, or fits it)")
    return metrics


def requantized_points(root: Path) -> list[Point]:
    """Bit-width points (deliverable "bits") from the methods deliverable's CoSpaDi runs: each run itself at float32
    and every ``evaluation-*.json`` that ``task=evaluate eval.requantize=<width>`` wrote into it (equal to a fit
    with ``method.quantization=<width>``: the width never changes the K-SVD fit; ``python
    experiments/paper_setting.py --requantize`` runs them)."""
    points = []
    for run in sorted(root.glob("methods/*/metrics.json")):
        metrics = json.loads(run.read_text())
        method = metrics["config"]["method"]
        evaluations = [(f, json.loads(f.read_text())) for f in sorted(run.parent.glob("evaluation-*.json"))]
        evaluations = [(f, e) for f, e in evaluations if (e.get("eval") or {}).get("requantize")]
        if (method.get("label") or method["name"]) != "cospadi" or method.get("quantization") or not evaluations:
            continue
        points.append(point_from_metrics(metrics, "bits", run.relative_to(root).as_posix()))
        for file, evaluation in evaluations:
            config = {**metrics["config"], "method": {**method, "quantization": evaluation["eval"]["requantize"]}}
            points.append(point_from_metrics({**metrics, "config": config, "compressed": evaluation["compressed"]},
                                             "bits", file.relative_to(root).as_posix()))
    return points


def group(points: Iterable[Point]) -> dict[str, list[Point]]:
    """Deliverable -> its points (every deliverable present, possibly empty), in path order."""
    by: dict[str, list[Point]] = {name: [] for name in DELIVERABLES}
    for p in sorted(points, key=lambda p: p.path):
        by[p.deliverable].append(p)
    return by


def _distinct(points: list[Point], value: Callable[[Point], Any]) -> dict[Any, str]:
    """Each distinct non-None ``value(p)``, sorted -> the path of its first point (an example for an error)."""
    seen: dict[Any, str] = {}
    for p in points:
        if (v := value(p)) is not None:
            seen.setdefault(v, p.path)
    return dict(sorted(seen.items()))


def figure_setting(points: Iterable[Point], what: str, axis: str | None = None) -> str:
    """The fitting setting a figure's points share, for its title: K-SVD T and the calibration size (windows x
    tokens) of its data-aware points. Raises :class:`MixedTError` or :class:`MixedCalibrationError` where they
    differ, except along the figure's own ``axis`` ("T" or "calib"), which the title then leaves out."""
    points = list(points)
    parts = []
    if axis != "T":
        ts = _distinct(points, lambda p: p.T)
        if len(ts) > 1:
            raise MixedTError(f"{what}: its points were fitted with different K-SVD T {list(ts)} (e.g. {ts}); a "
                              "figure is drawn at one T. Rerun the other points at one T, or move them out of this "
                              "deliverable's directory.")
        parts.append(f"K-SVD T = {next(iter(ts))}" if ts else "no K-SVD (low-rank methods only)")
    if axis != "calib":
        sizes = _distinct(points, lambda p: (p.nsamples, p.seqlen) if p.data_aware else None)
        if len(sizes) > 1:
            examples = {f"{n}x{l}": path for (n, l), path in sizes.items()}
            raise MixedCalibrationError(
                f"{what}: its points were calibrated on different sizes (windows x tokens) {examples}; a figure is "
                "drawn at one calibration size. Rerun the other points at one size (calib.nsamples, calib.seqlen), "
                "or move them out of this deliverable's directory.")
        parts.append("calibration {} x {} tokens".format(*next(iter(sizes))) if sizes
                     else "no calibration (data-free methods only)")
    return ", ".join(parts)


def unique(points: list[Point], key: Callable[[Point], Any], what: str) -> dict[Any, Point]:
    out: dict[Any, Point] = {}
    for p in points:
        k = key(p)
        if k in out:
            raise ValueError(f"{what}: two runs have the same setting {k}: {out[k].path} and {p.path}; remove one")
        out[k] = p
    return out


def find(points: list[Point], **setting: Any) -> Point | None:
    hits = [p for p in points if all(getattr(p, k) == v for k, v in setting.items())]
    return hits[0] if hits else None



# ----------------------------------------------------------------------------------------------- tables


def ksvd_curve(points: list[Point]) -> dict[float, dict[int, Point]]:
    """CR -> T -> point of the K-SVD-iterations deliverable (a run's own metrics.json wins over its snapshot at
    the same T)."""
    curve: dict[float, dict[int, Point]] = defaultdict(dict)
    for p in sorted((p for p in points if p.T is not None), key=lambda p: (p.snapshot, p.path)):
        curve[p.ratio].setdefault(p.T, p)
    return {r: dict(sorted(curve[r].items())) for r in sorted(curve)}


def bits_table(points: list[Point]) -> list[dict[str, Any]]:
    """Rows (CR, bits, ppl, acc, relative ppl and acc to the 16-bit point at the same CR, None without it)."""
    pts = unique(points, lambda p: (p.ratio, p.quantization), "bits")
    rows = []
    for (ratio, q), p in sorted(pts.items(), key=lambda kv: (kv[0][0], -BITS[kv[0][1]])):
        ref = pts.get((ratio, "bf16"))
        rel_ppl = p.ppl / ref.ppl if ref and ref.ppl and p.ppl is not None else None
        rel_acc = p.acc / ref.acc if ref and ref.acc and p.acc is not None else None
        rows.append({"ratio": ratio, "quantization": q, "bits": BITS[q], "ppl": p.ppl, "acc": p.acc,
                     "acc_stderr": p.acc_stderr, "rel_ppl": rel_ppl, "rel_acc": rel_acc})
    return rows


def projection_params(points: Iterable[Point]) -> int | None:
    """Dense parameters of every projection of the model, from the union of the runs' matrices (None unless the
    runs together cover every projection type: a UG run alone does not know the other matrices' sizes)."""
    sizes = {path: m[2] for p in points for path, m in p.matrices.items() if m[2]}
    if {path.rsplit(".", 1)[-1] for path in sizes} != set(ALL_PROJECTIONS):
        return None
    return sum(sizes.values())


def global_ratio(p: Point, total: int | None) -> float | None:
    """Fraction of all projection weights' bytes removed (uncompressed projections count as dense)."""
    if total is None or not p.matrices:
        return None
    return sum(m[2] * m[3] for m in p.matrices.values()) / total


def ug_table(points: list[Point]) -> list[dict[str, Any]]:
    """One row per UG run: its global CR and the uniform run of the same method nearest that global CR."""
    total = projection_params(points)
    ug = [p for p in points if set(p.proj_types) == set(UG)]
    uniform = [p for p in points if set(p.proj_types) == set(ALL_PROJECTIONS)]
    rows = []
    for p in sorted(ug, key=lambda p: (p.method, p.ratio)):
        g = global_ratio(p, total)
        cands = [u for u in uniform if u.method == p.method]
        match = min(cands, key=lambda u: (abs(u.ratio - g), u.ratio)) if g is not None and cands else None
        if match is not None and abs(match.ratio - g) > 0.02:
            match = None  # no uniform run at a similar global CR
        rows.append({"method": p.method, "ug_ratio": p.ratio, "global_ratio": g, "ppl": p.ppl, "acc": p.acc,
                     "acc_stderr": p.acc_stderr, "uniform_ratio": match.ratio if match else None,
                     "uniform_ppl": match.ppl if match else None, "uniform_acc": match.acc if match else None,
                     "uniform_acc_stderr": match.acc_stderr if match else None, "T": p.T})
    return rows


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"
