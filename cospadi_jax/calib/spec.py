"""Where calibration statistics come from (the ``calib`` node of the configs), and the Grams it gives."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from ..data.calibration import sample_windows, tokenizer_fingerprint
from ..data.text import load_text
from ..fileio import can_create_in
from ..models.transformer import CausalLM
from ..parallel import on_every_process
from .cache import GramKey, cached_path, load_grams, model_fingerprint, save_grams
from .grams import Grams, collect_grams

log = logging.getLogger(__name__)


@dataclass
class CalibrationSpec:
    """Where calibration and held-out statistics come from (paper: RefinedWeb, 256 x 1024, seed 42); the
    schema of the configs' ``calib`` node."""

    source: str = "embedded:calibration"
    nsamples: int = 256
    seqlen: int = 1024
    seed: int = 42
    heldout_source: Optional[str] = "embedded:heldout"
    heldout_nsamples: int = 32
    batch_size: int = 8
    # Gram cache directory (keyed by model, tokenizer, source, nsamples, seqlen, seed); None: no cache.
    # conf/calib/*.yaml set .cache/grams, so every job of a sweep reuses one calibration pass.
    cache_dir: Optional[str] = None
    # Grams of each layer on the activations of the model whose earlier layers are compressed (sequential.py)
    sequential: bool = False

    def validate(self) -> None:
        """Raise naming the bad key."""
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError(f"calib.nsamples >= 1 and calib.seqlen >= 2 required, got {self.nsamples}, "
                             f"{self.seqlen}")
        if self.heldout_nsamples < 1 or self.batch_size < 1:
            raise ValueError(f"calib.heldout_nsamples and calib.batch_size must be >= 1, got "
                             f"{self.heldout_nsamples}, {self.batch_size}")


def calibration_grams(model: CausalLM, tokenizer: Any, spec: CalibrationSpec, layers: list[int] | None,
                      *, heldout: bool = False, progress: bool = True) -> tuple[Grams, GramKey]:
    """Grams over seeded windows of the calibration (or held-out) source, through the on-disk cache if set."""
    source = spec.heldout_source if heldout else spec.source
    nsamples = spec.heldout_nsamples if heldout else spec.nsamples
    key = GramKey(model_fingerprint(model), tokenizer_fingerprint(tokenizer), source, nsamples, spec.seqlen,
                  spec.seed, tuple(layers) if layers is not None else None)
    if spec.seqlen > model.config.max_position_embeddings:
        raise ValueError(f"calibration seqlen {spec.seqlen} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}; use a shorter seqlen.")
    path = cached_path(spec.cache_dir, key) if spec.cache_dir else None
    # Decided together: a process that read the cache while its peers computed would leave them waiting on it.
    if path is not None and on_every_process(path.exists()):
        return load_grams(path, key), key
    if path is not None and not can_create_in(path.parent):  # checked now, not after the forward passes
        log.warning("the Gram cache %s is not writable: computing the Grams without caching them", path.parent)
        path = None
    windows = sample_windows(tokenizer, load_text(source), nsamples, spec.seqlen, spec.seed)
    grams = collect_grams(model, windows, batch_size=spec.batch_size, layers=layers, progress=progress)
    if path is not None:
        save_grams(path, grams, key)
    return grams, key
