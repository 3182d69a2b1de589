"""The Hydra app: ``python -m cospadi_jax.run`` (console script ``cospadi-run``).

    python -m cospadi_jax.run experiment=demo                       # a few minutes on the embedded SmolLM2
    python -m cospadi_jax.run -m method.ratio=0.2,0.3,0.4 method.rho=1.5,2
    python -m cospadi_jax.run experiment=ablation_ksvd_iterations   # multirun over K-SVD iterations
    python -m cospadi_jax.run task=evaluate artifact=results/<run>  # evaluate a saved artifact
    python -m cospadi_jax.run task=export artifact=results/<run> export.format=hf-dense  # write it as a checkpoint
    python -m cospadi_jax.run task=plot results_glob='results/**/metrics.json'

task=compress loads the model, compresses it (checkpointing every finished matrix or group into
``output_dir``, resuming from it after a crash), evaluates perplexity (and lm-eval tasks if configured), logs to
wandb and writes ``output_dir/metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from .checkpoint import ArtifactWriter, fingerprint, restore_model
from .environment import environment
from .config import EvalConf, RunConfig, export_path, register_configs, validate
from .fileio import atomic_write_json, can_create_in, check_replaceable, check_writable
from .identity import artifact_identity, digest, flatten
from .report import engine_summary, model_size
from .parallel import initialize, is_primary, on_every_process

log = logging.getLogger("cospadi_jax")
register_configs()

def _evaluate(model: Any, tokenizer: Any, cfg: RunConfig) -> dict[str, Any]:
    """Perplexity per source and lm-eval tasks; data-parallel over all devices (all processes) when
    ``eval.data_parallel`` and there is more than one device. Every process must call it (collectives)."""
    import jax

    from .data.text import load_text
    from .parallel import make_mesh
    from .eval import perplexity

    mesh = make_mesh() if cfg.eval.data_parallel and jax.device_count() > 1 else None
    out: dict[str, Any] = {"perplexity": {}}
    for source in cfg.eval.ppl_sources:
        out["perplexity"][source] = perplexity(
            model, tokenizer, load_text(source), seqlen=cfg.eval.seqlen, max_windows=cfg.eval.max_windows,
            batch_size=cfg.eval.batch_size, mesh=mesh).to_dict()
    if cfg.eval.tasks:
        from .eval.harness import evaluate_zero_shot

        zero_shot = evaluate_zero_shot(
            model, tokenizer, cfg.eval.tasks, batch_size=cfg.eval.task_batch_size, limit=cfg.eval.task_limit,
            include_path=cfg.eval.task_include_path, mesh=mesh)
        if zero_shot is not None:  # None on the processes that only followed process 0's lm-eval
            zero_shot.pop("raw", None)
            out["zero_shot"] = zero_shot
    return out


def _dense_baseline(model: Any, tokenizer: Any, cfg: RunConfig) -> dict[str, Any]:
    """:func:`_evaluate` on the dense model, read from ``eval.dense_cache_dir`` when this model, tokenizer and
    eval config were scored before. The key is stored in the file and compared on load, so a file from another
    setting is never reused. In a multi-process run the cache is used only when every process can read it (each
    one's answer is gathered), because evaluating means every process joins the collectives; process 0 writes it."""
    if not cfg.eval.dense_cache_dir:
        return _evaluate(model, tokenizer, cfg)
    from .calib.cache import model_fingerprint
    from .data.calibration import tokenizer_fingerprint

    eval_conf = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in ("dense_baseline", "dense_cache_dir")}
    key = {"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer), "eval": eval_conf,
           "versions": {n: environment()["versions"][n] for n in ("cospadi-jax", "lm-eval")}}
    path = Path(cfg.eval.dense_cache_dir) / f"dense-{fingerprint(key)}.json"
    stored = None
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            stored = None
        if not isinstance(stored, dict) or stored.get("key") != key:
            log.warning("%s is unreadable or holds another setting's dense scores; re-evaluating", path)
            stored = None
    if on_every_process(stored is not None):
        log.info("dense baseline read from %s", path)
        return stored["scores"]
    writable = can_create_in(path.parent)  # checked before the evaluation, not after it
    if not writable:
        log.warning("the dense-score cache %s is not writable: evaluating the dense model without caching",
                    path.parent)
    scores = _evaluate(model, tokenizer, cfg)
    if writable and is_primary():
        atomic_write_json(path, {"key": key, "scores": scores})
    return scores


def _tracker(cfg: RunConfig, resolved: dict, run_id: str | None = None) -> Any:
    from .tracking import Tracker

    tags = list(cfg.logger.tags) + [f"method:{cfg.method.name}", f"model:{cfg.model.name}"]
    if cfg.ablation_axis:
        tags.append(f"ablation:{cfg.ablation_axis}")
    return Tracker(mode=cfg.logger.mode, project=cfg.logger.project, name=cfg.run_name, group=cfg.logger.group,
                   tags=tags, config=resolved, directory=cfg.output_dir, run_id=run_id)


def _check_model_fits(cfg: RunConfig, model: Any, tokenizer: Any) -> None:
    """Checks that need the loaded model, before any calibration or fitting."""
    from .models.loading import TOKENIZER_FILES

    if tokenizer is None:
        raise FileNotFoundError(
            f"model.spec={cfg.model.spec} has weights but no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "calibration and evaluation need one. Copy the original model's tokenizer files next to its "
            "config.json, e.g. `AutoTokenizer.from_pretrained(<hub id>).save_pretrained(dir)`.")
    max_positions = model.config.max_position_embeddings
    for key, seqlen in (("calib.seqlen", cfg.calib.seqlen), ("eval.seqlen", cfg.eval.seqlen)):
        if seqlen > max_positions:
            raise ValueError(f"{key}={seqlen} exceeds the model's max_position_embeddings={max_positions}; "
                             f"use {key}<={max_positions}.")


def _log_estimate(model: Any, config: Any, skip: set[int]) -> None:
    """For K-SVD methods, the fitting time measured by a probe on this machine, before the work starts."""
    from .compress import work_units
    from .estimate import estimate_fit_seconds
    from .methods import CoSpaDi, build
    from .models.paths import get_module

    method = build(config, model.config.num_hidden_layers)
    if not isinstance(method, CoSpaDi) or config.parallel == "columns" or not is_primary():
        return
    units = []
    for index, paths in enumerate(work_units(config, model.config.num_hidden_layers)):
        if index not in skip:
            d_in, d_out = get_module(model, paths[0]).kernel.get_value().shape
            b = config.unit_budget(d_in, d_out, len(paths))
            units.append((d_in, d_out * len(paths), b.n_atoms, b.sparsity))
    if not units:
        return
    est = estimate_fit_seconds(units, config.ksvd_iterations, **method.ksvd_options())
    workers = "" if config.parallel == "none" else "; parallel=matrices divides it by about the number of workers"
    log.info("estimated fitting time: %.0f min for %d units (T = %d x %.1f s per iteration on this machine, measured "
             "in %.1f s on random data of each shape; calibration and evaluation extra%s)", est["seconds"] / 60,
             len(units), config.ksvd_iterations, est["per_iteration_s"], est["probe_s"], workers)


def _stored_identity(metadata: dict) -> dict:
    return artifact_identity(metadata.get("config", {}))


def run_compress(cfg: RunConfig, resolved: dict) -> dict[str, Any]:
    from . import load_model
    from .compress import compress

    out_dir = check_writable(cfg.output_dir)  # before the model loads; nothing is written into it yet
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.model.spec, cfg.model.dtype, revision=cfg.model.revision)
    _check_model_fits(cfg, model, tokenizer)
    config = cfg.method  # validated by execute(); the layer range now that the model is known
    config.check_layers(model.config.num_hidden_layers)
    # metadata.json only now: a first attempt that fails validation leaves nothing that blocks the next one.
    metadata = {"config": resolved, "identity": artifact_identity(resolved), "model": dataclasses.asdict(cfg.model),
                **environment()}
    artifact = ArtifactWriter(out_dir, metadata, identity_of=_stored_identity)
    _log_estimate(model, config, skip=set(artifact.finished_indices()))
    tracker = _tracker(cfg, resolved, run_id=artifact.metadata["wandb_run_id"])
    try:
        metrics: dict[str, Any] = {"config": resolved, **environment(), "timings": {"load_s": time.perf_counter() - t0}}
        if cfg.eval.dense_baseline:
            t0 = time.perf_counter()
            metrics["dense"] = _dense_baseline(model, tokenizer, cfg)
            metrics["timings"]["dense_eval_s"] = time.perf_counter() - t0

        def on_unit(index: int, rows: list) -> None:
            for row in rows:
                if row.objective:
                    tracker.log_objective(row.path, row.objective)

        def on_refined(record: Any) -> None:
            tracker.log_curve(f"refine_loss/layer{record.layer}", "step", "loss", record.losses)
            tracker.log({f"refine/layer{record.layer}/loss_before": record.loss_before,
                         f"refine/layer{record.layer}/loss_after": record.loss_after})

        compressed, report = compress(model, tokenizer, config=config, calibration=cfg.calib, seed=cfg.seed,
                                      artifact=artifact, on_unit=on_unit, refine=cfg.refine, on_refined=on_refined,
                                      allocation=cfg.budget)
        metrics["timings"]["compress_s"] = report.seconds
        # Fitting time summed over every unit, those fitted by earlier attempts of a resumed run included.
        metrics["timings"]["fit_s_cumulative"] = sum(m.seconds for m in report.matrices)
        metrics["resumed"] = {"units_reused": report.units_reused, "units": report.units}
        t0 = time.perf_counter()
        metrics["compressed"] = _evaluate(compressed, tokenizer, cfg)
        metrics["timings"]["eval_s"] = time.perf_counter() - t0
        report_dict = report.to_dict()
        metrics.update(realised_ratio=report.realised_ratio, calibration_key=report.calibration.get("key"),
                       matrices=report_dict["matrices"], refinement=report_dict["refinement"],
                       allocation=report_dict["allocation"], paper=cfg.paper,
                       engine=engine_summary(report_dict["matrices"]),
                       model_size=model_size(model, report))
        if is_primary():  # every process compressed and evaluated; only process 0 writes and logs
            artifact.finalize(report_dict)
            atomic_write_json(out_dir / "metrics.json", metrics)
        if getattr(config, "ksvd_snapshots", None):
            from .snapshots import evaluate_snapshots

            metrics["snapshots"] = evaluate_snapshots(artifact, config.ksvd_snapshots, model,
                                                      lambda m: _evaluate(m, tokenizer, cfg), primary=is_primary())
            if is_primary():
                atomic_write_json(out_dir / "metrics.json", metrics)
                tracker.log_table("snapshots", [{"ksvd_iterations": r["ksvd_iterations"], **r["scores"]}
                                                for r in metrics["snapshots"]])
        if not is_primary():
            return metrics
        tracker.log_table("matrices", [{k: v for k, v in m.items() if k not in ("objective", "group")}
                                       for m in report_dict["matrices"]])
        summary = {"realised_ratio": report.realised_ratio, **metrics["timings"],
                   "resumed/units_reused": report.units_reused,
                   **{f"engine/{k}_s": v for k, v in metrics["engine"]["phase_seconds"].items()}}
        if metrics["engine"]["omp_backend"]:
            summary["engine/omp_backend"] = metrics["engine"]["omp_backend"]  # the resolved one, not "auto"
        for source, r in metrics["compressed"]["perplexity"].items():
            summary[f"ppl/{source}"] = r["perplexity"]
        if "zero_shot" in metrics["compressed"]:
            summary["zero_shot/average"] = metrics["compressed"]["zero_shot"]["average"]
        tracker.log(summary)
        tracker.summary(summary)
        _log_summary(cfg, metrics, out_dir / "metrics.json")
        return metrics
    finally:
        tracker.finish()


def _log_summary(cfg: RunConfig, metrics: dict, path: Path) -> None:
    size, timings = metrics["model_size"], metrics["timings"]
    lines = [f"{cfg.run_name}: {cfg.method.name} at CR {cfg.method.ratio} -> realised {metrics['realised_ratio']:.4f} "
             f"over the compressed matrices ({size['fraction_compressed']:.1%} of the model's parameters)",
             f"  whole model: {size['params']:,} -> {size['params_after']:,.0f} parameters, "
             f"{size['bytes_16bit'] / 2**20:.1f} -> {size['bytes_16bit_after'] / 2**20:.1f} MiB at 16 bits "
             f"(whole-model CR {size['whole_model_ratio']:.4f})"]
    for source, r in metrics["compressed"]["perplexity"].items():
        dense = metrics.get("dense", {}).get("perplexity", {}).get(source, {}).get("perplexity")
        lines.append(f"  {source}: perplexity {r['perplexity']:.3f}" + (f" (dense {dense:.3f})" if dense else ""))
    zero_shot = metrics["compressed"].get("zero_shot")
    if zero_shot:
        lines.append(f"  zero-shot average accuracy {zero_shot['average']:.4f}")
    resumed = metrics["resumed"]
    lines.append("  timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
                 + (f" ({resumed['units_reused']} of {resumed['units']} units reused)" if resumed["units_reused"]
                    else ""))
    theirs = (cfg.paper or {}).get(cfg.method.label, {}).get(f"{cfg.method.ratio:g}")
    if theirs:
        ours = {"avg_acc": (zero_shot or {}).get("average")}
        lines.append(f"  paper ({cfg.method.label}, CR {cfg.method.ratio:g}): "
                     + ", ".join(f"{k} {v}" for k, v in theirs.items()) + f" | ours: avg_acc {ours['avg_acc']}")
    lines.append(f"  metrics: {path}")
    log.info("\n".join(lines))


def _eval_overrides() -> dict[str, Any]:
    """The ``eval.*`` keys given on the command line (none when not run through Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    dotlist = [o.lstrip("+~") for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("eval.")]
    return OmegaConf.to_container(OmegaConf.from_dotlist(dotlist)).get("eval", {}) if dotlist else {}


def run_evaluate(cfg: RunConfig, eval_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore a saved artifact into its base model and evaluate it, without recompressing.

    The evaluation settings are the artifact's own (those its metrics.json was computed with), with only the
    ``eval.*`` keys given on the command line (or ``eval_overrides``) changed. The result goes to
    ``<artifact>/evaluation-<hash of the settings>.json``, so evaluations under other settings are all kept.
    """
    meta_path = Path(cfg.artifact) / "metadata.json"  # absent: restore_model says what the directory lacks
    stored_eval = json.loads(meta_path.read_text()).get("config", {}).get("eval", {}) if meta_path.exists() else {}
    overrides = _eval_overrides() if eval_overrides is None else eval_overrides
    # requantize is this task's own knob (a compression run never sets it): always the one given now.
    eval_conf = EvalConf(**{**stored_eval, **overrides, "requantize": cfg.eval.requantize})
    model, tokenizer, metadata = restore_model(cfg.artifact, requantize=eval_conf.requantize)
    cfg = dataclasses.replace(cfg, eval=eval_conf)
    eval_dict = dataclasses.asdict(eval_conf)
    metrics = {"artifact": str(cfg.artifact), "eval": eval_dict, "eval_overrides": overrides,
               "compressed": _evaluate(model, tokenizer, cfg), **environment()}
    if not is_primary():
        return metrics
    out = Path(cfg.artifact) / f"evaluation-{digest(flatten(eval_dict))}.json"
    atomic_write_json(out, metrics)
    for source, r in metrics["compressed"]["perplexity"].items():
        log.info("%s: %s perplexity %.3f (written to %s)", cfg.artifact, source, r["perplexity"], out)
    return metrics


def run_export(cfg: RunConfig) -> dict[str, Any]:
    """Write a finished artifact's compressed model as a checkpoint (``export.format``: factored | hf-dense) to
    ``export.path`` (default ``<artifact>/export-<format>``), with its tokenizer and a record of the compression
    (the artifact's metadata, its realised ratio and calibration key). Returns the export's manifest."""
    from .export import save_pretrained

    path = export_path(cfg)
    check_replaceable(path, overwrite=cfg.export.overwrite, flag="export.overwrite=true")  # before the restore
    model, tokenizer, metadata = restore_model(cfg.artifact)
    report = json.loads((Path(cfg.artifact) / "report.json").read_text())
    record = {**metadata, "realised_ratio": report.get("realised_ratio"), "allocation": report.get("allocation"),
              "calibration_key": (report.get("calibration") or {}).get("key")}
    manifest = save_pretrained(model, path, cfg.export.format, tokenizer=tokenizer, overwrite=cfg.export.overwrite,
                               metadata=record)
    sizes = manifest["bytes"]
    accounted = sizes.get("accounted")
    log.info("%s export of %s written to %s: %s bytes%s", cfg.export.format, cfg.artifact, path,
             f"{sizes['file']:,}", "" if accounted is None else
             f" (compressed tensors {sizes['compressed_tensors']:,}, accounted {accounted:,.0f})")
    return {"export": str(path), **manifest}


def execute(cfg: DictConfig) -> dict[str, Any]:
    """Run one job from a composed config (used by the Hydra entry point and by tests)."""
    run_cfg: RunConfig = OmegaConf.to_object(cfg)  # structured schema: unknown keys and wrong types fail here
    validate(run_cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if run_cfg.task == "compress":
        return run_compress(run_cfg, resolved)
    if run_cfg.task == "evaluate":
        return run_evaluate(run_cfg)
    if run_cfg.task == "export":
        return run_export(run_cfg)
    if run_cfg.task == "generate":
        from .generate import run_generate

        return run_generate(run_cfg)
    import glob

    from .plots import plot_results

    return plot_results(sorted(glob.glob(run_cfg.results_glob, recursive=True)), run_cfg.plot_dir)


# The configs ship inside the package (pkg://), so the console script works from any directory and from a wheel;
# `--config-dir DIR` or `hydra.searchpath=[file://DIR]` adds the user's own config groups.
@hydra.main(version_base="1.3", config_path="pkg://cospadi_jax.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Multi-host / multi-process runs (TPU pods, srun, JAX_COORDINATOR_ADDRESS...): jax.distributed must start
    # before any JAX computation. A no-op for a single process. See docs/cluster.md.
    initialize()
    metrics = execute(cfg)
    ppl = metrics.get("compressed", {}).get("perplexity", {}) if isinstance(metrics, dict) else {}
    return next(iter(ppl.values()))["perplexity"] if ppl else None  # Hydra sweepers optimise the return value


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is not there either
        return False


def cli() -> None:
    """The console script: :func:`main`, after the checks Hydra would report without a hint."""
    import sys

    if any(a.replace("+", "").startswith("hydra/launcher=slurm") for a in sys.argv[1:]) and \
            not _importable("hydra_plugins.hydra_submitit_launcher"):
        sys.exit("hydra/launcher=slurm needs the submitit launcher plugin, which is not installed: "
                 'pip install "cospadi-jax[slurm]" (or pip install -e ".[slurm]" in a checkout).')
    main()


if __name__ == "__main__":
    cli()
