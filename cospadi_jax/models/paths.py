"""Address projections by their HF path (``model.layers.3.mlp.up_proj``) and read their weights."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

PROJECTION_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# Projections that read the same input share one calibration Gram, keyed by the first of them.
GRAM_SOURCE = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
               "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}


def projection_path(layer: int, proj_type: str) -> str:
    if proj_type not in PROJECTION_TYPES:
        raise ValueError(f"unknown projection type {proj_type!r}; use one of {PROJECTION_TYPES}")
    return f"model.layers.{layer}.{_PARENT[proj_type]}.{proj_type}"


def parse_projection_path(path: str) -> tuple[int, str]:
    """'model.layers.3.mlp.up_proj' -> (3, 'up_proj'); raises on anything else."""
    parts = path.split(".")
    if (len(parts) != 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit()
            or parts[4] not in PROJECTION_TYPES or parts[3] != _PARENT[parts[4]]):
        raise ValueError(f"not a projection path: {path!r}; expected e.g. 'model.layers.3.mlp.up_proj'")
    return int(parts[2]), parts[4]


def get_module(model: nnx.Module, path: str) -> Any:
    """Follow a dotted HF path through the NNX module tree."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part, None)
        if node is None:
            raise ValueError(f"{path!r} does not exist in this model")
    return node


def projection_module_path(root: nnx.Module, path: str) -> str:
    """Projection ``path`` relative to ``root``: the whole model (the path itself, its layer index checked), or
    the decoder layer the path names (a standalone layer, as a :class:`~cospadi_jax.sources.LayerSource` yields:
    ``"model.layers.3.mlp.up_proj"`` -> ``"mlp.up_proj"``)."""
    layer, _ = parse_projection_path(path)
    if not hasattr(root, "model"):
        return path.split(".", 3)[3]
    if layer >= root.config.num_hidden_layers:
        raise ValueError(f"layer index {layer} out of range: the model has {root.config.num_hidden_layers} layers")
    return path


def projection_weight(root: nnx.Module, path: str) -> np.ndarray:
    """W of one projection in the paper's orientation: [d_in, d_out] float32 numpy (= HF weight.T); ``root`` is
    the model or the projection's decoder layer (:func:`projection_module_path`)."""
    return np.asarray(jax.device_get(get_module(root, projection_module_path(root, path)).kernel[...]),
                      dtype=np.float32)
