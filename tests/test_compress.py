"""Whole-model compression: factored layers, budget accounting, orchestration and its bad inputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_hf_config

from cospadi_jax.budget import budget
from cospadi_jax.calib import collect_grams
from cospadi_jax.compress import compress, work_units
from cospadi_jax.methods import CoSpaDiConfig, method_config
from cospadi_jax.layers import DictLinear, LowRankLinear, quantize_coefficients, replace_projection
from cospadi_jax.methods.base import DictFactors, LowRankFactors, functional_error
from cospadi_jax.models import forward_logits, get_module, projection_weight, random_model

FAST = dict()
KSVD = dict(ksvd_iterations=3, power_iterations=4)  # CoSpaDi's knobs: the low-rank methods have none


def fast(method: str = "cospadi") -> dict:
    """FAST, and the K-SVD knobs for a CoSpaDi method."""
    return {**FAST, **(KSVD if method.startswith("cospadi") else {})}


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen2 (q/k/v biases) with 4 layers, and its Grams on random tokens."""
    cfg = tiny_hf_config("qwen2_bias", False)
    cfg.num_hidden_layers = 4
    model = random_model(cfg, seed=0)
    windows = np.random.default_rng(0).integers(3, 96, size=(16, 32)).astype(np.int32)
    heldout = np.random.default_rng(1).integers(3, 96, size=(8, 32)).astype(np.int32)
    return model, collect_grams(model, windows, progress=False), collect_grams(model, heldout, progress=False)


def _dict_factors(rng, d_in=64, d_out=48, k=40, s=10):
    D = rng.normal(size=(d_in, k))
    idx = np.stack([rng.permutation(k)[:s] for _ in range(d_out)]).astype(np.int32)
    return DictFactors(D, idx, rng.normal(size=(d_out, s)))


def test_dense_and_factored_paths_agree():
    rng = np.random.default_rng(0)
    f = _dict_factors(rng)
    x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
    dense = DictLinear(f.D, f.indices, f.values, None, dtype=jnp.float32, mode="dense")(x)
    factored = DictLinear(f.D, f.indices, f.values, None, dtype=jnp.float32, mode="factored")(x)
    expected = np.asarray(x, np.float64) @ f.dense()
    np.testing.assert_allclose(np.asarray(dense), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(factored), expected, rtol=1e-4, atol=1e-4)


def test_coefficient_quantisation_grids():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(30, 8)).astype(np.float32)
    q14 = quantize_coefficients(v, "bf16-14bit")
    bits = np.asarray(jnp.asarray(q14, jnp.bfloat16)).view(np.uint16)
    assert np.all(bits & 3 == 0)  # the two lowest bf16 mantissa bits are dropped
    assert np.max(np.abs(q14 - v) / np.abs(v)) < 2**-5  # 5 mantissa bits left: relative error < 2^-5
    q8 = quantize_coefficients(v, "int8")
    scale = np.abs(v).max(1, keepdims=True) / 127
    np.testing.assert_allclose(np.round(q8 / scale), q8 / scale, atol=1e-3)
    assert np.max(np.abs(q8 - v)) <= scale.max() / 2 + 1e-7
    with pytest.raises(ValueError, match="unknown coefficient quantisation"):
        quantize_coefficients(v, "fp4")


def test_swapping_one_projection_changes_logits_only_through_it(tiny):
    from flax import nnx

    model, _, _ = tiny
    path = "model.layers.2.mlp.up_proj"
    W = projection_weight(model, path)
    exact = LowRankFactors(W, np.eye(W.shape[1]))  # an exact factorisation: logits must not move
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 96, size=(2, 16)), jnp.int32)
    before = np.asarray(forward_logits(model, ids))
    swapped = nnx.clone(model)
    replace_projection(swapped, path, exact)
    assert isinstance(get_module(swapped, path), LowRankLinear)
    np.testing.assert_allclose(np.asarray(forward_logits(swapped, ids)), before, atol=1e-4)
    # a perturbed factorisation moves the logits, and only layer 2's up_proj differs between the models
    replace_projection(swapped, "model.layers.1.self_attn.q_proj",
                       LowRankFactors(projection_weight(model, "model.layers.1.self_attn.q_proj") * 1.5,
                                      np.eye(64)))
    assert np.abs(np.asarray(forward_logits(swapped, ids)) - before).max() > 1e-3
    assert get_module(swapped, "model.layers.1.self_attn.q_proj").bias is not None  # Qwen2 bias kept
    with pytest.raises(ValueError, match="already compressed"):
        replace_projection(swapped, path, exact)


@pytest.mark.parametrize("method", ["svd", "svd_llm", "asvd", "cospadi", "cospadi_free"])
def test_compress_counts_match_budget(tiny, method):
    model, grams, heldout = tiny
    compressed, report = compress(model, grams=grams, heldout_grams=heldout, method=method, ratio=0.3,
                                  progress=False, **fast(method))
    assert len(report.matrices) == 4 * 7
    spent = 0.0
    for row in report.matrices:
        b = budget(row.d_in, row.d_out, 0.3, kind="low_rank" if row.rank else "cospadi")
        module = get_module(compressed, row.path)
        if row.rank is not None:
            assert row.rank == b.rank and module.A.shape == (row.d_in, b.rank)
            stored = module.A.size + module.B.size
        else:
            assert (row.k, row.s) == (b.n_atoms, b.sparsity)
            assert module.D.shape == (row.d_in, b.n_atoms) and module.values.shape == (row.d_out, b.sparsity)
            stored = module.D.size + module.values.size
        assert stored == b.stored_params == row.compressed_params
        assert abs(row.realised_ratio - b.realised_ratio_bytes) < 1e-12
        W_hat = (np.asarray(module.A[...], np.float64) @ np.asarray(module.B[...], np.float64) if row.rank else
                 np.asarray(module.D[...], np.float64) @ np.asarray(module.coefficients(), np.float64))
        W = projection_weight(model, row.path)
        assert 0 <= row.functional_error_calib < 1
        # the held-out error is the layer's own, on the held-out Gram
        assert row.functional_error_heldout == pytest.approx(functional_error(W, W_hat, heldout.gram(row.path)),
                                                             rel=1e-5)
        spent += float(b.total_bytes)
    # the report's CR is the budget's bytes over the dense bf16 bytes, exactly
    assert report.realised_ratio == pytest.approx(1 - spent / sum(2 * m.dense_params for m in report.matrices),
                                                  rel=1e-12)
    # the original model is untouched
    assert type(get_module(model, "model.layers.0.mlp.up_proj")).__name__ == "Linear"


def test_grouped_units_share_one_dictionary(tiny):
    model, grams, _ = tiny
    cfg = method_config("cospadi", group_size=2)
    units = work_units(cfg, 4)
    assert ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"] in units
    assert ["model.layers.0.self_attn.o_proj"] in units  # o and down stay private
    compressed, report = compress(model, grams=grams, method="cospadi", group_size=2, ratio=0.3,
                                  progress=False, **fast())
    a = get_module(compressed, "model.layers.0.mlp.up_proj").D[...]
    b = get_module(compressed, "model.layers.1.mlp.up_proj").D[...]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    row = next(r for r in report.matrices if r.path == "model.layers.0.mlp.up_proj")
    assert row.k == budget(64, 128, 0.3, group_size=2).n_atoms


def test_compression_is_deterministic_under_a_seed(tiny):
    model, grams, _ = tiny
    kw = dict(grams=grams, method="cospadi", ratio=0.3, layers=(1,), progress=False, **fast())
    m1, r1 = compress(model, seed=3, **kw)
    m2, r2 = compress(model, seed=3, **kw)
    m3, _ = compress(model, seed=4, **kw)
    assert [m.functional_error_calib for m in r1.matrices] == [m.functional_error_calib for m in r2.matrices]
    for row in r1.matrices:  # bit-identical factors under one seed; another seed draws another dictionary
        a, b, c = (get_module(m, row.path) for m in (m1, m2, m3))
        for name in ("D", "values"):
            np.testing.assert_array_equal(np.asarray(getattr(a, name)[...]), np.asarray(getattr(b, name)[...]))
        np.testing.assert_array_equal(np.asarray(a.coefficients()), np.asarray(b.coefficients()))  # supports
        assert not np.array_equal(np.asarray(a.D[...]), np.asarray(c.D[...]))


def test_bad_compression_inputs(tiny):
    model, grams, _ = tiny
    kw = dict(grams=grams, progress=False)
    for overrides, message in [
        (dict(ratio=1.2), "ratio must be in \\(0, 1\\)"),
        (dict(ratio=0.0), "ratio must be in \\(0, 1\\)"),
        (dict(rho=0.5), "rho = k/s must be >= 1"),
        (dict(method="pca"), "unknown method 'pca'"),
        (dict(proj_types=("qkv_proj",)), "unknown projection type"),
        (dict(layers=(7,)), "layer index \\[7\\] out of range"),
        (dict(method="cospadi", group_size=3), "group_size=3 does not divide the 4"),
        (dict(method="svd_llm", group_size=2), "does not share bases"),
        (dict(layers=()), "layers is empty"),
        (dict(proj_types=()), "proj_types is empty"),
        (dict(layers=(1, 1)), "lists a layer twice"),
        (dict(proj_types=("q_proj", "q_proj")), "lists a projection twice"),
        (dict(method="cospadi", group_size=2, layers=(0, 3)), "not consecutive"),
        (dict(method="cospadi", group_size=2, layers=(1, 2, 0, 3)), "not consecutive"),
        (dict(method="svd_llm", quantization="int8"), "applies to CoSpaDi's coefficient values"),
        (dict(rho=float("inf")), "rho must be finite"),
        (dict(sparse_coder="lasso"), "unknown sparse_coder"),
    ]:
        with pytest.raises(ValueError, match=message):
            compress(model, **kw, **overrides)
    for overrides, message in [
        (dict(ratio="0.3"), "ratio must be a number"),
        (dict(layers=1), "layers must be a list"),
        (dict(layers=(1.0,)), "layer indices must be integers"),
        (dict(proj_types="q_proj"), "proj_types must be a list"),
        (dict(ksvd_iterations=2.5), "ksvd_iterations must be an integer"),
    ]:
        with pytest.raises(TypeError, match=message):
            compress(model, **kw, **overrides)
    with pytest.raises(TypeError, match="model must be a cospadi_jax CausalLM"):
        compress(None, grams=grams, progress=False)
    compressed, _ = compress(model, grams=grams, method="svd_llm", layers=(0,), proj_types=("q_proj",),
                             progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        compress(compressed, grams=grams, method="svd_llm", layers=(0,), progress=False)


def test_bad_grams(tiny):
    from cospadi_jax.calib import Grams

    model, grams, _ = tiny
    nan = Grams(grams.n_tokens, {k: v.copy() for k, v in grams.by_path.items()}, dict(grams.abs_sums))
    nan.by_path["model.layers.0.self_attn.q_proj"][0, 0] = np.nan
    with pytest.raises(ValueError, match="(?i)non-finite|nan"):
        compress(model, grams=nan, method="svd_llm", layers=(0,), progress=False)
    wrong = Grams(grams.n_tokens, {k: np.eye(5) for k in grams.by_path}, dict(grams.abs_sums))
    with pytest.raises(ValueError, match="Gram"):
        compress(model, grams=wrong, method="svd_llm", layers=(0,), progress=False)


def test_group_with_different_shapes_is_refused(tiny, monkeypatch):
    import cospadi_jax.compress as compress_module

    model, grams, _ = tiny
    real = compress_module.projection_weight

    def uneven(m, path):  # a checkpoint whose layer 1 up_proj is narrower than layer 0's
        W = real(m, path)
        return W[:, :64] if path == "model.layers.1.mlp.up_proj" else W

    monkeypatch.setattr(compress_module, "projection_weight", uneven)
    with pytest.raises(ValueError, match="a shared group needs equal shapes"):
        compress(model, grams=grams, method="cospadi", group_size=2, proj_types=("up_proj",), progress=False, **fast())


def test_a_knob_the_method_does_not_have_is_refused(tiny):
    """Each method owns its config: K-SVD knobs given to SVD-LLM are an error, not silently ignored."""
    model, grams, _ = tiny
    with pytest.raises(TypeError, match=r"method 'svd_llm' has no knob\(s\) \['ksvd_iterations'\]"):
        compress(model, grams=grams, method="svd_llm", ksvd_iterations=4, progress=False)
    with pytest.raises(ValueError, match="configured by LowRankConfig"):  # method.name overridden in a CoSpaDi file
        compress(model, grams=grams, config=CoSpaDiConfig(name="svd_llm"), progress=False)
    with pytest.raises(ValueError, match="contradicts config.name"):
        compress(model, grams=grams, config=CoSpaDiConfig(), method="svd_llm", progress=False)


def test_fit_seconds_exclude_reading_the_grams(tiny, monkeypatch):
    """A matrix's fit time is the fit alone: a slow Gram cache (Basis Sharing's groups read theirs from a
    compressed file for minutes) must not be booked as fitting."""
    import time

    from cospadi_jax.calib import Grams

    model, grams, _ = tiny
    clock = {"skew": 0.0}  # reading a Gram takes an hour on this clock
    monkeypatch.setattr(time, "perf_counter", lambda: time.monotonic() + clock["skew"])

    class SlowGrams(Grams):
        def gram(self, path):
            clock["skew"] += 3600.0
            return super().gram(path)

    slow = SlowGrams(grams.n_tokens, grams.by_path, grams.abs_sums)
    _, report = compress(model, grams=slow, method="svd_llm", layers=(0,), proj_types=("q_proj",), progress=False)
    (row,) = report.matrices
    assert clock["skew"] >= 3600.0 and row.seconds < 600.0
