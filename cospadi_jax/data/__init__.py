"""Text sources, the shipped corpus, and seeded calibration windows."""

from .calibration import sample_windows, tokenize, tokenizer_fingerprint
from .text import HUB_SOURCES, available_sources, embedded_text, load_text

__all__ = [
    "HUB_SOURCES", "available_sources", "embedded_text", "load_text", "sample_windows", "tokenize",
    "tokenizer_fingerprint",
]
