"""LLVM IR building blocks of the CPU sparse kernels (:mod:`.spmm_cpu`): the instruction set they are built for,
the Numba options they share, lane counts and vector types, small IR helpers and the scalar intrinsics (software
prefetch, bf16 widening). The vector loops built from them are in :mod:`.spmm_loops`.
"""

from __future__ import annotations

import os

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .cpu_kernel import CACHE


_AVX512_FEATURES = ("avx512f", "avx512bw", "avx512vbmi2", "bmi2")  # Ice Lake, Zen 4 and later


def _host_has_avx512() -> bool:
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return all(features.get(f, False) for f in _AVX512_FEATURES)


_ISA = os.environ.get("COSPADI_SPMM_ISA", "auto")
if _ISA not in ("auto", "avx512", "portable"):
    raise ValueError(f"COSPADI_SPMM_ISA must be auto, avx512 or portable, got {_ISA!r}")
# A module constant: Numba folds it, so each compiled kernel contains one ISA's code only. Numba's cache key
# holds the host CPU and its features, so a cache written on another host is never loaded here.
AVX512 = _host_has_avx512() if _ISA == "auto" else _ISA == "avx512"

# An ISA forced by the environment is for testing: never cached, so it cannot load (or leave) the other's code.
_CACHE = CACHE and _ISA == "auto"
_OPTS = dict(cache=_CACHE, fastmath=True, nogil=True, boundscheck=False, error_model="numpy")
_LANES = 16  # f32 lanes of one zmm register; every padded dimension is a multiple of it
_TILE_TOKENS = 4  # the x·D tile: 4 tokens × 4 vectors of 16 atoms = 16 accumulators
_TILE_VECTORS = 4
_MASK_TOKENS = (8, 4, 2, 1)  # tokens sharing one mask expansion (static IR variants)
_ROWS_OUT = 4 * 16  # the coo16 n > 1 pass: up to 4 vectors of 16 tokens

I1, I16, I32, I64, F32 = ir.IntType(1), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
VF, VI16, VI32, VB = (ir.VectorType(t, _LANES) for t in (F32, I16, I32, I1))
VW32, VB32, V32I32 = ir.VectorType(I16, 32), ir.VectorType(I1, 32), ir.VectorType(I32, 32)  # a zmm as 32 words


# ---------------------------------------------------------------------------------------------------------------
# LLVM IR building blocks
# ---------------------------------------------------------------------------------------------------------------

def _fn(builder, name: str, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _c64(v: int):
    return ir.Constant(I64, v)


def _splat(builder, value, vty):
    lane0 = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(lane0, ir.Constant(vty, None), ir.Constant(VI32, [0] * _LANES))


def _widen_bf16(builder, raw16):
    """<16 x i16> bf16 bits -> <16 x float> (exact: the bits move to the high half)."""
    return builder.bitcast(builder.shl(builder.zext(raw16, VI32), ir.Constant(VI32, [16] * _LANES)), VF)


def _smin(builder, a, b):
    return builder.select(builder.icmp_signed("<", a, b), a, b)


def _smax(builder, a, b):
    return builder.select(builder.icmp_signed(">", a, b), a, b)


def _lanes_below(builder, limit64):
    """<16 x i1>: lane l < limit (limit may be <= 0 or > 16)."""
    limit = builder.trunc(_smax(builder, _smin(builder, limit64, _c64(_LANES)), _c64(0)), I32)
    return builder.icmp_signed("<", ir.Constant(VI32, list(range(_LANES))), _splat(builder, limit, VI32))


def _masked_load16(builder, ptr, lanes, elem):
    """Masked load of 16 elements of type ``elem`` (i16 or float); inactive lanes are 0 and never touched."""
    vty = ir.VectorType(elem, _LANES)
    name = "llvm.masked.load.v16i16.p0" if elem == I16 else "llvm.masked.load.v16f32.p0"
    load = _fn(builder, name, vty, [ir.PointerType(vty), I32, VB, vty])
    align = ir.Constant(I32, 2 if elem == I16 else 4)
    return builder.call(load, [builder.bitcast(ptr, ir.PointerType(vty)), align, lanes, ir.Constant(vty, None)])


def _load_words(builder, base, offset, limit, lanes):
    """16 int16 words at base[offset:]: a plain load while 16 words remain before ``limit`` (words readable from
    base), else a load masked to ``lanes``. Word-masked loads measured 2x slower than plain ones on Zen 4, so
    only the last vectors of an array pay for them. Lanes outside ``lanes`` are unspecified (callers mask)."""
    slot = cgutils.alloca_once(builder, VI16)
    src = builder.gep(base, [offset])
    with builder.if_else(builder.icmp_signed("<=", builder.add(offset, _c64(_LANES)), limit)) as (plain, guarded):
        with plain:
            builder.store(builder.load(builder.bitcast(src, ir.PointerType(VI16)), align=2), slot)
        with guarded:
            builder.store(_masked_load16(builder, src, lanes, I16), slot)
    return builder.load(slot)


def _hsum(builder, v):
    red = _fn(builder, "llvm.vector.reduce.fadd.v16f32", F32, [F32, VF])
    return builder.call(red, [ir.Constant(F32, 0.0), v], fastmath=("reassoc", "nsz"))


def _fma(builder, a, b, c):
    return builder.call(_fn(builder, "llvm.fma.v16f32", VF, [VF, VF, VF]), [a, b, c])


def _ptr(builder, addr, elem):
    return builder.inttoptr(addr, ir.PointerType(elem))


@intrinsic
def _prefetch_range(typingctx, addr, nbytes):
    """Software prefetch (read, into L2: ``prefetcht1``) of every 64-byte line of [addr, addr + nbytes).

    Why: weights streamed from DRAM once per call cross a 4 KiB page every 64 lines, where the hardware
    prefetchers stop and retrain; the kernels ask for the rows ahead of use instead. Into L2, not L1: L1's few
    miss buffers dropped most of them (measured, up_proj from DRAM: the x·D phase 79 µs without prefetch, 78 into
    L1, 31-35 into L2)."""
    def codegen(context, builder, signature, args):
        start, n = args
        fetch = _fn(builder, "llvm.prefetch.p0", ir.VoidType(), [ir.PointerType(ir.IntType(8)), I32, I32, I32])
        lines = builder.udiv(builder.add(n, _c64(63)), _c64(64))
        with cgutils.for_range(builder, lines) as loop:
            ptr = _ptr(builder, builder.add(start, builder.mul(loop.index, _c64(64))), ir.IntType(8))
            builder.call(fetch, [ptr, ir.Constant(I32, 0), ir.Constant(I32, 2), ir.Constant(I32, 1)])
    return types.void(types.int64, types.int64), codegen


@intrinsic
def _bf16(typingctx, bits):
    """bf16 bits (uint16) -> float32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.shl(builder.zext(args[0], I32), ir.Constant(I32, 16)), F32)
    return types.float32(types.uint16), codegen
