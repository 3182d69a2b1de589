"""Factored projections that replace a ``Linear`` in place, addressed by HF path.

``DictLinear`` computes y = (x·D)·S in one of two jit-compatible ways:

- ``"dense"``: reconstruct W̃ = D·S inside the compiled function, then one GEMM (fastest on CPU/GPU for
  evaluation; numerically the same function);
- ``"factored"``: z = x·D, then y_j = Σ_t values[j, t] · z[indices[j, t]], gathered in blocks of the sparsity so
  that neither dense S nor an [tokens, d_out, s] tensor is ever built.

Optional coefficient quantisation (applied once, when the layer is built): ``"bf16-14bit"`` is bf16 with the two
lowest mantissa bits truncated (Eq. 11's 14-bit values: 1 sign, 8 exponent, 5 mantissa bits), ``"int8"`` is
symmetric int8 with one scale per output column.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .methods.base import DictFactors, Factors, LowRankFactors
from .models.paths import get_module, parse_projection_path
from .models.transformer import Linear

QUANTIZATIONS = (None, "bf16-14bit", "int8")
_GATHER_BLOCK = 8  # sparsity slots gathered per step in the factored path


def quantize_coefficients(values: np.ndarray, scheme: str | None) -> np.ndarray:
    """Quantise-dequantise coefficient values [d_out, s]; returns float32 values on the quantisation grid."""
    values = np.asarray(values, np.float32)
    if scheme is None:
        return values
    if scheme == "bf16-14bit":
        bits = np.asarray(jnp.asarray(values, jnp.bfloat16)).view(np.uint16)
        truncated = (bits & np.uint16(0xFFFC)).view(jnp.bfloat16)  # drop 2 of bf16's 7 mantissa bits
        return np.asarray(truncated, np.float32)
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
    """y = (x @ D) @ S (+ bias) with S stored column-wise as indices [d_out, s] and values [d_out, s]."""

    def __init__(self, D: np.ndarray, indices: np.ndarray, values: np.ndarray, bias: jax.Array | None, *,
                 dtype: Any, mode: str = "dense"):
        if mode not in ("dense", "factored"):
            raise ValueError(f"unknown DictLinear mode {mode!r}; use 'dense' or 'factored'")
        self.D = nnx.Param(jnp.asarray(D, dtype))
        self.indices = nnx.Variable(jnp.asarray(indices, jnp.int32))  # not trainable: a support, not a weight
        self.values = nnx.Param(jnp.asarray(values, dtype))
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias, dtype))
        self.dtype = dtype
        self.mode = mode

    def coefficients(self) -> jax.Array:
        """Dense S [k, d_out] (scatter-add, so padded slots with value 0 are harmless)."""
        idx, val = self.indices[...], self.values[...]
        cols = jnp.broadcast_to(jnp.arange(idx.shape[0])[:, None], idx.shape)
        return jnp.zeros((self.D.shape[1], idx.shape[0]), self.dtype).at[idx, cols].add(val)

    def _factored(self, z: jax.Array) -> jax.Array:
        idx, val = self.indices[...], self.values[...]
        d_out, s = idx.shape
        pad = -s % _GATHER_BLOCK
        idx = jnp.pad(idx, ((0, 0), (0, pad))).reshape(d_out, -1, _GATHER_BLOCK).transpose(1, 0, 2)
        val = jnp.pad(val, ((0, 0), (0, pad))).reshape(d_out, -1, _GATHER_BLOCK).transpose(1, 0, 2)

        def step(y, block):
            i, v = block  # [d_out, block]
            return y + jnp.einsum("...jb,jb->...j", jnp.take(z, i, axis=-1), v), None

        y0 = jnp.zeros(z.shape[:-1] + (d_out,), z.dtype)
        return jax.lax.scan(step, y0, (idx, val))[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.mode == "dense":
            y = x @ (self.D[...] @ self.coefficients())
        else:
            y = self._factored(x @ self.D[...])
        return y if self.bias is None else y + self.bias[...]


def factored_module(factors: Factors, bias: jax.Array | None, *, dtype: Any, mode: str = "dense") -> nnx.Module:
    """The NNX module computing x ↦ x·W̃ (+ bias) for one set of factors (coefficient quantisation, if any, is
    applied once by the orchestrator before the factors are stored)."""
    if isinstance(factors, LowRankFactors):
        return LowRankLinear(factors.A, factors.B, bias, dtype=dtype)
    if isinstance(factors, DictFactors):
        return DictLinear(factors.D, factors.indices, factors.values, bias, dtype=dtype, mode=mode)
    raise TypeError(f"unknown factors type {type(factors).__name__}")


def replace_projection(model: nnx.Module, path: str, factors: Factors, *, mode: str = "dense") -> nnx.Module:
    """Swap the projection at HF ``path`` (e.g. ``model.layers.3.mlp.up_proj``) for its factors, in place.

    The original bias (Qwen2 q/k/v) is kept. Returns the new module.
    """
    parse_projection_path(path)
    parent_path, _, name = path.rpartition(".")
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
