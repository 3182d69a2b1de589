"""A reduced CoSpaDi-vs-SVD-LLM comparison on the real SmolLM2 weights (few layers, iterations, windows)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import requires_embedded

from cospadi_jax.compress import CalibrationSpec, calibration_grams, compress

pytestmark = [requires_embedded, pytest.mark.real_weights, pytest.mark.slow]


def test_cospadi_beats_svd_llm_in_functional_error_at_equal_budget(smollm2):
    model, tok = smollm2
    layers = [3]
    spec = CalibrationSpec(nsamples=8, seqlen=256, heldout_nsamples=4, cache_dir=None)
    grams, _ = calibration_grams(model, tok, spec, layers, progress=False)
    heldout, _ = calibration_grams(model, tok, spec, layers, heldout=True, progress=False)
    kw = dict(grams=grams, heldout_grams=heldout, layers=tuple(layers), ratio=0.3, progress=False,
              proj_types=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    _, svd_llm = compress(model, method="svd_llm", **kw)
    _, cospadi = compress(model, method="cospadi", ksvd_iterations=8, **kw)
    for a, b in zip(cospadi.matrices, svd_llm.matrices):
        assert a.path == b.path and abs(a.realised_ratio - b.realised_ratio) < 0.01  # equal budgets
        assert a.functional_error_calib < b.functional_error_calib, a.path
    # and on held-out activations on average
    assert np.mean([m.functional_error_heldout for m in cospadi.matrices]) < np.mean(
        [m.functional_error_heldout for m in svd_llm.matrices])
