"""One budget function for every method: sizes (r, or k and s) from a compression ratio.

Conventions (see docs/budget.md):

* ``ratio`` is always the fraction of storage *removed* (CR 0.2 keeps 80 %).
* The dense reference is the bf16 matrix: 2 bytes per weight.
* Orientation: the paper's maths uses W = linear.weight.T, [d_in, d_out], so by
  default d1 = d_in and d2 = d_out (``orientation="paper"``). The paper's
  accounting tables (A.11, Table 10) are reproduced byte-for-byte only with
  (d1, d2) = weight.shape = (d_out, d_in): ``orientation="weight_shape"``.
  The total is the same either way; the dictionary / coefficient split and the
  per-matrix k, s differ.

Formulas (γ = ratio, ρ = k/s, m = group size, d2 → m·d2 for a group):

* low rank:   r = ⌊(1−γ)·d1·d2 / (d1 + d2)⌋                    (Eq. 48)
* CoSpaDi:    k = ⌊(1−γ)·d1·d2 / (d1 + d2/ρ + extra)⌋, s = ⌊k/ρ⌋  (Eq. 49)
  with extra = 0 for ``accounting="eq11"`` ((16−ρ)-bit values + k·d2-bit mask,
  i.e. 14-bit values at ρ = 2), extra = d2/16 for ``accounting="eq10"`` (bf16
  values + bitmask), extra = d2/ρ for ``accounting="coo16"`` (bf16 values +
  int16 row indices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["Budget", "budget", "MIB"]

MIB = 1024 * 1024
_DENSE_BITS = 16  # bf16 reference
_KINDS = ("low_rank", "cospadi")
ACCOUNTINGS = ("eq11", "eq10", "coo16")
_ORIENTATIONS = ("paper", "weight_shape")


@dataclass(frozen=True)
class Budget:
    """Sizes and storage of one compressed matrix (or one group of m matrices).

    d1, d2: accounting dimensions after orientation (d2 already multiplied by group_size).
    rank: r for ``low_rank`` (None otherwise); n_atoms / sparsity: k / s for ``cospadi``.
    *_bytes: storage of each part; total_bytes = their sum; dense_bytes = 2·d1·d2.
    realised_ratio_params: 1 − stored numbers / (d1·d2) (values only, no mask/indices).
    realised_ratio_bytes: 1 − total_bytes / dense_bytes (what the paper calls CR).
    """

    kind: str
    target_ratio: float
    d1: int
    d2: int
    group_size: int
    orientation: str
    accounting: str | None
    rho: float | None
    rank: int | None
    n_atoms: int | None
    sparsity: int | None
    dictionary_bytes: float
    values_bytes: float
    index_bytes: float
    total_bytes: float
    dense_bytes: float
    stored_params: int
    realised_ratio_params: float
    realised_ratio_bytes: float


def _exact(x, name: str) -> Fraction:
    # Exact rational arithmetic so that e.g. (1 − 0.3)·… never floors one below an integer.
    if isinstance(x, (str, bool)):
        raise TypeError(f"{name} must be a real number, got {x!r}.")
    try:
        return Fraction(x).limit_denominator(10**9)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a real number, got {x!r}.") from exc


def budget(
    d_in: int,
    d_out: int,
    ratio: float,
    *,
    kind: str = "cospadi",
    rho: float = 2.0,
    accounting: str = "eq11",
    group_size: int = 1,
    orientation: str = "paper",
) -> Budget:
    """Budget of a [d_in, d_out] projection (W = weight.T) at compression ``ratio`` (fraction removed).

    Args:
        d_in, d_out: in/out features of the linear layer (weight.shape == (d_out, d_in)).
        ratio: γ in (0, 1), fraction of the dense bf16 storage removed (0 would be the dense matrix).
        kind: "low_rank" (r) or "cospadi" (k, s).
        rho: ρ = k/s (cospadi only), ≥ 1.
        accounting: "eq11" (paper default, (16−ρ)-bit values + bitmask; exact for ρ = 2),
            "eq10" (bf16 values + bitmask) or "coo16" (bf16 values + int16 indices).
        group_size: m matrices sharing one dictionary / basis (d2 → m·d2).
        orientation: "paper" (d1 = d_in, d2 = d_out) or "weight_shape" (d1 = d_out,
            d2 = d_in; reproduces the paper's A.11 and Table 10 numbers).
    """
    for name, v in (("d_in", d_in), ("d_out", d_out), ("group_size", group_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
    if orientation not in _ORIENTATIONS:
        raise ValueError(f"orientation must be one of {_ORIENTATIONS}, got {orientation!r}.")
    gamma = _exact(ratio, "ratio")
    if not 0 < gamma < 1:
        raise ValueError(f"ratio is the fraction removed and must be in (0, 1), got {ratio}.")
    d1, d2 = (d_in, d_out) if orientation == "paper" else (d_out, d_in)
    d2 *= group_size
    keep = (1 - gamma) * d1 * d2
    dense_bytes = Fraction(_DENSE_BITS, 8) * d1 * d2

    if kind == "low_rank":
        r = math.floor(keep / (d1 + d2))
        if r < 1:
            raise ValueError(f"ratio {ratio} leaves rank 0 for a {d1}×{d2} matrix; use a smaller ratio.")
        stored = r * (d1 + d2)
        dict_b, val_b, idx_b = Fraction(2 * d1 * r), Fraction(2 * d2 * r), Fraction(0)
        k = s = None
        rho_out = accounting_out = None
    else:
        rho_f = _exact(rho, "rho")
        if rho_f < 1:
            raise ValueError(f"rho = k/s must be >= 1, got {rho}.")
        if accounting not in ACCOUNTINGS:
            raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}.")
        if accounting == "eq11" and not rho_f < 16:
            raise ValueError("accounting='eq11' stores (16−ρ)-bit values; it needs rho < 16.")
        extra = {"eq11": Fraction(0), "eq10": Fraction(d2, 16), "coo16": d2 / rho_f}[accounting]
        k = math.floor(keep / (d1 + d2 / rho_f + extra))
        s = math.floor(k / rho_f)
        if k < 1 or s < 1:
            raise ValueError(
                f"ratio {ratio} with rho {rho} leaves k = {k}, s = {s} for a {d1}×{d2} matrix; "
                "use a smaller ratio or rho."
            )
        stored = d1 * k + s * d2
        dict_b = Fraction(2 * d1 * k)
        if accounting == "eq11":
            val_b = Fraction((_DENSE_BITS - rho_f) * s * d2, 8)  # 14-bit values at ρ = 2
            idx_b = Fraction(k * d2, 8)  # bitmask
        elif accounting == "eq10":
            val_b, idx_b = Fraction(2 * s * d2), Fraction(k * d2, 8)
        else:
            val_b, idx_b = Fraction(2 * s * d2), Fraction(2 * s * d2)
        rho_out, accounting_out = float(rho_f), accounting
    total = dict_b + val_b + idx_b
    return Budget(
        kind=kind,
        target_ratio=float(gamma),
        d1=d1,
        d2=d2,
        group_size=group_size,
        orientation=orientation,
        accounting=accounting_out,
        rho=rho_out,
        rank=r if kind == "low_rank" else None,
        n_atoms=k,
        sparsity=s,
        dictionary_bytes=float(dict_b),
        values_bytes=float(val_b),
        index_bytes=float(idx_b),
        total_bytes=float(total),
        dense_bytes=float(dense_bytes),
        stored_params=int(stored),
        realised_ratio_params=float(1 - Fraction(stored, d1 * d2)),
        realised_ratio_bytes=float(1 - total / dense_bytes),
    )
