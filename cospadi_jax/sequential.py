"""Sequential calibration (``calib.sequential=true``): each layer's Grams on the activations of the model whose
earlier layers are already compressed, as SparseGPT and GPTQ do, so that later layers correct for earlier errors.

The rule, also for bases shared across layers:

- A *block* is the m consecutive layers of one shared group (``group_size`` m), or one layer when nothing is
  shared. Blocks are fitted in layer order.
- All Grams of a block are collected in one pass through the block's still-dense layers, on the hidden states
  that the compressed prefix (every layer before the block, compressed where it was selected) produces. So a
  shared basis is fitted on its whole group at once, every layer of the group seeing the compressed prefix
  before the group; inside a block the inputs are the dense block's (o_proj sees dense q/k/v outputs).
- The block's units are then fitted and swapped in, and the hidden states advance through the compressed block.

Resume: units an interrupted run finished are swapped in instead of refitted, and the hidden states are
recomputed through them (a deterministic forward), so the remaining units see the same Grams and get
bit-identical factors. The Gram cache is not used: sequential Grams depend on the compression itself.

The loop itself, :func:`fit_blocks`, also runs streaming compression (:mod:`cospadi_jax.streaming`), where the
hidden states advance through the dense layers instead (``compressed_inputs=False``) unless the sequential rule
is asked for there too.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from .calib.grams import Grams, advance_layer
from .methods.base import clear_whitening_cache
from .models.paths import parse_projection_path
from .sources import LayerSource


def blocks(units: list[list[str]]) -> list[list[int]]:
    """Layer blocks in order: a unit's layers are one block's (or within one); disjoint, sorted.

    units: projection paths per fitting unit (compress.work_units)."""
    layer_sets = [sorted({parse_projection_path(p)[0] for p in unit}) for unit in units]
    out: list[list[int]] = []
    for layers in sorted(layer_sets, key=lambda ls: (-len(ls), ls)):  # groups first, then single layers
        if not any(set(layers) & set(b) for b in out):
            out.append(layers)
        elif not any(set(layers) <= set(b) for b in out):
            raise ValueError(f"fitting units straddle blocks of layers ({layers}); sequential calibration needs "
                             "every shared group to be whole consecutive layers")
    return sorted(out)


def fit_blocks(source: LayerSource, windows: np.ndarray, units: list[list[str]],
               fit_block: Callable[[list[int], Grams, dict[int, Any]], None], *, done: set[int] | dict,
               batch_size: int, compressed_inputs: bool, swap_in: Callable[[int, dict[int, Any]], None] | None = None,
               progress: bool = True, desc: str = "sequential calibration",
               on_layer: Callable[[int, dict[str, float]], None] | None = None) -> None:
    """The layer loop of sequential calibration and of streaming compression: block by block, in layer order.

    source: where the layers come from, one at a time (:mod:`cospadi_jax.sources`). windows: [n, T] int32
    calibration token ids, embedded ``batch_size`` at a time. For each block (:func:`blocks`) the Grams of its
    layers are collected on the hidden states entering it, and ``fit_block(indices, grams, layers)`` fits the
    block's units not in ``done`` (``layers``: the block's layer objects by index). With ``compressed_inputs`` (the
    sequential rule) the Grams come from a pass through the block's dense layers that leaves the hidden states as
    they were; ``swap_in(index, layers)`` then puts every unit of the block (fitted or ``done``) into them, and the
    hidden states advance through the compressed block. Otherwise one pass collects the Grams and advances through
    the dense block (the plain rule, on one layer at a time). ``on_layer(index, seconds)`` follows each layer.
    """
    windows = np.asarray(windows, np.int32)
    layer_blocks = blocks(units)
    unit_block = {}
    for i, unit in enumerate(units):
        first = min(parse_projection_path(p)[0] for p in unit)
        unit_block[i] = next(b for b, layers in enumerate(layer_blocks) if first in layers)
    hidden = [source.embed(windows[s : s + batch_size]) for s in range(0, len(windows), batch_size)]
    next_layer = 0
    bar = tqdm(layer_blocks, desc=desc, unit="block", disable=not progress)
    for b, block in enumerate(bar):
        for index in range(next_layer, block[0]):  # layers left dense between blocks
            t0 = time.perf_counter()
            advance_layer(source.layer(index), index, hidden, collect=False)
            if on_layer is not None:
                on_layer(index, {"calibration_s": time.perf_counter() - t0, "seconds": time.perf_counter() - t0})
        t0 = time.perf_counter()
        members = [i for i in range(len(units)) if unit_block[i] == b]
        todo = [i for i in members if i not in done]
        layers = {index: source.layer(index) for index in block}
        grams = Grams(n_tokens=int(windows.size))
        if compressed_inputs:
            if todo:  # a new list, so ``hidden`` keeps the block's inputs (a one-layer block needs no outputs)
                scratch = list(hidden)
                for index in block:
                    grams.add(advance_layer(layers[index], index, scratch, advance=index != block[-1]))
                del scratch
        else:
            for index in block:
                grams.add(advance_layer(layers[index], index, hidden, collect=bool(todo)))
        t_calib = time.perf_counter() - t0
        if todo:
            fit_block(todo, grams, layers)
        del grams
        if compressed_inputs:
            for i in members:
                swap_in(i, layers)
            for index in block:  # through the compressed block: the next block's inputs
                advance_layer(layers[index], index, hidden, collect=False)
        del layers
        clear_whitening_cache()  # this block's Grams never come back: free their factors before the next
        if on_layer is not None:
            on_layer(block[-1], {"calibration_s": t_calib, "seconds": time.perf_counter() - t0})
        next_layer = block[-1] + 1


def check_sequential(grams: Any, processes: int) -> None:
    """Refuse what sequential calibration cannot do, before any work."""
    if grams is not None:
        raise ValueError("calib.sequential=true collects each layer's Grams on the compressed prefix, so "
                         "precomputed grams would be silently wrong: pass a tokenizer (or windows=) instead of "
                         "grams=, or set sequential=False")
    if processes > 1:
        raise ValueError("calib.sequential=true runs on one process (each block waits for the one before it); "
                         "use method.parallel=matrices within one process, or sequential=false across processes")
