"""Sparse-times-dense products y = (x·D)·S (cospadi_jax.sparse.spmm): the fused CPU kernel (XLA FFI) and the
XLA path against a float64 NumPy reference, the two storage layouts, bad inputs, the portable kernel build, and
DictLinear's sparse modes on a tiny model (same logits as "dense", resident bytes equal to the budget)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import subprocess_env, tiny_hf_config

from cospadi_jax.budget import budget
from cospadi_jax.layers import DICT_MODES, DictLinear, replace_projection, resident_bytes
from cospadi_jax.methods.base import DictFactors
from cospadi_jax.models import forward_logits, get_module, random_model
from cospadi_jax.models.paths import PROJECTION_TYPES, projection_path, projection_weight
from cospadi_jax.sparse import spmm

pytest.importorskip("numba")
BF16 = jnp.bfloat16


def _support(rng, d_out: int, k: int, s: int, *, padded: bool = True, duplicates: bool = True):
    """indices [d_out, s] and values [d_out, s] as DictFactors holds them: distinct atoms per column, plus (when
    asked) early-stopped columns padded with (0, 0.0) and columns repeating an atom (scatter-add)."""
    idx = np.stack([rng.permutation(k)[:s] for _ in range(d_out)]).astype(np.int32)
    val = rng.normal(size=(d_out, s))
    if padded and s > 1:
        idx[0, s // 2:], val[0, s // 2:] = 0, 0.0
    if duplicates and s > 1 and d_out > 1:
        idx[-1, 1] = idx[-1, 0]
    return idx, val


def _reference(x: np.ndarray, D: np.ndarray, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
    """float64 x·D·S, S by scatter-add of the slots (DictFactors.coefficients)."""
    S = DictFactors(D, idx, val).coefficients()
    return np.asarray(x, np.float64) @ np.asarray(D, np.float64) @ S


def _bf16(a) -> np.ndarray:
    return np.asarray(np.asarray(a, np.float32).astype(BF16), np.float64)


# (tokens, d_in, d_out, k, s): k not a multiple of 8 or 16, s = 1, d_out = 1, s = k, T up to 64 (and 70: a
# tail after the 64-token pass and after the 4-token tiles).
SHAPES = [
    (1, 40, 24, 37, 9),
    (3, 40, 24, 37, 9),
    (64, 33, 17, 21, 5),
    (70, 24, 9, 48, 16),
    (1, 64, 1, 19, 1),
    (3, 16, 5, 16, 16),
    (64, 8, 1, 1, 1),
    (5, 576, 40, 430, 215),
]


@pytest.mark.parametrize("layout", spmm.LAYOUTS)
@pytest.mark.parametrize("backend", spmm.BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-{}x{}-k{}-s{}".format(*s))
def test_product_matches_float64_reference(layout, backend, shape):
    n, d_in, d_out, k, s = shape
    rng = np.random.default_rng(sum(shape))
    D, x = rng.normal(size=(d_in, k)), rng.normal(size=(n, d_in)).astype(np.float32)
    idx, val = _support(rng, d_out, k, s)
    if layout == "coo16":
        sparse, packed = spmm.pack_coo16(idx, val, k)
        ref = _reference(x, _bf16(D), sparse.astype(np.int32), np.asarray(packed, np.float64))
        fn = spmm.coo16_matmul
    else:
        sparse, packed = spmm.pack_bitmask(idx, val, k)
        ids = np.asarray(spmm.bitmask_indices(jnp.asarray(sparse), k, s))
        ref = _reference(x, _bf16(D), ids, np.asarray(packed, np.float64))
        fn = spmm.bitmask_matmul
    # the packed layout is the factors' S up to one bf16 rounding per stored value
    np.testing.assert_allclose(ref, _reference(x, _bf16(D), idx, val), rtol=0, atol=2e-2 * np.abs(ref).max())
    y = jax.jit(lambda *a: fn(*a, backend=backend))(jnp.asarray(x), jnp.asarray(D, BF16), jnp.asarray(sparse),
                                                     jnp.asarray(packed))
    assert y.shape == (n, d_out) and y.dtype == jnp.float32
    # f32 accumulation of O(d_in + s) terms: relative to the output scale
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * math.sqrt(d_in * s) * np.abs(ref).max())


def test_leading_batch_dims_and_input_dtype():
    rng = np.random.default_rng(3)
    D, (idx, val) = rng.normal(size=(12, 20)), _support(rng, 7, 20, 4)
    mask, packed = spmm.pack_bitmask(idx, val, 20)
    x = rng.normal(size=(2, 3, 12))
    args = (jnp.asarray(D, BF16), jnp.asarray(mask), jnp.asarray(packed))
    y = jax.jit(spmm.bitmask_matmul)(jnp.asarray(x, BF16), *args)
    assert y.shape == (2, 3, 7) and y.dtype == jnp.float32
    flat = spmm.bitmask_matmul(jnp.asarray(x, BF16).reshape(6, 12), *args)
    np.testing.assert_array_equal(np.asarray(y).reshape(6, 7), np.asarray(flat))


def test_cpu_lowering_is_one_ffi_call_per_product():
    rng = np.random.default_rng(4)
    D, (idx, val) = rng.normal(size=(8, 12)), _support(rng, 5, 12, 3)
    ids, packed = spmm.pack_coo16(idx, val, 12)
    hlo = jax.jit(spmm.coo16_matmul).lower(jnp.ones((1, 8)), jnp.asarray(D, BF16), jnp.asarray(ids),
                                           jnp.asarray(packed)).as_text()
    assert hlo.count("custom_call @cospadi_spmm_coo16") == 1 and "gather" not in hlo
    xla = jax.jit(lambda *a: spmm.coo16_matmul(*a, backend="xla")).lower(
        jnp.ones((1, 8)), jnp.asarray(D, BF16), jnp.asarray(ids), jnp.asarray(packed)).as_text()
    assert "custom_call" not in xla


def test_bitmask_convention():
    """mask = np.packbits(bits, axis=1, bitorder="little"); used atoms ascending take values[j, 0..popcount-1]."""
    idx = np.array([[9, 2, 0], [4, 4, 1], [0, 0, 0]])  # row 1 repeats atom 4, row 2 is all padding
    val = np.array([[1.0, 2.0, 0.0], [0.5, 0.25, -1.0], [0.0, 0.0, 0.0]])
    mask, packed = spmm.pack_bitmask(idx, val, 10)
    bits = np.zeros((3, 10), bool)
    bits[0, [2, 9]] = True  # atom 0 of row 0 has value 0: a padded slot, not used
    bits[1, [1, 4]] = True
    np.testing.assert_array_equal(mask, np.packbits(bits, axis=1, bitorder="little"))
    assert mask.dtype == np.uint8 and mask.shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(packed, np.float64), [[2.0, 1.0, 0], [-1.0, 0.75, 0], [0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(spmm.bitmask_indices(jnp.asarray(mask), 10, 3)),
                                  [[2, 9, 0], [1, 4, 0], [0, 0, 0]])
    spmm.check_bitmask(mask, packed, 10)
    ids, vals = spmm.pack_coo16(idx, val, 10)
    assert ids.dtype == np.int16 and vals.dtype == BF16
    np.testing.assert_array_equal(ids, [[0, 2, 9], [1, 4, 4], [0, 0, 0]])  # sorted per column, repeats kept


def test_bad_inputs_fail_with_a_message():
    idx, val = np.array([[0, 5]]), np.ones((1, 2))
    with pytest.raises(ValueError, match=r"atom ids must lie in \[0, k = 5\)"):
        spmm.pack_coo16(idx, val, 5)
    with pytest.raises(ValueError, match="int16"):
        spmm.pack_coo16(np.array([[0, 40000]]), val, 40001)
    with pytest.raises(ValueError, match="more set bits than s"):
        spmm.check_bitmask(np.array([[0b111]], np.uint8), np.ones((1, 2)), 3)
    with pytest.raises(ValueError, match="at or above k"):
        spmm.check_bitmask(np.array([[0b1000]], np.uint8), np.ones((1, 2)), 3)
    D, mask = jnp.ones((4, 9), BF16), jnp.zeros((2, 2), jnp.uint8)
    with pytest.raises(TypeError, match="D must be a bfloat16"):
        spmm.bitmask_matmul(jnp.ones((1, 4)), D.astype(jnp.float32), mask, jnp.ones((2, 3), BF16))
    with pytest.raises(TypeError, match="mask must be uint8"):
        spmm.bitmask_matmul(jnp.ones((1, 4)), D, jnp.zeros((2, 1), jnp.uint8), jnp.ones((2, 3), BF16))
    with pytest.raises(TypeError, match="indices must be int16"):
        spmm.coo16_matmul(jnp.ones((1, 4)), D, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), BF16))
    with pytest.raises(ValueError, match="does not match D"):
        spmm.coo16_matmul(jnp.ones((1, 5)), D, jnp.zeros((2, 3), jnp.int16), jnp.ones((2, 3), BF16))
    with pytest.raises(ValueError, match="backend must be one of"):
        spmm.coo16_matmul(jnp.ones((1, 4)), D, jnp.zeros((2, 3), jnp.int16), jnp.ones((2, 3), BF16), backend="gpu")


def test_portable_kernel_build_matches_the_reference():
    """The kernels without AVX-512 intrinsics (what a host without AVX-512 runs), compiled in a fresh process."""
    code = textwrap.dedent("""
        import numpy as np
        from cospadi_jax.sparse import spmm, spmm_cpu
        assert not spmm_cpu.AVX512
        rng = np.random.default_rng(0)
        for n, d_in, d_out, k, s in [(1, 24, 9, 37, 9), (5, 24, 9, 37, 9), (1, 16, 1, 19, 1)]:
            D = rng.normal(size=(d_in, k)).astype(spmm.BF16)
            idx = np.stack([rng.permutation(k)[:s] for _ in range(d_out)])
            val = rng.normal(size=(d_out, s))
            x = rng.normal(size=(n, d_in)).astype(np.float32)
            for layout, pack, run in [("coo16", spmm.pack_coo16, spmm_cpu.spmm_coo16_host),
                                      ("bitmask", spmm.pack_bitmask, spmm_cpu.spmm_bitmask_host)]:
                sp, v = pack(idx, val, k)
                ids = sp if layout == "coo16" else np.asarray(spmm.bitmask_indices(sp, k, s))
                S = np.zeros((k, d_out))
                np.add.at(S, (ids.astype(int), np.arange(d_out)[:, None]), np.asarray(v, np.float64))
                ref = x.astype(np.float64) @ np.asarray(D, np.float64) @ S
                y = np.zeros((n, d_out), np.float32)
                ws = np.zeros(spmm_cpu.workspace_size(n, k, layout), np.float32)
                run(x, D.view(np.uint16), sp, v.view(np.uint16), y, ws)
                assert np.abs(y - ref).max() < 1e-5 * np.abs(ref).max(), (layout, n)
        print("ok")
    """)
    env = subprocess_env(COSPADI_SPMM_ISA="portable", COSPADI_NUMBA_CACHE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------
# DictLinear's sparse modes
# ------------------------------------------------------------------------------------------------------------

def _random_factors(model, ratio: float, storage: str, rng) -> dict[str, DictFactors]:
    """Budget-sized random DictFactors for every projection of every layer (speed and exactness, not quality)."""
    out = {}
    for layer in range(model.config.num_hidden_layers):
        for proj in PROJECTION_TYPES:
            path = projection_path(layer, proj)
            W = projection_weight(model, path)
            b = budget(*W.shape, ratio, accounting=storage)
            idx, val = _support(rng, W.shape[1], b.n_atoms, b.sparsity)
            D = rng.normal(size=(W.shape[0], b.n_atoms)) * np.linalg.norm(W) / math.sqrt(W.size)
            out[path] = DictFactors(_bf16(D), idx, _bf16(val * 0.3))
    return out


@pytest.fixture(scope="module")
def tiny_llama():
    return random_model(tiny_hf_config("llama_gqa", True), seed=0)


@pytest.mark.parametrize("mode,storage", [("sparse", "eq10"), ("sparse_coo16", "coo16")])
def test_sparse_modes_give_the_dense_mode_logits(tiny_llama, mode, storage):
    from flax import nnx

    factors = _random_factors(tiny_llama, 0.3, storage, np.random.default_rng(5))
    if mode == "sparse":  # the bitmask holds one bf16 value per used atom: merge the repeated slots first
        for f in factors.values():
            k = f.D.shape[1]
            mask, packed = spmm.pack_bitmask(f.indices, f.values, k)
            f.indices = np.asarray(spmm.bitmask_indices(jnp.asarray(mask), k, f.values.shape[1]))
            f.values = np.asarray(packed, np.float64)
    models = {}
    for m in ("dense", mode):
        models[m] = nnx.clone(tiny_llama)
        for path, f in factors.items():
            replace_projection(models[m], path, f, mode=m)
    ids = jnp.asarray(np.random.default_rng(6).integers(3, 96, size=(2, 9)), jnp.int32)
    dense = np.asarray(forward_logits(models["dense"], ids))
    sparse = np.asarray(forward_logits(models[mode], ids))
    # the same function (bf16-exact factors); only the f32 summation order differs
    np.testing.assert_allclose(sparse, dense, rtol=0, atol=2e-4 * np.abs(dense).max())
    assert np.abs(dense - np.asarray(forward_logits(tiny_llama, ids))).max() > 1e-2  # the swap did something
    # decode-shaped call: one token, batch 1
    np.testing.assert_allclose(np.asarray(forward_logits(models[mode], ids[:1, :1])), dense[:1, :1], rtol=0,
                               atol=2e-4 * np.abs(dense).max())
    # resident bytes: exactly the accounting (bitmask rows round k up to whole bytes)
    for path, f in factors.items():
        module = get_module(models[mode], path)
        d_in, k = f.D.shape
        d_out, s = f.indices.shape
        b = budget(d_in, d_out, 0.3, accounting=storage)
        support = d_out * math.ceil(k / 8) if mode == "sparse" else 2 * d_out * s
        assert resident_bytes(module) == 2 * d_in * k + 2 * d_out * s + support
        assert abs(resident_bytes(module) / b.total_bytes - 1) < 0.02
        assert resident_bytes(module) <= (1 - 0.3) * b.dense_bytes * 1.02


def test_dict_linear_modes_agree_on_the_same_factors():
    rng = np.random.default_rng(7)
    idx, val = _support(rng, 48, 40, 10)
    f = DictFactors(_bf16(rng.normal(size=(64, 40))), idx, _bf16(val))
    x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
    ys = {m: np.asarray(DictLinear(f.D, f.indices, f.values, None, dtype=jnp.float32, mode=m)(x))
          for m in DICT_MODES}
    expected = np.asarray(x, np.float64) @ f.dense()
    for m in ("dense", "factored", "sparse_coo16"):
        np.testing.assert_allclose(ys[m], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ys["sparse"], expected, rtol=0, atol=2e-2)  # repeated slots merged in bf16
    layer = DictLinear(f.D, f.indices, f.values, jnp.ones(48), dtype=jnp.bfloat16, mode="sparse")
    y = layer(x)
    assert y.dtype == jnp.bfloat16 and layer.mask[...].dtype == jnp.uint8 and layer.D[...].dtype == BF16
    np.testing.assert_allclose(np.asarray(layer.coefficients(), np.float64), f.coefficients(), atol=2e-2)
    with pytest.raises(ValueError, match="unknown DictLinear mode"):
        DictLinear(f.D, f.indices, f.values, None, dtype=jnp.float32, mode="csr")
