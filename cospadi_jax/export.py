"""Export a compressed model, and load a factored export back: ``save_pretrained(model, path, format=...)``.

``format="factored"`` stores the factors at the sizes the budget counts (:mod:`cospadi_jax.budget`), in one
``model.safetensors`` (never a pickle) beside ``config.json`` (the HF config), ``cospadi.json`` (the manifest:
the record of the compression, the layout of every compressed projection, accounted and written bytes) and the
tokenizer if given. ``cospadi_jax.load_model(path)`` recognises the directory and rebuilds the same
``DictLinear`` / ``LowRankLinear`` modules bit-exactly, without recompressing.

Tensors, for a projection at HF path ``P`` with W [d_in, d_out] = HF ``weight.T`` (the paper's orientation):

- CoSpaDi, W ≈ D·S: ``P.D`` bf16 [d_in, k], once per group when a dictionary is shared (grouped CoSpaDi; found
  by equal content); the support, ``P.mask`` uint8 [d_out, ⌈k/8⌉] = ``np.packbits(bits, axis=1,
  bitorder="little")`` with bits[j, t] = 1 iff column j uses atom t (Eq. 10's bitmask), or ``P.indices`` int16
  [d_out, s] (``accounting="coo16"``); the values of column j in increasing atom order, left-aligned and padded with
  0: ``P.values`` bf16 [d_out, s], ``P.values_14bit`` uint8 [14·⌈s·d_out/8⌉] (Eq. 11's 14-bit values: bf16 with
  its two lowest mantissa bits dropped, 8 codes of 14 bits packed little-endian into 14 bytes, row-major over
  [d_out, s]), or ``P.values_int8`` int8 [d_out, s] with ``P.scales`` float32 [d_out] (value = q · scale);
- low rank, W ≈ A·B: ``P.A`` bf16 [d_in, r] (once per group when shared, Basis Sharing), ``P.B`` bf16 [r, d_out];
- everything else (embeddings, norms, biases, untouched projections) under its HF name in HF layout, bf16.

Which encoding: the support follows ``accounting`` (bitmask for eq10/eq11, int16 for coo16); the values follow
``quantization`` when it is set (bf16-14bit values are stored at the accounting's width, int8 as int8 + scales),
otherwise the accounting (14-bit for eq11, bf16 for eq10/coo16). **When the accounting counts fewer bits than
memory holds** (eq11 with ``quantization=null``: 14-bit accounting, float32 in memory) **the export follows the
accounting and warns that it rounds**; the loaded model computes with the rounded values. Both come from the
compression's metadata (``metadata=``); without it, compress()'s defaults (eq11, no quantisation) apply.

Bytes written per compressed matrix (D or A counted once per shared group):
  D 2·d_in·k + support (bitmask d_out·⌈k/8⌉ | int16 2·s·d_out) + values (bf16 2·s·d_out | 14-bit 14·⌈s·d_out/8⌉
  | int8 s·d_out + 4·d_out);  low rank 2·d_in·r + 2·r·d_out.
This equals the budget's ``total_bytes`` exactly when k is a multiple of 8 and s·d_out of 8 (the rows of the
bitmask and the 14-bit groups are byte-padded), for eq10, eq11 (ρ = 2) and coo16; int8 (no accounting of its
own) and eq11 at ρ ≠ 2 (no (16−ρ)-bit format exists; 14-bit values are written) differ, and the manifest records
accounted and written bytes side by side. The file adds the uncompressed tensors and the safetensors header.

``format="hf-dense"`` writes a plain transformers checkpoint: the reconstructed W̃ = D·S (or A·B) of every
compressed projection as a dense ``weight`` [d_out, d_in] in the model's dtype, the other tensors unchanged, the
HF ``config.json`` and the tokenizer, for ``AutoModelForCausalLM``, ``lm_eval --model hf`` or vLLM. **It saves
no memory**: the file is as large as the uncompressed model in that dtype.

Either way the directory is written into a temporary sibling and renamed into place (:mod:`cospadi_jax.fileio`):
it holds the old contents or the complete export, never a half-written one; a non-empty directory is replaced
only with ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from .budget import budget
from .export_format import (BF16, FACTORED, FORMATS, MANIFEST, VERSION, WEIGHTS, encode_dict_factors, encodings,
                            pack_14bit, unpack_14bit)
from .export_load import is_factored_export, load_factored
from .fileio import atomic_directory
from .layers import DictLinear, LowRankLinear
from .methods.base import DictFactors, Factors, LowRankFactors
from .models.convert import model_state_dict, nnx_to_hf
from .models.paths import PROJECTION_TYPES, get_module, projection_path
from .models.transformer import CausalLM, Linear

__all__ = ["FORMATS", "MANIFEST", "export_record", "is_factored_export", "load_factored", "pack_14bit",
           "save_pretrained", "unpack_14bit"]

log = logging.getLogger(__name__)

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_RECORD_KEYS = ("method", "ratio", "rho", "accounting", "quantization", "group_size", "mode")


# --------------------------------------------------------------------------------------- reading a model


def module_factors(module: nnx.Module) -> Factors | None:
    """The factors a projection module computes with (float32 numpy), or None for a dense ``Linear``. The one
    place that reads the factored modules' parameters."""
    if isinstance(module, DictLinear):
        # support(): the atom ids of whichever layout the mode holds (int32 ids, int16 ids or a bitmask)
        return DictFactors(np.asarray(module.D[...], np.float32), np.asarray(module.support(), np.int32),
                           np.asarray(module.values[...], np.float32))
    if isinstance(module, LowRankLinear):
        return LowRankFactors(np.asarray(module.A[...], np.float32), np.asarray(module.B[...], np.float32))
    if isinstance(module, Linear):
        return None
    raise TypeError(f"cannot export a projection module of type {type(module).__name__}")


def compressed_projections(model: CausalLM) -> dict[str, tuple[Factors, str]]:
    """Every compressed projection of the model: HF path -> (factors, DictLinear mode or "dense")."""
    out = {}
    for layer in range(model.config.num_hidden_layers):
        for proj in PROJECTION_TYPES:
            path = projection_path(layer, proj)
            module = get_module(model, path)
            factors = module_factors(module)
            if factors is not None:
                out[path] = (factors, getattr(module, "mode", "dense"))
    return out


def _factor_leaves(model: CausalLM, paths: list[str]) -> set[str]:
    """Dotted parameter paths of the compressed projections' factors (their biases stay HF tensors)."""
    leaves = set()
    for path in paths:
        for leaf, _ in nnx.to_flat_state(nnx.state(get_module(model, path))):
            name = ".".join(str(p) for p in leaf)
            if name != "bias":
                leaves.add(f"{path}.{name}")
    return leaves


# ------------------------------------------------------------------------------------------- the record


def export_record(metadata: Any) -> dict[str, Any]:
    """The compression record an export stores, from any of: an artifact's ``metadata.json`` (optionally with
    ``realised_ratio`` and ``calibration_key`` from its report), a :class:`~cospadi_jax.compress.CompressionReport`
    (or its ``to_dict()``), or an earlier export's ``cospadi.json``; ``{}`` for None.

    Keys: method, ratio, rho, accounting, quantization, group_size, mode, realised_ratio, git_sha,
    calibration_key, model (those the source has), and unit_ratios ({first path: ratio} of a non-uniform
    budget)."""
    if metadata is None:
        return {}
    if hasattr(metadata, "to_dict"):
        metadata = metadata.to_dict()
    if metadata.get("format") in (FACTORED, "hf-dense"):
        return dict(metadata.get("record", {}))
    config = metadata.get("config") or {}
    method = config.get("method")
    # A Hydra artifact nests the method's config (config.method); a CompressionReport's config is that config
    # itself (older reports named the method "method", not "name").
    settings = dict(method) if isinstance(method, dict) else dict(config)
    settings["method"] = settings.get("name", settings.get("method"))
    record = {k: settings[k] for k in _RECORD_KEYS if k in settings}
    calibration_key = metadata.get("calibration_key", (metadata.get("calibration") or {}).get("key"))
    allocation = metadata.get("allocation")
    if allocation:  # a non-uniform budget: each unit's ratio, by its first path
        record["unit_ratios"] = dict(zip(allocation["paths"], allocation["ratios"]))
    for key, value in (("realised_ratio", metadata.get("realised_ratio")), ("git_sha", metadata.get("git_sha")),
                       ("calibration_key", calibration_key), ("model", metadata.get("model"))):
        if value is not None:
            record[key] = value
    return record


def _accounted_bytes(layout: dict[str, dict], units: list[list[str]], record: dict[str, Any]) -> float | None:
    """Σ budget(...).total_bytes over the fitting units (a shared group counted once), or None when the record
    lacks the ratio. Raises when the budget's sizes are not the model's: the metadata is of another run."""
    if "ratio" not in record:
        return None
    total = 0.0
    for unit in units:
        entry = layout[unit[0]]
        kind = "cospadi" if entry["kind"] == "dict" else "low_rank"
        ratio = record.get("unit_ratios", {}).get(unit[0], record["ratio"])
        b = budget(entry["d_in"], entry["d_out"], ratio, kind=kind, rho=record.get("rho", 2.0),
                   accounting=record.get("accounting", "eq11"), group_size=len(unit))
        sizes = (b.n_atoms, b.sparsity) if kind == "cospadi" else (b.rank,)
        ours = (entry["k"], entry["s"]) if kind == "cospadi" else (entry["rank"],)
        if sizes != ours:
            raise ValueError(
                f"the metadata (ratio {ratio}, rho {record.get('rho')}, accounting "
                f"{record.get('accounting')}, group of {len(unit)}) gives {sizes} for {unit[0]}, but the model has "
                f"{ours}: the metadata belongs to another compression. Pass the metadata of the run that produced "
                "this model (or none).")
        total += b.total_bytes
    return total


# -------------------------------------------------------------------------------------------- writing


def _hf_config(model: CausalLM, dtype: np.dtype) -> dict[str, Any]:
    text = model.config.hf_config_json
    if text is None:
        raise ValueError("this model carries no Hugging Face config (DecoderConfig.hf_config_json is None), so "
                         "config.json cannot be written; load the model with cospadi_jax.load_model, which sets it.")
    config = json.loads(text)
    config["architectures"] = config.get("architectures") or [_ARCHITECTURES[config["model_type"]]]
    config["dtype"] = str(dtype)
    return config


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> dict[str, int]:
    """Write the tensors; returns their data bytes and the header bytes (8-byte length + JSON)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    data = sum(int(v.nbytes) for v in tensors.values())
    size = path.stat().st_size
    return {"tensor_data": data, "header": size - data, "file": size}


def _add_shared(tensors: dict[str, np.ndarray], seen: dict[tuple, str], name: str, array: np.ndarray) -> str:
    """Store ``array`` under ``name`` unless an equal array is stored already; returns the name that holds it
    (how a dictionary or basis shared by a group is written once)."""
    key = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
    if key not in seen:
        seen[key] = name
        tensors[name] = array
    return seen[key]


def _factored_tensors(projections: dict[str, tuple[Factors, str]], record: dict[str, Any]
                      ) -> tuple[dict[str, np.ndarray], dict[str, dict], list[list[str]], list[str]]:
    """Tensors of every compressed projection, its layout entry, the fitting units (paths sharing a D or A) and
    the paths whose coefficient values the export rounded."""
    values_enc, support_enc = encodings(record.get("accounting", "eq11"), record.get("quantization"))
    tensors: dict[str, np.ndarray] = {}
    seen: dict[tuple, str] = {}
    layout, units_by_basis, rounded = {}, {}, []
    for path, (f, mode) in projections.items():
        d_in, d_out = f.shape
        if isinstance(f, DictFactors):
            parts, _, exact = encode_dict_factors(f, values_enc, support_enc)
            if not exact:
                rounded.append(path)
            names = {"D": _add_shared(tensors, seen, f"{path}.D", parts.pop("D"))}
            for suffix, array in parts.items():
                names[suffix] = f"{path}.{suffix}"
                tensors[names[suffix]] = array
            entry = {"kind": "dict", "k": f.k, "s": f.s, "values": values_enc, "support": support_enc,
                     "mode": mode}
            basis = names["D"]
        else:
            names = {"A": _add_shared(tensors, seen, f"{path}.A", np.asarray(f.A, np.float32).astype(BF16)),
                     "B": f"{path}.B"}
            tensors[names["B"]] = np.asarray(f.B, np.float32).astype(BF16)
            entry = {"kind": "low_rank", "rank": int(f.A.shape[1])}
            basis = names["A"]
        layout[path] = {**entry, "d_in": d_in, "d_out": d_out, "tensors": names}
        units_by_basis.setdefault(basis, []).append(path)
    return tensors, layout, list(units_by_basis.values()), rounded


def _warn_rounding(rounded: list[str], record: dict[str, Any]) -> None:
    values_enc, _ = encodings(record.get("accounting", "eq11"), record.get("quantization"))
    if rounded:
        log.warning("the coefficient values of %d compressed matrices (e.g. %s) are not on the %s grid that "
                    "accounting=%s / quantization=%s stores: the export rounds them as the accounting counts them, "
                    "and the loaded model computes with the rounded values. Compress with quantization=bf16-14bit "
                    "(eq11) to export exactly what was evaluated.", len(rounded), rounded[0], values_enc,
                    record.get("accounting", "eq11"), record.get("quantization"))
    rho = record.get("rho", 2.0)
    if record.get("accounting", "eq11") == "eq11" and values_enc == "bf16-14bit" and rho != 2.0:
        log.warning("accounting eq11 at rho=%s counts (16 - rho)-bit values, a width no format has; the export "
                    "writes 14-bit values (Eq. 11 at rho = 2), so the file differs from the accounted bytes (both "
                    "are in cospadi.json)", rho)


def _write_factored(model: CausalLM, directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    projections = compressed_projections(model)
    tensors, layout, units, rounded = _factored_tensors(projections, record)
    _warn_rounding(rounded, record)
    log.info("dictionaries, low-rank factors and uncompressed tensors are stored in bf16 (the budget's 16-bit "
             "dense reference)")
    compressed_bytes = sum(int(v.nbytes) for v in tensors.values())
    dense = model_state_dict(model, dtype=BF16, skip=_factor_leaves(model, list(projections)))
    overlap = set(dense) & set(tensors)
    if overlap:  # cannot happen with key-table names; a guard against a future rename colliding
        raise RuntimeError(f"tensor names collide: {sorted(overlap)[:3]}")
    sizes = _save_safetensors({**tensors, **dense}, directory / WEIGHTS)
    dense_bytes = sum(2 * e["d_in"] * e["d_out"] for e in layout.values())
    accounted = _accounted_bytes(layout, units, record)
    manifest = {
        "format": FACTORED, "version": VERSION, "weights": WEIGHTS, "record": record,
        "bytes": {"compressed_tensors": compressed_bytes, "accounted": accounted,
                  "uncompressed_tensors": sizes["tensor_data"] - compressed_bytes, "header": sizes["header"],
                  "file": sizes["file"], "dense_bf16_of_compressed": dense_bytes,
                  "realised_ratio_file": 1 - compressed_bytes / dense_bytes if dense_bytes else 0.0},
        "groups": [u for u in units if len(u) > 1], "projections": layout,
    }
    _write_json(directory / MANIFEST, manifest)
    _write_json(directory / "config.json", _hf_config(model, BF16))
    log.info("factored export: %d compressed projections, %s compressed bytes (accounted %s), file %s bytes",
             len(layout), f"{compressed_bytes:,}", "n/a" if accounted is None else f"{accounted:,.0f}",
             f"{sizes['file']:,}")
    return manifest


def _write_hf_dense(model: CausalLM, directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    projections = compressed_projections(model)
    dtype = np.dtype(model.dtype)
    tensors = model_state_dict(model, dtype=dtype, skip=_factor_leaves(model, list(projections)))
    for path, (f, _) in projections.items():
        tensors[nnx_to_hf(f"{path}.kernel")] = f.dense().T.astype(dtype)  # W̃ [d_in, d_out] -> HF [out, in]
    sizes = _save_safetensors(tensors, directory / WEIGHTS)
    manifest = {"format": "hf-dense", "version": VERSION, "weights": WEIGHTS, "record": record,
                "bytes": {"file": sizes["file"]}, "reconstructed": sorted(projections)}
    _write_json(directory / MANIFEST, manifest)
    _write_json(directory / "config.json", _hf_config(model, dtype))
    return manifest


def save_pretrained(model: CausalLM, path: str | Path, format: str = "factored", *, tokenizer: Any = None,
                    overwrite: bool = False, metadata: Any = None) -> dict[str, Any]:
    """Export a (compressed) model to the directory ``path``; returns the manifest written to ``cospadi.json``.

    format: ``"factored"`` (the factors at their accounted sizes, loadable by ``cospadi_jax.load_model``) or
    ``"hf-dense"`` (dense reconstructed weights for transformers / lm-eval / vLLM; saves no memory).
    tokenizer: saved beside the weights (``tokenizer.save_pretrained``) when given.
    overwrite: replace a non-empty ``path``; without it such a directory is refused before any work.
    metadata: what the model was compressed with, for the record and the storage rule (see
    :func:`export_record`): the artifact's metadata, a ``CompressionReport``, or an earlier export's manifest.
    The directory is written into a temporary sibling and renamed into place, so a failure leaves nothing.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be a cospadi_jax CausalLM (from cospadi_jax.load_model), got "
                        f"{type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {FORMATS}")
    record = export_record(metadata)
    if format == "hf-dense" and tokenizer is None:
        log.warning("hf-dense export without a tokenizer: transformers, lm_eval and vLLM need one in the directory")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        writer = _write_factored if format == "factored" else _write_hf_dense
        manifest = writer(model, tmp, record)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return manifest
