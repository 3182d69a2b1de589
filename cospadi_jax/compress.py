"""Whole-model compression: calibration, grouping, per-matrix fitting and metrics, factored layers.

``compress(model, tokenizer, method=..., ratio=...)`` returns a compressed copy of the model and a report with
one row per matrix: functional error on the calibration Gram and on a held-out Gram, weight error, k/s or r,
realised ratio, damping, early-stopped OMP columns and time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .allocation import AllocationConfig, Unit, allocate
from .calib.grams import Grams, collect_grams
from .calib.spec import CalibrationSpec, calibration_grams
from .data.calibration import sample_windows
from .data.text import load_text
from .layers import replace_projection, set_dict_mode
from .methods import Method, MethodConfig, UnitStats, build, method_class, method_config
from .methods.base import Factors, whitening_factor
from .models.paths import get_module, parse_projection_path, projection_path, projection_weight
from .models.transformer import CausalLM
from .parallel import map_units
from .refine import RefineConfig, refine_compressed
from .report import CompressionReport, MatrixReport, matrix_rows, rows_from_artifact, warn_about
from .sequential import check_sequential, fit_blocks
from .sources import LayerSource, ModelLayerSource
from .streaming import ClonedLayers, check_streamed, peak_rss_gib, plan_memory

log = logging.getLogger(__name__)


def work_units(cfg: MethodConfig, n_layers: int) -> list[list[str]]:
    """Projection paths grouped into fitting units: a shared group of m consecutive layers, or one matrix."""
    layers = list(cfg.layers) if cfg.layers is not None else list(range(n_layers))
    units = []
    for proj in cfg.proj_types:
        m = cfg.group_size if proj in cfg.shared_types else 1
        for g in range(0, len(layers), m):
            units.append([projection_path(i, proj) for i in layers[g : g + m]])
    return units


def fit_unit(Ws: list[np.ndarray], paths: list[str], method: Method, config: MethodConfig, grams: Grams | None,
             heldout_grams: Grams | None, key: jax.Array, ratio: float | None = None
             ) -> tuple[list[Factors], list[MatrixReport]]:
    """Fit one unit (a matrix or a shared group): its factors and one report row per matrix.

    Ws: the unit's weights [d_in, d_out] (float32), in the order of ``paths``; ``method`` from
    :func:`~cospadi_jax.methods.build`; ``key`` the unit's key (folded from the seed and the unit index).
    """
    shapes = {w.shape for w in Ws}
    if len(shapes) > 1:
        raise ValueError(f"a shared group needs equal shapes, got {dict(zip(paths, [w.shape for w in Ws]))}")
    unit_grams = [grams.gram(p) for p in paths] if grams is not None else [None] * len(paths)
    for p, g in zip(paths, unit_grams):
        if g is None:
            continue
        if g.shape != (Ws[0].shape[0],) * 2:
            raise ValueError(f"calibration Gram for {p} has shape {g.shape} but W has d_in = {Ws[0].shape[0]}; "
                             "the Grams belong to another model: recompute them for this one.")
        if not np.all(np.isfinite(g)):
            raise ValueError(f"calibration Gram for {p} contains NaN/inf; recompute the calibration statistics.")
    stats = UnitStats(mean_abs=grams.mean_abs(paths[0]) if method.needs_mean_abs else None)
    unit_b = config.unit_budget(*Ws[0].shape, len(Ws), ratio)
    t0 = time.perf_counter()  # the fit alone: reading a group's Grams from the cache took 10x longer (Basis Sharing)
    factors_list = method.fit_group(Ws, unit_grams, unit_b, key, stats)
    seconds = (time.perf_counter() - t0) / len(paths)
    return matrix_rows(paths, Ws, factors_list, unit_grams, heldout_grams, unit_b, seconds, config)


def fit_and_save(unit_index: int, Ws: list[np.ndarray], paths: list[str], method: Method, config: MethodConfig,
                 grams: Grams | None, heldout_grams: Grams | None, key: jax.Array, ratio: float | None,
                 artifact: Any) -> tuple[list[Factors], list[MatrixReport]]:
    """:func:`fit_unit` with the unit's key folded from the run's ``key`` and its global index (so a unit gets the
    same key whichever path fits it), saved to ``artifact`` when one is given. The unit step of every path of
    ``compress`` (in memory, sequential and streamed)."""
    factors, rows = fit_unit(Ws, paths, method, config, grams, heldout_grams, jax.random.fold_in(key, unit_index),
                             ratio)
    snapshots = sorted({t for f in factors for t in getattr(f, "snapshots", {})})
    if snapshots and artifact is None:
        raise ValueError("ksvd_snapshots are saved as artifacts of their own: pass artifact=ArtifactWriter(...)")
    unit_grams = [grams.gram(p) if grams is not None else None for p in paths] if snapshots else []
    unit_b = config.unit_budget(*Ws[0].shape, len(Ws), ratio) if snapshots else None
    for t in snapshots:  # before the unit itself: a unit listed as finished has every snapshot saved
        snap_factors = [f.snapshots.pop(t) for f in factors]
        snap_seconds = sum(snap_factors[0].info["phase_seconds"].values()) / len(paths)
        snap_factors, snap_rows = matrix_rows(paths, Ws, snap_factors, unit_grams, heldout_grams, unit_b,
                                              snap_seconds, config)
        artifact.snapshot(t).save_unit(unit_index, snap_factors, [asdict(r) for r in snap_rows])
    if artifact is not None:
        artifact.save_unit(unit_index, factors, [asdict(r) for r in rows])
    return factors, rows


def reused_units(artifact: Any, total: int | None = None, factors: bool = True
                 ) -> dict[int, tuple[list[Factors], list[MatrixReport]]]:
    """The units an interrupted run finished (reused, never refitted: a resumed run is bit-identical); with
    ``factors=False`` their rows only (factors ``[]``, read later through ``artifact.unit``)."""
    return rows_from_artifact(artifact.finished_units(total, factors)) if artifact is not None else {}


def compress(
    model: CausalLM | LayerSource,
    tokenizer: Any = None,
    *,
    config: MethodConfig | None = None,
    seed: int = 42,
    calibration: CalibrationSpec | None = None,
    grams: Grams | None = None,
    heldout_grams: Grams | None = None,
    inplace: bool = False,
    progress: bool = True,
    artifact: Any = None,
    on_unit: Any = None,
    refine: RefineConfig | None = None,
    windows: np.ndarray | None = None,
    on_refined: Any = None,
    allocation: AllocationConfig | None = None,
    budget_gib: float | None = None,
    keep_factors: bool = True,
    on_layer: Callable[[int, dict[str, float]], None] | None = None,
    **overrides: Any,
) -> tuple[Any, CompressionReport]:
    """Compress the model's projections with one method; returns (compressed model, report), or for a streamed
    run (``budget_gib`` given) (factors by projection path, report).

    Either pass precomputed ``grams`` (e.g. from a cache) or a ``tokenizer`` and a ``calibration`` spec.
    ``config`` is the method's own config (:class:`~cospadi_jax.methods.CoSpaDiConfig`, ...); keyword
    ``overrides`` set its fields, and ``method`` names the method when no config is given
    (``method="svd_llm", ratio=0.3``). Deterministic under ``seed``: every unit gets its own key folded from
    the seed and its position, and refinement's minibatches are drawn from it.

    ``artifact`` (a :class:`cospadi_jax.checkpoint.ArtifactWriter`) saves every finished unit and, when it already
    holds finished units from a killed run, reuses them instead of refitting, so the result is bit-identical to an
    uninterrupted run. ``on_unit(index, rows)`` is called after each unit (e.g. to log to wandb).

    ``refine`` (:class:`cospadi_jax.refine.RefineConfig`, off when ``steps=0``) re-fits every compressed layer's
    factored numbers to the dense layer's output after all units are fitted, on ``windows`` [n, T] token ids
    (default: the calibration spec's windows, which needs the tokenizer). Refined layers are saved to and resumed
    from ``artifact`` like units; ``on_refined(record)`` is called after each (a ``LayerRefinement``).

    CoSpaDi's ``ksvd_snapshots`` save, per unit, the factors after each listed iteration count into
    ``artifact.snapshot(t)`` (the artifact of the run at T = t; :mod:`cospadi_jax.snapshots` evaluates them).

    ``allocation`` (:class:`cospadi_jax.allocation.AllocationConfig`, off when ``allocation="uniform"``) gives
    each unit its own ratio at the uniform byte budget, from the dense model's calibration Grams (also under
    sequential calibration); it is saved to and resumed from ``artifact``.

    Streaming, for models larger than the host: with ``budget_gib``, ``model`` may also be a
    :class:`~cospadi_jax.sources.LayerSource` (a safetensors directory read one layer at a time, ...). Only one
    decoder layer, the calibration hidden states and that layer's Grams are resident; chunk sizes come from
    :func:`cospadi_jax.streaming.plan_memory` (``report.memory_plan``). Each layer is calibrated on the dense
    prefix's hidden states (the Grams ``compress()`` collects up front), or on the compressed prefix's under
    ``calibration.sequential``. ``keep_factors=False`` drops each layer's factors once they are in the artifact;
    ``on_layer(index, stats)`` gets per-layer timings and the peak RSS. Shared groups, refinement, allocation,
    snapshots and precomputed Grams need the whole model and are refused.
    """
    streamed = budget_gib is not None
    if not isinstance(model, CausalLM) and not (streamed and hasattr(model, "layer") and hasattr(model, "embed")):
        raise TypeError(f"model must be a cospadi_jax CausalLM (from cospadi_jax.load_model), or with budget_gib= a "
                        f"LayerSource (cospadi_jax.sources); got {type(model).__name__}")
    config = _method_config(config, overrides)
    n_layers = model.config.num_hidden_layers
    method = build(config, n_layers)
    calibration = calibration or CalibrationSpec()
    calibration.validate()
    refine = refine or RefineConfig()
    refine.validate()
    allocation = allocation or AllocationConfig()
    allocation.validate()
    if refine.steps and inplace:
        raise ValueError("refinement matches each compressed layer to the dense one, so the dense model must "
                         "survive: use inplace=False with refine.steps > 0")
    if getattr(config, "ksvd_snapshots", None) and (calibration.sequential or refine.steps
                                                     or allocation.allocation != "uniform"):
        raise ValueError("method.ksvd_snapshots keeps, per snapshot, the result of the same run at fewer K-SVD "
                         "iterations; with calib.sequential, refine.steps or a non-uniform budget.allocation that "
                         "result depends on the other matrices' T, so a snapshot would be no run's result. Run "
                         "without snapshots, or without those levers.")
    if streamed:
        check_streamed(config, refine, allocation, grams, heldout_grams, inplace, keep_factors, artifact)
    if isinstance(model, CausalLM):
        already = [p for unit in work_units(config, n_layers) for p in unit
                   if not hasattr(get_module(model, p), "kernel")]
        if already:
            raise ValueError(f"{already[0]} is already compressed: compress the original model (load it again), "
                             "a compressed model is never compressed twice")
    if config.quantization:
        log.info("quantization=%s is simulated: coefficient values are rounded to its grid and kept as float32",
                 config.quantization)
    t_start = time.perf_counter()
    layers = list(config.layers) if config.layers is not None else None
    calibration_info = asdict(calibration)
    sequential = calibration.sequential and method.data_aware
    if calibration.sequential:
        check_sequential(grams, jax.process_count())
        if not method.data_aware:
            log.warning("calib.sequential=true has no effect on %s, which uses no calibration data", config.name)
    if (refine.steps or sequential or streamed) and windows is None:
        if tokenizer is None:
            raise ValueError("sequential calibration, refinement and streaming need calibration windows: pass a "
                             "tokenizer (and a calibration spec) or windows=[n, T] token ids")
        windows = sample_windows(tokenizer, load_text(calibration.source), calibration.nsamples,
                                 calibration.seqlen, calibration.seed)
    plan = None
    if streamed:
        windows = np.asarray(windows, np.int32)
        plan = plan_memory(model.config, config, len(windows), windows.shape[1], budget_gib=budget_gib,
                           dtype=model.dtype)
        if hasattr(config, "omp_memory_mb"):  # K-SVD's OMP chunk sized by the plan (16 to 4096 MiB: valid)
            config = replace(config, omp_memory_mb=plan.omp_memory_mb)
            method = method_class(config.name)(config)
        calibration_info = {"nsamples": len(windows), "seqlen": windows.shape[1]}
    elif method.data_aware and grams is None and not sequential:
        if tokenizer is None:
            raise ValueError("a data-aware method needs a tokenizer (or precomputed grams) for calibration")
        grams, key_used = calibration_grams(model, tokenizer, calibration, layers, progress=progress)
        calibration_info["key"] = asdict(key_used)
    units = work_units(config, n_layers)
    stored = None
    if allocation.allocation != "uniform":
        stored = _resolve_allocation(model, tokenizer, config, allocation, calibration, method, grams, windows,
                                     artifact, len(units), progress, seed)
    ratios = stored["ratios"] if stored is not None else None
    if heldout_grams is None and tokenizer is not None and calibration.heldout_source and not streamed:
        heldout_grams, _ = calibration_grams(model, tokenizer, calibration, layers, heldout=True, progress=progress)

    target = None if streamed else model if inplace else nnx.clone(model)
    report = CompressionReport(config={**asdict(config), "seed": seed}, calibration=calibration_info,
                               allocation=stored, memory_plan=plan)
    if plan is not None:
        report.config["streaming"] = asdict(plan)
    key = jax.random.key(seed)
    # Refinement differentiates through the layers: a sparse (packed bf16) mode is set once it is done.
    build_mode = "dense" if refine.steps and config.mode not in ("dense", "factored") else config.mode

    def fit(unit_index: int, unit_grams: Grams | None = None, block_layers: dict | None = None
            ) -> tuple[list[Factors], list[MatrixReport]]:
        """Unit ``unit_index``, its weights from the block's layer objects when the layer loop runs, else the model."""
        paths = units[unit_index]
        Ws = [projection_weight(model if block_layers is None else block_layers[parse_projection_path(p)[0]], p)
              for p in paths]
        return fit_and_save(unit_index, Ws, paths, method, config, unit_grams or grams, heldout_grams, key,
                            ratios[unit_index] if ratios is not None else None, artifact)

    # A streamed run that drops its factors must not read every finished unit's at once on resume: the compressed
    # model may not fit the host. swap_in reads a reused unit's factors when its layer comes.
    done = reused_units(artifact, len(units), factors=keep_factors or not streamed)
    report.units, report.units_reused = len(units), len(done)
    if sequential or streamed:
        def fit_block(indices: list[int], block_grams: Grams, block_layers: dict) -> None:
            if config.parallel == "matrices":  # a block's units side by side, one thread per local device
                done.update(map_units(lambda i, _: fit(i, block_grams, block_layers), units, rank=0, world=1,
                                      skip=set(range(len(units))) - set(indices)))
            else:
                done.update({i: fit(i, block_grams, block_layers) for i in indices})

        def swap_in(unit_index: int, block_layers: dict) -> None:
            for path, f in zip(units[unit_index], done[unit_index][0] or artifact.unit(unit_index)[0]):
                replace_projection(block_layers[parse_projection_path(path)[0]], path, f, mode=build_mode)

        def layer_done(index: int, stats: dict[str, float]) -> None:
            if not keep_factors:  # the layer's factors are in the artifact (and swapped in, if sequential)
                for i, paths in enumerate(units):
                    if parse_projection_path(paths[0])[0] == index and i in done:
                        done[i] = ([], done[i][1])
            if on_layer is not None:
                on_layer(index, {**stats, "peak_rss_gib": peak_rss_gib()})

        # In memory the layers are the target's own; a streamed source's are swapped into copies, never its own.
        source = ModelLayerSource(target if target is not None else model) if isinstance(model, CausalLM) else model
        if streamed and sequential:
            source = ClonedLayers(source)
        fit_blocks(source, windows, units, fit_block, done=done, compressed_inputs=sequential, swap_in=swap_in,
                   batch_size=plan.calib_batch if plan is not None else calibration.batch_size, progress=progress,
                   desc="streaming compression" if streamed else "sequential calibration", on_layer=layer_done)
    elif config.parallel == "matrices":
        # This process's round-robin share, one thread per local device; other processes' units arrive through
        # the artifact directory (a filesystem all processes see) after the barrier.
        if jax.process_count() > 1 and artifact is None:
            raise ValueError("parallel='matrices' over several processes exchanges units through the artifact "
                             "directory: pass artifact=ArtifactWriter(...) on a filesystem every process sees.")
        done.update(map_units(lambda i, _: fit(i), units, skip=done, progress=progress))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("cospadi_jax.compress: all units fitted")
            done = reused_units(artifact)
            # Staged units may be rewritten by process 0's finalize(): nobody may still be reading them then.
            multihost_utils.sync_global_devices("cospadi_jax.compress: all units read")
    factors_by_path: dict[str, Factors] = {}
    bar = tqdm(units, desc=f"compress ({config.name}, CR {config.ratio})", unit="group",
               disable=not progress or config.parallel == "matrices" or sequential or streamed)
    for unit_index, paths in enumerate(bar):
        bar.set_postfix_str(paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1})")
        factors, unit_rows = done[unit_index] if unit_index in done else fit(unit_index)
        if streamed:
            factors_by_path.update(zip(paths, factors) if keep_factors else ())
        elif not sequential:  # sequential calibration swapped every unit in already
            for path, f in zip(paths, factors):
                replace_projection(target, path, f, mode=build_mode)
        report.matrices.extend(unit_rows)
        if on_unit is not None:
            on_unit(unit_index, unit_rows)
    if refine.steps:
        refine_compressed(model, target, windows, refine, quantization=config.quantization, seed=seed, units=units,
                          report=report, grams=grams, heldout_grams=heldout_grams, artifact=artifact,
                          on_refined=on_refined, progress=progress)
        if build_mode != config.mode:
            set_dict_mode(target, config.mode)
    report.seconds = time.perf_counter() - t_start
    if streamed:
        report.config["peak_rss_gib"] = peak_rss_gib()
    warn_about(report, config)
    return (factors_by_path if streamed else target), report


def _method_config(config: MethodConfig | None, overrides: dict[str, Any]) -> MethodConfig:
    """``config`` with ``overrides`` set; without a config, ``overrides["method"]`` (default cospadi) names it."""
    name = overrides.pop("method", None)
    if config is None:
        return method_config(name or "cospadi", **overrides)
    if name is not None and name != config.name:
        raise ValueError(f"method={name!r} contradicts config.name={config.name!r}: pass one of them")
    return replace(config, **overrides)


def _resolve_allocation(model: CausalLM, tokenizer: Any, config: MethodConfig, allocation: AllocationConfig,
                        calibration: CalibrationSpec, method: Any, grams: Grams | None, windows: np.ndarray | None,
                        artifact: Any, n_units: int, progress: bool, seed: int) -> dict:
    """The artifact's stored allocation (a resumed run), else :func:`allocate_units` on the dense model's Grams
    (computed here under sequential calibration, which has none yet), saved to the artifact."""
    if not method.data_aware:
        raise ValueError(f"budget.allocation={allocation.allocation} weighs each unit's output error on the "
                         f"calibration Grams, which {config.name!r} does not use: use a data-aware method "
                         "or budget.allocation=uniform")
    stored = artifact.allocation() if artifact is not None else None
    if stored is None:
        layers = list(config.layers) if config.layers is not None else None
        if grams is None and tokenizer is not None:
            grams, _ = calibration_grams(model, tokenizer, calibration, layers, progress=progress)
        elif grams is None:
            grams = collect_grams(model, windows, batch_size=calibration.batch_size, layers=layers,
                                  progress=progress)
        stored = allocate_units(model, config, allocation, grams, progress, seed)
        if artifact is not None:
            artifact.save_allocation(stored)
    if len(stored["ratios"]) != n_units:
        raise ValueError("the artifact's allocation.json has another number of units than this run: it "
                         "belongs to another setting; use another output_dir")
    return stored


def allocate_units(model: CausalLM, config: MethodConfig, allocation: AllocationConfig, grams: Grams,
                   progress: bool = True, seed: int = 42) -> dict:
    """:func:`cospadi_jax.allocation.allocate` over the model's fitting units, on the calibration ``grams``
    (a group: its members side by side with the mean Gram, as it is fitted)."""
    units = work_units(config, model.config.num_hidden_layers)
    items = []
    for paths in units:
        Ws = [projection_weight(model, p) for p in paths]
        items.append(Unit(paths, np.concatenate(Ws, axis=1),
                          np.mean([np.asarray(grams.gram(p), np.float64) for p in paths], axis=0)))

    def measure(u: int, ratio: float) -> float:
        """Mean squared functional error of unit u fitted at ``ratio`` with the curve's K-SVD iterations."""
        _, rows = fit_unit([projection_weight(model, p) for p in units[u]], units[u], curve_method, config, grams,
                           None, jax.random.fold_in(jax.random.key(seed), u), ratio)
        return float(np.mean([row.functional_error_calib ** 2 for row in rows]))

    options = config.budget_options()
    measured = allocation.curve == "measured" and options["kind"] == "cospadi"  # a low-rank spectrum is exact
    curve_method = build(replace(config, ksvd_iterations=allocation.curve_iterations)) if measured else None
    bar = tqdm(total=len(units), desc=f"allocation ({allocation.curve})", unit="group", disable=not progress)
    result = allocate(items, config.ratio, allocation, **options, whiten=lambda G: whitening_factor(G)[0],
                      measure=measure if measured else None, progress=lambda _: bar.update())
    bar.close()
    log.info("budget.allocation=%s: ratios %.3f..%.3f, realised CR %.4f (uniform %.4f), objective %.4g -> %.4g",
             allocation.allocation, min(result["ratios"]), max(result["ratios"]), result["realised_ratio"],
             result["uniform_realised_ratio"], result["objective"]["uniform"], result["objective"]["allocated"])
    return result
