"""What a compression reports: one row per matrix, the run's totals, and the warnings they deserve."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .layers import quantize_coefficients
from .methods.base import DictFactors, functional_error, weight_error

log = logging.getLogger("cospadi_jax.compress")


@dataclass
class MatrixReport:
    path: str
    group: list[str]
    d_in: int
    d_out: int
    method: str
    functional_error_calib: float | None
    functional_error_heldout: float | None
    weight_error: float
    realised_ratio: float  # storage removed (bytes, the paper's CR; a group's shared basis split evenly)
    realised_ratio_params: float  # stored numbers removed (no mask/index bits)
    dense_params: int
    compressed_params: float
    seconds: float
    k: int | None = None
    s: int | None = None
    rank: int | None = None
    jitter: float | None = None
    lambda_min: float | None = None
    condition_number: float | None = None
    effective_rank: int | None = None  # of the calibration Gram (None when not computed)
    early_stopped_columns: int | None = None
    quantization_error: float | None = None
    objective: list[float] | None = None
    # CoSpaDi: resolved Batch-OMP backend and fitting time per phase (whitening, omp, update, gemm).
    omp_backend: str | None = None
    phase_seconds: dict | None = None
    # Block-output refinement (refine.py): the held-out functional error of the factors as fitted, before it.
    functional_error_heldout_fitted: float | None = None
    target_ratio: float | None = None  # the unit's ratio: config.ratio, or its share of a non-uniform allocation


def matrix_rows(paths: list[str], Ws: list[np.ndarray], factors_list: list[Any], grams: list[np.ndarray | None],
                heldout_grams: Any, budget: Any, seconds: float, config: Any) -> tuple[list[Any], list[MatrixReport]]:
    """The factors of one fitted unit (coefficient values rounded to ``config.quantization``'s grid) and one
    report row per matrix: functional errors on its calibration Gram (``grams``, one per path, None for a data-free
    run without calibration data) and on ``heldout_grams`` (a Grams, or None), weight error, ``budget``'s ratios.
    Ws: [d_in, d_out] each."""
    unit_factors, unit_rows = [], []
    for path, W, factors, gram in zip(paths, Ws, factors_list, grams):
        quant_err = None
        if isinstance(factors, DictFactors) and config.quantization:
            q = quantize_coefficients(factors.values, config.quantization)
            quant_err = float(np.linalg.norm(q - factors.values) / np.linalg.norm(factors.values))
            factors = replace(factors, values=q)
        W_hat = factors.dense()
        info = factors.info
        unit_rows.append(MatrixReport(
            path=path, group=paths, d_in=W.shape[0], d_out=W.shape[1], method=config.name,
            functional_error_calib=functional_error(W, W_hat, gram) if gram is not None else None,
            functional_error_heldout=functional_error(W, W_hat, heldout_grams.gram(path))
            if heldout_grams is not None else None,
            weight_error=weight_error(W, W_hat),
            realised_ratio=budget.realised_ratio_bytes,
            realised_ratio_params=budget.realised_ratio_params,
            dense_params=W.size,
            compressed_params=budget.stored_params / len(paths),
            seconds=seconds,
            k=info.get("k"), s=info.get("s"), rank=info.get("rank"),
            jitter=info.get("jitter"), lambda_min=info.get("lambda_min"),
            condition_number=info.get("condition_number"), effective_rank=info.get("effective_rank"),
            early_stopped_columns=info.get("early_stopped_columns"),
            quantization_error=quant_err, objective=info.get("objective"),
            omp_backend=info.get("omp_backend"), phase_seconds=info.get("phase_seconds"),
            target_ratio=budget.target_ratio,
        ))
        unit_factors.append(factors)
    return unit_factors, unit_rows


def rows_from_artifact(done: dict[int, tuple[list, list[dict]]]) -> dict[int, tuple[list, list[MatrixReport]]]:
    """An artifact's finished units (``ArtifactWriter.finished_units``: rows as written, dicts) with their rows
    as :class:`MatrixReport` again (the factors' ``info`` stored beside them dropped)."""
    names = set(MatrixReport.__dataclass_fields__)
    return {i: (factors, [MatrixReport(**{k: v for k, v in row.items() if k in names}) for row in rows])
            for i, (factors, rows) in done.items()}


@dataclass
class CompressionReport:
    config: dict
    calibration: dict
    matrices: list[MatrixReport] = field(default_factory=list)
    seconds: float = 0.0
    units: int = 0  # fitting units (a matrix or a shared group)
    units_reused: int = 0  # read back from the artifact of an interrupted run instead of being fitted
    refinement: list[dict] = field(default_factory=list)  # one refine.LayerRefinement per refined layer
    allocation: dict | None = None  # allocation.allocate's result (per-unit ratios); None when uniform
    memory_plan: Any = None  # streaming.MemoryPlan of a streamed run (written as config["streaming"])

    @property
    def realised_ratio(self) -> float:
        """Storage removed over all compressed matrices (bytes, the paper's CR; a shared basis counted once)."""
        dense = sum(m.dense_params for m in self.matrices)
        return 1.0 - sum((1 - m.realised_ratio) * m.dense_params for m in self.matrices) / dense

    def to_dict(self) -> dict:
        return {"config": self.config, "calibration": self.calibration, "seconds": self.seconds,
                "realised_ratio": self.realised_ratio, "units": self.units, "units_reused": self.units_reused,
                "refinement": self.refinement, "allocation": self.allocation,
                "matrices": [asdict(m) for m in self.matrices]}


def warn_about(report: CompressionReport, config: Any) -> None:
    """Warnings a finished compression deserves: degenerate calibration data, a ratio far from the target."""
    deficient = [m for m in report.matrices if m.effective_rank is not None and m.effective_rank < m.d_in]
    if deficient:
        worst = min(deficient, key=lambda m: m.effective_rank / m.d_in)
        log.warning("the calibration Grams of %d matrices are rank-deficient (worst: %s, effective rank %d of %d): "
                    "the calibration text spans too few directions (a repeated token, or too few tokens), so the "
                    "fit matches the calibration data but not held-out data. Use more, varied calibration text.",
                    len(deficient), worst.path, worst.effective_rank, worst.d_in)
    if report.matrices and abs(report.realised_ratio - config.ratio) > 0.02:
        log.warning("realised ratio %.4f is far from the target %.4f: the matrices are too small for the budget's "
                    "integer rounding (k, s or rank), or the accounting differs; see the per-matrix rows.",
                    report.realised_ratio, config.ratio)


def model_size(model: Any, report: CompressionReport) -> dict[str, Any]:
    """Whole-model parameters and bytes of the dense ``model`` before and after, at 16 bits per dense number (the
    paper's storage convention; CoSpaDi's sparse part at its Eq. 10/11 accounting, as in ``realised_ratio``)."""
    from flax import nnx

    total = sum(int(v.get_value().size) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    matrices = sum(m.dense_params for m in report.matrices)
    kept = total - matrices
    params_after = kept + sum(m.compressed_params for m in report.matrices)
    bytes_after = 2 * kept + 2 * matrices * (1 - report.realised_ratio)
    return {"params": total, "compressed_matrix_params": matrices, "fraction_compressed": matrices / total,
            "params_after": params_after, "bytes_16bit": 2 * total, "bytes_16bit_after": bytes_after,
            "whole_model_ratio": 1 - bytes_after / (2 * total)}


def engine_summary(matrices: list[dict]) -> dict[str, Any]:
    """The Batch-OMP backend(s) that actually ran and the fitting time per phase, summed over the report rows."""
    backends = sorted({m["omp_backend"] for m in matrices if m.get("omp_backend")})
    phases: dict[str, float] = {}
    for m in matrices:
        for phase, seconds in (m.get("phase_seconds") or {}).items():
            phases[phase] = phases.get(phase, 0.0) + seconds / len(m["group"])  # a group's time split evenly
    return {"omp_backend": ",".join(backends) or None, "phase_seconds": phases}
