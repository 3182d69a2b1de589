"""Non-uniform budgets (cospadi_jax/allocation.py): the byte budget kept, the error lowered, the closed-form curve
exact for SVD-LLM, the allocation plumbed through compress, resume and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_hf_config

from cospadi_jax.allocation import AllocationConfig, Unit, allocate, ratio_grid, spectrum_error
from cospadi_jax.budget import budget
from cospadi_jax.calib import collect_grams
from cospadi_jax.checkpoint import ArtifactWriter
from cospadi_jax.compress import CalibrationSpec, compress
from cospadi_jax.export import save_pretrained
from cospadi_jax.methods.base import functional_error, whitening_factor
from cospadi_jax.methods.lowrank import SVDLLM
from cospadi_jax.models import random_model
from cospadi_jax.refine import factors_of

GREEDY = AllocationConfig(allocation="greedy", spread=0.2, step=0.01)
WHITEN = lambda G: whitening_factor(G)[0]  # noqa: E731


def _unit(rng, name: str, decay: float, d_in: int = 96, d_out: int = 160) -> Unit:
    """W with singular values decaying like exp(-decay·i) under a random positive definite Gram."""
    U, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
    V, _ = np.linalg.qr(rng.standard_normal((d_out, d_in)))
    W = (U * np.exp(-decay * np.arange(d_in))) @ V.T
    X = rng.standard_normal((4 * d_in, d_in))
    return Unit([name], W, X.T @ X)


@pytest.fixture(scope="module")
def units():
    rng = np.random.default_rng(0)
    return [_unit(rng, f"u{i}", decay) for i, decay in enumerate((0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.4))]


def _bytes(units, ratios, kind="low_rank"):
    return sum(budget(u.W.shape[0], u.W.shape[1], r, kind=kind).total_bytes for u, r in zip(units, ratios))


@pytest.mark.parametrize("kind", ["low_rank", "cospadi"])
@pytest.mark.parametrize("target", [0.2, 0.3, 0.4])
def test_the_byte_budget_is_kept_and_the_objective_falls(units, kind, target):
    result = allocate(units, target, GREEDY, kind=kind, rho=2.0, accounting="eq11", whiten=WHITEN)
    ratios = result["ratios"]
    assert _bytes(units, ratios, kind) <= _bytes(units, [target] * len(units), kind)
    assert 0 <= result["realised_ratio"] - result["uniform_realised_ratio"] <= 0.005
    assert result["objective"]["allocated"] < result["objective"]["uniform"]
    # Fast-decaying spectra lose little to a lower rank: they give bytes to the slow ones.
    assert ratios[-1] > target > ratios[0]
    assert all(abs(r - target) <= GREEDY.spread + 1e-9 for r in ratios)


def test_greedy_matches_the_exhaustive_optimum_on_a_small_problem(units):
    """Three units, five ratios each: the greedy hull walk finds the best allocation within the uniform bytes
    (up to the last step that does not fit: never worse than uniform, and within the smallest step gap)."""
    cfg = AllocationConfig(allocation="greedy", spread=0.1, step=0.05)
    result = allocate(units[:3], 0.3, cfg, kind="low_rank", rho=2.0, accounting="eq11", whiten=WHITEN)
    grid = ratio_grid(0.3, cfg)
    cost = {}
    for u in units[:3]:
        tail = spectrum_error(u, WHITEN)
        cost[u.paths[0]] = {g: tail(budget(96, 160, g, kind="low_rank").rank) for g in grid}
    limit = _bytes(units[:3], [0.3] * 3)
    best = min(sum(cost[u.paths[0]][g] for u, g in zip(units[:3], combo))
               for combo in np.array(np.meshgrid(grid, grid, grid)).T.reshape(-1, 3)
               if _bytes(units[:3], combo) <= limit)
    assert best <= result["objective"]["allocated"] <= result["objective"]["uniform"]
    assert result["objective"]["allocated"] == pytest.approx(best, rel=0.15)


def test_the_spectrum_curve_is_svd_llm_s_error_exactly(units):
    u = units[1]
    tail = spectrum_error(u, WHITEN)
    for ratio in (0.2, 0.5):
        b = budget(96, 160, ratio, kind="low_rank")
        W_hat = SVDLLM().fit_group([u.W], [u.gram], b, None)[0].dense()
        assert tail(b.rank) == pytest.approx(functional_error(u.W, W_hat, u.gram) ** 2, rel=1e-6)


def test_bad_settings_name_the_key(units):
    with pytest.raises(ValueError, match="max_ratio"):
        allocate(units, 0.95, GREEDY, kind="low_rank", rho=2.0, accounting="eq11", whiten=WHITEN)
    for bad, key in ((dict(allocation="lagrange"), "budget.allocation"), (dict(curve="x"), "budget.curve"),
                     (dict(step=0.5), "budget.step"), (dict(points=1), "budget.points")):
        with pytest.raises(ValueError, match=key):
            AllocationConfig(**bad).validate()


# ------------------------------------------------------------------------------------------- whole model


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_hf_config("llama_gqa", False)
    cfg.num_hidden_layers = 3
    model = random_model(cfg, seed=0)
    windows = np.random.default_rng(0).integers(3, 96, size=(8, 32)).astype(np.int32)
    return model, windows, collect_grams(model, windows, batch_size=4, progress=False)


FAST = dict(ratio=0.3, progress=False)
KSVD = dict(ksvd_iterations=1, power_iterations=2)  # CoSpaDi's knobs: the low-rank methods have none


def fast(method: str = "cospadi") -> dict:
    """FAST, and the K-SVD knobs for a CoSpaDi method."""
    return {**FAST, **(KSVD if method.startswith("cospadi") else {})}


def _calib_objective(report) -> float:
    return sum(m.functional_error_calib ** 2 for m in report.matrices)


def test_compress_svd_llm_allocation_lowers_the_calibration_error_at_the_same_bytes(tiny):
    """SVD-LLM's curve is exact, so the realised Σ e² on the calibration Grams must fall."""
    model, _, grams = tiny
    _, uniform = compress(model, grams=grams, method="svd_llm", **fast("svd_llm"))
    _, greedy = compress(model, grams=grams, method="svd_llm", allocation=GREEDY, **fast("svd_llm"))
    assert greedy.allocation is not None and len(set(greedy.allocation["ratios"])) > 1
    assert 0 <= greedy.realised_ratio - uniform.realised_ratio <= 0.005
    assert _calib_objective(greedy) == pytest.approx(greedy.allocation["objective"]["allocated"], rel=1e-6)
    assert _calib_objective(greedy) < _calib_objective(uniform)
    assert {m.target_ratio for m in uniform.matrices} == {0.3}


class _Killed(Exception):
    pass


def test_measured_cospadi_allocation_resumes_and_exports_at_its_bytes(tiny, tmp_path):
    """A killed run resumes with the stored allocation and bit-identical factors; the factored export accounts
    each unit at its own ratio (it refuses sizes that disagree with the record)."""
    model, _, grams = tiny
    cfg = AllocationConfig(allocation="greedy", curve="measured", spread=0.2, step=0.02, points=3)
    run = dict(method="cospadi", group_size=3, grams=grams, allocation=cfg, **fast())
    reference, full = compress(model, **run)
    assert full.allocation["curve"] == "measured" and len(set(full.allocation["ratios"])) > 1

    def kill(index, rows):
        if index == 3:
            raise _Killed

    with pytest.raises(_Killed):
        compress(model, artifact=ArtifactWriter(tmp_path / "run", {"identity": 1}), on_unit=kill, **run)
    stored = json.loads((tmp_path / "run" / "allocation.json").read_text())
    assert stored["ratios"] == full.allocation["ratios"]
    resumed, again = compress(model, artifact=ArtifactWriter(tmp_path / "run", {"identity": 1}), **run)
    assert again.units_reused == 4 and again.allocation == stored  # reused, not recomputed
    for layer in range(3):
        for path, f in factors_of(reference, layer).items():
            g = factors_of(resumed, layer)[path]
            for name in ("D", "indices", "values"):
                np.testing.assert_array_equal(getattr(f, name), getattr(g, name), err_msg=f"{path} {name}")
    manifest = save_pretrained(reference, tmp_path / "export", "factored", metadata=full)
    units = {m.group[0]: m for m in full.matrices}
    expected = sum(budget(units[p].d_in, units[p].d_out, r, kind="cospadi", group_size=len(units[p].group)
                          ).total_bytes for p, r in zip(full.allocation["paths"], full.allocation["ratios"]))
    assert manifest["bytes"]["accounted"] == pytest.approx(float(expected))
    assert 1 - expected / sum(2 * m.dense_params for m in full.matrices) == pytest.approx(full.realised_ratio)


def test_allocation_under_sequential_calibration_comes_from_the_dense_grams(tiny):
    model, windows, grams = tiny
    _, plain = compress(model, grams=grams, method="svd_llm", allocation=GREEDY, **fast("svd_llm"))
    _, seq = compress(model, windows=windows, method="svd_llm", allocation=GREEDY,
                      calibration=CalibrationSpec(sequential=True, heldout_source=None, batch_size=4), **fast("svd_llm"))
    assert seq.allocation["ratios"] == plain.allocation["ratios"]


def test_a_data_free_method_refuses_an_allocation(tiny):
    model, _, grams = tiny
    with pytest.raises(ValueError, match="data-aware"):
        compress(model, grams=grams, method="svd", allocation=GREEDY, **fast("svd"))


# ------------------------------------------------------------------------------------------- Hydra app


def test_the_app_sweeps_budget_allocation_and_exports_its_bytes(tmp_path):
    import cospadi_jax.run as run_app
    from helpers import save_tiny_model_with_tokenizer
    from test_run import _compose, _overrides

    tiny_dir = save_tiny_model_with_tokenizer(tmp_path / "tiny", layers=2)
    cfg = _compose(_overrides(tiny_dir, tmp_path / "run", "method=svd_llm", "method.ratio=0.3",
                              "budget.allocation=greedy", "budget.step=0.02"))
    assert "Agreedy-spectrum" in cfg.run_name
    metrics = run_app.execute(cfg)
    allocation = metrics["allocation"]
    assert len(set(allocation["ratios"])) > 1
    assert allocation["objective"]["allocated"] < allocation["objective"]["uniform"]
    assert metrics["realised_ratio"] == pytest.approx(allocation["realised_ratio"])
    manifest = run_app.execute(_compose([f"model.spec={tiny_dir}", "task=export", f"artifact={tmp_path / 'run'}"]))
    dense = sum(2 * m["dense_params"] for m in metrics["matrices"])
    assert 1 - manifest["bytes"]["accounted"] / dense == pytest.approx(metrics["realised_ratio"])
    with pytest.raises(ValueError, match="budget.allocation"):
        run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "bad", "budget.allocation=lagrange")))
