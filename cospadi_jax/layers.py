"""Factored projections that replace a ``Linear`` in place, addressed by HF path.

``DictLinear`` computes y = (x·D)·S in one of four jit-compatible ways (``DICT_MODES``):

- ``"dense"``: reconstruct W̃ = D·S inside the compiled function, then one GEMM (fastest on CPU/GPU for
  evaluation of long sequences; numerically the same function);
- ``"factored"``: z = x·D, then y_j = Σ_t values[j, t] · z[indices[j, t]], gathered in blocks of the sparsity so
  that neither dense S nor an [tokens, d_out, s] tensor is ever built;
- ``"sparse"``: the inference layout. D and the values are held in bfloat16 and S's support as a bitmask
  (uint8 [d_out, ceil(k/8)]), so the resident bytes are budget's ``accounting="eq10"`` accounting; the product
  runs in the fused CPU kernel of :mod:`.sparse.spmm` (an XLA FFI call inside the jitted model; the XLA gather
  path on other platforms). For batch-1 decode and short prefill;
- ``"sparse_coo16"``: the same with int16 atom ids instead of the bitmask (``accounting="coo16"``).

The sparse modes round D and the values to bf16 once, when the layer is built; they compute in float32 and
return the model dtype. :func:`resident_bytes` counts what a module holds.

Optional coefficient quantisation (applied once, when the layer is built; :data:`QUANTIZATIONS`): ``"bf16"``
rounds the values to bfloat16 (16 bits: 1 sign, 8 exponent, 7 mantissa bits); ``"bf16-14bit"``, ``"bf16-12bit"``
and ``"bf16-10bit"`` then drop the 2, 4 or 6 lowest mantissa bits (Eq. 11's 14-bit values keep 5 mantissa bits).
The rounding rule of every bf16 scheme: round to nearest, ties to even, into bf16, then truncate the dropped bits
(toward zero). 8 bits cannot be reached by mantissa truncation (sign and exponent alone take 9), so the 8-bit
point of the paper's Fig. 3 is ``"int8"``: symmetric int8 with one scale per output column.

The bit width does not enter the budget: k and s come from ``method.accounting`` (Eq. 11 counts 14-bit values
at ρ = 2) whatever ``quantization`` is, so a narrower width is the same fitted model with coarser values (what
the paper's Fig. 3 measures), not a re-spent budget, and ``realised_ratio`` does not change. :data:`VALUE_BITS`
gives the width each scheme stores.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .methods.base import DictFactors, Factors, LowRankFactors
from .models.paths import get_module, projection_module_path
from .models.transformer import Linear
from .sparse import spmm

# bf16 schemes -> stored bits (1 sign + 8 exponent + the mantissa bits kept); see the module docstring.
BF16_WIDTHS = {"bf16": 16, "bf16-14bit": 14, "bf16-12bit": 12, "bf16-10bit": 10}
QUANTIZATIONS = (None, *BF16_WIDTHS, "int8")
# Bits per stored coefficient value (int8's per-column scale not counted); None: float32, not quantised.
VALUE_BITS = {None: 32, **BF16_WIDTHS, "int8": 8}
DICT_MODES = ("dense", "factored", "sparse", "sparse_coo16")
# The budget storage (budget.budget(..., accounting=...)) whose bytes a packed mode holds exactly.
MODE_STORAGE = {"sparse": "eq10", "sparse_coo16": "coo16"}


def quantize_coefficients(values: np.ndarray, scheme: str | None) -> np.ndarray:
    """Quantise-dequantise coefficient values [d_out, s]; returns float32 values on the quantisation grid."""
    values = np.asarray(values, np.float32)
    if scheme is None:
        return values
    if scheme in BF16_WIDTHS:
        bits = np.asarray(jnp.asarray(values, jnp.bfloat16)).view(np.uint16)  # round to nearest even into bf16
        keep = np.uint16((0xFFFF << (16 - BF16_WIDTHS[scheme])) & 0xFFFF)  # 14 bits: 0xFFFC, 2 mantissa bits off
        return np.asarray((bits & keep).view(jnp.bfloat16), np.float32)
    if scheme == "int8":
        scale = np.abs(values).max(axis=1, keepdims=True) / 127.0
        scale = np.where(scale == 0, 1.0, scale)
        return (np.clip(np.round(values / scale), -127, 127) * scale).astype(np.float32)
    raise ValueError(f"unknown coefficient quantisation {scheme!r}; use one of {QUANTIZATIONS}")


class LowRankLinear(nnx.Module):
    """y = (x @ A) @ B (+ bias).  A: [d_in, r], B: [r, d_out]."""

    def __init__(self, A: np.ndarray, B: np.ndarray, bias: jax.Array | None, *, dtype: Any):
        self.A = nnx.Param(jnp.asarray(A, dtype))
        self.B = nnx.Param(jnp.asarray(B, dtype))
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias, dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = (x.astype(self.dtype) @ self.A[...]) @ self.B[...]
        return y if self.bias is None else y + self.bias[...]


class DictLinear(nnx.Module):
    """y = (x @ D) @ S (+ bias), S column-sparse with s entries per output column (see the module docstring).

    Held arrays by mode: "dense" / "factored": D [d_in, k], values [d_out, s] in ``dtype``, indices [d_out, s]
    int32 (padded slots are value 0; repeated ids add up); "sparse": D and values bf16, mask uint8
    [d_out, ceil(k/8)] (:func:`.sparse.spmm.pack_bitmask`); "sparse_coo16": D and values bf16, indices int16
    (:func:`.sparse.spmm.pack_coo16`). ``bias`` [d_out] stays in ``dtype``.
    """

    def __init__(self, D: np.ndarray, indices: np.ndarray, values: np.ndarray, bias: jax.Array | None, *,
                 dtype: Any, mode: str = "dense"):
        if mode not in DICT_MODES:
            raise ValueError(f"unknown DictLinear mode {mode!r}; use one of {DICT_MODES}")
        k = int(np.shape(D)[1])
        if mode == "sparse":
            mask, values = spmm.pack_bitmask(np.asarray(indices), np.asarray(values), k)
            self.mask = nnx.Variable(jnp.asarray(mask))  # not trainable: a support, not a weight
        elif mode == "sparse_coo16":
            indices, values = spmm.pack_coo16(np.asarray(indices), np.asarray(values), k)
            self.indices = nnx.Variable(jnp.asarray(indices))
        else:
            self.indices = nnx.Variable(jnp.asarray(indices, jnp.int32))
        weight_dtype = spmm.BF16 if mode.startswith("sparse") else dtype
        self.D = nnx.Param(jnp.asarray(D, weight_dtype))
        self.values = nnx.Param(jnp.asarray(values, weight_dtype))
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias, dtype))
        self.dtype = dtype
        self.mode = mode

    def support(self) -> jax.Array:
        """Atom ids [d_out, s] (int32) of the held layout; with a bitmask, used atoms ascending then 0."""
        if self.mode == "sparse":
            return spmm.bitmask_indices(self.mask[...], self.D.shape[1], self.values.shape[1])
        return self.indices[...].astype(jnp.int32)

    def coefficients(self) -> jax.Array:
        """Dense S [k, d_out] (scatter-add, so padded slots with value 0 are harmless)."""
        idx, val = self.support(), self.values[...].astype(self.dtype)
        cols = jnp.broadcast_to(jnp.arange(idx.shape[0])[:, None], idx.shape)
        return jnp.zeros((self.D.shape[1], idx.shape[0]), self.dtype).at[idx, cols].add(val)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.mode == "dense":
            y = x @ (self.D[...] @ self.coefficients())
        elif self.mode == "factored":
            y = spmm.gather_columns(x @ self.D[...], self.indices[...], self.values[...])
        elif self.mode == "sparse":
            y = spmm.bitmask_matmul(x, self.D[...], self.mask[...], self.values[...]).astype(self.dtype)
        else:
            y = spmm.coo16_matmul(x, self.D[...], self.indices[...], self.values[...]).astype(self.dtype)
        return y if self.bias is None else y + self.bias[...]


def resident_bytes(module: nnx.Module) -> int:
    """Bytes of every array a module holds (parameters, supports, biases, norms; each distinct array once).

    For a DictLinear in a sparse mode this is the inference footprint: D and values in bf16 plus the mask or
    the int16 ids (and a bias if the original layer had one), i.e. budget's eq10 / coo16 bytes."""
    seen: dict[int, int] = {}
    for leaf in jax.tree_util.tree_leaves(nnx.state(module)):
        if hasattr(leaf, "nbytes"):
            seen.setdefault(id(leaf), int(leaf.nbytes))
    return sum(seen.values())


def factored_module(factors: Factors, bias: jax.Array | None, *, dtype: Any, mode: str = "dense") -> nnx.Module:
    """The NNX module computing x ↦ x·W̃ (+ bias) for one set of factors (coefficient quantisation, if any, is
    applied once by the orchestrator before the factors are stored). ``mode``: the DictLinear path
    (:data:`DICT_MODES`); low-rank factors have one path and ignore it."""
    if isinstance(factors, LowRankFactors):
        return LowRankLinear(factors.A, factors.B, bias, dtype=dtype)
    if isinstance(factors, DictFactors):
        return DictLinear(factors.D, factors.indices, factors.values, bias, dtype=dtype, mode=mode)
    raise TypeError(f"unknown factors type {type(factors).__name__}")


def replace_projection(model: nnx.Module, path: str, factors: Factors, *, mode: str = "dense") -> nnx.Module:
    """Swap the projection at HF ``path`` (e.g. ``model.layers.3.mlp.up_proj``) for its factors, in place; ``model``
    is the whole model or the path's decoder layer (as a layer source yields it).

    The original bias (Qwen2 q/k/v) is kept. Returns the new module.
    """
    parent_path, _, name = projection_module_path(model, path).rpartition(".")
    parent = get_module(model, parent_path)
    old = getattr(parent, name)
    if not isinstance(old, Linear):
        raise ValueError(f"{path} is already compressed ({type(old).__name__}); reload the model to refit it")
    d_in, d_out = old.kernel.shape
    if factors.shape != (d_in, d_out):
        raise ValueError(f"factors of shape {factors.shape} do not fit {path} with W [d_in, d_out] = {(d_in, d_out)}")
    bias = None if old.bias is None else old.bias[...]
    new = factored_module(factors, bias, dtype=old.dtype, mode=mode)
    setattr(parent, name, new)
    return new


def set_dict_mode(model: nnx.Module, mode: str) -> int:
    """Rebuild every ``DictLinear`` of ``model`` in ``mode`` (:data:`DICT_MODES`), in place, from the support and
    values it holds: e.g. ``"sparse"`` for fast batch-1 decode on the CPU after loading an artifact or an export
    evaluated in ``"dense"`` mode. Returns the number of modules rebuilt.

    Going to a sparse mode rounds D and the values to bf16 (what those layouts hold); from a sparse mode the
    bf16 numbers are kept exactly."""
    if mode not in DICT_MODES:
        raise ValueError(f"unknown DictLinear mode {mode!r}; use one of {DICT_MODES}")
    rebuilt = 0
    for path, module in list(nnx.iter_graph(model)):
        if isinstance(module, DictLinear) and module.mode != mode:
            parent = get_module(model, ".".join(str(p) for p in path[:-1])) if len(path) > 1 else model
            bias = None if module.bias is None else module.bias[...]
            new = DictLinear(np.asarray(module.D[...], np.float32), np.asarray(module.support()),
                             np.asarray(module.values[...], np.float32), bias, dtype=module.dtype, mode=mode)
            setattr(parent, str(path[-1]), new)
            rebuilt += 1
    return rebuilt
