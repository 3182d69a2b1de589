"""KV-cached generation with the NNX decoder: one prefill, then one-token decode steps over a static-shape cache.

A batch of prompts is left-padded to a common bucket length (a power of two, at least 16), so every row's last
prompt token sits in the same slot and the next token of every row is read from one place. The cache has a
static length L = bucket + max_new_tokens (rounded up to 16), so a :class:`Generator` compiles one prefill per
(batch, bucket, L) and one decode step per (batch, L), whatever the prompts. RoPE positions count real tokens
only (position = number of earlier non-padding tokens), as transformers' ``generate`` does with left padding, so
a padded row computes exactly what it computes alone.

Compressed projections (``DictLinear`` in either mode, ``LowRankLinear``) are ordinary submodules here: the cached
forward calls the same modules as the full forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import DecoderConfig
from .transformer import CausalLM, rotary_cos_sin

Array = jax.Array
_MIN_BUCKET = 16
_CACHE_ROUND = 16


class KVCache(NamedTuple):
    """Decoder state between steps (a pytree; every array has a static shape).

    layers: per decoder layer (keys, values), each [B, L, kv_heads, head_dim] in the model dtype;
    valid: [B, L] bool, the slot holds a real (non-padding) token; index: int32 scalar, the next free slot;
    next_position: [B] int32, the RoPE position of each row's next token.
    """

    layers: tuple[tuple[Array, Array], ...]
    valid: Array
    index: Array
    next_position: Array


def init_cache(cfg: DecoderConfig, batch: int, length: int, dtype: Any) -> KVCache:
    """An empty cache of ``length`` slots for ``batch`` rows."""
    shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
    layers = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_hidden_layers))
    return KVCache(layers, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32))


def forward_cached(model: CausalLM, input_ids: Array, attention_mask: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Run T new tokens per row through the decoder, reading and extending the cache.

    input_ids, attention_mask: [B, T] (mask 1 = real token, 0 = left padding; a decode step is T = 1, all ones).
    Returns (logits [B, V] float32 of the last of the T slots, the updated cache). The new tokens occupy slots
    [index, index + T); a query in slot i attends to every valid slot j <= i.
    """
    cfg = model.config
    t = input_ids.shape[1]
    length = cache.valid.shape[1]
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.maximum(cache.next_position[:, None] + jnp.cumsum(mask, axis=1) - 1, 0)
    valid = jax.lax.dynamic_update_slice(cache.valid, mask.astype(bool), (0, cache.index))
    slots = cache.index + jnp.arange(t)
    causal = jnp.arange(length)[None, :] <= slots[:, None]  # [T, L]
    attend = causal[None, None] & valid[:, None, None, :]  # [B, 1, T, L]
    cos, sin = rotary_cos_sin(cfg, positions, model.dtype)
    h = model.model.embed_tokens(input_ids).astype(model.dtype)
    layers = []
    for layer, layer_cache in zip(model.model.layers, cache.layers):
        h, layer_cache = layer.cached(h, cos, sin, attend, layer_cache, cache.index)
        layers.append(layer_cache)
    logits = model.head(h[:, -1:])[:, 0]
    return logits, KVCache(tuple(layers), valid, cache.index + t, cache.next_position + mask.sum(axis=1))


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (argmax); otherwise the logits are divided by the
    temperature, restricted to the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling),
    and sampled with a key derived from ``seed`` and the step, so a run is deterministic under its seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus restriction)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_tokens(logits: Array, key: Array, temperature: Array, top_p: Array) -> Array:
    """Nucleus sampling: logits [B, V] float32 -> tokens [B] int32. The most probable token is always kept."""
    logits = logits / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the mass before this token has not yet reached top_p
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jax.random.categorical(key, jnp.where(logits >= cutoff, logits, -jnp.inf), axis=-1).astype(jnp.int32)


def _bucket(n: int) -> int:
    return max(_MIN_BUCKET, 1 << (n - 1).bit_length())


class Generator:
    """Compiled KV-cached generation for one model (its parameters as they are when the Generator is built).

    >>> gen = Generator(model)
    >>> gen.generate([tokenizer.encode("The Lord is")], max_new_tokens=32)      # greedy
    >>> for tokens in gen.stream(prompts, 64, sampling=Sampling(0.7, 0.9, seed=1)): ...

    The model is split once into its graph and state, so a decode step costs one compiled call, not an NNX
    graph traversal.
    """

    def __init__(self, model: CausalLM):
        self.config: DecoderConfig = model.config
        self.dtype = model.dtype
        self._graphdef, self._state = nnx.split(model)
        # The cache is donated: each step updates it in place instead of copying L slots per layer.
        self._step = jax.jit(self._step_impl, static_argnames=("greedy",), donate_argnames=("cache",))

    def _step_impl(self, state: Any, input_ids: Array, attention_mask: Array, cache: KVCache, key: Array,
                   temperature: Array, top_p: Array, *, greedy: bool) -> tuple[Array, Array, KVCache]:
        model = nnx.merge(self._graphdef, state)
        logits, cache = forward_cached(model, input_ids, attention_mask, cache)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else \
            sample_tokens(logits, key, temperature, top_p)
        return token, logits, cache

    def step(self, input_ids: Array, attention_mask: Array, cache: KVCache, *, sampling: Sampling = Sampling(),
             step: int = 0) -> tuple[Array, Array, KVCache]:
        """One compiled prefill (T > 1) or decode (T = 1) step: (next tokens [B], logits [B, V], cache).

        The cache passed in is donated (consumed); use the returned one."""
        key = jax.random.fold_in(jax.random.key(sampling.seed), step)
        return self._step(self._state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                          cache, key, jnp.float32(sampling.temperature or 1.0), jnp.float32(sampling.top_p),
                          greedy=sampling.greedy)

    def prepare(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_token_id: int = 0
                ) -> tuple[np.ndarray, np.ndarray, KVCache]:
        """Validate and left-pad a batch: (ids [B, bucket] int32, mask [B, bucket] int32, an empty cache)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (an empty prompt has nothing to condition on; "
                             "start it with the tokenizer's BOS token)")
        cfg = self.config
        longest = max(len(p) for p in prompts)
        limit = cfg.max_position_embeddings
        if longest > limit:
            raise ValueError(f"a prompt of {longest} tokens is longer than the model's {limit} positions "
                             "(max_position_embeddings): truncate it (keep its last tokens)")
        if longest + max_new_tokens > limit:
            raise ValueError(f"{longest} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's {limit} "
                             f"positions: lower max_new_tokens to <= {limit - longest} or shorten the prompt")
        bucket = _bucket(longest)
        ids = np.full((len(prompts), bucket), pad_token_id, np.int32)
        mask = np.zeros((len(prompts), bucket), np.int32)
        for row, prompt in enumerate(prompts):
            tokens = np.asarray(prompt, np.int64)
            if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
                raise ValueError(f"prompt {row} holds token ids outside [0, {cfg.vocab_size}) of this model's "
                                 "vocabulary: was it encoded with another tokenizer?")
            ids[row, bucket - len(tokens):] = tokens
            mask[row, bucket - len(tokens):] = 1
        length = -(-(bucket + max_new_tokens) // _CACHE_ROUND) * _CACHE_ROUND
        return ids, mask, init_cache(cfg, len(prompts), length, self.dtype)

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, sampling: Sampling = Sampling(),
               eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
               stop: Callable[[int, list[int]], bool] | None = None) -> Iterator[np.ndarray]:
        """Yield the next token of every row, [B] int64, once per step.

        A row is finished after it yields one of ``eos_token_ids`` or when ``stop(row, tokens_so_far)`` returns
        True (e.g. a stop string); a finished row yields -1 from then on, and the stream ends when every row is
        finished or after ``max_new_tokens`` steps. ``pad_token_id`` fills the left padding.
        """
        ids, mask, cache = self.prepare(prompts, max_new_tokens, pad_token_id=pad_token_id)
        eos = np.asarray(list(eos_token_ids), np.int64)
        done = np.zeros(len(prompts), bool)
        generated: list[list[int]] = [[] for _ in prompts]
        token, _, cache = self.step(ids, mask, cache, sampling=sampling, step=0)
        ones = np.ones((len(prompts), 1), np.int32)
        for step in range(max_new_tokens):
            tokens = np.asarray(token, np.int64)
            tokens[done] = -1
            yield tokens
            for row in np.flatnonzero(~done):
                generated[row].append(int(tokens[row]))
                if tokens[row] in eos or (stop is not None and stop(int(row), generated[row])):
                    done[row] = True
            if done.all() or step + 1 == max_new_tokens:
                return
            feed = np.where(done, pad_token_id, tokens)[:, None].astype(np.int32)
            token, _, cache = self.step(feed, ones, cache, sampling=sampling, step=step + 1)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, sampling: Sampling = Sampling(),
                 eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """The generated tokens of every row (an EOS token that ends a row is included, as in transformers)."""
        out: list[list[int]] = [[] for _ in prompts]
        for tokens in self.stream(prompts, max_new_tokens, sampling=sampling, eos_token_ids=eos_token_ids,
                                  pad_token_id=pad_token_id, stop=stop):
            for row in np.flatnonzero(tokens >= 0):
                out[row].append(int(tokens[row]))
        return out


def generate(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampling: Sampling = Sampling(), eos_token_ids: Sequence[int] = (), pad_token_id: int = 0
             ) -> list[list[int]]:
    """One-shot :meth:`Generator.generate` (compiles on first use; keep a Generator to reuse the compiled steps)."""
    return Generator(model).generate(prompts, max_new_tokens, sampling=sampling, eos_token_ids=eos_token_ids,
                                     pad_token_id=pad_token_id)
