"""Calibration Grams G = Σ xᵀx of every distinct projection input, streamed layer by layer.

One forward pass of the original model over the calibration windows: hidden states of all windows are kept on
the host between layers, and each layer is run batch by batch through one jit-compiled step (all layers share
a shape, so it compiles once). Memory is O(tokens × hidden + d²) per layer, never O(layers × d²) unless the
caller keeps every layer's Grams. Batches sum in float32 on the device; batches are summed in float64 on the host,
in batch order. Processes of a ``jax.distributed`` run share the batches and gather each batch's Gram, so the
Grams (and the cache file) do not depend on the process count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ..models.paths import GRAM_SOURCE, parse_projection_path, projection_path
from ..models.transformer import CausalLM, DecoderLayer, Embed, causal_mask, layer_rotary
from ..parallel import assign_units, gather_exact

# DecoderLayer.return_projection_inputs key -> projection type whose Gram it is.
_INPUT_TO_TYPE = {"self_attn.q_proj": "q_proj", "self_attn.o_proj": "o_proj",
                  "mlp.gate_proj": "gate_proj", "mlp.down_proj": "down_proj"}


@dataclass
class Grams:
    """Grams keyed by projection path of the Gram's source projection (q_proj, o_proj, gate_proj, down_proj)."""

    n_tokens: int
    by_path: dict[str, np.ndarray] = field(default_factory=dict)  # path -> [d_in, d_in] float64
    abs_sums: dict[str, np.ndarray] = field(default_factory=dict)  # path -> Σ|x| [d_in] float64 (for ASVD)

    def _key(self, path: str) -> str:
        layer, proj = parse_projection_path(path)
        key = projection_path(layer, GRAM_SOURCE[proj])
        if key not in self.by_path:
            raise KeyError(f"no calibration Gram for {path} (layer {layer} was not collected)")
        return key

    def gram(self, path: str) -> np.ndarray:
        """G = Σ xᵀx [d_in, d_in] float64 for any projection path (k/v -> q's input, up -> gate's input)."""
        return self.by_path[self._key(path)]

    def mean_abs(self, path: str) -> np.ndarray:
        """Mean absolute activation per input channel [d_in] (ASVD's scaling statistic)."""
        return self.abs_sums[self._key(path)] / self.n_tokens

    def add(self, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Add one layer's ``{source path: (Gram, Σ|x|)}``, as :func:`advance_layer` returns them."""
        for path, (gram, abs_sum) in stats.items():
            self.by_path[path], self.abs_sums[path] = gram, abs_sum


@nnx.jit(static_argnums=2)
def embed_tokens(table: Embed, ids: jax.Array, dtype: Any) -> jax.Array:
    """ids [b, T] int32 -> the hidden states entering layer 0 [b, T, hidden] in ``dtype``."""
    return table(ids).astype(dtype)


@nnx.jit
def _layer_step(layer: DecoderLayer, h: jax.Array):
    b, t, _ = h.shape
    cos, sin = layer_rotary(layer.self_attn.cfg, b, t, h.dtype)
    mask = causal_mask(jnp.ones((b, t), jnp.int32))
    h_out, inputs = layer(h, cos, sin, mask, return_projection_inputs=True)
    grams = {}
    for name, x in inputs.items():
        x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        grams[name] = (jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST), jnp.abs(x2).sum(axis=0))
    return h_out, grams


def iter_layer_grams(
    model: CausalLM, windows: np.ndarray, *, batch_size: int = 8, layers: list[int] | None = None,
    progress: bool = True,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (layer index, {source path: (Gram [d,d], Σ|x| [d]) float64}) for the requested layers, in order.

    windows: [n, seqlen] int32 token ids (full windows, no padding). In a multi-process run (``jax.distributed``)
    with at least one batch per process, each process forwards its round-robin share of the batches and every
    process gets the same Grams, bit-identical to one process's (:func:`advance_layer`): a collective, so every
    process must call it with the same windows.
    """
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [n, seqlen], got shape {windows.shape}")
    n_layers = model.config.num_hidden_layers
    wanted = set(range(n_layers)) if layers is None else set(layers)
    bad = [i for i in wanted if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layer index {bad} out of range: the model has {n_layers} layers")
    n_batches = -(-len(windows) // batch_size)
    shared = 1 < jax.process_count() <= n_batches
    hidden = embed_batches(model, windows, batch_size, assign_units(n_batches) if shared else None)
    last = max(wanted)
    bar = tqdm(total=last + 1, desc="calibration Grams", unit="layer", disable=not progress)
    for i in range(last + 1):
        by_path = advance_layer(model.model.layers[i], i, hidden, collect=i in wanted,
                                n_batches=n_batches if shared else None)
        bar.update(1)
        if i in wanted:
            yield i, by_path
    bar.close()


def embed_batches(model: CausalLM, windows: np.ndarray, batch_size: int,
                  batches: list[int] | None = None) -> list[np.ndarray]:
    """Token embeddings of ``windows`` [n, T] in batches of ``batch_size`` (only the batch indices ``batches``,
    default all): the hidden states entering layer 0."""
    starts = range(0, len(windows), batch_size)
    starts = starts if batches is None else [starts[b] for b in batches]
    return [np.asarray(embed_tokens(model.model.embed_tokens, jnp.asarray(windows[s : s + batch_size]), model.dtype))
            for s in starts]


def advance_layer(layer: DecoderLayer, index: int, hidden: list[np.ndarray], *, collect: bool = True,
                  advance: bool = True, n_batches: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Run the hidden-state batches (each [b, T, hidden]) through decoder layer ``index``, replacing them in
    place (unless not ``advance``: Grams only), and return its Grams {source path: (Gram [d, d], Σ|x| [d])
    float64} (empty if not ``collect``).

    ``n_batches`` (multi-process runs): the number of batches over all processes, of which ``hidden`` holds this
    process's round-robin share (:func:`cospadi_jax.parallel.assign_units`; local batch j is global batch
    j · processes + rank). Each batch's float64 Gram is then gathered from its process, and all processes add
    the batches in global order, the order of one process: the sums are bit-identical to a single process's,
    whatever the process count (a collective: every process must call it).

    Raises FloatingPointError on a non-finite Gram.
    """
    world = 1 if n_batches is None else jax.process_count()
    rounds = len(hidden) if n_batches is None else -(-n_batches // world)
    acc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for r in range(rounds):
        batch_stats = None
        if r < len(hidden):
            h_out, grams = _layer_step(layer, jnp.asarray(hidden[r]))
            if advance:
                hidden[r] = np.asarray(h_out)
            batch_stats = {name: tuple(np.asarray(v, dtype=np.float64) for v in stats)
                           for name, stats in grams.items()}
        if not collect:
            continue
        if world == 1:
            in_order = [batch_stats]
        else:  # this round's batches r·world + p, p = 0 … world − 1, from every process
            shapes = shapes or {name: tuple(v.shape for v in stats) for name, stats in batch_stats.items()}
            rows = gather_exact(_flatten(batch_stats, shapes))
            in_order = [_unflatten(row, shapes) for p, row in enumerate(rows) if r * world + p < n_batches]
        for stats in in_order:
            for name, g64 in stats.items():
                acc[name] = tuple(a + b for a, b in zip(acc[name], g64)) if name in acc else g64
    out = {}
    for name, g in acc.items():
        if not all(np.all(np.isfinite(v)) for v in g):
            raise FloatingPointError(f"non-finite calibration Gram at layer {index} ({name})")
        # XᵀX is symmetric, but a float32 GEMM need not round G[i, j] and G[j, i] alike (XLA:CPU's tiling
        # depends on its threads): symmetrise here, so that whitening's float64 symmetry check holds. Exact
        # (bit-identical) where the GEMM already was symmetric.
        gram, abs_sum = g
        out[projection_path(index, _INPUT_TO_TYPE[name])] = (0.5 * (gram + gram.T), abs_sum)
    return out


def _flatten(stats: dict[str, tuple[np.ndarray, ...]] | None, shapes: dict[str, tuple[tuple[int, ...], ...]]
             ) -> np.ndarray:
    """One float64 vector of a batch's statistics in ``shapes``' order; zeros for a process without a batch."""
    if stats is None:
        return np.zeros(sum(int(np.prod(s)) for ss in shapes.values() for s in ss))
    return np.concatenate([v.ravel() for name in shapes for v in stats[name]])


def _unflatten(flat: np.ndarray, shapes: dict[str, tuple[tuple[int, ...], ...]]) -> dict[str, tuple[np.ndarray, ...]]:
    out, offset = {}, 0
    for name, ss in shapes.items():
        parts = []
        for s in ss:
            size = int(np.prod(s))
            parts.append(flat[offset : offset + size].reshape(s))
            offset += size
        out[name] = tuple(parts)
    return out


def collect_grams(
    model: CausalLM, windows: np.ndarray, *, batch_size: int = 8, layers: list[int] | None = None,
    progress: bool = True,
) -> Grams:
    """All requested layers' Grams in memory (see :func:`iter_layer_grams` for the streaming form)."""
    grams = Grams(n_tokens=int(np.asarray(windows).size))
    for _, by_path in iter_layer_grams(model, windows, batch_size=batch_size, layers=layers, progress=progress):
        grams.add(by_path)
    return grams
