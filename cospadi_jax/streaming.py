"""Layer-by-layer streaming compression, for models whose weights do not fit in host memory.

A Llama-3-8B in bfloat16 is 16 GB of weights; with float64 calibration Grams and the fitting buffers it does not fit
a 24 GB host as a whole. Here only these live at once: the calibration hidden states [n, T, hidden], one decoder
layer's weights, that layer's Grams (float64), and the buffers of the matrix being fitted. Layers come from a
:class:`LayerSource` (an in-memory model, a Hugging Face safetensors directory read one layer at a time, or seeded random weights
built from a config one layer at a time), are
calibrated on the hidden states of the *original* model (exactly what :func:`cospadi_jax.compress.compress` does),
compressed unit by unit into an artifact, and dropped.

Chunk sizes come from one memory budget (:func:`plan_memory`): windows per calibration forward batch and columns
per OMP chunk, reported with the estimate of every resident buffer. The same seed gives the same factors as
``compress()`` on the whole model (every unit keeps its global index and key).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .calib.grams import Grams, advance_layer, embed_tokens
from .compress import fit_and_save, reused_units, unit_budget, work_units
from .report import CompressionReport, warn_about
from .layers import factored_module
from .methods import MethodConfig, build
from .methods.base import Factors, clear_whitening_cache
from .models.config import DecoderConfig, decoder_config_from_hf, projection_shapes
from .models.convert import assign_tensors
from .models.paths import GRAM_SOURCE, get_module, parse_projection_path
from .models.transformer import CausalLM, DecoderLayer, Embed
from .sparse.omp import omp_chunk_size

GIB = 2**30


class LayerSource(Protocol):
    """Where the streamed weights come from: the config, the token embeddings and one decoder layer at a time."""

    config: DecoderConfig
    dtype: Any

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """ids [b, T] int32 -> hidden states [b, T, hidden] in ``dtype``."""

    def layer(self, index: int) -> DecoderLayer:
        """Decoder layer ``index`` (its weights are released when the caller drops it)."""


class ModelLayerSource:
    """Layers of a model already in memory (for models that fit, and to test streaming against ``compress``)."""

    def __init__(self, model: CausalLM):
        self.model, self.config, self.dtype = model, model.config, model.dtype

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(embed_tokens(self.model.model.embed_tokens, jnp.asarray(ids), self.dtype))

    def layer(self, index: int) -> DecoderLayer:
        return self.model.model.layers[index]


class RandomLayerSource:
    """Seeded random weights built from a config one layer at a time (e.g. Llama-3-8B shapes).

    Weights take the values of ``weight_dtype`` (bfloat16 by default, as the checkpoints) and compute in
    ``dtype`` (float32: XLA:CPU has no fast bfloat16 GEMM, and Grams are accumulated in float32 anyway). Layer i
    is initialised from ``fold_in(seed, i)``, so it is the same whichever layers are built, and never more than
    one layer (plus, while embedding, the embedding table) exists.
    """

    def __init__(self, config: DecoderConfig, *, weight_dtype: Any = jnp.bfloat16, dtype: Any = jnp.float32,
                 seed: int = 0):
        self.config, self.weight_dtype, self.dtype, self.seed = config, weight_dtype, dtype, seed

    def _build(self, module: Any, index: int) -> Any:
        built = module(rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(self.seed), index)))
        state = nnx.state(built, nnx.Param)
        nnx.update(built, jax.tree.map(lambda x: x.astype(self.weight_dtype).astype(self.dtype), state))
        return built

    def embed(self, ids: np.ndarray) -> np.ndarray:
        # The table exists only while embedding; its key index follows the layers' (0 .. L-1).
        table = self._build(partial(Embed, self.config.vocab_size, self.config.hidden_size, dtype=self.dtype),
                            self.config.num_hidden_layers)
        return np.asarray(embed_tokens(table, jnp.asarray(ids), self.dtype))

    def layer(self, index: int) -> DecoderLayer:
        return self._build(partial(DecoderLayer, self.config, dtype=self.dtype), index)


class CheckpointLayerSource:
    """One layer at a time from a Hugging Face directory (config.json + safetensors, sharded index supported).

    Only the tensors of the requested layer are read (safetensors reads tensor by tensor), converted through the
    key table to ``dtype`` and checked like a whole-model load; the embedding table is read once to embed the
    windows and dropped. This is how a real 8B checkpoint streams through a host that cannot hold it.
    """

    def __init__(self, model_dir: str | Path, *, dtype: Any = jnp.float32):
        from .models.loading import _safetensors_files, hf_directory_config

        self.model_dir = Path(model_dir)
        self.config = decoder_config_from_hf(hf_directory_config(self.model_dir))
        self.dtype = dtype
        self._file_of: dict[str, Path] = {}
        from safetensors import safe_open

        for file in _safetensors_files(self.model_dir):
            with safe_open(str(file), framework="flax") as f:
                self._file_of.update(dict.fromkeys(f.keys(), file))

    def _tensors(self, prefix: str):
        from safetensors import safe_open

        names = [n for n in self._file_of if n.startswith(prefix)]
        for file in sorted({self._file_of[n] for n in names}):
            with safe_open(str(file), framework="flax") as f:
                for name in names:
                    if self._file_of[name] == file:
                        yield name, f.get_tensor(name)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        abstract = nnx.eval_shape(lambda: Embed(self.config.vocab_size, self.config.hidden_size, dtype=self.dtype,
                                                rngs=nnx.Rngs(0)))
        table = assign_tensors(abstract, self._tensors("model.embed_tokens."), dtype=self.dtype,
                               tied_embeddings=False, source=str(self.model_dir), prefix="model.embed_tokens.")
        return np.asarray(embed_tokens(table, jnp.asarray(ids), self.dtype))

    def layer(self, index: int) -> DecoderLayer:
        prefix = f"model.layers.{index}."
        abstract = nnx.eval_shape(lambda: DecoderLayer(self.config, dtype=self.dtype, rngs=nnx.Rngs(0)))
        return assign_tensors(abstract, self._tensors(prefix), dtype=self.dtype, tied_embeddings=False,
                              source=str(self.model_dir), prefix=prefix)


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
    if not keep_factors and artifact is None:
        raise ValueError("keep_factors=False without an artifact would throw the factors away; pass an artifact.")
    config.validate(cfg.num_hidden_layers)  # before the memory plan reads the budget
    windows = np.asarray(windows, np.int32)
    plan = plan_memory(cfg, config, len(windows), windows.shape[1], budget_gib=budget_gib, dtype=source.dtype)
    if hasattr(config, "omp_memory_mb"):  # K-SVD's OMP chunk sized by the plan
        config = replace(config, omp_memory_mb=plan.omp_memory_mb)
    method = build(config)
    units = work_units(config, cfg.num_hidden_layers)
    unit_of = {paths[0]: i for i, paths in enumerate(units)}
    layers = sorted({parse_projection_path(paths[0])[0] for paths in units})
    key = jax.random.key(seed)
    done = reused_units(artifact, len(units))
    report = CompressionReport(config={**asdict(config), "seed": seed, "streaming": asdict(plan)},
                               calibration={"nsamples": len(windows), "seqlen": windows.shape[1]},
                               units=len(units), units_reused=len(done))
    factors_by_path: dict[str, Factors] = {}
    t_start = time.perf_counter()
    hidden = [source.embed(windows[s : s + plan.calib_batch]) for s in range(0, len(windows), plan.calib_batch)]
    bar = tqdm(layers, desc="streaming compression", unit="layer", disable=not progress)
    for index in range(max(layers) + 1):
        t0 = time.perf_counter()
        layer = source.layer(index)
        by_path = advance_layer(layer, index, hidden, collect=index in layers,
                                advance=not (sequential and index in layers))
        t_calib = time.perf_counter() - t0
        if index in layers:
            grams = Grams(n_tokens=int(windows.size))
            grams.add(by_path)
            if sequential:
                layer = nnx.clone(layer)  # compressed below: never the source's own layer (an in-memory model)
            for unit_index in sorted(i for p, i in unit_of.items() if parse_projection_path(p)[0] == index):
                paths = units[unit_index]
                unit_factors, rows = done[unit_index] if unit_index in done else fit_and_save(
                    unit_index, [_weight(layer, p) for p in paths], paths, method, config, grams, None, key, None,
                    artifact)
                report.matrices.extend(rows)
                if sequential:
                    for path, f in zip(paths, unit_factors):
                        _swap_in(layer, path, f, config.mode)
                if keep_factors:
                    factors_by_path.update(zip(paths, unit_factors))
            del grams
            if sequential:  # through the compressed layer: the next layer's inputs
                advance_layer(layer, index, hidden, collect=False)
            clear_whitening_cache()  # this layer's factors are never needed again: free them before the next
            bar.update()
        del layer, by_path
        stats = {"calibration_s": t_calib, "seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib()}
        if on_layer is not None:
            on_layer(index, stats)
    bar.close()
    report.matrices.sort(key=lambda row: unit_of[row.path])  # the order of compress(): projection type, then layer
    report.seconds = time.perf_counter() - t_start
    report.config["peak_rss_gib"] = peak_rss_gib()
    warn_about(report, config)
    return report, factors_by_path, plan


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
