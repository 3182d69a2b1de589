"""Block-output refinement (cospadi_jax/refine.py): lower layer loss at an unchanged budget, supports kept,
deterministic, shared tensors kept shared, non-finite losses refused, resume bit-identical, the Hydra knobs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_hf_config

from cospadi_jax.calib import collect_grams
from cospadi_jax.checkpoint import ArtifactWriter, load_artifact
from cospadi_jax.compress import compress
from cospadi_jax.layers import DictLinear
from cospadi_jax.models import get_module, random_model
from cospadi_jax.refine import RefineConfig, factors_of

FAST = dict(ratio=0.3, progress=False)
KSVD = dict(ksvd_iterations=2, power_iterations=4)  # CoSpaDi's knobs: the low-rank methods have none


def fast(method: str = "cospadi") -> dict:
    """FAST, and the K-SVD knobs for a CoSpaDi method."""
    return {**FAST, **(KSVD if method.startswith("cospadi") else {})}
REFINE = RefineConfig(steps=25, lr=1e-2)  # rms-scaled: a step of 1 % of each tensor's RMS


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen2 (q/k/v biases) with 2 layers, its calibration windows and Grams."""
    cfg = tiny_hf_config("qwen2_bias", False)
    model = random_model(cfg, seed=0)
    windows = np.random.default_rng(0).integers(3, 96, size=(12, 32)).astype(np.int32)
    heldout = np.random.default_rng(1).integers(3, 96, size=(4, 32)).astype(np.int32)
    return model, windows, collect_grams(model, windows, progress=False), collect_grams(model, heldout, progress=False)


def _factors(model) -> dict:
    return {p: f for l in range(model.config.num_hidden_layers) for p, f in factors_of(model, l).items()}


def _fit(tiny, refine=None, **kw):
    model, windows, grams, heldout = tiny
    return compress(model, grams=grams, heldout_grams=heldout, windows=windows, refine=refine,
                    **{**fast(kw.get("method", "cospadi")), **kw})


@pytest.mark.parametrize("method, refine", [
    ("cospadi", REFINE), ("svd_llm", REFINE), ("cospadi", RefineConfig(steps=25, lr=1e-3, scale="absolute"))])
def test_refinement_lowers_every_layer_loss_at_the_same_budget(tiny, method, refine):
    plain, plain_report = _fit(tiny, method=method)
    refined, report = _fit(tiny, refine, method=method)
    assert [r["layer"] for r in report.refinement] == [0, 1]
    for r in report.refinement:
        assert r["status"] == "refined" and r["loss_after"] < 0.8 * r["loss_before"], r
        assert len(r["losses"]) == refine.steps and r["trainable_params"] > 0
    # the stored budget is untouched: the same realised CR, shapes and supports
    assert report.realised_ratio == plain_report.realised_ratio
    before, after = _factors(plain), _factors(refined)
    assert before.keys() == after.keys()
    changed = 0
    for path, f in after.items():
        b = before[path]
        for name in ("D", "values") if method == "cospadi" else ("A", "B"):
            assert getattr(f, name).shape == getattr(b, name).shape
            changed += not np.array_equal(getattr(f, name), getattr(b, name))
        if method == "cospadi":
            np.testing.assert_array_equal(f.indices, b.indices)
            assert not np.any((f.values != 0) & (b.values == 0))  # padded slots stay empty
    assert changed == 2 * len(after)
    # the rows report the refined factors' errors and keep the fitted held-out one
    rows = {m.path: m for m in report.matrices}
    plain_rows = {m.path: m for m in plain_report.matrices}
    for path, row in rows.items():
        assert row.functional_error_heldout_fitted == pytest.approx(plain_rows[path].functional_error_heldout)
        assert row.functional_error_heldout != row.functional_error_heldout_fitted


def test_refinement_is_deterministic_under_the_seed(tiny):
    a, b = _factors(_fit(tiny, REFINE)[0]), _factors(_fit(tiny, REFINE)[0])
    for path in a:
        np.testing.assert_array_equal(a[path].D, b[path].D)
        np.testing.assert_array_equal(a[path].values, b[path].values)
    c = _factors(_fit(tiny, REFINE, seed=7)[0])  # another seed: other fits, other minibatches
    assert not np.array_equal(a[path].values, c[path].values)


def test_refined_values_stay_on_the_quantisation_grid(tiny):
    model, report = _fit(tiny, REFINE, quantization="bf16-14bit")
    assert all(r["status"] == "refined" for r in report.refinement)
    import jax.numpy as jnp

    for f in _factors(model).values():
        bits = np.asarray(jnp.asarray(f.values, jnp.bfloat16)).view(np.uint16)
        np.testing.assert_array_equal(np.asarray(jnp.asarray(f.values, jnp.bfloat16), np.float32), f.values)
        assert np.all(bits & 3 == 0)


def test_a_shared_dictionary_stays_fixed_and_shared(tiny):
    plain, _ = _fit(tiny, group_size=2)
    refined, report = _fit(tiny, REFINE, group_size=2)
    before, after = _factors(plain), _factors(refined)
    for t in ("self_attn.q_proj", "mlp.up_proj"):  # shared across the two layers: D kept, values refined
        paths = [f"model.layers.{l}.{t}" for l in (0, 1)]
        for p in paths:
            np.testing.assert_array_equal(after[p].D, before[p].D)
            assert not np.array_equal(after[p].values, before[p].values)
        np.testing.assert_array_equal(after[paths[0]].D, after[paths[1]].D)
    o = "model.layers.0.self_attn.o_proj"  # private: its D is refined
    assert not np.array_equal(after[o].D, before[o].D)


def test_a_non_finite_loss_keeps_the_fitted_factors(tiny, caplog):
    plain, _ = _fit(tiny)
    with caplog.at_level("WARNING", logger="cospadi_jax"):
        refined, report = _fit(tiny, RefineConfig(steps=5, lr=1e30))
    assert all(r["status"] != "refined" and "kept the fitted factors" in r["status"] for r in report.refinement)
    assert "kept the fitted factors" in caplog.text
    before, after = _factors(plain), _factors(refined)
    for path in before:
        np.testing.assert_array_equal(after[path].D, before[path].D)
        np.testing.assert_array_equal(after[path].values, before[path].values)


def test_refinement_in_a_sparse_mode_refines_then_packs(tiny):
    dense_mode, _ = _fit(tiny, REFINE)
    sparse, _ = _fit(tiny, REFINE, mode="sparse_coo16")
    module = get_module(sparse, "model.layers.1.mlp.down_proj")
    assert isinstance(module, DictLinear) and module.mode == "sparse_coo16"
    ref = get_module(dense_mode, "model.layers.1.mlp.down_proj")
    # the packed layout holds the refined numbers, rounded to bf16 (its columns' values are reordered by atom)
    np.testing.assert_allclose(np.asarray(module.coefficients()), np.asarray(ref.coefficients()), rtol=2**-8, atol=0)


class _Stop(Exception):
    pass


def test_interrupted_refinement_resumes_bit_identical(tiny, tmp_path):
    reference = _factors(_fit(tiny, REFINE)[0])
    meta = {"identity": {"x": 1}}

    def stop_after_first(record):
        raise _Stop

    with pytest.raises(_Stop):
        _fit(tiny, REFINE, artifact=ArtifactWriter(tmp_path, meta), on_refined=stop_after_first)
    assert [p.parent.name for p in tmp_path.glob("refined/*/record.json")] == ["00000"]
    seen = []
    resumed, report = _fit(tiny, REFINE, artifact=ArtifactWriter(tmp_path, meta), on_refined=seen.append)
    assert [r.layer for r in seen] == [1] and report.units_reused == report.units
    assert [r["layer"] for r in report.refinement] == [0, 1]  # layer 0's record is read back
    got = _factors(resumed)
    for path in reference:
        np.testing.assert_array_equal(got[path].D, reference[path].D)
        np.testing.assert_array_equal(got[path].values, reference[path].values)
    (tmp_path / "report.json").write_text(json.dumps(report.to_dict()))
    loaded, _ = load_artifact(tmp_path)  # the artifact gives the refined factors, not the fitted ones
    for path in reference:
        np.testing.assert_array_equal(loaded[path].values, reference[path].values)


@pytest.mark.parametrize("bad, match", [
    (RefineConfig(steps=-1), "refine.steps must be >= 0"),
    (RefineConfig(steps=5, lr=0.0), "refine.lr must be a positive"),
    (RefineConfig(steps=5, lr=-1e-3), "refine.lr must be a positive"),
    (RefineConfig(steps=5, batch_size=0), "refine.batch_size"),
    (RefineConfig(steps=5, inputs="teacher"), "refine.inputs must be one of"),
    (RefineConfig(steps=5, scale="relative"), "refine.scale must be one of"),
])
def test_bad_refinement_settings_are_refused_before_any_work(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        _fit(tiny, bad)


def test_refinement_needs_windows_and_the_dense_model(tiny):
    model, _, grams, _ = tiny
    with pytest.raises(ValueError, match="need calibration windows"):
        compress(model, grams=grams, refine=REFINE, **fast())
    with pytest.raises(ValueError, match="use inplace=False"):
        compress(model, grams=grams, refine=REFINE, inplace=True, **fast())


def test_hydra_refine_knobs(tmp_path):
    from test_run import _compose, _overrides

    from cospadi_jax import run as run_app

    cfg = _compose(_overrides("unused", tmp_path / "r", "refine.steps=-1"))
    with pytest.raises(ValueError, match="refine.steps must be >= 0"):
        run_app.execute(cfg)
    with pytest.raises(ValueError, match="refine.lr must be a positive"):
        run_app.execute(_compose(_overrides("unused", tmp_path / "r", "refine.steps=3", "refine.lr=0")))
    from cospadi_jax.identity import run_name

    from omegaconf import OmegaConf

    name = run_name(OmegaConf.to_container(_compose(["refine.steps=200"]), resolve=False))
    assert "-R200-" in name and "-R" not in run_name(OmegaConf.to_container(_compose([]), resolve=False))


def test_hydra_job_refines_logs_and_restores_the_refined_model(tmp_path):
    from helpers import save_tiny_model_with_tokenizer
    from test_run import _compose, _overrides

    from cospadi_jax import run as run_app

    tiny_dir = save_tiny_model_with_tokenizer(tmp_path / "tiny", family="llama_gqa", layers=2)
    out = tmp_path / "run"
    extra = ["refine.steps=5", "refine.lr=1e-3", "eval.dense_baseline=false"]
    metrics = run_app.execute(_compose(_overrides(tiny_dir, out, *extra)))
    saved = json.loads((out / "metrics.json").read_text())
    assert [r["layer"] for r in saved["refinement"]] == [0, 1] and saved["config"]["refine"]["steps"] == 5
    assert all(len(r["losses"]) == 5 for r in saved["refinement"])
    assert any(r["status"] == "refined" for r in saved["refinement"])
    evaluated = run_app.execute(_compose(_overrides(tiny_dir, out, *extra, "task=evaluate", f"artifact={out}")))
    ours = metrics["compressed"]["perplexity"]["embedded:heldout"]["perplexity"]
    assert evaluated["compressed"]["perplexity"]["embedded:heldout"]["perplexity"] == pytest.approx(ours, rel=1e-6)
