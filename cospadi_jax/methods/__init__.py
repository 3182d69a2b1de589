"""Compression methods behind one interface, and the registry the orchestrator and configs use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..budget import Budget, budget
from .base import DictFactors, Factors, LowRankFactors, Method, functional_error, weight_error
from .cospadi import CoSpaDi
from .lowrank import ASVD, SVDLLM, BasisSharing, TruncatedSVD


@dataclass(frozen=True)
class MethodSpec:
    build: Callable[[Any], Any]  # CompressionConfig -> method object
    budget_kind: str  # "low_rank" | "cospadi"
    supports_groups: bool


METHODS: dict[str, MethodSpec] = {
    "svd": MethodSpec(lambda c: TruncatedSVD(), "low_rank", False),
    "svd_llm": MethodSpec(lambda c: SVDLLM(), "low_rank", False),
    "asvd": MethodSpec(lambda c: ASVD(), "low_rank", False),
    "basis_sharing": MethodSpec(lambda c: BasisSharing(), "low_rank", True),
    "cospadi": MethodSpec(lambda c: CoSpaDi(data_aware=True, iterations=c.ksvd_iterations,
                                            power_iterations=c.power_iterations, update=c.dict_update,
                                            reseed_unused=c.reseed_unused, parallel=c.parallel,
                                            omp_memory_mb=c.omp_memory_mb, omp_backend=c.omp_backend,
                                            sparse_coder=c.sparse_coder),
                            "cospadi", True),
    "cospadi_free": MethodSpec(lambda c: CoSpaDi(data_aware=False, iterations=c.ksvd_iterations,
                                                 power_iterations=c.power_iterations, update=c.dict_update,
                                                 reseed_unused=c.reseed_unused, parallel=c.parallel,
                                                 omp_memory_mb=c.omp_memory_mb, omp_backend=c.omp_backend,
                                                 sparse_coder=c.sparse_coder),
                                 "cospadi", True),
}


class MethodRunner:
    """Draws the budget of a fitting unit from the one budget function and fits the unit."""

    def __init__(self, config: Any):
        spec = METHODS[config.method]
        self.spec, self.config, self.method = spec, config, spec.build(config)
        self.data_aware = self.method.data_aware
        self.needs_mean_abs = getattr(self.method, "needs_mean_abs", False)

    def budget(self, d_in: int, d_out: int, group_size: int, ratio: float | None = None) -> Budget:
        """The unit's budget at ``ratio`` (default: the config's; a non-uniform allocation passes its own)."""
        c = self.config
        return budget(d_in, d_out, c.ratio if ratio is None else ratio, method=self.spec.budget_kind, rho=c.rho,
                      storage=c.accounting, group_size=group_size)

    def fit_unit(self, Ws: list[np.ndarray], grams: list[np.ndarray | None], key: Any, ratio: float | None = None,
                 **extra: Any) -> tuple[list[Factors], Budget]:
        d_in, d_out = Ws[0].shape
        b = self.budget(d_in, d_out, len(Ws), ratio)
        if len(Ws) == 1:
            return [self.method.fit(Ws[0], grams[0], b, key, **extra)], b
        return self.method.fit_group(Ws, grams, b, key), b


def make_method(config: Any) -> MethodRunner:
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; available: {', '.join(sorted(METHODS))}")
    return MethodRunner(config)


__all__ = [
    "ASVD", "METHODS", "SVDLLM", "BasisSharing", "CoSpaDi", "DictFactors", "Factors", "LowRankFactors", "Method",
    "MethodRunner", "TruncatedSVD", "functional_error", "make_method", "weight_error",
]
