"""CPU kernels for y = (x·D)·S with a bf16 dictionary and a column-sparse S, called from XLA through ``jax.ffi``.

Imported lazily by :mod:`.spmm` (it needs Numba); nothing here knows about LLMs. Shapes: x [n, d_in] f32,
D [d_in, k] bf16, S [k, d_out] given per output column j either as

* ``coo16``: int16 atom ids ``indices [d_out, s]`` and bf16 ``values [d_out, s]`` (slot t of column j
  contributes values[j, t]·e_{indices[j, t]}; repeated ids add up), or
* ``bitmask``: ``mask uint8 [d_out, ceil(k/8)]`` = ``np.packbits(bits, axis=1, bitorder="little")`` and bf16
  ``values [d_out, s]``: the set bits of row j, in increasing atom order, take values[j, 0 .. popcount − 1].

y [n, d_out] is float32. bf16 is held as its 16 raw bits (uint16): f32 = bits << 16, exact.

Why a kernel. At batch 1 a projection is memory-bound: y costs the bytes of D, values and indices, which at
compression ratio γ are (1 − γ) of the dense bf16 matrix. XLA:CPU cannot stream them: its gather runs at
≈ 0.9 ns per non-zero (4× slower than the dense f32 GEMV) and its bf16 dot is slower than its f32 dot.

How. Two phases per call, in one Numba function:

1. Z = x·D [n, k] in f32 (D widened on the fly: 2 bytes read per weight, no f32 copy). n = 1: a row-major
   GEMV that streams D once, four rows per pass over z (z stays in L1). n > 1: a 4-token × 64-atom register
   tile (16 zmm accumulators; ≈ 80-100 GFLOP/s on one Zen 4 core, faster than XLA's f32 GEMM at these M).
2. y = Z·S, per output column:
   * bitmask: a 16-atom chunk of the mask selects which of z's 16 lanes are used; the column's next
     popcount values are *expanded* into those lanes (AVX-512 ``vexpandps``, a register op: the memory form
     ``vpexpandw m`` is microcoded on Zen 4 and 2× slower) and multiplied with the 16 contiguous z's. No
     gather, no index decoding: ≈ 0.14 ns per stored non-zero. Up to 8 tokens share one expansion.
   * coo16, n = 1: 16 lanes gathered at a time (``vgatherdps``, ≈ 0.5 ns per non-zero on Zen 4).
   * coo16, n > 1: Zᵀ [k, n] so that each non-zero reads one contiguous row of n tokens (register tiles of
     16-64 tokens, unrolled over non-zeros to hide the FMA latency).

Every vector loop is written as LLVM IR through Numba intrinsics, because the loops Numba's auto-vectoriser
produces are the slow ones above (64-bit-index gathers, one FMA chain). Hosts without AVX-512 get the same
kernels through generic LLVM intrinsics (``llvm.masked.expandload``, plain gather loops) that LLVM lowers for
the host: correct everywhere, fast where AVX-512 is present. ``COSPADI_SPMM_ISA=portable`` forces them.

The kernels are single-threaded: a decode step runs ~200 of them back to back, each 10-100 µs, where a
parallel region's fork/join (and the cores XLA's own pool holds) costs more than it saves.

Reading outside the arrays is impossible for well-formed inputs and guarded where it is cheap: atom ids are
clamped to [0, k), mask bits at or above k are ignored, every partial vector is a masked load. A bitmask row
with more set bits than s is malformed (checked by :func:`.spmm.check_bitmask`, not here).

XLA interface: typed FFI (``api_version=1``; the legacy custom-call API is refused by jaxlib 0.10's XLA:CPU).
The handler is a Numba ``cfunc`` reading ``XLA_FFI_CallFrame`` by its C ABI (xla/ffi/api/c_api.h): operands
(x, D, indices-or-mask, values), results (y, workspace). Shapes come from the buffers; dtypes and shapes are
validated in Python before the call. Measured overhead per call inside a jitted function: ≈ 0.25 µs.

Modules: :mod:`.spmm_ir` (the ISA, the IR building blocks), :mod:`.spmm_loops` (the vector loops as intrinsics),
:mod:`.spmm_kernels` (the kernels on arrays) and this one (the FFI handlers and their registration). Numba's disk
cache checks only the timestamp of the file a compiled function is in, not of the modules it calls into: after
editing spmm_ir.py, spmm_loops.py or spmm_kernels.py, delete the cache (``__pycache__/spmm_*.nbi``, ``.nbc``) or
run with ``COSPADI_NUMBA_CACHE=0``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core.extending import intrinsic

from .spmm_ir import _CACHE, _OPTS, AVX512
from .spmm_kernels import pad16, spmm_bitmask_host, spmm_coo16_host, workspace_size

__all__ = ["AVX512", "FFI_TARGETS", "pad16", "register_ffi_targets", "spmm_bitmask_host", "spmm_coo16_host",
           "workspace_size"]


# ---------------------------------------------------------------------------------------------------------------
# The XLA FFI handlers
# ---------------------------------------------------------------------------------------------------------------

@intrinsic
def _as_voidptr(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))
    return types.voidptr(types.int64), codegen


@intrinsic
def _null(typingctx):
    def codegen(context, builder, signature, args):
        return ir.Constant(ir.PointerType(ir.IntType(8)), None)
    return types.voidptr(), codegen


@njit(inline="always", **_OPTS)
def _words(addr, n):
    return carray(_as_voidptr(addr), (n,), dtype=np.int64)


# XLA_FFI_CallFrame as 64-bit words (c_api.h, x86-64 / aarch64 LP64): 0 struct_size, 1 extension_start,
# 2 api, 3 ctx, 4 stage, args = {5 struct_size, 6 extension_start, 7 size, 8 types, 9 args},
# rets = {10, 11, 12 size, 13 types, 14 rets}, attrs 15-20, 21 future.
_FRAME_WORDS = 22
_EXTENSION_METADATA = 1  # XLA_FFI_Extension_Metadata
_FFI_API_MAJOR, _FFI_API_MINOR = 0, 3  # the c_api.h this handler's layout is read from (jaxlib 0.10)


@njit(inline="always", **_OPTS)
def _answer_metadata(frame):
    """If XLA asks for the handler's metadata (api version, traits), fill it in and return True."""
    if frame[1] == 0:
        return False
    ext = _words(frame[1], 4)  # XLA_FFI_Metadata_Extension: struct_size, type, next, metadata*
    if (ext[1] & 0xFFFFFFFF) != _EXTENSION_METADATA:
        return False
    md = _words(ext[3], 5)  # XLA_FFI_Metadata: struct_size, {struct_size, ext, major|minor}, traits
    md[1] = 24  # XLA_FFI_Api_Version_STRUCT_SIZE
    md[2] = 0
    md[3] = (np.int64(_FFI_API_MINOR) << 32) | _FFI_API_MAJOR
    md[4] = 0  # no traits (not command-buffer compatible: CPU only)
    return True


@njit(inline="always", **_OPTS)
def _buffer(table, i):
    """(data address, dims) of XLA_FFI_Buffer i: {struct_size, extension_start, dtype, data, rank, dims*}."""
    b = _words(table[i], 6)
    return b[3], _words(b[5], b[4])


def _make_handler(kernel, sparse_dtype):
    sig = types.voidptr(types.voidptr)

    def handler(frame_ptr):
        frame = carray(frame_ptr, (_FRAME_WORDS,), dtype=np.int64)
        if _answer_metadata(frame):
            return _null()
        args, rets = _words(frame[9], 4), _words(frame[14], 2)
        xa, xd = _buffer(args, 0)
        da, dd = _buffer(args, 1)
        sa, sd = _buffer(args, 2)
        va, vd = _buffer(args, 3)
        ya, yd = _buffer(rets, 0)
        wa, wd = _buffer(rets, 1)
        x = carray(_as_voidptr(xa), (xd[0], xd[1]), dtype=np.float32)
        D = carray(_as_voidptr(da), (dd[0], dd[1]), dtype=np.uint16)
        sp = carray(_as_voidptr(sa), (sd[0], sd[1]), dtype=sparse_dtype)
        v = carray(_as_voidptr(va), (vd[0], vd[1]), dtype=np.uint16)
        y = carray(_as_voidptr(ya), (yd[0], yd[1]), dtype=np.float32)
        ws = carray(_as_voidptr(wa), (wd[0],), dtype=np.float32)
        kernel(x, D, sp, v, y, ws)
        return _null()

    return cfunc(sig, nopython=True, cache=_CACHE)(handler)


FFI_TARGETS = {"coo16": "cospadi_spmm_coo16", "bitmask": "cospadi_spmm_bitmask"}
_registered = False


def register_ffi_targets() -> dict[str, str]:
    """Compile (or load from Numba's cache) the two handlers and register them with XLA:CPU, once per process.

    Returns {layout: FFI target name}."""
    global _registered, _handlers
    if not _registered:
        import jax

        _handlers = {"coo16": _make_handler(spmm_coo16_host, np.int16),
                     "bitmask": _make_handler(spmm_bitmask_host, np.uint8)}
        for layout, name in FFI_TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(_handlers[layout].ctypes), platform="cpu",
                                        api_version=1)
        _registered = True
    return dict(FFI_TARGETS)


_handlers: dict = {}  # kept alive: XLA holds raw pointers to their code
