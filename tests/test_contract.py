"""The method contract, checked for every registered method (``cospadi_jax.methods.METHODS``, so a new method is
covered the day it is registered) and for the grouped variant of every method that shares bases.

On one tiny random model and its calibration / held-out Grams, through the public entry points only
(``compress``, ``METHODS``, ``budget``, ``ArtifactWriter``), each variant must:

* meet its budget: every row's realised ratio is exactly the budget's, the arrays held by the compressed layers
  have the budget's sizes, the bytes counted from those arrays give the same ratio, and the ratio lies within
  the method's integer rounding above the target (never over budget);
* hold finite factors only (in the compressed model and in the artifact);
* beat the data-free baseline on output error: data-aware methods below plain truncated SVD at the same ratio
  (mean over matrices, calibration and held-out Grams), data-free ones below 1 (the error of W̃ = 0);
* be deterministic under a seed (bit-identical factors, CoSpaDi's atom indices included);
* resume bit-identically: a run interrupted after some units and resumed into the same artifact directory
  reuses those units and ends with the factors of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from helpers import tiny_hf_config

from cospadi_jax.budget import budget
from cospadi_jax.calib import collect_grams
from cospadi_jax.checkpoint import ArtifactWriter
from cospadi_jax.compress import compress
from cospadi_jax.methods import METHODS
from cospadi_jax.models import get_module, projection_weight, random_model

N_LAYERS = 2  # with group_size=2: one shared group per q/k/v/gate/up, o and down private
RATIO = 0.3
SEED = 7
KSVD = dict(ksvd_iterations=2, power_iterations=2)  # set for the methods whose config has these knobs
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRIVATE = ("o_proj", "down_proj")  # never shared across layers (Basis Sharing protocol)
RHO = 2.0  # the default rho and eq11 accounting: (16 - rho)-bit values plus a k x d_out bitmask


def _variants() -> list[Any]:
    out = []
    for name, cls in METHODS.items():
        out.append(pytest.param(name, 1, id=name))
        if cls.supports_groups:
            out.append(pytest.param(name, 2, id=f"{name}-m2"))
    return out


VARIANTS = _variants()


class _Interrupted(Exception):
    """Raised from on_unit to stop a run between two units, as a kill would."""


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """NumPy's BLAS on one thread for this module: on a loaded 2-core machine OpenBLAS's spinning threads make
    the SVD of a 64 x 128 matrix ~50x slower. Every comparison here is between runs made under this setting."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without threadpoolctl (a dependency of scikit-learn, a test extra): only slower
        yield
        return
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen2 (q/k/v biases, GQA: k/v narrower than q) and its calibration and held-out Grams."""
    cfg = tiny_hf_config("qwen2_bias", False)
    cfg.num_hidden_layers = N_LAYERS
    model = random_model(cfg, seed=0)
    calib = np.random.default_rng(0).integers(3, 96, size=(16, 32)).astype(np.int32)
    heldout = np.random.default_rng(1).integers(3, 96, size=(8, 32)).astype(np.int32)
    return model, collect_grams(model, calib, progress=False), collect_grams(model, heldout, progress=False)


def _module_arrays(model, path: str) -> dict[str, np.ndarray]:
    """Every array a compressed projection holds (factors, CoSpaDi's atom indices, the bias)."""
    module = get_module(model, path)
    assert not hasattr(module, "kernel"), f"{path} was not compressed"
    out = {}
    for name in ("A", "B", "D", "values", "indices", "mask", "bias"):
        value = getattr(module, name, None)
        if value is not None:
            out[name] = np.asarray(value[...])
    return out


def _all_paths() -> list[str]:
    return [f"model.layers.{l}.{'self_attn' if p in PROJECTIONS[:4] else 'mlp'}.{p}"
            for l in range(N_LAYERS) for p in PROJECTIONS]


def _arrays_of(model) -> dict[str, dict[str, np.ndarray]]:
    return {p: _module_arrays(model, p) for p in _all_paths()}


def _artifact_factors(directory, meta) -> dict[str, dict[str, np.ndarray]]:
    """The factors as fitted (full precision), read back from an artifact directory, by projection path."""
    out = {}
    for factors, rows in ArtifactWriter(directory, meta).finished_units().values():
        for f, row in zip(factors, rows):
            out[row["path"]] = {name: np.asarray(getattr(f, name)) for name in ("A", "B", "D", "indices", "values")
                                if hasattr(f, name)}
    return out


def _assert_bit_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for path in a:
        assert a[path].keys() == b[path].keys(), f"{what}: {path}"
        for name in a[path]:
            x, y = a[path][name], b[path][name]
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {path}.{name}"
            assert np.array_equal(x, y), f"{what}: {path}.{name} differs (max |diff| " \
                                         f"{np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))})"


@dataclass
class Runs:
    """One variant's runs: the reference (with an artifact), a repeat, interrupted + resumed."""

    reference: Any
    report: Any
    reference_artifact: dict
    repeat: Any
    repeat_report: Any
    interrupted_after: int
    finished_when_interrupted: list[int]
    resumed: Any
    resumed_report: Any
    resumed_artifact: dict


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """runs(method, group_size) -> Runs, computed once per variant and shared by the tests below."""
    model, grams, heldout = tiny
    cache: dict[tuple[str, int], Runs] = {}

    def get(name: str, group_size: int) -> Runs:
        if (name, group_size) in cache:
            return cache[name, group_size]
        fields = METHODS[name].config_class.__dataclass_fields__
        kw = dict(grams=grams, heldout_grams=heldout, method=name, ratio=RATIO, group_size=group_size,
                  progress=False, **{k: v for k, v in KSVD.items() if k in fields})
        meta = {"identity": {"method": name, "group_size": group_size, "seed": SEED}}
        ref_dir = tmp_path_factory.mktemp(f"{name}-m{group_size}-ref")
        reference, report = compress(model, seed=SEED, artifact=ArtifactWriter(ref_dir, meta), **kw)
        repeat, repeat_report = compress(model, seed=SEED, **kw)

        # Interrupted after half the units (on_unit runs once a unit is fitted and saved), then resumed.
        stop = report.units // 2
        res_dir = tmp_path_factory.mktemp(f"{name}-m{group_size}-resume")

        def interrupt(index, rows):
            if index == stop - 1:
                raise _Interrupted

        with pytest.raises(_Interrupted):
            compress(model, seed=SEED, artifact=ArtifactWriter(res_dir, meta), on_unit=interrupt, **kw)
        finished = ArtifactWriter(res_dir, meta).finished_indices()
        resumed, resumed_report = compress(model, seed=SEED, artifact=ArtifactWriter(res_dir, meta), **kw)
        cache[name, group_size] = Runs(
            reference, report, _artifact_factors(ref_dir, meta), repeat, repeat_report, stop,
            finished, resumed, resumed_report, _artifact_factors(res_dir, meta))
        return cache[name, group_size]

    return get


@pytest.fixture(scope="module")
def svd_baseline(tiny):
    """Plain truncated SVD (data-free) at the same ratio on the same matrices: the bar for data-aware methods."""
    model, grams, heldout = tiny
    _, report = compress(model, grams=grams, heldout_grams=heldout, method="svd", ratio=RATIO, seed=SEED,
                         progress=False)
    return report


def _groups(report) -> list[list[str]]:
    groups = []
    for row in report.matrices:
        if row.group not in groups:
            groups.append(row.group)
    return groups


def _layer(path: str) -> int:
    return int(path.split(".")[2])


def _unit_bytes(kind: str, members: list[dict[str, np.ndarray]]) -> Fraction:
    """Storage of one unit counted from the arrays its layers hold (a shared basis once), the paper's way:
    low rank: bf16 A and B; CoSpaDi (eq11, rho = 2): bf16 D, (16 - rho)-bit values, a k-bit mask per column."""
    if kind == "low_rank":
        return Fraction(2 * members[0]["A"].size + sum(2 * m["B"].size for m in members))
    k = members[0]["D"].shape[1]
    return Fraction(2 * members[0]["D"].size) + sum(
        Fraction(int(16 - RHO) * m["values"].size, 8) + Fraction(k * m["values"].shape[0], 8) for m in members)


def _rounding_slack(kind: str, d_in: int, d_out_total: int) -> Fraction:
    """How far above the target the integer rounding of the budget may leave a unit's ratio: one rank
    (low rank), or one atom plus one non-zero per column (CoSpaDi), in bytes over the dense bf16 bytes."""
    dense = Fraction(2 * d_in * d_out_total)
    if kind == "low_rank":
        return 2 * (d_in + d_out_total) / dense
    return (2 * (d_in + Fraction(d_out_total) / Fraction(RHO)) + Fraction(int(16 - RHO) * d_out_total, 8)) / dense


@pytest.mark.parametrize("name, group_size", VARIANTS)
def test_budget_is_met_exactly(runs, name, group_size):
    r = runs(name, group_size)
    report, model = r.report, r.reference
    kind = METHODS[name].budget_kind
    assert sorted(m.path for m in report.matrices) == sorted(_all_paths())
    groups = _groups(report)
    assert report.units == len(groups) and report.units_reused == 0
    total_bytes, dense_bytes, slack = Fraction(0), Fraction(0), Fraction(0)
    arrays = _arrays_of(model)
    for group in groups:
        proj = group[0].rsplit(".", 1)[1]
        assert all(p.rsplit(".", 1)[1] == proj for p in group)
        assert [_layer(p) for p in group] == list(range(_layer(group[0]), _layer(group[0]) + len(group))), group
        assert len(group) == (1 if group_size == 1 or proj in PRIVATE else group_size), group
        rows = [next(m for m in report.matrices if m.path == p) for p in group]
        members = [arrays[p] for p in group]
        d_in, d_out = rows[0].d_in, rows[0].d_out
        b = budget(d_in, d_out, RATIO, kind=kind, rho=RHO, accounting="eq11", group_size=len(group))
        # The layers hold exactly the budget's sizes; a group's basis is one array shared by its members.
        for row, held in zip(rows, members):
            assert (row.d_in, row.d_out) == (d_in, d_out)
            if kind == "low_rank":
                assert row.rank == b.rank and held["A"].shape == (d_in, b.rank) and held["B"].shape == (b.rank, d_out)
                assert np.array_equal(held["A"], members[0]["A"]), f"{row.path}: the group's basis is not shared"
            else:
                assert (row.k, row.s) == (b.n_atoms, b.sparsity)
                assert held["D"].shape == (d_in, b.n_atoms) and held["values"].shape == (d_out, b.sparsity)
                assert held["indices"].shape == (d_out, b.sparsity)
                assert np.array_equal(held["D"], members[0]["D"]), f"{row.path}: the group's dictionary differs"
            # the report's ratio is exactly the budget's, for every matrix of the unit
            assert row.realised_ratio == b.realised_ratio_bytes, row.path
            assert row.target_ratio == pytest.approx(RATIO)
        unit_dense = Fraction(2 * d_in * d_out * len(group))
        unit_bytes = _unit_bytes(kind, members)
        assert unit_bytes == Fraction(b.total_bytes), f"{group}: bytes counted from the arrays != budget"
        realised = 1 - unit_bytes / unit_dense
        assert float(realised) == pytest.approx(rows[0].realised_ratio, rel=0, abs=1e-15)
        # never over budget, and at most one rounding step of the integer sizes away from the target
        unit_slack = _rounding_slack(kind, d_in, d_out * len(group))
        assert Fraction(RATIO) <= realised < Fraction(RATIO) + unit_slack, (group, float(realised))
        total_bytes += unit_bytes
        dense_bytes += unit_dense
        slack = max(slack, unit_slack)
    expected = 1 - total_bytes / dense_bytes
    assert report.realised_ratio == pytest.approx(float(expected), rel=1e-12)
    assert Fraction(RATIO) <= expected < Fraction(RATIO) + slack


@pytest.mark.parametrize("name, group_size", VARIANTS)
def test_every_factor_is_finite(runs, name, group_size):
    r = runs(name, group_size)
    for what, factors in (("model", _arrays_of(r.reference)), ("artifact", r.reference_artifact)):
        assert factors.keys() == set(_all_paths()), what
        for path, arrays in factors.items():
            for field_name, a in arrays.items():
                assert a.size and np.all(np.isfinite(a.astype(np.float64))), f"{what}: {path}.{field_name}"
            if "indices" in arrays:  # atom ids address the dictionary
                k = arrays["D"].shape[1]
                assert arrays["indices"].min() >= 0 and arrays["indices"].max() < k, f"{what}: {path}"
    for row in r.report.matrices:
        assert np.isfinite(row.functional_error_calib) and np.isfinite(row.functional_error_heldout)
        assert np.isfinite(row.weight_error), row.path


def _dense(f: dict[str, np.ndarray]) -> np.ndarray:
    """W̃ [d_in, d_out] in float64 from the fitted factors, computed here (not by the library)."""
    if "A" in f:
        return f["A"].astype(np.float64) @ f["B"].astype(np.float64)
    D, idx, val = f["D"].astype(np.float64), f["indices"], f["values"].astype(np.float64)
    S = np.zeros((D.shape[1], idx.shape[0]))
    for j in range(idx.shape[0]):
        for t in range(idx.shape[1]):
            S[idx[j, t], j] += val[j, t]
    return D @ S


def _output_error(W: np.ndarray, W_hat: np.ndarray, G: np.ndarray) -> float:
    """‖X(W − W̃)‖_F / ‖XW‖_F from G = XᵀX: sqrt(tr(ΔᵀGΔ) / tr(WᵀGW))."""
    W = W.astype(np.float64)
    delta = W - W_hat
    return float(np.sqrt(np.trace(delta.T @ G @ delta) / np.trace(W.T @ G @ W)))


@pytest.mark.parametrize("name, group_size", VARIANTS)
def test_functional_error_beats_the_data_free_baseline(tiny, runs, svd_baseline, name, group_size):
    model, grams, heldout = tiny
    r = runs(name, group_size)
    rows = {m.path: m for m in r.report.matrices}
    # The report's errors are the output errors of the fitted factors, recomputed here from the artifact.
    for path, f in r.reference_artifact.items():
        W_hat = _dense(f)
        W = projection_weight(model, path)
        assert rows[path].functional_error_calib == pytest.approx(_output_error(W, W_hat, grams.gram(path)),
                                                                  rel=1e-9), path
        assert rows[path].functional_error_heldout == pytest.approx(_output_error(W, W_hat, heldout.gram(path)),
                                                                    rel=1e-9), path
    calib = np.array([rows[p].functional_error_calib for p in _all_paths()])
    held = np.array([rows[p].functional_error_heldout for p in _all_paths()])
    assert np.all(calib < 1.0) and np.all(held < 1.0), "an error at or above that of W̃ = 0"
    if METHODS[name].data_aware:
        base = {m.path: m for m in svd_baseline.matrices}
        svd_calib = np.mean([base[p].functional_error_calib for p in _all_paths()])
        svd_held = np.mean([base[p].functional_error_heldout for p in _all_paths()])
        assert calib.mean() < svd_calib, f"{name}: calibration error {calib.mean():.4f} >= SVD's {svd_calib:.4f}"
        assert held.mean() < svd_held, f"{name}: held-out error {held.mean():.4f} >= SVD's {svd_held:.4f}"


@pytest.mark.parametrize("name, group_size", VARIANTS)
def test_deterministic_under_a_seed(runs, name, group_size):
    r = runs(name, group_size)
    _assert_bit_identical(_arrays_of(r.reference), _arrays_of(r.repeat), "same seed, second run")
    assert [(m.path, m.functional_error_calib, m.functional_error_heldout, m.weight_error)
            for m in r.report.matrices] == [(m.path, m.functional_error_calib, m.functional_error_heldout,
                                             m.weight_error) for m in r.repeat_report.matrices]
    # (Another seed may draw other factors, e.g. K-SVD's initial dictionary: nothing is asserted about it.)


@pytest.mark.parametrize("name, group_size", VARIANTS)
def test_resume_is_bit_identical(runs, name, group_size):
    r = runs(name, group_size)
    assert r.finished_when_interrupted == list(range(r.interrupted_after)), "the interrupted run's saved units"
    assert 0 < r.interrupted_after < r.report.units
    assert r.resumed_report.units == r.report.units
    assert r.resumed_report.units_reused == r.interrupted_after
    # bit for bit: the factors as saved (full precision, atom indices included) and the model the resume returns
    _assert_bit_identical(r.reference_artifact, r.resumed_artifact, "artifact after resume")
    _assert_bit_identical(_arrays_of(r.reference), _arrays_of(r.resumed), "resumed model")
    assert [(m.path, m.functional_error_calib, m.functional_error_heldout) for m in r.report.matrices] == \
        [(m.path, m.functional_error_calib, m.functional_error_heldout) for m in r.resumed_report.matrices]
    assert r.resumed_report.realised_ratio == r.report.realised_ratio
