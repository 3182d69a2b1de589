"""Layer-by-layer streaming compression, for models whose weights do not fit in host memory.

A Llama-3-8B in bfloat16 is 16 GB of weights; with float64 calibration Grams and the fitting buffers it does not fit
a 24 GB host as a whole. Here only these live at once: the calibration hidden states [n, T, hidden], one decoder
layer's weights, that layer's Grams (float64), and the buffers of the matrix being fitted. Layers come from a
:class:`~cospadi_jax.sources.LayerSource` (an in-memory model, a Hugging Face safetensors directory read one layer
at a time, or seeded random weights built from a config one layer at a time), are calibrated on the hidden states
of the *original* model (exactly what :func:`cospadi_jax.compress.compress` does), or of the compressed prefix
under the sequential rule, compressed unit by unit into an artifact, and dropped. The layer loop is
:func:`cospadi_jax.sequential.fit_blocks`, the one sequential calibration runs, and the unit step
:func:`cospadi_jax.compress.fit_and_save`, the one every path runs.

Chunk sizes come from one memory budget (:func:`plan_memory`): windows per calibration forward batch and columns
per OMP chunk, reported with the estimate of every resident buffer. The same seed gives the same factors as
``compress()`` on the whole model (every unit keeps its global index and key).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .calib.grams import Grams
from .sequential import fit_blocks
from .compress import fit_and_save, reused_units, unit_budget, work_units
from .report import CompressionReport, warn_about
from .layers import factored_module
from .methods import MethodConfig, method_class
from .methods.base import Factors
from .models.config import DecoderConfig, projection_shapes
from .sources import LayerSource
from .models.paths import GRAM_SOURCE, get_module, parse_projection_path
from .models.transformer import DecoderLayer
from .sparse.omp import omp_chunk_size

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Chunk sizes derived from a host memory budget, with the estimate (GiB) of every resident buffer."""

    budget_gib: float
    calib_batch: int  # windows per calibration forward batch
    omp_memory_mb: int  # working memory of one OMP chunk
    omp_chunk_columns: dict[str, int]  # projection type -> columns per OMP chunk (CoSpaDi)
    resident_gib: dict[str, float]
    calib_batch_gib: float  # activations of one calibration forward batch
    predicted_peak_gib: float  # resident + the larger of a calibration batch and an OMP chunk (never both at once)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.resident_gib.items())
        chunks = ", ".join(f"{k} {v}" for k, v in self.omp_chunk_columns.items())
        return (f"memory plan for {self.budget_gib:.1f} GiB: calibration batch {self.calib_batch} windows "
                f"({self.calib_batch_gib:.2f} GiB), OMP chunk {self.omp_memory_mb} MiB -> columns per chunk: {chunks};"
                f" resident GiB: {parts}; predicted peak {self.predicted_peak_gib:.2f} GiB")


def plan_memory(cfg: DecoderConfig, comp: MethodConfig, n_windows: int, seqlen: int, *, budget_gib: float,
                dtype: Any = jnp.bfloat16) -> MemoryPlan:
    """Split ``budget_gib`` of host memory between the resident buffers and the two chunked ones.

    Resident: one layer's weights (``dtype``), the hidden states [n, T, hidden] (``dtype``), one layer's float64
    Grams, and fitting the largest matrix (float64 W, whitening factor L [d_in, d_in], target L·W, and the K-SVD
    buffers: float32 Y, D, dense S). What is left goes half to the calibration forward batch (float32 activations
    of one window: ~ T·(6·hidden + 3·intermediate + heads·T)) and half to one OMP chunk (capped at 4 GiB).
    Raises ValueError naming the buffers when even the resident part does not fit.
    """
    item = jnp.dtype(dtype).itemsize
    shapes = {t: s for t, s in projection_shapes(cfg).items() if t in comp.proj_types}
    budgets = {t: unit_budget(comp, *s, 1) for t, s in shapes.items()}
    layer_params = sum(a * b for a, b in projection_shapes(cfg).values()) + 2 * cfg.hidden_size
    gram_sources = set(GRAM_SOURCE.values())  # calibration collects all four (q/k/v share one, gate/up one)

    def fit_bytes(t: str) -> int:
        d_in, d_out = shapes[t]
        k = budgets[t].n_atoms or budgets[t].rank or 0
        return 8 * (2 * d_in * d_out + d_in * d_in) + 4 * (d_in * d_out + d_in * k + k * d_out)

    resident = {
        "layer weights": layer_params * item / GIB,
        "hidden states": n_windows * seqlen * cfg.hidden_size * item / GIB,
        "Grams (float64)": sum(8 * projection_shapes(cfg)[t][0] ** 2 for t in gram_sources) / GIB,
        "fitting the largest matrix": max(fit_bytes(t) for t in shapes) / GIB,
        "runtime (JAX, XLA, Python)": 1.5,
    }
    free = budget_gib - sum(resident.values())
    if free <= 0:
        raise ValueError(
            f"a memory budget of {budget_gib:.1f} GiB is below the resident need of {budget_gib - free:.1f} GiB "
            f"({', '.join(f'{k} {v:.2f}' for k, v in resident.items())}); raise the budget or use fewer/shorter "
            "calibration windows.")
    per_window = 4 * seqlen * (6 * cfg.hidden_size + 3 * cfg.intermediate_size + cfg.num_attention_heads * seqlen)
    calib_batch = int(max(1, min(n_windows, free / 2 * GIB // per_window)))
    omp_mb = int(max(16, min(4096, free / 2 * 1024)))
    chunks = {t: omp_chunk_size(b.n_atoms, b.sparsity, 4, omp_mb * 2**20)
              for t, b in budgets.items() if b.n_atoms is not None}
    calib_gib = calib_batch * per_window / GIB
    peak = sum(resident.values()) + max(calib_gib, omp_mb / 1024 if chunks else 0.0)
    return MemoryPlan(budget_gib, calib_batch, omp_mb, chunks, resident, calib_gib, peak)


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def compress_streaming(
    source: LayerSource,
    windows: np.ndarray,
    *,
    config: MethodConfig,
    budget_gib: float,
    seed: int = 42,
    artifact: Any = None,
    keep_factors: bool = True,
    progress: bool = True,
    on_layer: Callable[[int, dict[str, Any]], None] | None = None,
    sequential: bool = False,
) -> tuple[CompressionReport, dict[str, Factors], MemoryPlan]:
    """Calibrate and compress ``source`` one layer at a time; returns (report, factors by path, memory plan).

    windows: [n, seqlen] int32 calibration token ids. ``config.group_size`` must be 1 (a shared group would need
    several layers resident: use :func:`cospadi_jax.compress.compress`). Units are saved to ``artifact`` as they
    finish (and reused when it already holds them); ``keep_factors=False`` drops them from memory after saving,
    which a model larger than the host needs. ``on_layer(index, stats)`` gets per-layer timings and the peak RSS.
    ``sequential``: each layer's Grams on the hidden states of the compressed layers before it
    (:mod:`cospadi_jax.sequential`); the layer's factors are swapped in before the hidden states advance.
    """
    cfg = source.config
    if config.group_size != 1:
        raise ValueError("streaming compression fits one layer at a time: use group_size=1, or compress() for "
                         "shared dictionaries across layers.")
    if getattr(config, "ksvd_snapshots", None):
        raise ValueError("method.ksvd_snapshots is for compress() and the Hydra app, which evaluate each snapshot "
                         "as a run; streaming compression keeps one layer resident: run without snapshots.")
    if not keep_factors and artifact is None:
        raise ValueError("keep_factors=False without an artifact would throw the factors away; pass an artifact.")
    config.validate(cfg.num_hidden_layers)  # once, with the layer range, before the memory plan reads the budget
    windows = np.asarray(windows, np.int32)
    plan = plan_memory(cfg, config, len(windows), windows.shape[1], budget_gib=budget_gib, dtype=source.dtype)
    if hasattr(config, "omp_memory_mb"):  # K-SVD's OMP chunk sized by the plan
        config = replace(config, omp_memory_mb=plan.omp_memory_mb)
    # Not build(), which would validate again: the config is validated above, and the plan's chunk (16 to 4096
    # MiB) is a valid omp_memory_mb; the plan needs a validated config, and the method needs the planned one.
    method = method_class(config.name)(config)
    units = work_units(config, cfg.num_hidden_layers)
    unit_of = {paths[0]: i for i, paths in enumerate(units)}
    key = jax.random.key(seed)
    done = reused_units(artifact, len(units))
    report = CompressionReport(config={**asdict(config), "seed": seed, "streaming": asdict(plan)},
                               calibration={"nsamples": len(windows), "seqlen": windows.shape[1]},
                               units=len(units), units_reused=len(done))
    factors_by_path: dict[str, Factors] = {}
    fitted = dict(done)  # unit -> (factors, rows); a unit's factors are dropped once swapped in unless kept
    t_start = time.perf_counter()

    def fit_block(indices: list[int], grams: Grams, layers: dict[int, DecoderLayer]) -> None:
        for i in indices:
            paths = units[i]
            layer = layers[parse_projection_path(paths[0])[0]]
            fitted[i] = fit_and_save(i, [_weight(layer, p) for p in paths], paths, method, config, grams, None, key,
                                     None, artifact)

    def swap_in(i: int, layers: dict[int, DecoderLayer]) -> None:
        for path, f in zip(units[i], fitted[i][0]):
            _swap_in(layers[parse_projection_path(path)[0]], path, f, config.mode)

    def layer_done(index: int, stats: dict[str, float]) -> None:
        for i in (i for p, i in unit_of.items() if parse_projection_path(p)[0] == index):
            factors, rows = fitted[i]
            report.matrices.extend(rows)
            if keep_factors:
                factors_by_path.update(zip(units[i], factors))
            fitted[i] = ([], rows)  # the factors are in the artifact (and in factors_by_path if kept)
        if on_layer is not None:
            on_layer(index, {**stats, "peak_rss_gib": peak_rss_gib()})

    # The sequential rule swaps factors into the layer: never into the source's own (an in-memory model's) layer.
    layers_from = _ClonedLayers(source) if sequential else source
    fit_blocks(layers_from, windows, units, fit_block, done=done, batch_size=plan.calib_batch,
               compressed_inputs=sequential, swap_in=swap_in, progress=progress, desc="streaming compression",
               on_layer=layer_done)
    report.matrices.sort(key=lambda row: unit_of[row.path])  # the order of compress(): projection type, then layer
    report.seconds = time.perf_counter() - t_start
    report.config["peak_rss_gib"] = peak_rss_gib()
    warn_about(report, config)
    return report, factors_by_path, plan


class _ClonedLayers:
    """A layer source whose layers are copies, so that swapping factors in leaves the source's own intact."""

    def __init__(self, source: LayerSource):
        self.source, self.config, self.dtype = source, source.config, source.dtype

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.source.embed(ids)

    def layer(self, index: int) -> DecoderLayer:
        return nnx.clone(self.source.layer(index))


def _swap_in(layer: DecoderLayer, path: str, factors: Factors, mode: str) -> None:
    """Replace one projection of a standalone layer by its factored module (the bias is kept)."""
    parent_path, _, name = path.split(".", 3)[3].rpartition(".")  # "mlp", "up_proj"
    parent = get_module(layer, parent_path)
    old = getattr(parent, name)
    bias = None if old.bias is None else old.bias[...]
    setattr(parent, name, factored_module(factors, bias, dtype=old.dtype, mode=mode))


def _weight(layer: DecoderLayer, path: str) -> np.ndarray:
    """W [d_in, d_out] float32 of one projection of a standalone layer ("model.layers.3.mlp.up_proj")."""
    relative = path.split(".", 3)[3]  # "mlp.up_proj"
    return np.asarray(jax.device_get(get_module(layer, relative).kernel[...]), dtype=np.float32)
