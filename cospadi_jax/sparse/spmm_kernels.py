"""The CPU sparse kernels on arrays: y = (x·D)·S for S in the bitmask or the coo16 layout, bf16 held as uint16
(:mod:`.spmm_cpu`'s docstring: layouts, phases, measurements). Each is a Numba function over C-contiguous arrays and
an f32 workspace; :mod:`.spmm_cpu` calls them from XLA.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .spmm_ir import AVX512, _LANES, _OPTS, _ROWS_OUT, _TILE_TOKENS, _TILE_VECTORS, _bf16, _prefetch_range
from .spmm_loops import (_gather_dot, _mask_dot1, _mask_dot2, _mask_dot4, _mask_dot8, _rows1, _rows2, _rows3, _rows4,
                         _xd_tile)

__all__ = ["pad16", "spmm_bitmask_host", "spmm_coo16_host", "workspace_size"]


def pad16(n: int) -> int:
    """n rounded up to a multiple of 16 (the lane count)."""
    return (n + _LANES - 1) // _LANES * _LANES


def workspace_size(n: int, k: int, layout: str) -> int:
    """f32 words of scratch one call needs: Z [n, pad16(k)]; for coo16 with n > 1 also Zᵀ [pad16(k), pad16(n)]
    and one 64-token output row; plus 16 words of slack to start Z on a 64-byte line (:func:`_aligned`)."""
    size = n * pad16(k) + _LANES
    if layout == "coo16" and n > 1:
        size += pad16(k) * pad16(n) + _ROWS_OUT
    return size


def _aligned(ws):
    """ws from its first 64-byte boundary on, so that no 64-byte load of Z splits two cache lines whatever
    alignment XLA gives the workspace buffer."""
    skip = (-(ws.ctypes.data // 4)) % _LANES
    return ws[skip:]


_pad16 = njit(**_OPTS)(pad16)
_aligned = njit(inline="always", **_OPTS)(_aligned)


# ---------------------------------------------------------------------------------------------------------------
# Kernels on arrays (bf16 as uint16)
# ---------------------------------------------------------------------------------------------------------------

_PREFETCH_COLUMNS = 16  # sparse columns (values, mask or ids) fetched ahead of their dot products
_PREFETCH_ROWS = 32  # D rows fetched ahead of the GEMV (28 KiB at k = 430, ≈ 1 µs of DRAM traffic)


@njit(**_OPTS)
def _gemv_rows(x, D, z):
    """z[:k] = x·D for one token, streaming D's rows in order (4 per pass over z); z[k:] = 0."""
    d_in, k = D.shape
    for t in range(z.shape[0]):
        z[t] = 0.0
    da, row_bytes = D.ctypes.data, 2 * k
    _prefetch_range(da, row_bytes * min(d_in, _PREFETCH_ROWS))
    i = 0
    while i + 4 <= d_in:
        ahead = i + _PREFETCH_ROWS
        if ahead < d_in:
            _prefetch_range(da + ahead * row_bytes, row_bytes * min(4, d_in - ahead))
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        D0, D1, D2, D3 = D[i], D[i + 1], D[i + 2], D[i + 3]
        for t in range(k):
            z[t] += (x0 * _bf16(D0[t]) + x1 * _bf16(D1[t])) + (x2 * _bf16(D2[t]) + x3 * _bf16(D3[t]))
        i += 4
    while i < d_in:
        xi, Di = x[i], D[i]
        for t in range(k):
            z[t] += xi * _bf16(Di[t])
        i += 1


# Inner loops take raw addresses (base + row · stride): a slice per column (mask[j], values[j]) would cost an
# NRT reference-count pair per view, which measured as half the time of a 1536-column bitmask product.

@njit(**_OPTS)
def _dictionary_product(x, D, Z):
    """Z[:, :k] = x·D (f32), Z[:, k:] = 0. x [n, d_in] f32, D [d_in, k] bf16 bits, Z [n, pad16(k)] (C order)."""
    n, d_in = x.shape
    k = D.shape[1]
    kp = Z.shape[1]
    xa, da, za = x.ctypes.data, D.ctypes.data, Z.ctypes.data
    t0 = 0
    if n > 1:
        while t0 + _TILE_TOKENS <= n:
            for a0 in range(0, k, _LANES * _TILE_VECTORS):
                _xd_tile(xa + 4 * t0 * d_in, d_in, da + 2 * a0, k, za + 4 * (t0 * kp + a0), kp, d_in, k - a0)
            for t in range(t0, t0 + _TILE_TOKENS):
                for a in range(k, kp):
                    Z[t, a] = 0.0
            t0 += _TILE_TOKENS
    for t in range(t0, n):
        _gemv_rows(x[t], D, Z[t])


@njit(**_OPTS)
def spmm_bitmask_host(x, D, mask, values, y, ws):
    """y = (x·D)·S with S as a bitmask (module docstring). All arrays C-contiguous; bf16 as uint16; ws: f32
    scratch of :func:`workspace_size` words."""
    n = x.shape[0]
    k = D.shape[1]
    d_out, nb = mask.shape
    s = values.shape[1]
    kp = _pad16(k)
    Z = _aligned(ws)[:n * kp].reshape((n, kp))
    _dictionary_product(x, D, Z)
    n_full = k // _LANES
    tail_bytes = nb - 2 * n_full
    keep = (np.int64(1) << (k - _LANES * n_full)) - 1
    za, va, ma, ya = Z.ctypes.data, values.ctypes.data, mask.ctypes.data, y.ctypes.data
    _prefetch_range(va, 2 * s * min(d_out, _PREFETCH_COLUMNS))
    _prefetch_range(ma, nb * min(d_out, _PREFETCH_COLUMNS))
    for j in range(d_out):
        v, m = va + 2 * j * s, ma + j * nb
        vlim = (d_out - j) * s
        if j + _PREFETCH_COLUMNS < d_out:
            _prefetch_range(v + 2 * _PREFETCH_COLUMNS * s, 2 * s)
            _prefetch_range(m + _PREFETCH_COLUMNS * nb, nb)
        t0 = 0
        while t0 < n:  # token blocks of 8, 4, 2, 1 share each column's expansion
            rem = n - t0
            z, out = za + 4 * t0 * kp, ya + 4 * (t0 * d_out + j)
            if rem >= 8:
                _mask_dot8(z, kp, v, vlim, m, n_full, tail_bytes, keep, out, d_out)
                t0 += 8
            elif rem >= 4:
                _mask_dot4(z, kp, v, vlim, m, n_full, tail_bytes, keep, out, d_out)
                t0 += 4
            elif rem >= 2:
                _mask_dot2(z, kp, v, vlim, m, n_full, tail_bytes, keep, out, d_out)
                t0 += 2
            else:
                _mask_dot1(z, kp, v, vlim, m, n_full, tail_bytes, keep, out, d_out)
                t0 += 1


@njit(**_OPTS)
def _gather_columns_one(z, indices, values, y, k):
    """y[j] = Σ_t bf16(values[j, t])·z[indices[j, t]] for one token (ids clamped to [0, k))."""
    d_out, s = indices.shape
    za, ia, va = z.ctypes.data, indices.ctypes.data, values.ctypes.data
    _prefetch_range(ia, 2 * s * min(d_out, _PREFETCH_COLUMNS))
    _prefetch_range(va, 2 * s * min(d_out, _PREFETCH_COLUMNS))
    for j in range(d_out):
        if j + _PREFETCH_COLUMNS < d_out:
            _prefetch_range(ia + 2 * (j + _PREFETCH_COLUMNS) * s, 2 * s)
            _prefetch_range(va + 2 * (j + _PREFETCH_COLUMNS) * s, 2 * s)
        if AVX512:
            y[j] = _gather_dot(za, ia + 2 * j * s, va + 2 * j * s, s, (d_out - j) * s, k)
        else:  # Numba's own vectorised loop (LLVM picks the host's gathers, if any)
            acc = np.float32(0.0)
            for t in range(s):
                acc += _bf16(values[j, t]) * z[min(max(np.int64(indices[j, t]), 0), k - 1)]
            y[j] = acc


@njit(**_OPTS)
def spmm_coo16_host(x, D, indices, values, y, ws):
    """y = (x·D)·S with S as int16 ids + bf16 values (module docstring). All arrays C-contiguous; bf16 as
    uint16; ws: f32 scratch of :func:`workspace_size` words."""
    n = x.shape[0]
    k = D.shape[1]
    d_out, s = indices.shape
    kp = _pad16(k)
    ws = _aligned(ws)
    Z = ws[:n * kp].reshape((n, kp))
    _dictionary_product(x, D, Z)
    if n == 1:
        _gather_columns_one(Z[0], indices, values, y[0], k)
        return
    npad = _pad16(n)
    Zt = ws[n * kp:n * kp + kp * npad].reshape((kp, npad))
    for a in range(kp):
        for t in range(n):
            Zt[a, t] = Z[t, a]
        for t in range(n, npad):
            Zt[a, t] = 0.0
    out = ws[n * kp + kp * npad:]
    zta, ia, va, oa = Zt.ctypes.data, indices.ctypes.data, values.ctypes.data, out.ctypes.data
    for j in range(d_out):
        ij, vj = ia + 2 * j * s, va + 2 * j * s
        t0 = 0
        while t0 < n:  # up to 64 tokens per pass over the column's non-zeros
            vectors = min(4, (npad - t0) // _LANES)
            zt = zta + 4 * t0
            if vectors == 4:
                _rows4(zt, npad, ij, vj, s, k, oa)
            elif vectors == 3:
                _rows3(zt, npad, ij, vj, s, k, oa)
            elif vectors == 2:
                _rows2(zt, npad, ij, vj, s, k, oa)
            else:
                _rows1(zt, npad, ij, vj, s, k, oa)
            for t in range(min(_LANES * vectors, n - t0)):
                y[t0 + t, j] = out[t]
            t0 += _LANES * vectors

