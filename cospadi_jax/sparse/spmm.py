"""Sparse-times-dense products y = (x·D)·S for a dictionary D and a column-sparse S, inside jitted JAX code.

Generic sparse linear algebra (nothing here knows about LLMs). Shapes and dtypes:

* x: [..., d_in], any float dtype (computed in float32); y: [..., d_out] float32.
* D: [d_in, k] bfloat16 (stored bf16, accumulated in f32).
* S [k, d_out], column-sparse with at most s stored entries per column, in one of two layouts:

  - ``coo16``: ``indices`` int16 [d_out, s] (atom ids in [0, k), k ≤ 32767) and ``values`` bf16 [d_out, s];
    column j = Σ_t values[j, t]·e_{indices[j, t]}: slots with the same id add up, a padded slot is value 0.
    2 + 2 bytes per stored entry (``budget(..., accounting="coo16")``).
  - ``bitmask``: ``mask`` uint8 [d_out, ceil(k/8)] = ``np.packbits(bits, axis=1, bitorder="little")`` with
    bits[j, t] = 1 iff column j uses atom t, and ``values`` bf16 [d_out, s]: the set bits of row j, in
    increasing atom order, take values[j, 0 .. popcount − 1]; the rest of the row is 0 and never read.
    k/8 bytes per column plus 2 per value (``accounting="eq10"``); bits at or above k must be 0.

:func:`coo16_matmul` and :func:`bitmask_matmul` run the Numba kernels of :mod:`.spmm_cpu` as an XLA:CPU FFI
call (one fused call per product, ≈ 0.25 µs of dispatch inside a jitted function) when the computation is
lowered for the CPU and Numba is installed; on any other platform (GPU, TPU), or without Numba, they lower to
the pure-XLA gather path (:func:`gather_columns`), so the same code runs everywhere. Forward only: neither
path defines a gradient for the FFI call (these are inference layouts).

:func:`pack_coo16` and :func:`pack_bitmask` build the layouts on the host from DictFactors-style
``indices [d_out, s]`` (int, padded slots allowed) and ``values [d_out, s]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BACKENDS", "LAYOUTS", "bitmask_indices", "bitmask_matmul", "check_bitmask", "coo16_matmul", "gather_columns",
           "kernel_available", "pack_bitmask", "pack_coo16"]

LAYOUTS = ("coo16", "bitmask")
BF16 = jnp.bfloat16
_INT16_MAX = np.iinfo(np.int16).max
_GATHER_BLOCK = 8  # sparsity slots gathered per step of the XLA path


# ---------------------------------------------------------------------------------------------------------------
# Host-side packing
# ---------------------------------------------------------------------------------------------------------------

def _check_support(indices: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    indices, values = np.asarray(indices), np.asarray(values, np.float64)
    if indices.ndim != 2 or values.shape != indices.shape:
        raise ValueError(f"indices and values must both be [d_out, s]; got {indices.shape} and {values.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"indices must be integers, got {indices.dtype}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (number of atoms) must be a positive int, got {k!r}")
    if indices.size and (indices.min() < 0 or indices.max() >= k):
        raise ValueError(f"atom ids must lie in [0, k = {k}); got [{indices.min()}, {indices.max()}]")
    return indices, values


def pack_coo16(indices: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """int16 ids [d_out, s] and bf16 values [d_out, s] of S, each column's slots sorted by atom id.

    Sorting changes only the order of the sum; it makes a column's reads of z ascend. Repeated ids and padded
    slots (value 0) are kept: the product adds them up, as DictFactors' scatter-add does."""
    indices, values = _check_support(indices, values, k)
    if k > _INT16_MAX + 1:
        raise ValueError(f"coo16 stores atom ids as int16: k = {k} > {_INT16_MAX + 1}; use the bitmask layout")
    order = np.argsort(indices, axis=1, kind="stable")
    ids = np.take_along_axis(indices, order, axis=1).astype(np.int16)
    vals = np.take_along_axis(values, order, axis=1).astype(BF16)
    return ids, vals


def pack_bitmask(indices: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Bitmask uint8 [d_out, ceil(k/8)] and bf16 values [d_out, s] of S (module docstring's convention).

    Slots with the same id are summed first (in float64, rounded to bf16 once); an atom is "used" iff its
    summed coefficient is non-zero, so padded slots (value 0) set no bit. Values beyond a column's popcount
    are 0."""
    indices, values = _check_support(indices, values, k)
    d_out, s = indices.shape
    S = np.zeros((d_out, k), np.float64)  # Sᵀ, one dense row per column: the host-side build is O(d_out·k)
    np.add.at(S, (np.broadcast_to(np.arange(d_out)[:, None], indices.shape), indices), values)
    bits = S != 0
    mask = np.packbits(bits, axis=1, bitorder="little")
    rank = np.cumsum(bits, axis=1) - 1  # slot of each used atom within its column
    rows, atoms = np.nonzero(bits)  # row-major: atoms ascend within a row
    packed = np.zeros((d_out, s), np.float64)
    packed[rows, rank[rows, atoms]] = S[rows, atoms]
    return mask, packed.astype(BF16)


def check_bitmask(mask: np.ndarray, values: np.ndarray, k: int) -> None:
    """Raise ValueError unless (mask, values) is a well-formed bitmask layout for k atoms (host arrays)."""
    mask, values = np.asarray(mask), np.asarray(values)
    nb = math.ceil(k / 8)
    if mask.dtype != np.uint8 or mask.ndim != 2 or mask.shape[1] != nb:
        raise ValueError(f"mask must be uint8 [d_out, ceil(k/8) = {nb}], got {mask.dtype} {mask.shape}")
    if values.ndim != 2 or values.shape[0] != mask.shape[0]:
        raise ValueError(f"values must be [d_out = {mask.shape[0]}, s], got {values.shape}")
    bits = np.unpackbits(mask, axis=1, bitorder="little")
    if bits[:, k:].any():
        raise ValueError(f"mask has bits set at or above k = {k}")
    over = bits.sum(axis=1) > values.shape[1]
    if over.any():
        raise ValueError(f"{int(over.sum())} mask rows have more set bits than s = {values.shape[1]} values")


# ---------------------------------------------------------------------------------------------------------------
# Pure-XLA path (every platform)
# ---------------------------------------------------------------------------------------------------------------

def gather_columns(z: jax.Array, indices: jax.Array, values: jax.Array) -> jax.Array:
    """y[..., j] = Σ_t values[j, t]·z[..., indices[j, t]] without building S or a [..., d_out, s] tensor.

    z: [..., k]; indices, values: [d_out, s]; y: [..., d_out] in z's dtype. Slots are gathered
    ``_GATHER_BLOCK`` at a time in a scan, so the live gather is [..., d_out, 8]."""
    d_out, s = indices.shape
    pad = -s % _GATHER_BLOCK
    idx = jnp.pad(indices, ((0, 0), (0, pad))).reshape(d_out, -1, _GATHER_BLOCK).transpose(1, 0, 2)
    val = jnp.pad(values.astype(z.dtype), ((0, 0), (0, pad))).reshape(d_out, -1, _GATHER_BLOCK).transpose(1, 0, 2)

    def step(y, block):
        i, v = block  # [d_out, block]
        return y + jnp.einsum("...jb,jb->...j", jnp.take(z, i.astype(jnp.int32), axis=-1), v), None

    y0 = jnp.zeros(z.shape[:-1] + (d_out,), z.dtype)
    return jax.lax.scan(step, y0, (idx, val))[0]


def bitmask_indices(mask: jax.Array, k: int, s: int) -> jax.Array:
    """Atom ids [d_out, s] int32 of a bitmask (used atoms ascending, then 0 for the unused slots), in XLA."""
    d_out = mask.shape[0]
    bits = jnp.unpackbits(mask, axis=1, bitorder="little")[:, :k].astype(jnp.int32)
    rank = jnp.where(bits == 1, jnp.cumsum(bits, axis=1) - 1, s)  # s: out of range, dropped
    rows = jnp.broadcast_to(jnp.arange(d_out)[:, None], (d_out, k))
    atoms = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :], (d_out, k))
    return jnp.zeros((d_out, s), jnp.int32).at[rows, rank].set(atoms, mode="drop")


def _dictionary_product(x2: jax.Array, D: jax.Array) -> jax.Array:
    return x2 @ D.astype(jnp.float32)


def _coo16_xla(x2, D, indices, values):
    return gather_columns(_dictionary_product(x2, D), indices, values)


def _bitmask_xla(x2, D, mask, values):
    k, s = D.shape[1], values.shape[1]
    return gather_columns(_dictionary_product(x2, D), bitmask_indices(mask, k, s), values)


# ---------------------------------------------------------------------------------------------------------------
# CPU kernel path
# ---------------------------------------------------------------------------------------------------------------

@functools.cache
def kernel_available() -> bool:
    """True when Numba imports, so CPU lowerings use the fused kernel (registered with XLA on first call)."""
    from .cpu_kernel import numba_available

    return numba_available()


def _ffi(layout: str, x2, D, sparse, values):
    from . import spmm_cpu

    target = spmm_cpu.register_ffi_targets()[layout]
    n, k, d_out = x2.shape[0], D.shape[1], sparse.shape[0]
    ws = max(spmm_cpu.workspace_size(n, k, layout), 1)
    out = (jax.ShapeDtypeStruct((n, d_out), jnp.float32), jax.ShapeDtypeStruct((ws,), jnp.float32))
    y, _ = jax.ffi.ffi_call(target, out, vmap_method="sequential")(x2, D, sparse, values)
    return y


BACKENDS = ("auto", "xla")


def _product(layout: str, xla_path, x, D, sparse, values, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_in).astype(jnp.float32)
    if backend == "auto" and kernel_available():
        y = jax.lax.platform_dependent(x2, D, sparse, values, cpu=functools.partial(_ffi, layout), default=xla_path)
    else:
        y = xla_path(x2, D, sparse, values)
    return y.reshape(*lead, sparse.shape[0])


def _check_dense_operands(x, D, values, d_out: int) -> None:
    if D.ndim != 2 or D.dtype != BF16:
        raise TypeError(f"D must be a bfloat16 [d_in, k] array, got {D.dtype} {D.shape}")
    if x.shape[-1] != D.shape[0]:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match D [{D.shape[0]}, {D.shape[1]}]")
    if values.ndim != 2 or values.shape[0] != d_out or values.dtype != BF16:
        raise TypeError(f"values must be bfloat16 [d_out = {d_out}, s], got {values.dtype} {values.shape}")


def coo16_matmul(x: jax.Array, D: jax.Array, indices: jax.Array, values: jax.Array, *,
                 backend: str = "auto") -> jax.Array:
    """y = (x·D)·S with S in the coo16 layout. x [..., d_in] float, D [d_in, k] bf16, indices int16 [d_out, s],
    values bf16 [d_out, s] -> y [..., d_out] float32. Ids outside [0, k) are clamped by the CPU kernel and by
    ``jnp.take`` on the XLA path; :func:`pack_coo16` never produces them.

    backend: "auto" (the CPU kernel when lowered for the CPU with Numba installed, else XLA) or "xla"."""
    _check_dense_operands(x, D, values, indices.shape[0])
    if indices.dtype != jnp.int16 or indices.shape != values.shape:
        raise TypeError(f"indices must be int16 {values.shape}, got {indices.dtype} {indices.shape}")
    return _product("coo16", _coo16_xla, x, D, indices, values, backend)


def bitmask_matmul(x: jax.Array, D: jax.Array, mask: jax.Array, values: jax.Array, *,
                   backend: str = "auto") -> jax.Array:
    """y = (x·D)·S with S in the bitmask layout. x [..., d_in] float, D [d_in, k] bf16, mask uint8
    [d_out, ceil(k/8)], values bf16 [d_out, s] -> y [..., d_out] float32. A row with more than s set bits is
    malformed (:func:`check_bitmask`). backend: as :func:`coo16_matmul`."""
    _check_dense_operands(x, D, values, mask.shape[0])
    if mask.dtype != jnp.uint8 or mask.ndim != 2 or mask.shape[1] != math.ceil(D.shape[1] / 8):
        raise TypeError(f"mask must be uint8 [d_out, ceil(k/8) = {math.ceil(D.shape[1] / 8)}], got "
                        f"{mask.dtype} {mask.shape}")
    return _product("bitmask", _bitmask_xla, x, D, mask, values, backend)
