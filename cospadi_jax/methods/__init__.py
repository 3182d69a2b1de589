"""Compression methods behind one interface (:class:`~cospadi_jax.methods.base.Method`), and their registry."""

from __future__ import annotations

from typing import Any

from .base import DictFactors, Factors, LowRankFactors, Method, UnitStats, functional_error, weight_error
from .cospadi import CoSpaDi, CoSpaDiFree
from .lowrank import ASVD, SVDLLM, BasisSharing, TruncatedSVD

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in
                                    (TruncatedSVD, SVDLLM, ASVD, BasisSharing, CoSpaDi, CoSpaDiFree)}


def method_class(name: str) -> type[Method]:
    """The registered class of ``name``; an unknown name raises, listing the registered ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build(config: Any) -> Method:
    """The method ``config.method`` names, with its knobs from ``config`` (a compression config)."""
    return method_class(config.method).from_config(config)


__all__ = [
    "ASVD", "METHODS", "SVDLLM", "BasisSharing", "CoSpaDi", "CoSpaDiFree", "DictFactors", "Factors", "LowRankFactors",
    "Method", "TruncatedSVD", "UnitStats", "build", "functional_error", "method_class", "weight_error",
]
