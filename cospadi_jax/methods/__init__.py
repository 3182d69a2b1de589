"""Compression methods behind one interface (:class:`~cospadi_jax.methods.base.Method`), and their registry."""

from __future__ import annotations

from typing import Any

from .base import (DictFactors, Factors, LowRankFactors, Method, MethodConfig, UnitStats, functional_error,
                   weight_error)
from .cospadi import CoSpaDi, CoSpaDiConfig, CoSpaDiFree
from .lowrank import ASVD, SVDLLM, ASVDConfig, BasisSharing, LowRankConfig, TruncatedSVD

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in
                                    (TruncatedSVD, SVDLLM, ASVD, BasisSharing, CoSpaDi, CoSpaDiFree)}


def method_class(name: str) -> type[Method]:
    """The registered class of ``name``; an unknown name raises, listing the registered ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_config(name: str = "cospadi", **fields: Any) -> MethodConfig:
    """The config of method ``name`` (its own dataclass) with ``fields`` set; a field that the method does not
    have raises, naming the method's fields."""
    cls = method_class(name).config_class
    known = {f for f in cls.__dataclass_fields__ if f != "name"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"method {name!r} has no knob(s) {unknown}; its config {cls.__name__} has "
                        f"{sorted(known)}")
    return cls(name=name, **fields)


def build(config: MethodConfig, n_layers: int | None = None) -> Method:
    """The method ``config.name`` names, configured by ``config``, which is validated first (its layer indices
    against ``n_layers`` when given)."""
    config.validate(n_layers)
    return method_class(config.name)(config)


__all__ = [
    "ASVD", "METHODS", "SVDLLM", "ASVDConfig", "BasisSharing", "CoSpaDi", "CoSpaDiConfig", "CoSpaDiFree", "DictFactors",
    "Factors", "LowRankConfig", "LowRankFactors", "Method", "MethodConfig", "TruncatedSVD", "UnitStats", "build",
    "functional_error", "method_class", "method_config", "weight_error",
]
