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

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from .budget import budget
from .fileio import atomic_directory
from .layers import DictLinear, LowRankLinear, quantize_coefficients, replace_projection
from .methods.base import DictFactors, Factors, LowRankFactors
from .models.convert import CheckpointMismatchError, assign_tensors, model_state_dict, nnx_to_hf
from .models.paths import PROJECTION_TYPES, get_module, parse_projection_path, projection_path
from .models.transformer import CausalLM, Linear

__all__ = ["FORMATS", "MANIFEST", "export_record", "is_factored_export", "load_factored", "pack_14bit",
           "save_pretrained", "unpack_14bit"]

log = logging.getLogger(__name__)

FORMATS = ("factored", "hf-dense")
MANIFEST = "cospadi.json"
WEIGHTS = "model.safetensors"
FACTORED = "cospadi-factored"  # the manifest's "format" of a factored export
VERSION = 1
_BF16 = np.dtype(ml_dtypes.bfloat16)
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_RECORD_KEYS = ("method", "ratio", "rho", "accounting", "quantization", "group_size", "mode")


# ------------------------------------------------------------------------------------------ 14-bit packing


def pack_14bit(values: np.ndarray) -> np.ndarray:
    """Values on Eq. 11's 14-bit grid (``quantize_coefficients(v, "bf16-14bit")``), any shape, float32 ->
    uint8 [14·⌈n/8⌉]. Code = bf16 bits >> 2 (1 sign, 8 exponent, 5 mantissa bits); code i occupies bits
    14i … 14i+13 of a little-endian bit stream, so 8 codes fill 14 bytes (n is zero-padded to a multiple of 8)."""
    values = np.asarray(values, np.float32).reshape(-1)
    bits = values.astype(_BF16).view(np.uint16)
    if np.any(bits & 3) or not np.array_equal(bits.view(_BF16).astype(np.float32), values, equal_nan=True):
        raise ValueError("pack_14bit needs values on the 14-bit grid; round them with "
                         "layers.quantize_coefficients(v, 'bf16-14bit') first")
    codes = np.pad(bits >> 2, (0, -bits.size % 8)).astype(np.uint64).reshape(-1, 4)
    # 4 codes = 56 bits = 7 bytes exactly, so two such words are the 14 bytes of 8 codes in stream order.
    words = codes[:, 0] | codes[:, 1] << 14 | codes[:, 2] << 28 | codes[:, 3] << 42
    return words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :7].reshape(-1)


def unpack_14bit(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_14bit`: uint8 [14·⌈n/8⌉] -> float32 [n]."""
    packed = np.asarray(packed, np.uint8)
    if packed.size != 14 * -(-n // 8):
        raise ValueError(f"{packed.size} bytes cannot hold {n} packed 14-bit values (need {14 * -(-n // 8)})")
    words = np.zeros((packed.size // 7, 8), np.uint8)
    words[:, :7] = packed.reshape(-1, 7)
    words = words.view("<u8")[:, 0]
    codes = (words[:, None] >> np.array([0, 14, 28, 42], np.uint64)) & np.uint64(0x3FFF)
    bits = (codes.reshape(-1)[:n].astype(np.uint16) << 2)
    return bits.view(_BF16).astype(np.float32)


# ------------------------------------------------------------------------------- coefficient encodings


def encodings(accounting: str, quantization: str | None) -> tuple[str, str]:
    """(values encoding, support encoding) of CoSpaDi coefficients: the rule in the module docstring."""
    support = "int16" if accounting == "coo16" else "bitmask"
    if quantization == "int8":
        return "int8", support
    return ("bf16-14bit" if accounting == "eq11" else "bf16"), support


def _merge_columns(k: int, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each column's slots in increasing atom order with repeats summed (float32): (atoms [d_out, s] int64,
    values [d_out, s] float32, used [d_out, s] bool), left-aligned. Padded slots (atom 0, value 0) merge into
    atom 0 and are dropped later as zeros, so S (and the function) is unchanged."""
    idx = np.asarray(indices, np.int64)
    val = np.asarray(values, np.float32)
    if idx.size and (idx.min() < 0 or idx.max() >= k):
        raise ValueError(f"coefficient indices outside [0, {k}) (the dictionary's atoms)")
    order = np.argsort(idx, axis=1, kind="stable")
    idx, val = np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)
    first = np.ones(idx.shape, bool)
    first[:, 1:] = idx[:, 1:] != idx[:, :-1]
    slot = np.cumsum(first, axis=1) - 1
    rows = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)
    merged = np.zeros(idx.shape, np.float32)
    np.add.at(merged, (rows, slot), val)
    atoms = np.zeros(idx.shape, np.int64)
    used = np.zeros(idx.shape, bool)
    atoms[rows[first], slot[first]] = idx[first]
    used[rows[first], slot[first]] = True
    return atoms, merged, used


def _compact(atoms: np.ndarray, values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kept slots moved left in order; the rest (atom 0, value 0)."""
    rows = np.broadcast_to(np.arange(atoms.shape[0])[:, None], atoms.shape)
    pos = np.cumsum(keep, axis=1) - 1
    out_atoms = np.zeros(atoms.shape, np.int64)
    out_values = np.zeros(values.shape, np.float32)
    out_atoms[rows[keep], pos[keep]] = atoms[keep]
    out_values[rows[keep], pos[keep]] = values[keep]
    return out_atoms, out_values


def _int8_scales(values: np.ndarray) -> np.ndarray:
    """One float32 scale per column (row of ``values`` [d_out, s]) with q = round(v / scale) in [-127, 127].

    ``quantize_coefficients(v, "int8")``'s scale max|v|/127 when the values are not on an int8 grid yet (the
    export then rounds them exactly as that function does). Values already on one (an int8-quantised model, or a
    loaded export) come back bit-exactly only with their own scale, which max|q·scale|/127 may miss by one ulp:
    of that candidate and its two neighbours, the first that reproduces every value of the column is taken, so
    exporting the same values twice writes the same bytes."""
    amax = np.abs(values).max(axis=1) if values.size else np.zeros(values.shape[0], np.float32)
    base = np.where(amax == 0, np.float32(1.0), amax / np.float32(127.0)).astype(np.float32)
    chosen, found = base.copy(), np.zeros(base.shape, bool)
    for candidate in (base, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(0))):
        exact = np.all(_int8_round(values, candidate) == values, axis=1)
        chosen = np.where(~found & exact, candidate, chosen)
        found |= exact
    return chosen


def _int8_round(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return (np.clip(np.round(values / scales[:, None]), -127, 127) * scales[:, None]).astype(np.float32)


def _round_values(values: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Values [d_out, s] float32 on the encoding's grid, and the int8 scales [d_out] (None otherwise)."""
    if encoding == "int8":
        scales = _int8_scales(values)
        return _int8_round(values, scales), scales
    if encoding == "bf16-14bit":
        return quantize_coefficients(values, "bf16-14bit"), None
    return values.astype(_BF16).astype(np.float32), None


def _encode_values(values: np.ndarray, encoding: str, scales: np.ndarray | None) -> dict[str, np.ndarray]:
    """Tensors (name suffix -> array) of values [d_out, s] already on the encoding's grid."""
    if encoding == "int8":
        q = np.round(values / scales[:, None]).astype(np.int8)
        return {"values_int8": q, "scales": scales.astype(np.float32)}
    if encoding == "bf16-14bit":
        return {"values_14bit": pack_14bit(values)}
    return {"values": values.astype(_BF16)}


def _encode_support(atoms: np.ndarray, keep: np.ndarray, k: int, encoding: str) -> dict[str, np.ndarray]:
    if encoding == "int16":
        if k > 2**15:
            raise ValueError(f"storage coo16 stores atom indices as int16, which cannot address k = {k} atoms; "
                             "export with accounting eq10 or eq11 (a bitmask)")
        return {"indices": atoms.astype(np.int16)}
    bits = np.zeros((atoms.shape[0], k), bool)
    rows = np.broadcast_to(np.arange(atoms.shape[0])[:, None], atoms.shape)
    bits[rows[keep], atoms[keep]] = True
    return {"mask": np.packbits(bits, axis=1, bitorder="little")}


def encode_dict_factors(f: DictFactors, values_encoding: str, support_encoding: str
                        ) -> tuple[dict[str, np.ndarray], DictFactors, bool]:
    """The tensors of one CoSpaDi matrix (suffix -> array; ``D`` in bf16), the factors they decode to
    (canonical: supports in increasing atom order, padding (0, 0) on the right), which is what a load returns,
    and whether the coefficient values were already on the encoding's grid (False: the export rounded them)."""
    atoms, merged, used = _merge_columns(f.k, f.indices, f.values)
    rounded, scales = _round_values(merged, values_encoding)
    exact = bool(np.array_equal(rounded, merged))
    keep = used & (rounded != 0)
    atoms, rounded = _compact(atoms, rounded, keep)
    keep = np.arange(atoms.shape[1])[None, :] < keep.sum(axis=1)[:, None]
    D = np.asarray(f.D, np.float32).astype(_BF16)
    tensors = {"D": D, **_encode_support(atoms, keep, f.k, support_encoding),
               **_encode_values(rounded, values_encoding, scales)}
    return tensors, DictFactors(D.astype(np.float32), atoms.astype(np.int32), rounded, dict(f.info)), exact


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
            names = {"A": _add_shared(tensors, seen, f"{path}.A", np.asarray(f.A, np.float32).astype(_BF16)),
                     "B": f"{path}.B"}
            tensors[names["B"]] = np.asarray(f.B, np.float32).astype(_BF16)
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
    dense = model_state_dict(model, dtype=_BF16, skip=_factor_leaves(model, list(projections)))
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
    _write_json(directory / "config.json", _hf_config(model, _BF16))
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


def _expected_shapes(entry: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every tensor of one layout entry, from its sizes (d_in, d_out, k, s / rank)."""
    d_in, d_out = entry["d_in"], entry["d_out"]
    if entry["kind"] == "low_rank":
        r = entry["rank"]
        return {"A": ((d_in, r), _BF16), "B": ((r, d_out), _BF16)}
    k, s = entry["k"], entry["s"]
    support = {"bitmask": {"mask": ((d_out, -(-k // 8)), np.dtype(np.uint8))},
               "int16": {"indices": ((d_out, s), np.dtype(np.int16))}}[entry["support"]]
    values = {"bf16": {"values": ((d_out, s), _BF16)},
              "bf16-14bit": {"values_14bit": ((14 * -(-(d_out * s) // 8),), np.dtype(np.uint8))},
              "int8": {"values_int8": ((d_out, s), np.dtype(np.int8)), "scales": ((d_out,), np.dtype(np.float32))},
              }[entry["values"]]
    return {"D": ((d_in, k), _BF16), **support, **values}


def _decode_support(tensors: dict[str, np.ndarray], entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(atoms [d_out, s] int32 with padding 0, used [d_out, s] bool) of one matrix."""
    k, s = entry["k"], entry["s"]
    if entry["support"] == "int16":
        atoms = tensors["indices"].astype(np.int32)
        if atoms.size and (atoms.min() < 0 or atoms.max() >= k):
            raise ValueError(f"atom indices outside [0, {k})")
        return atoms, np.ones(atoms.shape, bool)  # padded slots carry value 0: harmless in S
    bits = np.unpackbits(tensors["mask"], axis=1, bitorder="little").astype(bool)
    if bits[:, k:].any():
        raise ValueError(f"bitmask bits set beyond the {k} atoms")
    bits = bits[:, :k]
    counts = bits.sum(axis=1)
    if counts.max(initial=0) > s:
        raise ValueError(f"a column of the bitmask uses {counts.max()} atoms, more than s = {s}")
    order = np.argsort(~bits, axis=1, kind="stable")[:, :s]  # set bits first, in increasing atom order
    used = np.arange(s)[None, :] < counts[:, None]
    return np.where(used, order, 0).astype(np.int32), used


def _decode_values(tensors: dict[str, np.ndarray], entry: dict[str, Any]) -> np.ndarray:
    d_out, s = entry["d_out"], entry["s"]
    if entry["values"] == "int8":
        return tensors["values_int8"].astype(np.float32) * tensors["scales"][:, None]
    if entry["values"] == "bf16-14bit":
        return unpack_14bit(tensors["values_14bit"], d_out * s).reshape(d_out, s)
    return tensors["values"].astype(np.float32)


def _decode(path: str, entry: dict[str, Any], tensors: dict[str, np.ndarray]) -> Factors:
    if entry["kind"] == "low_rank":
        return LowRankFactors(tensors["A"].astype(np.float32), tensors["B"].astype(np.float32))
    atoms, used = _decode_support(tensors, entry)
    values = _decode_values(tensors, entry)
    if np.any(values[~used] != 0):
        raise ValueError("values stored past a column's last used atom")
    return DictFactors(tensors["D"].astype(np.float32), atoms, values)


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
    for role, (shape, dtype) in _expected_shapes(entry).items():
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
                factors[path] = _decode(path, entry, _factor_tensors(weights, path, entry, available, source))
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
