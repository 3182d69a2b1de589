"""One Flax NNX decoder for Llama (2, 3, 3.1/3.2, SmolLM2), Qwen2 and Qwen3.

Module attribute paths equal the Hugging Face parameter paths: ``model.layers.3.mlp.up_proj`` is the same
projection in both. Linear kernels are stored as ``kernel: [d_in, d_out]`` (= HF ``weight.T``), which is the
paper's orientation W, so compression code reads W directly from the model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .config import DecoderConfig

Array = jax.Array


class Linear(nnx.Module):
    """y = x @ kernel (+ bias).  kernel: [d_in, d_out], bias: [d_out]."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype: Any, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale.  weight: [dim]."""

    def __init__(self, dim: int, eps: float, *, dtype: Any):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


def rotary_cos_sin(cfg: DecoderConfig, positions: Array, dtype: Any) -> tuple[Array, Array]:
    """positions: [B, T] int -> cos, sin: [B, T, head_dim] in ``dtype`` (angles computed in float32)."""
    inv_freq = jnp.asarray(cfg.rope_inv_freq, jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = cfg.rope_attention_scaling
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def _rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, T, heads, head_dim]; cos, sin: [B, T, head_dim]."""
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        h, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.num_attention_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(h, cfg.num_key_value_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(h, cfg.num_key_value_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_attention_heads * hd, h, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.cfg = cfg

    def _qkv(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
        """x: [B, T, hidden] -> q [B, T, heads, hd], k, v [B, T, kv_heads, hd] (normed and rotated)."""
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _attend(self, q: Array, k: Array, v: Array, mask: Array) -> tuple[Array, Array]:
        """q [B, T, heads, hd] over k, v [B, S, kv_heads, hd] with mask [B, 1, T, S] -> (output, o_proj input)."""
        b, t = q.shape[:2]
        # GQA/MQA handled natively: key/value heads must divide query heads.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.cfg.head_dim**-0.5)
        attn = out.reshape(b, t, self.cfg.num_attention_heads * self.cfg.head_dim)
        return self.o_proj(attn), attn

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> tuple[Array, Array]:
        """x: [B, T, hidden], mask: [B, 1, T, T] bool. Returns (output, o_proj input [B, T, heads*head_dim])."""
        return self._attend(*self._qkv(x, cos, sin), mask)

    def cached(self, x: Array, cos: Array, sin: Array, mask: Array, cache: tuple[Array, Array], index: Array
               ) -> tuple[Array, tuple[Array, Array]]:
        """The same attention over a KV cache: the T new tokens' keys and values are written into the cache's
        slots [index, index + T) first, then the queries attend over all L slots.

        x: [B, T, hidden]; cache: (keys, values) [B, L, kv_heads, hd]; mask: [B, 1, T, L] bool; index: int32
        scalar. Returns (output [B, T, hidden], updated cache).
        """
        q, k, v = self._qkv(x, cos, sin)
        keys, values = cache
        keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, index, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, index, 0, 0))
        return self._attend(q, keys, values, mask)[0], (keys, values)


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, i, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(h, i, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(i, h, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        """x: [B, T, hidden]. Returns (output, down_proj input [B, T, intermediate])."""
        act = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(act), act


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(
        self, h: Array, cos: Array, sin: Array, mask: Array, *, return_projection_inputs: bool = False
    ) -> Array | tuple[Array, dict[str, Array]]:
        """h: [B, T, hidden] -> [B, T, hidden].

        With ``return_projection_inputs`` also returns the input of every distinct projection input, keyed by
        the first projection that reads it (q/k/v share one input, gate/up share one): used for calibration Grams.
        """
        x_attn = self.input_layernorm(h)
        attn_out, o_in = self.self_attn(x_attn, cos, sin, mask)
        h = h + attn_out
        x_mlp = self.post_attention_layernorm(h)
        mlp_out, down_in = self.mlp(x_mlp)
        h = h + mlp_out
        if not return_projection_inputs:
            return h
        inputs = {"self_attn.q_proj": x_attn, "self_attn.o_proj": o_in, "mlp.gate_proj": x_mlp, "mlp.down_proj": down_in}
        return h, inputs

    def cached(self, h: Array, cos: Array, sin: Array, mask: Array, cache: tuple[Array, Array], index: Array
               ) -> tuple[Array, tuple[Array, Array]]:
        """:meth:`__call__` over a KV cache (see :meth:`Attention.cached`): h [B, T, hidden] -> (h, cache)."""
        attn_out, cache = self.self_attn.cached(self.input_layernorm(h), cos, sin, mask, cache, index)
        h = h + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))[0], cache


class Embed(nnx.Module):
    """embedding: [vocab, hidden] (HF ``embed_tokens.weight``)."""

    def __init__(self, vocab: int, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.embedding = nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), (vocab, dim), dtype))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class DecoderModel(nnx.Module):
    """HF ``model.*``: embeddings, decoder layers and the final norm."""

    def __init__(self, cfg: DecoderConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


def causal_mask(attention_mask: Array) -> Array:
    """attention_mask: [B, T] (1 = real token) -> [B, 1, T, T] bool: causal and never attending to padding."""
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


def layer_rotary(cfg: DecoderConfig, batch: int, seqlen: int, dtype: Any) -> tuple[Array, Array]:
    """cos, sin [B, T, head_dim] for positions 0..T-1, as in a plain HF forward (right padding keeps positions)."""
    return rotary_cos_sin(cfg, jnp.broadcast_to(jnp.arange(seqlen), (batch, seqlen)), dtype)


class CausalLM(nnx.Module):
    """Decoder-only LM with HF parameter paths (``model.*`` and, when untied, ``lm_head``)."""

    def __init__(self, cfg: DecoderConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.model = DecoderModel(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs
        )

    def embed(self, input_ids: Array, attention_mask: Array | None = None) -> tuple[Array, Array, Array, Array]:
        """Token embeddings and what every layer needs: (h [B,T,H], cos, sin [B,T,hd], mask [B,1,T,T])."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        cos, sin = layer_rotary(self.config, b, t, self.dtype)
        h = self.model.embed_tokens(input_ids).astype(self.dtype)
        return h, cos, sin, causal_mask(attention_mask)

    def head(self, h: Array) -> Array:
        """Final norm and LM head: h [B, T, H] -> logits [B, T, V] in float32."""
        h = self.model.norm(h)
        if self.lm_head is None:
            logits = h @ self.model.embed_tokens.embedding[...].astype(self.dtype).T
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """input_ids: [B, T] int32, attention_mask: [B, T] (1 real, 0 pad) -> logits [B, T, V] float32."""
        h, cos, sin, mask = self.embed(input_ids, attention_mask)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask)
        return self.head(h)


@nnx.jit
def forward_logits(model: CausalLM, input_ids: Array, attention_mask: Array | None = None) -> Array:
    """jit-compiled logits: [B, T] -> [B, T, V] float32 (compiles once per input shape)."""
    return model(input_ids, attention_mask)


@nnx.jit
def token_logprobs(model: CausalLM, input_ids: Array, attention_mask: Array | None = None) -> Array:
    """Log-probability of every next token: input_ids [B, T] -> [B, T-1] float32.

    Entry ``[b, i]`` is log p(input_ids[b, i+1] | input_ids[b, :i+1]); the full vocabulary reaches the
    log-softmax, and the [B, T, V] logits never leave the device.
    """
    logits = model(input_ids, attention_mask)[:, :-1]
    logz = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
    return target - logz
