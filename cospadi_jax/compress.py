"""Whole-model compression: calibration, grouping, per-matrix fitting and metrics, factored layers.

``compress(model, tokenizer, method=..., ratio=...)`` returns a compressed copy of the model and a report with
one row per matrix: functional error on the calibration Gram and on a held-out Gram, weight error, k/s or r,
realised ratio, damping, early-stopped OMP columns and time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .allocation import AllocationConfig, Unit, allocate
from .calib.cache import GramKey, cached_path, load_grams, model_fingerprint, save_grams
from .calib.grams import Grams, collect_grams
from .data.calibration import sample_windows, tokenizer_fingerprint
from .data.text import load_text
from .parallel import map_units
from .fileio import can_create_in
from .layers import DICT_MODES, QUANTIZATIONS, quantize_coefficients, replace_projection, set_dict_mode
from .budget import Budget, budget
from .methods import Method, UnitStats, build, method_class
from .methods.base import DictFactors, Factors, functional_error, weight_error, whitening_factor
from .models.paths import PROJECTION_TYPES, get_module, projection_path, projection_weight
from .models.transformer import CausalLM
from .refine import RefineConfig, refine_layers
from .sequential import check_sequential, fit_sequential
from .sparse.backend import check_omp_backend
from .sparse.ksvd import SPARSE_CODERS

log = logging.getLogger(__name__)

# The paper's grouping (Basis Sharing protocol): q, k, v, gate, up shared across consecutive layers; o, down private.
DEFAULT_SHARED_TYPES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
PARALLEL_MODES = ("none", "columns", "matrices")


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration and held-out statistics come from (paper: RefinedWeb, 256 x 1024, seed 42)."""

    source: str = "embedded:calibration"
    nsamples: int = 256
    seqlen: int = 1024
    seed: int = 42
    heldout_source: str | None = "embedded:heldout"
    heldout_nsamples: int = 32
    batch_size: int = 8
    cache_dir: str | None = None  # Gram cache (keyed by model, tokenizer, source, nsamples, seqlen, seed)
    # Grams of each layer on the activations of the model whose earlier layers are compressed (sequential.py)
    sequential: bool = False


@dataclass(frozen=True)
class CompressionConfig:
    method: str = "cospadi"
    ratio: float = 0.2  # fraction of parameters removed, per matrix
    rho: float = 2.0  # k / s (CoSpaDi)
    accounting: str = "eq11"  # CoSpaDi storage accounting: eq11 (14-bit values) | eq10 (bitmask)
    group_size: int = 1  # m consecutive layers sharing a basis (grouped CoSpaDi, Basis Sharing)
    shared_types: tuple[str, ...] = DEFAULT_SHARED_TYPES
    layers: tuple[int, ...] | None = None  # None = all layers
    proj_types: tuple[str, ...] = PROJECTION_TYPES
    ksvd_iterations: int = 60
    power_iterations: int = 8
    dict_update: str = "power"  # power | exact | mod
    reseed_unused: bool = False  # paper: unused atoms are skipped; True re-seeds them (K-SVD original)
    seed: int = 42
    mode: str = "dense"  # DictLinear evaluation path: dense | factored | sparse | sparse_coo16 (layers.DICT_MODES)
    # None | bf16-14bit | int8: CoSpaDi's coefficient values quantised and dequantised (simulated: they stay
    # float32 in memory and in the artifact; the realised ratio counts the accounting's value bits, Eq. 10/11)
    quantization: str | None = None
    # none | columns (one CoSpaDi K-SVD with its columns sharded over all devices) | matrices (independent
    # matrices/groups spread over processes and their local devices)
    parallel: str = "none"
    omp_memory_mb: int | None = None  # one OMP chunk's working memory per device; None = the backend's default
    omp_backend: str = "auto"  # auto | xla | cpu_kernel | gemm (cospadi_jax.sparse.backend)
    sparse_coder: str = "omp"  # omp (the paper's Batch-OMP) | ormp (order-recursive MP, cospadi_jax.sparse.ormp)

    def validate(self, n_layers: int | None = None) -> None:
        """Raise ValueError naming the bad field before any work starts (layer checks need ``n_layers``)."""
        method = method_class(self.method)
        for name in ("ratio", "rho"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
            if not np.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        for name in ("group_size", "ksvd_iterations", "power_iterations", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1) (fraction of parameters removed), got {self.ratio}")
        if self.rho < 1.0:
            raise ValueError(f"rho = k/s must be >= 1 (s <= k), got {self.rho}")
        for name in ("proj_types", "shared_types"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise TypeError(f"{name} must be a list of projection types such as ['q_proj'], got {value!r}")
        if not self.proj_types:
            raise ValueError(f"proj_types is empty: nothing would be compressed; choose from {PROJECTION_TYPES}")
        bad = [t for t in (*self.proj_types, *self.shared_types) if t not in PROJECTION_TYPES]
        if bad:
            raise ValueError(f"unknown projection type(s) {bad}; use {PROJECTION_TYPES}")
        if len(set(self.proj_types)) != len(self.proj_types):
            raise ValueError(f"proj_types lists a projection twice: {list(self.proj_types)}")
        if self.layers is not None:
            if isinstance(self.layers, (str, int)) or not isinstance(self.layers, (list, tuple)):
                raise TypeError(f"layers must be a list of layer indices such as [10, 11] (or None for all), "
                                f"got {self.layers!r}")
            not_int = [i for i in self.layers if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
            if not_int:
                raise TypeError(f"layer indices must be integers, got {not_int}")
            if not self.layers:
                raise ValueError("layers is empty: nothing would be compressed; use None (all layers) or a list")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers lists a layer twice: {list(self.layers)}")
        bad_layers = [i for i in (self.layers or ()) if i < 0 or (n_layers is not None and i >= n_layers)]
        if bad_layers:
            raise ValueError(f"layer index {bad_layers} out of range: the model has {n_layers} layers")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.group_size > 1:
            if not method.supports_groups:
                raise ValueError(f"method {self.method!r} does not share bases; use group_size=1")
            n = len(self.layers) if self.layers is not None else n_layers
            if n is not None and n % self.group_size:
                raise ValueError(
                    f"group_size={self.group_size} does not divide the {n} compressed layers; "
                    "choose a divisor or select layers so that groups are complete (no remainder rule is applied)."
                )
            layers = list(self.layers or ())
            apart = [layers[g:g + self.group_size] for g in range(0, len(layers), self.group_size)
                     if layers[g:g + self.group_size] != list(range(layers[g], layers[g] + self.group_size))]
            if apart:  # a basis is shared by consecutive layers (Basis Sharing protocol), never across a gap
                raise ValueError(f"group_size={self.group_size} groups layers {apart}, which are not consecutive; "
                                 "list consecutive layers in order, e.g. layers=[2, 3, 8, 9].")
        if self.dict_update not in ("power", "exact", "mod"):
            raise ValueError(f"dict_update must be power, exact or mod, got {self.dict_update!r}")
        if self.ksvd_iterations < 0 or self.power_iterations < 1:
            raise ValueError("ksvd_iterations must be >= 0 and power_iterations >= 1")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; use one of {QUANTIZATIONS}")
        if self.quantization and method.budget_kind != "cospadi":
            raise ValueError(f"quantization={self.quantization!r} applies to CoSpaDi's coefficient values; "
                             f"{self.method!r} stores dense low-rank factors, so it would be ignored. Use "
                             "quantization=null with low-rank methods.")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.omp_memory_mb is not None and self.omp_memory_mb < 1:
            raise ValueError(f"omp_memory_mb must be >= 1, got {self.omp_memory_mb}")
        check_omp_backend(self.omp_backend)
        if self.sparse_coder not in SPARSE_CODERS:
            raise ValueError(f"unknown sparse_coder {self.sparse_coder!r}; use one of {SPARSE_CODERS}")
        if self.sparse_coder != "omp" and self.parallel == "columns":
            raise ValueError("parallel='columns' shards Batch-OMP over devices; use sparse_coder=omp with it")
        if self.parallel == "columns" and self.omp_backend not in ("auto", "xla"):
            raise ValueError(f"parallel='columns' shards the XLA Batch-OMP over devices; omp_backend="
                             f"{self.omp_backend!r} cannot be sharded: use omp_backend=auto or xla.")
        if self.mode not in DICT_MODES:
            raise ValueError(f"mode must be one of {DICT_MODES}, got {self.mode!r}")


@dataclass
class MatrixReport:
    path: str
    group: list[str]
    d_in: int
    d_out: int
    method: str
    functional_error_calib: float | None
    functional_error_heldout: float | None
    weight_error: float
    realised_ratio: float  # storage removed (bytes, the paper's CR; a group's shared basis split evenly)
    realised_ratio_params: float  # stored numbers removed (no mask/index bits)
    dense_params: int
    compressed_params: float
    seconds: float
    k: int | None = None
    s: int | None = None
    rank: int | None = None
    jitter: float | None = None
    lambda_min: float | None = None
    condition_number: float | None = None
    effective_rank: int | None = None  # of the calibration Gram (None when not computed)
    early_stopped_columns: int | None = None
    quantization_error: float | None = None
    objective: list[float] | None = None
    # CoSpaDi: resolved Batch-OMP backend and fitting time per phase (whitening, omp, update, gemm).
    omp_backend: str | None = None
    phase_seconds: dict | None = None
    # Block-output refinement (refine.py): the held-out functional error of the factors as fitted, before it.
    functional_error_heldout_fitted: float | None = None
    target_ratio: float | None = None  # the unit's ratio: config.ratio, or its share of a non-uniform allocation


@dataclass
class CompressionReport:
    config: dict
    calibration: dict
    matrices: list[MatrixReport] = field(default_factory=list)
    seconds: float = 0.0
    units: int = 0  # fitting units (a matrix or a shared group)
    units_reused: int = 0  # read back from the artifact of an interrupted run instead of being fitted
    refinement: list[dict] = field(default_factory=list)  # one refine.LayerRefinement per refined layer
    allocation: dict | None = None  # allocation.allocate's result (per-unit ratios); None when uniform

    @property
    def realised_ratio(self) -> float:
        """Storage removed over all compressed matrices (bytes, the paper's CR; a shared basis counted once)."""
        dense = sum(m.dense_params for m in self.matrices)
        return 1.0 - sum((1 - m.realised_ratio) * m.dense_params for m in self.matrices) / dense

    def to_dict(self) -> dict:
        return {"config": self.config, "calibration": self.calibration, "seconds": self.seconds,
                "realised_ratio": self.realised_ratio, "units": self.units, "units_reused": self.units_reused,
                "refinement": self.refinement, "allocation": self.allocation,
                "matrices": [asdict(m) for m in self.matrices]}


def work_units(cfg: CompressionConfig, n_layers: int) -> list[list[str]]:
    """Projection paths grouped into fitting units: a shared group of m consecutive layers, or one matrix."""
    layers = list(cfg.layers) if cfg.layers is not None else list(range(n_layers))
    units = []
    for proj in cfg.proj_types:
        m = cfg.group_size if proj in cfg.shared_types else 1
        for g in range(0, len(layers), m):
            units.append([projection_path(i, proj) for i in layers[g : g + m]])
    return units


def calibration_grams(model: CausalLM, tokenizer: Any, spec: CalibrationSpec, layers: list[int] | None,
                      *, heldout: bool = False, progress: bool = True) -> tuple[Grams, GramKey]:
    """Grams over seeded windows of the calibration (or held-out) source, through the on-disk cache if set."""
    source = spec.heldout_source if heldout else spec.source
    nsamples = spec.heldout_nsamples if heldout else spec.nsamples
    key = GramKey(model_fingerprint(model), tokenizer_fingerprint(tokenizer), source, nsamples, spec.seqlen,
                  spec.seed, tuple(layers) if layers is not None else None)
    if spec.seqlen > model.config.max_position_embeddings:
        raise ValueError(f"calibration seqlen {spec.seqlen} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}; use a shorter seqlen.")
    path = cached_path(spec.cache_dir, key) if spec.cache_dir else None
    if path is not None and path.exists():
        return load_grams(path, key), key
    if path is not None and not can_create_in(path.parent):  # checked now, not after the forward passes
        log.warning("the Gram cache %s is not writable: computing the Grams without caching them", path.parent)
        path = None
    windows = sample_windows(tokenizer, load_text(source), nsamples, spec.seqlen, spec.seed)
    grams = collect_grams(model, windows, batch_size=spec.batch_size, layers=layers, progress=progress)
    if path is not None:
        save_grams(path, grams, key)
    return grams, key


def unit_budget(config: CompressionConfig, d_in: int, d_out: int, group_size: int, ratio: float | None = None
                ) -> Budget:
    """The budget of a unit of ``group_size`` [d_in, d_out] matrices at ``ratio`` (default: the config's; a
    non-uniform allocation passes the unit's own), of the kind of ``config.method``."""
    return budget(d_in, d_out, config.ratio if ratio is None else ratio, kind=method_class(config.method).budget_kind,
                  rho=config.rho, accounting=config.accounting, group_size=group_size)


def fit_unit(Ws: list[np.ndarray], paths: list[str], method: Method, config: CompressionConfig, grams: Grams | None,
             heldout_grams: Grams | None, key: jax.Array, ratio: float | None = None
             ) -> tuple[list[Factors], list[dict]]:
    """Fit one unit (a matrix or a shared group): its factors and one report row (a dict) per matrix.

    Ws: the unit's weights [d_in, d_out] (float32), in the order of ``paths``; ``method`` from
    :func:`~cospadi_jax.methods.build`; ``key`` the unit's key (folded from the seed and the unit index).
    """
    t0 = time.perf_counter()
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
    unit_b = unit_budget(config, *Ws[0].shape, len(Ws), ratio)
    factors_list = method.fit_group(Ws, unit_grams, unit_b, key, stats)
    seconds = (time.perf_counter() - t0) / len(paths)
    unit_factors, unit_rows = [], []
    for i, (path, W, factors) in enumerate(zip(paths, Ws, factors_list)):
        quant_err = None
        if isinstance(factors, DictFactors) and config.quantization:
            q = quantize_coefficients(factors.values, config.quantization)
            quant_err = float(np.linalg.norm(q - factors.values) / np.linalg.norm(factors.values))
            factors = DictFactors(factors.D, factors.indices, q, factors.info)
        W_hat = factors.dense()
        info = factors.info
        unit_rows.append(asdict(MatrixReport(
            path=path, group=paths, d_in=W.shape[0], d_out=W.shape[1], method=config.method,
            functional_error_calib=functional_error(W, W_hat, unit_grams[i]) if unit_grams[i] is not None
            else None,  # a data-free run without calibration data has no functional error to report
            functional_error_heldout=functional_error(W, W_hat, heldout_grams.gram(path))
            if heldout_grams is not None else None,
            weight_error=weight_error(W, W_hat),
            realised_ratio=unit_b.realised_ratio_bytes,
            realised_ratio_params=unit_b.realised_ratio_params,
            dense_params=W.size,
            compressed_params=unit_b.stored_params / len(paths),
            seconds=seconds,
            k=info.get("k"), s=info.get("s"), rank=info.get("rank"),
            jitter=info.get("jitter"), lambda_min=info.get("lambda_min"),
            condition_number=info.get("condition_number"), effective_rank=info.get("effective_rank"),
            early_stopped_columns=info.get("early_stopped_columns"),
            quantization_error=quant_err, objective=info.get("objective"),
            omp_backend=info.get("omp_backend"), phase_seconds=info.get("phase_seconds"),
            target_ratio=unit_b.target_ratio,
        )))
        unit_factors.append(factors)
    return unit_factors, unit_rows


def compress(
    model: CausalLM,
    tokenizer: Any = None,
    *,
    config: CompressionConfig | None = None,
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
    **overrides: Any,
) -> tuple[CausalLM, CompressionReport]:
    """Compress the model's projections with one method; returns (compressed model, report).

    Either pass precomputed ``grams`` (e.g. from a cache) or a ``tokenizer`` and a ``calibration`` spec.
    Keyword ``overrides`` set CompressionConfig fields (``method="svd_llm", ratio=0.3``). Deterministic under
    ``config.seed``: every matrix gets its own key folded from the seed and its position.

    ``artifact`` (a :class:`cospadi_jax.checkpoint.ArtifactWriter`) saves every finished unit and, when it already
    holds finished units from a killed run, reuses them instead of refitting, so the result is bit-identical to an
    uninterrupted run. ``on_unit(index, rows)`` is called after each unit (e.g. to log to wandb).

    ``refine`` (:class:`cospadi_jax.refine.RefineConfig`, off when ``steps=0``) re-fits every compressed layer's
    factored numbers to the dense layer's output after all units are fitted, on ``windows`` [n, T] token ids
    (default: the calibration spec's windows, which needs the tokenizer). Refined layers are saved to and resumed
    from ``artifact`` like units; ``on_refined(record)`` is called after each (a ``LayerRefinement``).

    ``allocation`` (:class:`cospadi_jax.allocation.AllocationConfig`, off when ``allocation="uniform"``) gives
    each unit its own ratio at the uniform byte budget, from the dense model's calibration Grams (also under
    sequential calibration); it is saved to and resumed from ``artifact``.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be a cospadi_jax CausalLM (from cospadi_jax.load_model), got "
                        f"{type(model).__name__}")
    config = CompressionConfig(**{**asdict(config or CompressionConfig()), **overrides})
    n_layers = model.config.num_hidden_layers
    config.validate(n_layers)
    calibration = calibration or CalibrationSpec()
    refine = refine or RefineConfig()
    refine.validate()
    allocation = allocation or AllocationConfig()
    allocation.validate()
    if refine.steps and inplace:
        raise ValueError("refinement matches each compressed layer to the dense one, so the dense model must "
                         "survive: use inplace=False with refine.steps > 0")
    method = build(config)
    already = [p for unit in work_units(config, n_layers) for p in unit if not hasattr(get_module(model, p), "kernel")]
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
            log.warning("calib.sequential=true has no effect on %s, which uses no calibration data", config.method)
    if (refine.steps or sequential) and windows is None:
        if tokenizer is None:
            raise ValueError("sequential calibration and refinement need calibration windows: pass a tokenizer "
                             "(and a calibration spec) or windows=[n, T] token ids")
        windows = sample_windows(tokenizer, load_text(calibration.source), calibration.nsamples,
                                 calibration.seqlen, calibration.seed)
    if method.data_aware and grams is None and not sequential:
        if tokenizer is None:
            raise ValueError("a data-aware method needs a tokenizer (or precomputed grams) for calibration")
        grams, key_used = calibration_grams(model, tokenizer, calibration, layers, progress=progress)
        calibration_info["key"] = asdict(key_used)
    units = work_units(config, n_layers)
    stored = None
    if allocation.allocation != "uniform":
        stored = _resolve_allocation(model, tokenizer, config, allocation, calibration, method, grams, windows,
                                     artifact, len(units), progress)
    ratios = stored["ratios"] if stored is not None else None
    if heldout_grams is None and tokenizer is not None and calibration.heldout_source:
        heldout_grams, _ = calibration_grams(model, tokenizer, calibration, layers, heldout=True, progress=progress)

    target = model if inplace else nnx.clone(model)
    report = CompressionReport(config=asdict(config), calibration=calibration_info, allocation=stored)
    key = jax.random.key(config.seed)
    # Refinement differentiates through the layers: a sparse (packed bf16) mode is set once it is done.
    build_mode = "dense" if refine.steps and config.mode not in ("dense", "factored") else config.mode

    def fit(unit_index: int, unit_grams: Grams | None = None) -> tuple[list[Factors], list[dict]]:
        paths = units[unit_index]
        factors, rows = fit_unit([projection_weight(model, p) for p in paths], paths, method, config,
                                 unit_grams or grams, heldout_grams, jax.random.fold_in(key, unit_index),
                                 ratios[unit_index] if ratios is not None else None)
        if artifact is not None:
            artifact.save_unit(unit_index, factors, rows)
        return factors, rows

    # Resumed units are reused, never refitted: the result is bit-identical to an uninterrupted run.
    done = artifact.finished_units(len(units)) if artifact is not None else {}
    report.units, report.units_reused = len(units), len(done)
    if sequential:
        def fit_many(indices: list[int], block_grams: Grams) -> dict:
            if config.parallel == "matrices":  # a block's units side by side, one thread per local device
                return map_units(lambda i, _: fit(i, block_grams), units, rank=0, world=1,
                                 skip=set(range(len(units))) - set(indices))
            return {i: fit(i, block_grams) for i in indices}

        def swap_in(unit_index: int, result: tuple[list[Factors], list[dict]]) -> None:
            for path, f in zip(units[unit_index], result[0]):
                replace_projection(target, path, f, mode=build_mode)

        done = fit_sequential(target, windows, units, fit_many, swap_in, done, batch_size=calibration.batch_size,
                              progress=progress)
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
            done = artifact.finished_units()
            # Staged units may be rewritten by process 0's finalize(): nobody may still be reading them then.
            multihost_utils.sync_global_devices("cospadi_jax.compress: all units read")
    bar = tqdm(units, desc=f"compress ({config.method}, CR {config.ratio})", unit="group",
               disable=not progress or config.parallel == "matrices")
    for unit_index, paths in enumerate(bar):
        bar.set_postfix_str(paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1})")
        factors, rows = done[unit_index] if unit_index in done else fit(unit_index)
        unit_rows = [MatrixReport(**{k: v for k, v in row.items() if k != "info"}) for row in rows]
        if not sequential:  # sequential calibration swapped every unit in already
            for path, f in zip(paths, factors):
                replace_projection(target, path, f, mode=build_mode)
        report.matrices.extend(unit_rows)
        if on_unit is not None:
            on_unit(unit_index, unit_rows)
    if refine.steps:
        _refine(model, target, windows, refine, config, units, report, grams, heldout_grams, artifact, on_refined,
                progress)
        if build_mode != config.mode:
            set_dict_mode(target, config.mode)
    report.seconds = time.perf_counter() - t_start
    warn_about(report, config)
    return target, report


def _resolve_allocation(model: CausalLM, tokenizer: Any, config: CompressionConfig, allocation: AllocationConfig,
                        calibration: CalibrationSpec, method: Any, grams: Grams | None, windows: np.ndarray | None,
                        artifact: Any, n_units: int, progress: bool) -> dict:
    """The artifact's stored allocation (a resumed run), else :func:`allocate_units` on the dense model's Grams
    (computed here under sequential calibration, which has none yet), saved to the artifact."""
    if not method.data_aware:
        raise ValueError(f"budget.allocation={allocation.allocation} weighs each unit's output error on the "
                         f"calibration Grams, which {config.method!r} does not use: use a data-aware method "
                         "or budget.allocation=uniform")
    stored = artifact.allocation() if artifact is not None else None
    if stored is None:
        layers = list(config.layers) if config.layers is not None else None
        if grams is None and tokenizer is not None:
            grams, _ = calibration_grams(model, tokenizer, calibration, layers, progress=progress)
        elif grams is None:
            grams = collect_grams(model, windows, batch_size=calibration.batch_size, layers=layers,
                                  progress=progress)
        stored = allocate_units(model, config, allocation, grams, progress)
        if artifact is not None:
            artifact.save_allocation(stored)
    if len(stored["ratios"]) != n_units:
        raise ValueError("the artifact's allocation.json has another number of units than this run: it "
                         "belongs to another setting; use another output_dir")
    return stored


def allocate_units(model: CausalLM, config: CompressionConfig, allocation: AllocationConfig, grams: Grams,
                   progress: bool = True) -> dict:
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
                           None, jax.random.fold_in(jax.random.key(config.seed), u), ratio)
        return float(np.mean([row["functional_error_calib"] ** 2 for row in rows]))

    curve_method = build(replace(config, ksvd_iterations=allocation.curve_iterations))
    kind = method_class(config.method).budget_kind
    measured = allocation.curve == "measured" and kind == "cospadi"  # a low-rank method's spectrum is exact
    bar = tqdm(total=len(units), desc=f"allocation ({allocation.curve})", unit="group", disable=not progress)
    result = allocate(items, config.ratio, allocation, kind=kind, rho=config.rho,
                      accounting=config.accounting, whiten=lambda G: whitening_factor(G)[0],
                      measure=measure if measured else None, progress=lambda _: bar.update())
    bar.close()
    log.info("budget.allocation=%s: ratios %.3f..%.3f, realised CR %.4f (uniform %.4f), objective %.4g -> %.4g",
             allocation.allocation, min(result["ratios"]), max(result["ratios"]), result["realised_ratio"],
             result["uniform_realised_ratio"], result["objective"]["uniform"], result["objective"]["allocated"])
    return result


def _refine(dense: CausalLM, target: CausalLM, windows: np.ndarray, refine: RefineConfig,
            config: CompressionConfig, units: list[list[str]], report: CompressionReport, grams: Grams | None,
            heldout_grams: Grams | None, artifact: Any, on_refined: Any, progress: bool) -> None:
    """Refine ``target`` in place (refine.refine_layers), resuming from and saving to ``artifact``; the report
    rows of refined matrices then give the refined factors' errors."""
    shared = frozenset(p for unit in units if len(unit) > 1 for p in unit)
    layers = sorted({int(p.split(".")[2]) for unit in units for p in unit})
    done = artifact.refined_layers() if artifact is not None else {}
    records = {int(r["layer"]): r for r, _ in done.values()}

    def on_layer(record: Any, factors: dict[str, Factors]) -> None:
        records[record.layer] = asdict(record)
        if artifact is not None:
            artifact.save_refined(record.layer, factors, asdict(record))
        if on_refined is not None:
            on_refined(record)

    refine_layers(dense, target, windows, refine, seed=config.seed, layers=layers, shared=shared,
                  quantization=config.quantization, done={l: f for l, (_, f) in done.items()}, on_layer=on_layer,
                  progress=progress)
    report.refinement = [records[l] for l in sorted(records)]
    for row in report.matrices:
        layer = int(row.path.split(".")[2])
        if records.get(layer, {}).get("status") != "refined":
            continue
        W, W_hat = projection_weight(dense, row.path), _dense_of(get_module(target, row.path))
        row.functional_error_heldout_fitted = row.functional_error_heldout
        if grams is not None:
            row.functional_error_calib = functional_error(W, W_hat, grams.gram(row.path))
        if heldout_grams is not None:
            row.functional_error_heldout = functional_error(W, W_hat, heldout_grams.gram(row.path))
        row.weight_error = weight_error(W, W_hat)


def _dense_of(module: Any) -> np.ndarray:
    """W̃ [d_in, d_out] (float64) of a factored module."""
    if hasattr(module, "coefficients"):
        return np.asarray(module.D[...], np.float64) @ np.asarray(module.coefficients(), np.float64)
    return np.asarray(module.A[...], np.float64) @ np.asarray(module.B[...], np.float64)


def warn_about(report: CompressionReport, config: CompressionConfig) -> None:
    """Warnings a finished compression deserves: degenerate calibration data, a ratio far from the target."""
    deficient = [m for m in report.matrices if m.effective_rank is not None and m.effective_rank < m.d_in]
    if deficient:
        worst = min(deficient, key=lambda m: m.effective_rank / m.d_in)
        log.warning("the calibration Grams of %d matrices are rank-deficient (worst: %s, effective rank %d of %d): "
                    "the calibration text spans too few directions (a repeated token, or too few tokens), so the "
                    "fit matches the calibration data but not held-out data. Use more, varied calibration text.",
                    len(deficient), worst.path, worst.effective_rank, worst.d_in)
    if report.matrices and abs(report.realised_ratio - config.ratio) > 0.02:
        log.warning("realised ratio %.4f is far from the target %.4f: the matrices are too small for the budget's "
                    "integer rounding (k, s or rank), or the accounting differs; see the per-matrix rows.",
                    report.realised_ratio, config.ratio)
