"""Streaming compression's memory plan and rules, for models whose weights do not fit in host memory.

A Llama-3-8B in bfloat16 is 16 GB of weights; with float64 calibration Grams and the fitting buffers it does not fit
a 24 GB host as a whole. :func:`cospadi_jax.compress.compress` with ``budget_gib=`` streams it: only these live at
once: the calibration hidden states [n, T, hidden], one decoder layer's weights, that layer's Grams (float64), and
the buffers of the matrix being fitted. Layers come from a :class:`~cospadi_jax.sources.LayerSource` (an in-memory
model, a Hugging Face safetensors directory read one layer at a time, or seeded random weights built from a config
one layer at a time), are calibrated on the hidden states of the *original* model (the Grams that ``compress()``
collects up front for an in-memory model), or of the compressed prefix under the sequential rule, compressed unit
by unit into an artifact, and dropped. It is the same orchestrator: the layer loop
:func:`cospadi_jax.sequential.fit_blocks` (the one sequential calibration runs) and the unit step
:func:`cospadi_jax.compress.fit_and_save`.

This module holds what only streaming needs: the chunk sizes from one memory budget (:func:`plan_memory`: windows
per calibration forward batch and columns per OMP chunk, reported with the estimate of every resident buffer), the
checks of what streaming refuses (:func:`check_streamed`), and the copies that sequential swaps factors into
(:class:`ClonedLayers`). The same seed gives the same factors as ``compress()`` on the whole model in memory (every
unit keeps its global index and key).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .methods import MethodConfig
from .models.config import DecoderConfig, projection_shapes
from .models.paths import GRAM_SOURCE
from .models.transformer import DecoderLayer
from .sources import LayerSource
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
    budgets = {t: comp.unit_budget(*s) for t, s in shapes.items()}
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


def check_streamed(config: MethodConfig, refine: Any, allocation: Any, grams: Any, heldout_grams: Any,
                   inplace: bool, keep_factors: bool, artifact: Any) -> None:
    """Refuse, before any work, what a streamed run (one layer resident) cannot do."""
    if config.group_size != 1:
        raise ValueError("streaming compression fits one layer at a time: use group_size=1, or compress() without "
                         "budget_gib for shared dictionaries across layers.")
    refused = {"method.ksvd_snapshots": getattr(config, "ksvd_snapshots", None), "refine.steps": refine.steps,
               "a non-uniform budget.allocation": allocation.allocation != "uniform",
               "precomputed grams=/heldout_grams=": grams is not None or heldout_grams is not None,
               "inplace=True": inplace}
    named = [k for k, v in refused.items() if v]
    if named:
        raise ValueError(f"streaming compression (budget_gib=) keeps one layer resident, so it takes no "
                         f"{', '.join(named)}: each needs the whole model (or collects its Grams itself); run "
                         "compress() without budget_gib, or without those.")
    if not keep_factors and artifact is None:
        raise ValueError("keep_factors=False without an artifact would throw the factors away; pass an artifact.")
    if jax.process_count() > 1:
        raise ValueError("streaming compression runs on one process; use compress() without budget_gib (and "
                         "method.parallel=matrices) across processes")


class ClonedLayers:
    """A layer source whose layers are copies, so that swapping factors in leaves the source's own intact."""

    def __init__(self, source: LayerSource):
        self.source, self.config, self.dtype = source, source.config, source.dtype

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.source.embed(ids)

    def layer(self, index: int) -> DecoderLayer:
        return nnx.clone(self.source.layer(index))
