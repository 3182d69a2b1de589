"""On-disk cache of calibration Grams, keyed by everything that determines them.

The key is model identity (config + a fingerprint of the weights), tokenizer fingerprint, text source, nsamples,
seqlen and seed. The file name is a hash of the key, so a changed key recomputes; the key is also stored inside
the file and checked on load, so a file renamed or copied from another run is refused rather than reused.
Files are ``.npz`` written with ``allow_pickle=False`` (nothing is ever unpickled) through a temporary file and an
atomic rename, so a killed run never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ..fileio import atomic_path
from .grams import Grams


class StaleCacheError(ValueError):
    """A cached Gram file was computed for another model, tokenizer or calibration setting."""


def model_fingerprint(model: nnx.Module) -> str:
    """sha256 (16 hex) of the config and of every parameter's shape, dtype and a strided sample of its values."""
    h = hashlib.sha256(repr(model.config).encode())
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        value = np.asarray(jax.device_get(var.get_value()))
        flat = value.reshape(-1)
        sample = flat[:: max(1, flat.size // 4096)].astype(np.float32)
        h.update(f"{path}{value.shape}{value.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class GramKey:
    model: str  # model_fingerprint
    tokenizer: str  # tokenizer_fingerprint
    source: str
    nsamples: int
    seqlen: int
    seed: int
    layers: tuple[int, ...] | None = None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


def save_grams(path: str | Path, grams: Grams, key: GramKey) -> Path:
    """Write Grams + their key atomically to ``path`` (.npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"gram::{p}": g for p, g in grams.by_path.items()}
    arrays.update({f"abs::{p}": a for p, a in grams.abs_sums.items()})
    meta = json.dumps({"key": asdict(key), "n_tokens": grams.n_tokens})
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, __meta__=np.frombuffer(meta.encode(), np.uint8), **arrays)
    return path


def load_grams(path: str | Path, key: GramKey) -> Grams:
    """Read Grams from ``path`` and check that they were computed under ``key``; raise otherwise."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["__meta__"]).decode())
        stored = GramKey(**{**meta["key"], "layers": tuple(meta["key"]["layers"]) if meta["key"]["layers"]
                            is not None else None})
        if stored != key:
            diff = {f: (getattr(stored, f), getattr(key, f)) for f in asdict(key) if getattr(stored, f) != getattr(key, f)}
            raise StaleCacheError(
                f"{path} holds Grams for a different setting (stored vs requested: {diff}); it is never reused "
                "silently. Delete it or point the cache elsewhere to recompute."
            )
        grams = Grams(n_tokens=int(meta["n_tokens"]))
        for name in data.files:
            if name.startswith("gram::"):
                grams.by_path[name[6:]] = data[name]
            elif name.startswith("abs::"):
                grams.abs_sums[name[5:]] = data[name]
    return grams


def cached_path(cache_dir: str | Path, key: GramKey) -> Path:
    return Path(cache_dir) / f"grams-{key.digest()}.npz"
