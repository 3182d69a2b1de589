"""The one declarative table from Hugging Face tensor names to our NNX parameter paths.

Every checkpoint format (safetensors directory, hub snapshot, GGUF) ends up as a stream of
``(hf_name, array)`` pairs that :func:`assign_tensors` writes into an abstract model, tensor by tensor:
each shape is checked, and missing or leftover keys are errors.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointMismatchError(ValueError):
    """Checkpoint tensors do not match the model built from its config (shape, missing or extra keys)."""


@dataclass(frozen=True)
class KeyRule:
    """Module paths are identical in HF and in our model; only the leaf name (and layout) may differ."""

    module: str  # full-match regex on the module path, e.g. model.layers.3.mlp.up_proj
    hf_leaf: str  # HF tensor leaf: weight | bias
    nnx_leaf: str  # our parameter leaf: kernel | bias | weight | embedding
    transpose: bool = False  # HF Linear weight [out, in] -> our kernel [in, out]


_PROJ = r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule(r"model\.embed_tokens", "weight", "embedding"),
    KeyRule(_PROJ, "weight", "kernel", transpose=True),
    KeyRule(_PROJ, "bias", "bias"),
    KeyRule(r"model\.layers\.\d+\.self_attn\.[qk]_norm", "weight", "weight"),
    KeyRule(r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)", "weight", "weight"),
    KeyRule(r"model\.norm", "weight", "weight"),
    KeyRule(r"lm_head", "weight", "kernel", transpose=True),
)
# Buffers some checkpoints carry that are recomputed from the config.
IGNORED_HF_KEYS = (re.compile(r".*\.rotary_emb\.inv_freq"),)


def hf_to_nnx(hf_name: str) -> tuple[str, bool] | None:
    """Map one HF tensor name to (our dotted parameter path, transpose?), or None if no rule matches."""
    module, _, leaf = hf_name.rpartition(".")
    for rule in KEY_TABLE:
        if leaf == rule.hf_leaf and re.fullmatch(rule.module, module):
            return f"{module}.{rule.nnx_leaf}", rule.transpose
    return None


def nnx_to_hf(nnx_path: str) -> str:
    """Inverse of :func:`hf_to_nnx`: our dotted parameter path -> HF tensor name."""
    module, _, leaf = nnx_path.rpartition(".")
    for rule in KEY_TABLE:
        if leaf == rule.nnx_leaf and re.fullmatch(rule.module, module):
            return f"{module}.{rule.hf_leaf}"
    raise KeyError(f"no key-table rule covers the parameter path {nnx_path!r}")


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def expected_hf_names(abstract_model: nnx.Module) -> list[str]:
    """HF tensor names a checkpoint must provide for this model (in parameter order)."""
    _, state = nnx.split(abstract_model)
    return [nnx_to_hf(_dotted(path)) for path, _ in nnx.to_flat_state(state)]


def assign_tensors(
    abstract_model: nnx.Module,
    tensors: Iterable[tuple[str, Any]],
    *,
    dtype: Any,
    tied_embeddings: bool,
    source: str,
    prefix: str = "",
) -> nnx.Module:
    """Fill an abstract model (from ``nnx.eval_shape``) with checkpoint tensors, one at a time.

    tensors: iterable of (HF name, array-like in HF layout). Each tensor is converted to ``dtype`` as it
    arrives, so at most one source tensor and the converted model exist at once. ``prefix`` is the module's
    path in the full model when filling a submodule (``"model.layers.3."`` for one decoder layer). Raises
    ``CheckpointMismatchError`` naming the key on a shape mismatch, non-finite values, a missing key or a
    leftover key.
    """
    graphdef, state = nnx.split(abstract_model)
    flat = {prefix + _dotted(path): var for path, var in nnx.to_flat_state(state)}
    paths = {prefix + _dotted(path): path for path, _ in nnx.to_flat_state(state)}
    filled: dict[str, Any] = {}
    leftover: list[str] = []
    for hf_name, tensor in tensors:
        if any(p.fullmatch(hf_name) for p in IGNORED_HF_KEYS):
            continue
        mapped = hf_to_nnx(hf_name)
        if mapped is None or mapped[0] not in flat:
            # A tied checkpoint may still store lm_head.weight; it must equal the embedding, which we use.
            if hf_name == "lm_head.weight" and tied_embeddings:
                continue
            leftover.append(hf_name)
            continue
        path, transpose = mapped
        array = jnp.asarray(tensor)
        if transpose:
            array = array.T
        expected = flat[path].get_value().shape
        if tuple(array.shape) != tuple(expected):
            raise CheckpointMismatchError(
                f"{source}: tensor {hf_name!r} has shape {tuple(np.shape(tensor))}"
                f"{' (transposed ' + str(tuple(array.shape)) + ')' if transpose else ''} but the config implies "
                f"{tuple(expected)} for {path}; the config and the weights disagree (wrong config.json, or a "
                "checkpoint of another model)."
            )
        if not bool(jnp.isfinite(array).all()):
            # Caught here, naming the tensor, rather than blamed later on "a diverged compression".
            bad = int((~jnp.isfinite(array)).sum())
            raise CheckpointMismatchError(
                f"{source}: tensor {hf_name!r} holds {bad} NaN/inf value(s) of {array.size}; the checkpoint is "
                "corrupt or was saved after a diverged run. Re-download or re-export it.")
        filled[path] = flat[path].replace(array.astype(dtype))
        del array
    missing = [nnx_to_hf(p) for p in flat if p not in filled]
    if leftover or missing:
        raise CheckpointMismatchError(
            f"{source}: checkpoint does not match the model built from its config: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''} ({len(missing)} total), "
            f"unexpected keys {leftover[:8]}{'...' if len(leftover) > 8 else ''} ({len(leftover)} total)."
        )
    new_state = nnx.from_flat_state([(paths[p], filled[p]) for p in flat])
    return nnx.merge(graphdef, new_state)


def model_state_dict(model: nnx.Module, *, dtype: Any = np.float32,
                     skip: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Export our parameters under HF names in HF layout (numpy in ``dtype``, float32 by default; ml_dtypes'
    bfloat16 works too), e.g. to load into PyTorch. ``skip``: dotted parameter paths left out (the factors of a
    compressed projection, which no key-table rule names)."""
    _, state = nnx.split(model)
    out = {}
    for path, var in nnx.to_flat_state(state):
        dotted = _dotted(path)
        if dotted in skip:
            continue
        hf = nnx_to_hf(dotted)
        value = np.asarray(jax.device_get(var.get_value())).astype(dtype)
        out[hf] = value.T if hf_to_nnx(hf)[1] else value
    return out
