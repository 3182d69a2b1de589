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
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .cpu_kernel import CACHE

__all__ = ["AVX512", "FFI_TARGETS", "pad16", "register_ffi_targets", "spmm_bitmask_host", "spmm_coo16_host",
           "workspace_size"]


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


@intrinsic
def _xd_tile(typingctx, x_addr, x_stride, d_addr, d_stride, z_addr, z_stride, d_in, n_valid):
    """Z[t, a0 + l] = Σ_i x[t, i]·D[i, a0 + l] for 4 tokens t and 64 atoms l < n_valid (masked stores beyond).

    Addresses are of x[t0, 0] (f32), D[0, a0] (bf16 bits), Z[t0, a0] (f32); strides in elements."""
    def codegen(context, builder, signature, args):
        xa, xs, da, ds, za, zs, n, nv = args
        xp, dp, zp = _ptr(builder, xa, F32), _ptr(builder, da, I16), _ptr(builder, za, F32)
        lanes = [_lanes_below(builder, builder.sub(nv, _c64(_LANES * r))) for r in range(_TILE_VECTORS)]
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(VF, None)) for _ in range(_TILE_VECTORS)]
               for _ in range(_TILE_TOKENS)]
        with cgutils.for_range(builder, n) as loop:
            i = loop.index
            row = builder.gep(dp, [builder.mul(i, ds)])
            dv = [_widen_bf16(builder, _masked_load16(builder, builder.gep(row, [_c64(_LANES * r)]), lanes[r], I16))
                  for r in range(_TILE_VECTORS)]
            for t in range(_TILE_TOKENS):
                xb = _splat(builder, builder.load(builder.gep(xp, [builder.add(builder.mul(_c64(t), xs), i)])), VF)
                for r in range(_TILE_VECTORS):
                    builder.store(_fma(builder, xb, dv[r], builder.load(acc[t][r])), acc[t][r])
        store = _fn(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(), [VF, ir.PointerType(VF), I32, VB])
        for t in range(_TILE_TOKENS):
            for r in range(_TILE_VECTORS):
                dst = builder.gep(zp, [builder.add(builder.mul(_c64(t), zs), _c64(_LANES * r))])
                builder.call(store, [builder.load(acc[t][r]), builder.bitcast(dst, ir.PointerType(VF)),
                                     ir.Constant(I32, 4), lanes[r]])
    return types.void(*[types.int64] * 8), codegen


def _make_mask_dot(tokens: int):
    """Intrinsic: for ``tokens`` rows of Z, y[t] = Σ_chunks Z[t, 16c:16c+16] · expand(values, mask chunk c).

    Args (all int64): z_addr (Z[t0, 0]), z_stride, v_addr (values[j, 0] bits), v_limit (values readable from
    v_addr to the end of the array), m_addr (mask[j, 0]), n_full (full 16-atom chunks, k // 16), tail_bytes
    (mask bytes after them: 0, 1 or 2), tail_keep ((1 << k % 16) − 1: bits at or above k are ignored), y_addr
    (y[t0, j]), y_stride. Writes ``tokens`` floats. The tail is read here, not by the caller: a Numba helper
    taking the mask array cost an NRT incref/decref per column."""

    @intrinsic
    def mask_dot(typingctx, z_addr, z_stride, v_addr, v_limit, m_addr, n_full, tail_bytes, tail_keep, y_addr,
                 y_stride):
        def codegen(context, builder, signature, args):
            za, zs, va, vlim, ma, nf, tb, keep, ya, ys = args
            zp, vp, yp = _ptr(builder, za, F32), _ptr(builder, va, I16), _ptr(builder, ya, F32)
            mp = _ptr(builder, ma, I16)
            ctpop = _fn(builder, "llvm.ctpop.i16", I16, [I16])
            if AVX512:
                pdep = _fn(builder, "llvm.x86.bmi.pdep.32", I32, [I32, I32])
                expand = _fn(builder, "llvm.x86.avx512.mask.expand.v32i16", VW32, [VW32, VW32, VB32])
            # Few tokens leave one FMA chain per accumulator, bound by its latency: alternate two sets.
            sets = 2 if tokens < 4 else 1
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(VF, None)) for _ in range(tokens)]
                   for _ in range(sets)]
            used = cgutils.alloca_once_value(builder, _c64(0))

            def chunk(index, m16, a, guarded):
                c = builder.load(used)
                count = builder.zext(builder.call(ctpop, [m16]), I32)
                if AVX512:
                    # One vpexpandw does the expansion and the bf16 -> f32 widening: the 16 loaded values go to
                    # the odd (high) words of the lanes whose bit is set, pdep spreading the mask to those words.
                    first = builder.trunc(builder.sub(builder.shl(ir.Constant(I32, 1), count), ir.Constant(I32, 1)), I16)
                    if guarded:
                        raw = _load_words(builder, vp, c, vlim, builder.bitcast(first, VB))
                    else:
                        raw = builder.load(builder.bitcast(builder.gep(vp, [c]), ir.PointerType(VI16)), align=2)
                    words = builder.shuffle_vector(raw, ir.Constant(VI16, None), ir.Constant(V32I32, list(range(32))))
                    odd = builder.call(pdep, [builder.zext(m16, I32), ir.Constant(I32, 0xAAAAAAAA)])
                    coef = builder.bitcast(builder.call(expand, [words, ir.Constant(VW32, None), builder.bitcast(odd, VB32)]), VF)
                else:  # generic intrinsic, lowered for the host (scalarised without AVX-512)
                    expandload = _fn(builder, "llvm.masked.expandload.v16i16", VI16, [ir.PointerType(I16), VB, VI16])
                    coef = _widen_bf16(builder, builder.call(expandload, [builder.gep(vp, [c]), builder.bitcast(m16, VB),
                                                                          ir.Constant(VI16, None)]))
                for t in range(tokens):
                    row = builder.gep(zp, [builder.add(builder.mul(_c64(t), zs), builder.mul(index, _c64(_LANES)))])
                    zv = builder.load(builder.bitcast(row, ir.PointerType(VF)), align=4)
                    builder.store(_fma(builder, coef, zv, builder.load(a[t])), a[t])
                builder.store(builder.add(c, builder.zext(count, I64)), used)

            def full_chunks(guarded):
                def full_chunk(index, a):
                    chunk(index, builder.load(builder.gep(mp, [index]), align=1), a, guarded)

                pairs = builder.udiv(nf, _c64(sets))
                with cgutils.for_range(builder, pairs) as loop:
                    for u in range(sets):
                        full_chunk(builder.add(builder.mul(loop.index, _c64(sets)), _c64(u)), acc[u])
                with cgutils.for_range(builder, builder.sub(nf, builder.mul(pairs, _c64(sets)))) as loop:
                    full_chunk(builder.add(builder.mul(pairs, _c64(sets)), loop.index), acc[0])

            # A column reads at most k values; with k + 16 of them readable every load can be a plain one
            # (a per-chunk check measured 25 % slower). Only the last few columns of an array take the guarded loop.
            roomy = builder.icmp_signed(">=", vlim, builder.add(builder.mul(nf, _c64(_LANES)), _c64(2 * _LANES)))
            with builder.if_else(roomy) as (plain, guarded):
                with plain:
                    full_chunks(False)
                with guarded:
                    full_chunks(True)
            with builder.if_then(builder.icmp_signed(">", tb, _c64(0))):  # k % 16 != 0 (else no z there)
                bytes_ = _ptr(builder, builder.add(ma, builder.mul(nf, _c64(2))), ir.IntType(8))
                tail = cgutils.alloca_once_value(builder, builder.zext(builder.load(bytes_), I16))
                with builder.if_then(builder.icmp_signed(">", tb, _c64(1))):
                    high = builder.shl(builder.zext(builder.load(builder.gep(bytes_, [_c64(1)])), I16), ir.Constant(I16, 8))
                    builder.store(builder.or_(builder.load(tail), high), tail)
                chunk(nf, builder.and_(builder.load(tail), builder.trunc(keep, I16)), acc[sets - 1], True)
            for t in range(tokens):
                total = builder.load(acc[0][t])
                for u in range(1, sets):
                    total = builder.fadd(total, builder.load(acc[u][t]))
                builder.store(_hsum(builder, total), builder.gep(yp, [builder.mul(_c64(t), ys)]))
        return types.void(*[types.int64] * 10), codegen

    return mask_dot


_MASK_DOT = {t: _make_mask_dot(t) for t in _MASK_TOKENS}
_mask_dot8, _mask_dot4, _mask_dot2, _mask_dot1 = (_MASK_DOT[t] for t in _MASK_TOKENS)


@intrinsic
def _gather_dot(typingctx, z_addr, i_addr, v_addr, s, limit, k):
    """Σ_t bf16(values[t])·z[clamp(indices[t], 0, k−1)] over t < s, 16 lanes per AVX-512 gather (int16 ids).

    ``limit``: words readable from i_addr (and from v_addr) to the end of their arrays."""
    def codegen(context, builder, signature, args):
        za, ia, va, n, lim, kk = args
        ip, vp = _ptr(builder, ia, I16), _ptr(builder, va, I16)
        gather = _fn(builder, "llvm.x86.avx512.mask.gather.dps.512", VF,
                     [VF, ir.PointerType(ir.IntType(8)), VI32, VB, I32])
        base = _ptr(builder, za, ir.IntType(8))
        zero, top = ir.Constant(VI32, [0] * _LANES), _splat(builder, builder.trunc(builder.sub(kk, _c64(1)), I32), VI32)
        acc = [cgutils.alloca_once_value(builder, ir.Constant(VF, None)) for _ in range(2)]

        def chunk(offset, lanes, a):
            idx = builder.sext(_load_words(builder, ip, offset, lim, lanes), VI32)
            idx = builder.select(builder.icmp_signed("<", idx, zero), zero, idx)
            idx = builder.select(builder.icmp_signed(">", idx, top), top, idx)
            zv = builder.call(gather, [ir.Constant(VF, None), base, idx, lanes, ir.Constant(I32, 4)])  # 0 off-lanes
            vals = _widen_bf16(builder, _load_words(builder, vp, offset, lim, lanes))
            vals = builder.select(lanes, vals, ir.Constant(VF, None))  # lanes past s may hold the next column's
            builder.store(_fma(builder, vals, zv, builder.load(a)), a)

        full = ir.Constant(VB, [1] * _LANES)
        pairs = builder.udiv(n, _c64(2 * _LANES))
        with cgutils.for_range(builder, pairs) as loop:  # two chains: one is bound by the FMA latency
            off = builder.mul(loop.index, _c64(2 * _LANES))
            chunk(off, full, acc[0])
            chunk(builder.add(off, _c64(_LANES)), full, acc[1])
        done = builder.mul(pairs, _c64(2 * _LANES))
        for u in range(2):  # the last 0-31 slots
            off = builder.add(done, _c64(_LANES * u))
            with builder.if_then(builder.icmp_signed("<", off, n)):
                chunk(off, _lanes_below(builder, builder.sub(n, off)), acc[u])
        return _hsum(builder, builder.fadd(builder.load(acc[0]), builder.load(acc[1])))
    return types.float32(*[types.int64] * 6), codegen


def _make_rows(vectors: int, unroll: int):
    """Intrinsic: out[16r + l] = Σ_c bf16(values[c])·Zt[clamp(indices[c]), t0 + 16r + l], r < ``vectors``.

    Args (int64): zt_addr (Zt[0, t0]), zt_stride, i_addr (int16 ids), v_addr (bf16 bits), n (non-zeros), k,
    out_addr (16·vectors floats). ``unroll`` non-zeros run as independent accumulator sets."""

    @intrinsic
    def rows(typingctx, zt_addr, zt_stride, i_addr, v_addr, n, k, out_addr):
        def codegen(context, builder, signature, args):
            za, zs, ia, va, nn, kk, oa = args
            zp, ip, vp, op = _ptr(builder, za, F32), _ptr(builder, ia, I16), _ptr(builder, va, I16), _ptr(builder, oa, F32)
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(VF, None)) for _ in range(vectors)]
                   for _ in range(unroll)]
            top = builder.sub(kk, _c64(1))

            def step(c, u):
                a = builder.sext(builder.load(builder.gep(ip, [c])), I64)
                a = _smin(builder, _smax(builder, a, _c64(0)), top)
                v = builder.bitcast(builder.shl(builder.zext(builder.load(builder.gep(vp, [c])), I32),
                                                ir.Constant(I32, 16)), F32)
                vb = _splat(builder, v, VF)
                row = builder.gep(zp, [builder.mul(a, zs)])
                for r in range(vectors):
                    zv = builder.load(builder.bitcast(builder.gep(row, [_c64(_LANES * r)]), ir.PointerType(VF)), align=4)
                    builder.store(_fma(builder, vb, zv, builder.load(acc[u][r])), acc[u][r])

            blocks = builder.udiv(nn, _c64(unroll))
            with cgutils.for_range(builder, blocks) as loop:
                for u in range(unroll):
                    step(builder.add(builder.mul(loop.index, _c64(unroll)), _c64(u)), u)
            done = builder.mul(blocks, _c64(unroll))
            with cgutils.for_range(builder, builder.sub(nn, done)) as loop:
                step(builder.add(done, loop.index), 0)
            for r in range(vectors):
                total = builder.load(acc[0][r])
                for u in range(1, unroll):
                    total = builder.fadd(total, builder.load(acc[u][r]))
                builder.store(total, builder.bitcast(builder.gep(op, [_c64(_LANES * r)]), ir.PointerType(VF)), align=4)
        return types.void(*[types.int64] * 7), codegen

    return rows


# token vectors per pass -> non-zeros in flight: enough independent FMA chains (≈ 8) without spilling
_rows1, _rows2, _rows3, _rows4 = (_make_rows(v, u) for v, u in ((1, 4), (2, 4), (3, 2), (4, 2)))


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
