"""Coefficient bit widths of the paper's Fig. 3 (layers.quantize_coefficients): exact bf16 bit patterns, the
rounding rule (nearest-even into bf16, then truncation toward zero), idempotence, error monotone in the width."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cospadi_jax.budget import budget
from cospadi_jax.layers import BF16_WIDTHS, QUANTIZATIONS, VALUE_BITS, quantize_coefficients
from cospadi_jax.methods import CoSpaDiConfig, method_config


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(np.asarray(x, np.float32), jnp.bfloat16)).view(np.uint16)


def test_schemes_and_widths():
    assert QUANTIZATIONS == (None, "bf16", "bf16-14bit", "bf16-12bit", "bf16-10bit", "int8")
    assert [VALUE_BITS[q] for q in QUANTIZATIONS] == [32, 16, 14, 12, 10, 8]


# 1.9921875 = 0x3FFF (bf16 mantissa all ones): each width clears its dropped mantissa bits, toward zero.
@pytest.mark.parametrize("scheme, pattern, value", [
    ("bf16", 0x3FFF, 1.9921875), ("bf16-14bit", 0x3FFC, 1.96875), ("bf16-12bit", 0x3FF0, 1.875),
    ("bf16-10bit", 0x3FC0, 1.5)])
def test_exact_bit_patterns(scheme, pattern, value):
    q = quantize_coefficients(np.array([[1.9921875, -1.9921875]], np.float32), scheme)
    np.testing.assert_array_equal(q, [[value, -value]])  # the sign bit is kept: truncation is toward zero
    assert _bf16_bits(q[0, 0]) == pattern and _bf16_bits(q[0, 1]) == pattern | 0x8000


def test_rounding_rule_is_nearest_even_into_bf16_then_truncation():
    # 1 + 3·2^-9 is 0.75 of a bf16 ulp above 1: rounds up to 0x3F81 (1.0078125); 14 bits then clear it to 1.0.
    # 1 + 2^-8 is a tie between 0x3F80 and 0x3F81: ties to even gives 1.0.
    x = np.array([[1 + 3 * 2**-9, 1 + 2**-8, 1 + 3 * 2**-8]], np.float32)
    np.testing.assert_array_equal(quantize_coefficients(x, "bf16"), [[1.0078125, 1.0, 1.015625]])
    np.testing.assert_array_equal(quantize_coefficients(x, "bf16-14bit"), [[1.0, 1.0, 1.0]])
    # 0x3F83 (1 + 3·2^-7) keeps 0x3F80 at 14 bits: truncation, not rounding, of the dropped bits
    assert quantize_coefficients(np.float32([[1 + 3 * 2**-7]]), "bf16-14bit")[0, 0] == 1.0
    # the exponent survives every width: a power of two is exact at 10 bits
    np.testing.assert_array_equal(quantize_coefficients(np.float32([[2.0**-20, -(2.0**30)]]), "bf16-10bit"),
                                  [[2.0**-20, -(2.0**30)]])


@pytest.mark.parametrize("scheme", [q for q in QUANTIZATIONS if q])
def test_idempotent(scheme):
    rng = np.random.default_rng(0)
    v = (rng.normal(size=(64, 16)) * 10.0 ** rng.integers(-6, 4, size=(64, 16))).astype(np.float32)
    once = quantize_coefficients(v, scheme)
    np.testing.assert_array_equal(quantize_coefficients(once, scheme), once)


@pytest.mark.parametrize("scheme", list(BF16_WIDTHS))
def test_low_bits_are_zero_and_relative_error_bounded(scheme):
    v = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    q = quantize_coefficients(v, scheme)
    dropped = 16 - BF16_WIDTHS[scheme]
    assert np.all(_bf16_bits(q) & ((1 << dropped) - 1) == 0)
    mantissa = 7 - dropped  # kept mantissa bits: relative error below one unit of the last kept bit
    assert np.max(np.abs(q - v) / np.abs(v)) < 2.0 ** -mantissa


def test_error_is_monotone_in_the_width():
    """Elementwise: fewer bits never give a smaller error (|x - bf16(x)| <= half a bf16 ulp, and every dropped
    bit pattern is a multiple of the ulp, toward zero); and the overall error grows strictly."""
    v = np.random.default_rng(2).normal(size=(500, 32)).astype(np.float32)
    errors = [np.abs(quantize_coefficients(v, q) - v) for q in ("bf16", "bf16-14bit", "bf16-12bit", "bf16-10bit")]
    for finer, coarser in zip(errors, errors[1:]):
        assert np.all(coarser >= finer)
        assert np.linalg.norm(coarser) > 2 * np.linalg.norm(finer)


def test_every_width_passes_validation_and_keeps_the_budget():
    """The width is evaluated at the accounting's k, s: the budget has no quantization input, and every scheme is
    accepted by CoSpaDi's config and refused for a low-rank method."""
    for q in QUANTIZATIONS:
        CoSpaDiConfig(name="cospadi", ratio=0.2, quantization=q).validate()
    with pytest.raises(ValueError, match="applies to CoSpaDi"):
        method_config("svd_llm", ratio=0.2, quantization="bf16-12bit").validate()
    b = budget(576, 1536, 0.2, **CoSpaDiConfig(name="cospadi", ratio=0.2, quantization="bf16-10bit").budget_options())
    assert (b.n_atoms, b.sparsity) == (budget(576, 1536, 0.2).n_atoms, budget(576, 1536, 0.2).sparsity)


def test_requantized_evaluation_equals_a_fit_at_that_width(tmp_path):
    """task=evaluate eval.requantize=<w> on an unquantised artifact scores exactly what a run fitted with
    method.quantization=<w> scores (the width never changes the K-SVD fit), so paper Fig. 3 needs one fit per CR."""
    import json

    from helpers import save_tiny_model_with_tokenizer
    from test_run import _compose, _overrides

    import cospadi_jax.run as run_app
    from cospadi_jax.identity import run_identity

    tiny_dir = save_tiny_model_with_tokenizer(tmp_path / "tiny", family="qwen2_bias", tied=False, layers=2)
    plain = tmp_path / "plain"
    run_app.execute(_compose(_overrides(tiny_dir, plain, "eval.dense_baseline=false")))
    fitted = run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "w12", "eval.dense_baseline=false",
                                                 "method.quantization=bf16-12bit")))
    evaluated = run_app.execute(_compose(_overrides(tiny_dir, plain, "task=evaluate", f"artifact={plain}",
                                                    "eval.requantize=bf16-12bit")))
    assert evaluated["eval"]["requantize"] == "bf16-12bit"
    assert evaluated["compressed"]["perplexity"] == fitted["compressed"]["perplexity"]
    assert len(list(plain.glob("evaluation-*.json"))) == 1
    # Unset, the key is no part of a run's identity: the names of runs made before it existed are unchanged.
    assert "eval.requantize" not in run_identity(json.loads((plain / "metrics.json").read_text())["config"])
    with pytest.raises(ValueError, match="already rounded or refined"):
        run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "w12", "task=evaluate",
                                            f"artifact={tmp_path / 'w12'}", "eval.requantize=bf16-10bit")))
    with pytest.raises(ValueError, match="use it with task=evaluate"):
        run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "x", "eval.requantize=bf16")))
    with pytest.raises(ValueError, match="is not one of"):
        run_app.execute(_compose(_overrides(tiny_dir, plain, "task=evaluate", f"artifact={plain}",
                                            "eval.requantize=fp4")))
