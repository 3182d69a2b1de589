"""Evaluation: perplexity under one protocol (docs/perplexity.md)."""

from .ppl import PerplexityResult, make_windows, perplexity, windows_perplexity

__all__ = ["PerplexityResult", "make_windows", "perplexity", "windows_perplexity"]
