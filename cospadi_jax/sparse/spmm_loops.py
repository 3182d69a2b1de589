"""The vector loops of the CPU sparse kernels (:mod:`.spmm_cpu`), written as LLVM IR through Numba intrinsics: the
4-token × 64-atom x·D tile, the bitmask column dot (mask-driven expansion), the coo16 gather dot (n = 1) and the coo16
row passes over Zᵀ (n > 1). Why IR and not NumPy loops: :mod:`.spmm_cpu`'s docstring.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .spmm_ir import (AVX512, F32, I16, I32, I64, V32I32, VB, VB32, VF, VI16, VI32, VW32, _LANES, _MASK_TOKENS,
                      _TILE_TOKENS, _TILE_VECTORS, _c64, _fma, _fn, _hsum, _lanes_below, _load_words, _masked_load16,
                      _ptr, _smax, _smin, _splat, _widen_bf16)


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
