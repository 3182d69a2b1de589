"""Loading a factored export (``save_pretrained(..., format="factored")``) back without recompressing: the
manifest and the weights are checked against the HF config, each compressed projection is decoded
(:mod:`cospadi_jax.export_format`) and rebuilt as the same module. ``cospadi_jax.load_model`` calls it for such a
directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from .export_format import FACTORED, MANIFEST, VERSION, WEIGHTS, decode_factors, expected_shapes
from .layers import replace_projection
from .models.convert import CheckpointMismatchError, assign_tensors, nnx_to_hf
from .models.paths import get_module, parse_projection_path
from .models.transformer import CausalLM

__all__ = ["is_factored_export", "load_factored"]


# -------------------------------------------------------------------------------------------- loading


def is_factored_export(directory: str | Path) -> bool:
    """Whether ``directory`` holds a factored export (its manifest says so)."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FACTORED
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointMismatchError(f"{manifest} is not a valid export manifest ({exc}); export the model again"
                                      ) from exc


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointMismatchError(f"{directory / MANIFEST} is not valid JSON ({exc}); export the model again"
                                      ) from exc
    if manifest.get("version") != VERSION:
        raise CheckpointMismatchError(f"{directory}: export format version {manifest.get('version')!r} is not "
                                      f"{VERSION}, the one this cospadi-jax reads; export it again with this version")
    return manifest


def _open_weights(file: Path) -> Any:
    from safetensors import safe_open

    if not file.is_file():
        raise CheckpointMismatchError(f"{file} is missing; the export is incomplete: export the model again")
    try:
        return safe_open(str(file), framework="numpy")
    except Exception as exc:  # safetensors raises its own SafetensorError for a truncated or corrupt header
        raise CheckpointMismatchError(
            f"{file} is not a readable safetensors file ({file.stat().st_size:,} bytes; {exc}). It is probably "
            "truncated or corrupt: copy or export it again.") from exc


def _factor_tensors(weights: Any, path: str, entry: dict[str, Any], available: set[str], source: str
                    ) -> dict[str, np.ndarray]:
    """The tensors of one layout entry, each checked for presence, shape and dtype."""
    out = {}
    for role, (shape, dtype) in expected_shapes(entry).items():
        name = entry["tensors"].get(role)
        if name is None or name not in available:
            raise CheckpointMismatchError(
                f"{source}: tensor {name or role!r} of {path} ({role}) is missing from {WEIGHTS}; the export is "
                "incomplete or was edited: export the model again.")
        array = weights.get_tensor(name)
        if array.shape != shape or array.dtype != dtype:
            raise CheckpointMismatchError(
                f"{source}: tensor {name!r} has shape {array.shape} and dtype {array.dtype}, but config.json and "
                f"{MANIFEST} imply {shape} {dtype} for the {role} of {path}; the weights and the config disagree "
                "(edited, or from another model): export the model again.")
        out[role] = array
    return out


def load_factored(directory: str | Path, dtype: Any = jnp.float32) -> tuple[CausalLM, Any]:
    """Load a factored export (``save_pretrained(..., format="factored")``) without recompressing: the HF config
    builds the model, uncompressed tensors fill it through the key table (every shape checked, missing and extra
    tensors refused), and each compressed projection is rebuilt from its stored factors by ``replace_projection``
    (same modules, same mode). Returns (model, tokenizer or None)."""
    from transformers import AutoConfig

    from .models.loading import TOKENIZER_FILES, _abstract_model, _load_tokenizer, resolve_dtype

    directory = Path(directory)
    source = str(directory)
    manifest = _read_manifest(directory)
    dtype = resolve_dtype(dtype)
    abstract = _abstract_model(AutoConfig.from_pretrained(source, trust_remote_code=False), dtype)
    layout = manifest["projections"]
    factors = {}
    with _open_weights(directory / manifest.get("weights", WEIGHTS)) as weights:
        available = set(weights.keys())
        for path, entry in layout.items():
            try:
                parse_projection_path(path)
                d_in, d_out = get_module(abstract, path).kernel.get_value().shape
            except (ValueError, AttributeError, IndexError) as exc:
                raise CheckpointMismatchError(f"{source}: {MANIFEST} lists {path!r}, which the model of config.json "
                                              f"does not have ({exc}); export the model again") from exc
            if (entry["d_in"], entry["d_out"]) != (d_in, d_out):
                raise CheckpointMismatchError(
                    f"{source}: {MANIFEST} gives {path} the shape {(entry['d_in'], entry['d_out'])}, but config.json "
                    f"implies W [d_in, d_out] = {(d_in, d_out)}; the config and the weights disagree.")
            try:
                factors[path] = decode_factors(path, entry, _factor_tensors(weights, path, entry, available, source))
            except ValueError as exc:
                if isinstance(exc, CheckpointMismatchError):
                    raise
                raise CheckpointMismatchError(f"{source}: the factors of {path} are inconsistent ({exc}); export "
                                              "the model again") from exc
        factor_names = {n for entry in layout.values() for n in entry["tensors"].values()}
        doubled = sorted({nnx_to_hf(f"{p}.kernel") for p in layout} & available)
        if doubled:
            raise CheckpointMismatchError(f"{source}: {doubled[0]!r} is stored both dense and factored; export the "
                                          "model again")

        def tensors():
            for name in sorted(available - factor_names):
                yield name, weights.get_tensor(name)
            for path, entry in layout.items():  # placeholders, replaced by the factored modules below
                yield nnx_to_hf(f"{path}.kernel"), np.broadcast_to(np.zeros((), np.float32), (entry["d_out"], entry["d_in"]))

        model = assign_tensors(abstract, tensors(), dtype=dtype, tied_embeddings=abstract.config.tie_word_embeddings,
                               source=source)
    for path, f in factors.items():
        replace_projection(model, path, f, mode=layout[path].get("mode", "dense"))
    tokenizer = _load_tokenizer(directory) if any((directory / n).exists() for n in TOKENIZER_FILES) else None
    return model, tokenizer
