"""Evaluating a run's K-SVD snapshots (``method.ksvd_snapshots``): one run, the whole accuracy-versus-T curve.

A run at T iterations with snapshots t_1 < … < T saves, beside its own artifact, the factors it held after each
t_i as the complete artifact of the run at T = t_i (``snapshots/T<t>/``; :meth:`ArtifactWriter.snapshot`). The
K-SVD loop of a run at T = t executes exactly the first t iterations of the longer one, so each snapshot is that
run's result bit for bit (``tests/test_snapshots.py``) at no extra fitting cost. After the run's own evaluation,
:func:`evaluate_snapshots` finalizes each snapshot artifact and writes its ``metrics.json`` in the format of the
run's own, with the config of the run at T = t: every tool that reads results sees one run per snapshot.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import jax
from flax import nnx

from .checkpoint import ArtifactWriter
from .environment import environment
from .fileio import atomic_write_json
from .identity import run_identity
from .layers import replace_projection
from .report import CompressionReport, engine_summary, model_size, rows_from_artifact

log = logging.getLogger(__name__)


def evaluate_snapshots(artifact: ArtifactWriter, snapshots: list[int], dense: Any,
                       evaluate: Callable[[Any], dict[str, Any]], *, primary: bool = True) -> list[dict[str, Any]]:
    """Finalize and evaluate every snapshot of ``artifact`` and write its ``metrics.json``; returns one summary
    per snapshot ({"ksvd_iterations", "metrics": path relative to the run, "scores": flat perplexities and the
    zero-shot average}), in the order of ``snapshots``.

    dense: the dense model the run compressed (cloned, never changed); evaluate(model) -> the run's evaluation
    dict (perplexity, zero-shot). ``primary``: whether this process writes (every process evaluates, as the run's
    own evaluation does). A snapshot whose ``metrics.json`` has this run's identity (a resumed run) is not
    evaluated again.
    """
    out = []
    for t in snapshots:
        t0 = time.perf_counter()
        snap = artifact.snapshot(t)
        config = snap.metadata["config"]
        path = snap.directory / "metrics.json"
        metrics = json.loads(path.read_text()) if path.exists() else None
        if metrics is None or run_identity(metrics["config"]) != run_identity(config):
            metrics = _evaluate_snapshot(snap, config, dense, evaluate, primary)
            metrics["timings"] = {"eval_s": time.perf_counter() - t0}
            if primary:
                atomic_write_json(path, metrics)
        scores = {f"ppl/{source}": r["perplexity"] for source, r in metrics["compressed"]["perplexity"].items()}
        if "zero_shot" in metrics["compressed"]:
            scores["zero_shot/average"] = metrics["compressed"]["zero_shot"]["average"]
        log.info("K-SVD snapshot T=%d: %s", t, scores)
        out.append({"ksvd_iterations": t, "metrics": str(path.relative_to(artifact.directory)), "scores": scores})
    return out


def _evaluate_snapshot(snap: ArtifactWriter, config: dict, dense: Any, evaluate: Callable[[Any], dict[str, Any]],
                       primary: bool) -> dict[str, Any]:
    units = rows_from_artifact(snap.finished_units())
    report = CompressionReport(config=config["method"], calibration=config.get("calib", {}), units=len(units),
                               matrices=[row for _, (_, rows) in sorted(units.items()) for row in rows])
    report_dict = report.to_dict()
    if jax.process_count() > 1:  # finalize() rewrites staged units: every process has read them before
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"cospadi_jax.snapshots: {snap.directory.name} read")
    if primary:
        snap.finalize(report_dict)
    model = nnx.clone(dense)
    for unit_factors, rows in units.values():
        for f, row in zip(unit_factors, rows):
            replace_projection(model, row.path, f, mode=config["method"]["mode"])
    return {"config": config, **environment(), "snapshot_of": str(snap.metadata.get("snapshot_of")),
            "compressed": evaluate(model), "realised_ratio": report.realised_ratio,
            "matrices": report_dict["matrices"], "engine": engine_summary(report_dict["matrices"]),
            "model_size": model_size(dense, report)}
