"""cospadi-jax: CoSpaDi LLM compression (sparse dictionary learning) in JAX/Flax NNX."""

from __future__ import annotations

__version__ = "0.1.0"

from .models import load_model  # noqa: E402
from .export import save_pretrained  # noqa: E402

__all__ = ["load_model", "save_pretrained", "__version__"]
