"""Non-uniform budgets: per-unit compression ratios that keep the model's bytes and lower its total error.

The paper gives every matrix the same ratio γ. Matrices differ in how fast their output error grows with γ, so
moving bytes from matrices whose error barely moves to those whose error moves fast lowers the total error at
the same storage. :func:`allocate` chooses one ratio per fitting unit (a matrix or a shared group):

    minimise Σ_u n_u · e_u(γ_u)²   subject to   Σ_u bytes_u(γ_u) ≤ Σ_u bytes_u(γ)

- n_u: matrices in the unit; bytes_u: :func:`cospadi_jax.budget.budget`'s ``total_bytes`` (the same accounting as
  the fitted factors, so the realised CR is exact); γ_u on a grid of ``step`` around γ within ±``spread``, capped
  at ``max_ratio``.
- e_u(γ)², the squared relative output error ‖X(W − W̃)‖²/‖XW‖² on the calibration Gram:
  ``curve="spectrum"``: closed form, the whitened tail Σ_{i>r} σ_i² / Σ_i σ_i² of σ = singular values of L·W
  (a group: L̄·[W_1 … W_m] with L̄ from the mean Gram, as it is fitted) at the rank r(γ) of the same bytes. For
  SVD-LLM and Basis Sharing this is their error exactly. ``curve="measured"``: the spectrum curve times a
  correction measured by fitting the unit's own method at ``points`` ratios with ``curve_iterations`` K-SVD
  iterations (log-linear in γ between the points), since a dictionary's error does not fall like a rank's.
- Solved greedily on each unit's lower convex hull (cost against bytes): the step with the largest error drop per
  byte first, until the budget is spent; this is optimal for the convex relaxation up to one step per unit. If
  the uniform ratios score better (a non-convex curve), they are kept.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .budget import budget

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "greedy")
CURVES = ("spectrum", "measured")
TOLERANCE = 0.005  # realised global CR within this of the target (issue 13)


@dataclass
class AllocationConfig:
    """Per-unit budgets (Hydra node ``budget``). ``allocation="uniform"`` is the paper's setting."""

    allocation: str = "uniform"  # uniform: every unit at method.ratio | greedy: :func:`allocate`
    curve: str = "spectrum"  # spectrum (closed form) | measured (spectrum × fitted correction, module docstring)
    spread: float = 0.2  # per-unit ratios within ±spread of the target
    max_ratio: float = 0.9  # no unit compressed beyond this
    step: float = 0.005  # ratio grid spacing
    points: int = 3  # measured curve: fitted ratios per unit (evenly over the grid)
    curve_iterations: int = 1  # measured curve: K-SVD iterations of each fitted point

    def validate(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"budget.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.curve not in CURVES:
            raise ValueError(f"budget.curve must be one of {CURVES}, got {self.curve!r}")
        if not 0.0 < self.spread < 1.0:
            raise ValueError(f"budget.spread must be in (0, 1), got {self.spread}")
        if not 0.0 < self.max_ratio < 1.0:
            raise ValueError(f"budget.max_ratio must be in (0, 1), got {self.max_ratio}")
        if not 0.0 < self.step <= self.spread:
            raise ValueError(f"budget.step must be in (0, spread={self.spread}], got {self.step}")
        if self.points < 2:
            raise ValueError(f"budget.points must be >= 2 (a correction needs two ratios), got {self.points}")
        if self.curve_iterations < 0:
            raise ValueError(f"budget.curve_iterations must be >= 0, got {self.curve_iterations}")


@dataclass(frozen=True)
class Unit:
    """One fitting unit as the allocator sees it. W: [d_in, m·d_out] (a group's members side by side);
    gram: [d_in, d_in] (a group's mean Gram)."""

    paths: list[str]
    W: np.ndarray
    gram: np.ndarray


def ratio_grid(target: float, config: AllocationConfig) -> np.ndarray:
    """Candidate ratios: ``target`` ± k·step within ±spread, in (0, max_ratio]; ascending, ``target`` included."""
    if target > config.max_ratio:
        raise ValueError(f"the target ratio {target} exceeds budget.max_ratio={config.max_ratio}: no unit may be "
                         "compressed that far; raise budget.max_ratio or lower method.ratio.")
    n = int(np.floor(config.spread / config.step + 1e-9))
    grid = np.round(target + config.step * np.arange(-n, n + 1), 10)
    return grid[(grid > 0) & (grid <= config.max_ratio + 1e-12)]


def spectrum_error(unit: Unit, whiten: Callable[[np.ndarray], np.ndarray]) -> Callable[[int], float]:
    """e²(r): the whitened tail energy fraction of ``unit`` at rank r (what a rank-r whitened SVD leaves)."""
    sigma2 = np.linalg.svd(whiten(unit.gram) @ np.asarray(unit.W, np.float64), compute_uv=False) ** 2
    tail = np.concatenate([np.cumsum(sigma2[::-1])[::-1], [0.0]]) / sigma2.sum()
    return lambda r: float(tail[min(r, sigma2.size)])


def allocate(units: list[Unit], target: float, config: AllocationConfig, *, kind: str, rho: float = 2.0,
             accounting: str = "eq11",
             whiten: Callable[[np.ndarray], np.ndarray],
             measure: Callable[[int, float], float] | None = None, progress: Callable[[str], None] | None = None,
             ) -> dict[str, Any]:
    """Per-unit ratios at the uniform byte budget (module docstring).

    units: the fitting units in order; target: the global CR γ; kind: the budget kind ("cospadi" | "low_rank");
    whiten(G) -> L [d_in, d_in] with LᵀL = G; measure(u, γ) -> e² of unit u fitted at γ (``curve="measured"``).
    Returns ``{"ratios": [γ_u], "paths": [first path of u], "objective": {"uniform", "allocated"},
    "realised_ratio", "uniform_realised_ratio", "curve", "seconds"}``. Raises ValueError when the greedy
    allocation leaves more than ``TOLERANCE`` of the dense bytes unspent (a grid too coarse for the units).
    """
    config.validate()
    t0 = time.perf_counter()
    grid = ratio_grid(target, config)
    options, dense_total, uniform_bytes, uniform_cost = [], 0.0, 0.0, 0.0
    for u, unit in enumerate(units):
        m = len(unit.paths)
        d_in, d_out = unit.W.shape[0], unit.W.shape[1] // m
        tail = spectrum_error(unit, whiten)
        spectrum = lambda g: m * tail(budget(d_in, d_out, g, kind="low_rank", group_size=m).rank)
        rows = []  # [bytes, cost, ratio], one per grid ratio that leaves at least one atom / rank
        for g in map(float, grid):
            try:
                b = budget(d_in, d_out, g, kind=kind, rho=rho, accounting=accounting, group_size=m)
            except ValueError:
                continue
            rows.append([float(b.total_bytes), spectrum(g), g, float(b.dense_bytes)])
        if config.curve == "measured" and measure is not None:
            at = _points([r[2] for r in rows], config.points)
            log_c = np.log([max(m * measure(u, g), 1e-30) / max(spectrum(g), 1e-30) for g in at])
            for row in rows:  # the measured/spectrum ratio, log-linear in γ between the points, clamped
                row[1] *= float(np.exp(np.interp(row[2], at, log_c)))
        uniform = next((r for r in rows if abs(r[2] - target) < 1e-9), None)
        if uniform is None:
            raise ValueError(f"{unit.paths[0]} cannot be compressed at ratio {target}: the budget leaves no atom")
        dense_total += uniform[3]
        uniform_bytes += uniform[0]
        uniform_cost += uniform[1]
        options.append(_lower_hull([tuple(r[:3]) for r in rows]))
        if progress is not None:
            progress(unit.paths[0])
    choice = _greedy(options, uniform_bytes)
    ratios = [options[u][i][2] for u, i in enumerate(choice)]
    spent = sum(options[u][i][0] for u, i in enumerate(choice))
    allocated_cost = sum(options[u][i][1] for u, i in enumerate(choice))
    if allocated_cost >= uniform_cost:
        log.info("budget.allocation=greedy: the uniform ratios score better (%.4g <= %.4g); keeping them",
                 uniform_cost, allocated_cost)
        ratios, spent, allocated_cost = [float(target)] * len(units), uniform_bytes, uniform_cost
    realised, uniform_realised = 1 - spent / dense_total, 1 - uniform_bytes / dense_total
    # Uniform's bytes are the budget (its integer sizes round off the target, by < 0.002 on SmolLM2), and at
    # most TOLERANCE of the dense bytes may stay unspent.
    if spent > uniform_bytes * (1 + 1e-12) or realised - uniform_realised > TOLERANCE:
        raise ValueError(f"the allocation realises CR {realised:.4f} for a target {target} (uniform: "
                         f"{uniform_realised:.4f}); widen budget.spread or refine budget.step")
    return {"ratios": ratios, "paths": [u.paths[0] for u in units],
            "objective": {"uniform": uniform_cost, "allocated": allocated_cost},
            "realised_ratio": realised, "uniform_realised_ratio": uniform_realised, "curve": config.curve,
            "seconds": time.perf_counter() - t0}


def _points(ratios: list[float], n: int) -> list[float]:
    """n of ``ratios`` (ascending) evenly spread, the ends included."""
    return [ratios[i] for i in np.unique(np.round(np.linspace(0, len(ratios) - 1, n)).astype(int))]


def _lower_hull(rows: list[list[float]]) -> list[tuple[float, float, float]]:
    """Options on the lower convex hull of (bytes, cost), by bytes ascending, cost strictly falling."""
    pts = sorted((b, c, g) for b, c, g in rows)
    hull: list[tuple[float, float, float]] = []
    for p in pts:
        if hull and p[1] >= hull[-1][1]:
            continue  # more bytes for no less error: never worth buying
        while len(hull) >= 2:
            (b1, c1, _), (b2, c2, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord from hull[-2] to p
            if (c2 - c1) * (p[0] - b1) >= (p[1] - c1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _greedy(options: list[list[tuple[float, float, float]]], budget_bytes: float) -> list[int]:
    """Index into each unit's hull: start every unit at its cheapest option, then buy the steps with the largest
    cost drop per byte while the budget allows (a unit whose next step does not fit stops there)."""
    choice = [0] * len(options)
    spent = sum(o[0][0] for o in options)
    heap = [(_slope(o, 0), u) for u, o in enumerate(options) if len(o) > 1]
    heapq.heapify(heap)
    while heap:
        _, u = heapq.heappop(heap)
        i, o = choice[u], options[u]
        extra = o[i + 1][0] - o[i][0]
        if spent + extra > budget_bytes * (1 + 1e-12):
            continue
        choice[u], spent = i + 1, spent + extra
        if i + 2 < len(o):
            heapq.heappush(heap, (_slope(o, i + 1), u))
    return choice


def _slope(option: list[tuple[float, float, float]], i: int) -> float:
    """Cost change per byte of the step i -> i+1 (negative: the heap pops the steepest drop first)."""
    return (option[i + 1][1] - option[i][1]) / (option[i + 1][0] - option[i][0])


__all__ = ["ALLOCATIONS", "AllocationConfig", "CURVES", "TOLERANCE", "Unit", "allocate", "ratio_grid",
           "spectrum_error"]
