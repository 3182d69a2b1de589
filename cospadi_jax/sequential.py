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
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from .calib.grams import Grams, advance_layer, embed_batches
from .methods.base import Factors
from .models.paths import parse_projection_path
from .models.transformer import CausalLM

UnitResult = tuple[list[Factors], list[dict]]


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


def fit_sequential(target: CausalLM, windows: np.ndarray, units: list[list[str]],
                   fit_many: Callable[[list[int], Grams], dict[int, UnitResult]],
                   swap_in: Callable[[int, UnitResult], None], done: dict[int, UnitResult], *,
                   batch_size: int, progress: bool = True) -> dict[int, UnitResult]:
    """Fit every unit block by block on the compressed prefix's Grams; returns every unit's (factors, rows).

    target: the model being compressed, dense where not yet compressed; it is compressed in place as blocks
    finish. windows: [n, T] int32 calibration token ids. ``fit_many(indices, grams)`` fits the listed units on
    ``grams``; ``swap_in(index, result)`` puts a unit's factors into ``target``; ``done``: units finished by an
    earlier attempt (swapped in, not refitted).
    """
    windows = np.asarray(windows, np.int32)
    unit_block = {}
    layer_blocks = blocks(units)
    for i, unit in enumerate(units):
        first = min(parse_projection_path(p)[0] for p in unit)
        unit_block[i] = next(b for b, layers in enumerate(layer_blocks) if first in layers)
    results = dict(done)
    hidden = embed_batches(target, windows, batch_size)
    next_layer = 0
    bar = tqdm(layer_blocks, desc="sequential calibration", unit="block", disable=not progress)
    for b, layers in enumerate(bar):
        for index in range(next_layer, layers[0]):  # layers left dense between blocks
            advance_layer(target.model.layers[index], index, hidden, collect=False)
        members = [i for i in range(len(units)) if unit_block[i] == b]
        todo = [i for i in members if i not in results]
        if todo:
            # The block's dense pass, for its Grams only: a new list, so ``hidden`` keeps the block's inputs
            # (a one-layer block needs no outputs at all).
            scratch = list(hidden)
            grams = Grams(n_tokens=int(windows.size))
            for index in layers:
                grams.add(advance_layer(target.model.layers[index], index, scratch, advance=index != layers[-1]))
            del scratch
            results.update(fit_many(todo, grams))
        for i in members:
            swap_in(i, results[i])
        for index in layers:  # through the compressed block: the next block's inputs
            advance_layer(target.model.layers[index], index, hidden, collect=False)
        next_layer = layers[-1] + 1
    return results


def check_sequential(grams: Any, processes: int) -> None:
    """Refuse what sequential calibration cannot do, before any work."""
    if grams is not None:
        raise ValueError("calib.sequential=true collects each layer's Grams on the compressed prefix, so "
                         "precomputed grams would be silently wrong: pass a tokenizer (or windows=) instead of "
                         "grams=, or set sequential=False")
    if processes > 1:
        raise ValueError("calib.sequential=true runs on one process (each block waits for the one before it); "
                         "use method.parallel=matrices within one process, or sequential=false across processes")
