"""Tokenisation into windows: a seeded calibration sampler and a fingerprint of the tokenizer for cache keys."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """The whole text as one stream of token ids [n_tokens] int32, without special tokens."""
    if not text.strip():
        raise ValueError("empty text: nothing to tokenize.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def sample_windows(tokenizer: Any, text: str, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
    """N calibration windows [nsamples, seqlen] int32, deterministic under ``seed``.

    The token stream is cut into non-overlapping seqlen windows (remainder dropped) and ``nsamples`` of them
    are drawn without replacement with a seeded permutation, so no calibration token is used twice.
    """
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    ids = tokenize(tokenizer, text)
    n_windows = len(ids) // seqlen
    if n_windows < nsamples:
        raise ValueError(
            f"the text has {len(ids)} tokens = {n_windows} windows of {seqlen}, fewer than nsamples={nsamples}; "
            "lower nsamples or seqlen, or use a larger text source."
        )
    windows = ids[: n_windows * seqlen].reshape(n_windows, seqlen)
    chosen = np.random.default_rng(seed).permutation(n_windows)[:nsamples]
    return np.ascontiguousarray(windows[np.sort(chosen)])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (16 hex chars) of the tokenizer's full serialisation: vocab, merges, normaliser, specials."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
