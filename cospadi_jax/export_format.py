"""The tensors of a factored export (:mod:`cospadi_jax.export`): Eq. 11's 14-bit packing, how one CoSpaDi
matrix's coefficients are encoded (support as a bitmask or int16 indices; values as bf16, 14-bit codes or int8 with
scales) and decoded again, and the shape and dtype every stored tensor must have.

The format itself (tensor names, which encoding when, the bytes written) is described in
:mod:`cospadi_jax.export`'s docstring and docs/export.md. Nothing here reads or writes files.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from .layers import quantize_coefficients
from .methods.base import DictFactors, Factors, LowRankFactors

__all__ = ["BF16", "FACTORED", "FORMATS", "MANIFEST", "VERSION", "WEIGHTS", "decode_factors", "encode_dict_factors",
           "encodings", "expected_shapes", "pack_14bit", "unpack_14bit"]

FORMATS = ("factored", "hf-dense")
MANIFEST = "cospadi.json"
WEIGHTS = "model.safetensors"
FACTORED = "cospadi-factored"  # the manifest's "format" of a factored export
VERSION = 1
BF16 = np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------------------------------ 14-bit packing


def pack_14bit(values: np.ndarray) -> np.ndarray:
    """Values on Eq. 11's 14-bit grid (``quantize_coefficients(v, "bf16-14bit")``), any shape, float32 ->
    uint8 [14·⌈n/8⌉]. Code = bf16 bits >> 2 (1 sign, 8 exponent, 5 mantissa bits); code i occupies bits
    14i … 14i+13 of a little-endian bit stream, so 8 codes fill 14 bytes (n is zero-padded to a multiple of 8)."""
    values = np.asarray(values, np.float32).reshape(-1)
    bits = values.astype(BF16).view(np.uint16)
    if np.any(bits & 3) or not np.array_equal(bits.view(BF16).astype(np.float32), values, equal_nan=True):
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
    return bits.view(BF16).astype(np.float32)


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
    return values.astype(BF16).astype(np.float32), None


def _encode_values(values: np.ndarray, encoding: str, scales: np.ndarray | None) -> dict[str, np.ndarray]:
    """Tensors (name suffix -> array) of values [d_out, s] already on the encoding's grid."""
    if encoding == "int8":
        q = np.round(values / scales[:, None]).astype(np.int8)
        return {"values_int8": q, "scales": scales.astype(np.float32)}
    if encoding == "bf16-14bit":
        return {"values_14bit": pack_14bit(values)}
    return {"values": values.astype(BF16)}


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
    D = np.asarray(f.D, np.float32).astype(BF16)
    tensors = {"D": D, **_encode_support(atoms, keep, f.k, support_encoding),
               **_encode_values(rounded, values_encoding, scales)}
    return tensors, DictFactors(D.astype(np.float32), atoms.astype(np.int32), rounded, dict(f.info)), exact


# ------------------------------------------------------------------------------------------- decoding


def expected_shapes(entry: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every tensor of one layout entry, from its sizes (d_in, d_out, k, s / rank)."""
    d_in, d_out = entry["d_in"], entry["d_out"]
    if entry["kind"] == "low_rank":
        r = entry["rank"]
        return {"A": ((d_in, r), BF16), "B": ((r, d_out), BF16)}
    k, s = entry["k"], entry["s"]
    support = {"bitmask": {"mask": ((d_out, -(-k // 8)), np.dtype(np.uint8))},
               "int16": {"indices": ((d_out, s), np.dtype(np.int16))}}[entry["support"]]
    values = {"bf16": {"values": ((d_out, s), BF16)},
              "bf16-14bit": {"values_14bit": ((14 * -(-(d_out * s) // 8),), np.dtype(np.uint8))},
              "int8": {"values_int8": ((d_out, s), np.dtype(np.int8)), "scales": ((d_out,), np.dtype(np.float32))},
              }[entry["values"]]
    return {"D": ((d_in, k), BF16), **support, **values}


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


def decode_factors(path: str, entry: dict[str, Any], tensors: dict[str, np.ndarray]) -> Factors:
    if entry["kind"] == "low_rank":
        return LowRankFactors(tensors["A"].astype(np.float32), tensors["B"].astype(np.float32))
    atoms, used = _decode_support(tensors, entry)
    values = _decode_values(tensors, entry)
    if np.any(values[~used] != 0):
        raise ValueError("values stored past a column's last used atom")
    return DictFactors(tensors["D"].astype(np.float32), atoms, values)

