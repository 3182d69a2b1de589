"""Perplexity under one written-down protocol (docs/perplexity.md).

Non-overlapping ``seqlen`` windows over the joined, tokenised text (remainder dropped); every window is scored
on its last ``seqlen - 1`` tokens (the first has no context); PPL = exp(token-weighted mean NLL). No BOS is
inserted by default, for every family (SparseGPT protocol: windows are raw slices of one token stream);
``add_bos=True`` prepends the tokenizer's BOS to ``seqlen - 1`` text tokens and scores all of them.
Non-finite log-probabilities raise instead of being skipped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ..data.calibration import tokenize
from ..parallel import is_primary
from ..models.transformer import CausalLM, token_logprobs
from .sharded import ShardedScorer


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    n_tokens: int  # scored tokens
    n_windows: int
    seqlen: int
    add_bos: bool

    def to_dict(self) -> dict:
        return asdict(self)


def make_windows(
    tokenizer: Any, text: str, seqlen: int, *, max_windows: int | None = None, add_bos: bool = False
) -> np.ndarray:
    """Evaluation windows [n_windows, seqlen] int32 under the protocol above."""
    ids = tokenize(tokenizer, text)
    body = seqlen - 1 if add_bos else seqlen
    n = len(ids) // body
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {body}; use a longer text.")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        n = min(n, max_windows)
    windows = ids[: n * body].reshape(n, body)
    if add_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token (e.g. Qwen); use add_bos=False.")
        windows = np.concatenate([np.full((n, 1), bos, np.int32), windows], axis=1)
    return windows


def windows_perplexity(
    model: CausalLM,
    windows: np.ndarray,
    *,
    batch_size: int = 1,
    add_bos: bool = False,
    progress: bool = True,
    mesh: Mesh | None = None,
) -> PerplexityResult:
    """Perplexity of pre-built windows [n, seqlen] (see :func:`make_windows`).

    Batches have a fixed shape [batch_size, seqlen] (the last one is padded with copies of a window whose scores
    are dropped), so the forward pass compiles exactly once.

    With ``mesh`` the evaluation is data-parallel (:class:`~cospadi_jax.eval.sharded.ShardedScorer`): parameters
    placed by the ``params`` sharding rule (replicated), each batch split over the ``"batch"`` axis, and
    ``batch_size`` (the global batch) rounded up to a multiple of that axis' device count. The result equals the
    single-device one up to float roundoff. With a mesh over several processes call it on every process with the
    same windows (a collective); every process returns the same result, only process 0 shows progress. Without a
    mesh each process evaluates alone on its default device.
    """
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, seqlen] array, got shape {windows.shape}")
    n, seqlen = windows.shape
    if seqlen > model.config.max_position_embeddings:
        raise ValueError(
            f"seqlen {seqlen} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}; use a shorter seqlen."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mesh is None:
        def score(batch: np.ndarray) -> np.ndarray:
            return np.asarray(token_logprobs(model, jnp.asarray(batch)))
    else:
        scorer = ShardedScorer(token_logprobs, model, mesh)
        batch_size = scorer.round_batch(batch_size)
        ones = np.ones((batch_size, seqlen), np.int32)  # windows have no padding tokens

        def score(batch: np.ndarray) -> np.ndarray:
            return scorer(batch, ones)
    total_nll, total_tokens = 0.0, 0
    starts = range(0, n, batch_size)
    bar = tqdm(starts, desc=f"perplexity ({n} x {seqlen})", disable=not (progress and is_primary()), unit="batch")
    for start in bar:
        batch = windows[start : start + batch_size]
        real = len(batch)
        if real < batch_size:  # pad with copies, dropped below: keeps one compiled shape
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
        logp = score(batch).astype(np.float64)[:real]
        if not np.all(np.isfinite(logp)):
            bad = start + int(np.argwhere(~np.isfinite(logp))[0, 0])
            raise FloatingPointError(
                f"non-finite log-probabilities in window {bad}; the model produces NaN/inf logits "
                "(a diverged compression, or bf16 overflow: evaluate in float32)."
            )
        total_nll -= float(logp.sum())
        total_tokens += logp.size
    mean_nll = total_nll / total_tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, total_tokens, n, seqlen, add_bos)


def perplexity(
    model: CausalLM,
    tokenizer: Any,
    text: str,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    add_bos: bool = False,
    progress: bool = True,
    mesh: Mesh | None = None,
) -> PerplexityResult:
    """Token-weighted perplexity of ``text`` under the protocol in the module docstring.

    ``mesh``: data-parallel evaluation, see :func:`windows_perplexity`.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be one str (join a list of documents first), got {type(text).__name__}")
    if not text or not text.strip():
        raise ValueError("empty text: perplexity needs at least one window of tokens.")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2 (one input and one predicted token), got {seqlen!r}")
    if tokenizer is None:
        raise ValueError("perplexity needs the model's tokenizer, got None")
    if seqlen > model.config.max_position_embeddings:
        raise ValueError(
            f"seqlen {seqlen} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}; use a shorter seqlen."
        )
    windows = make_windows(tokenizer, text, seqlen, max_windows=max_windows, add_bos=add_bos)
    return windows_perplexity(model, windows, batch_size=batch_size, add_bos=add_bos, progress=progress, mesh=mesh)
