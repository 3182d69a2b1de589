"""Calibration Grams equal Σ xᵀx of the inputs PyTorch hooks see on the reference model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_hf_config

from cospadi_jax import load_model
from cospadi_jax.calib import collect_grams


def test_grams_match_pytorch_hooks(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(tiny_hf_config("qwen3_qknorm", False)).eval()
    ref.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    windows = np.random.default_rng(0).integers(3, 96, size=(5, 24)).astype(np.int32)

    captured: dict[str, np.ndarray] = {}
    abs_sums: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            captured[name] = captured.get(name, 0) + (x.T @ x).numpy()
            abs_sums[name] = abs_sums.get(name, 0) + x.abs().sum(0).numpy()
        return fn

    for name, module in ref.named_modules():
        if name.endswith(("q_proj", "k_proj", "o_proj", "up_proj", "down_proj")):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        ref(torch.from_numpy(windows).long())

    grams = collect_grams(model, windows, batch_size=2, progress=False)  # 3 batches, the last one smaller
    assert grams.n_tokens == windows.size
    for name, expected in captured.items():
        got = grams.gram(name)  # k_proj resolves to q_proj's input, up_proj to gate_proj's
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, got.T, err_msg=name)  # exactly symmetric: whitening checks in float64
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name)
        np.testing.assert_allclose(grams.mean_abs(name), abs_sums[name] / windows.size, rtol=1e-4, err_msg=name)


def test_grams_bad_input(tmp_path):
    model, _ = load_model(tiny_hf_config("llama_mha", True))
    windows = np.ones((2, 8), np.int32)
    with pytest.raises(ValueError, match="out of range"):
        collect_grams(model, windows, layers=[5], progress=False)
    grams = collect_grams(model, windows, layers=[1], progress=False)
    with pytest.raises(KeyError, match="layer 0 was not collected"):
        grams.gram("model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="not a projection path"):
        grams.gram("model.layers.1.mlp.fc1")


def test_gram_cache_roundtrip_and_refuses_another_model_or_tokenizer(tmp_path):
    from dataclasses import replace

    from cospadi_jax.calib.cache import GramKey, StaleCacheError, cached_path, load_grams, model_fingerprint, save_grams
    from cospadi_jax.models import random_model

    model = random_model(tiny_hf_config("llama_mha", True), seed=0)
    other = random_model(tiny_hf_config("llama_mha", True), seed=1)
    grams = collect_grams(model, np.ones((2, 8), np.int32), progress=False)
    key = GramKey(model_fingerprint(model), "tokenizer-a", "embedded:calibration", 2, 8, 0)
    path = save_grams(cached_path(tmp_path, key), grams, key)
    loaded = load_grams(path, key)
    assert loaded.n_tokens == grams.n_tokens and loaded.by_path.keys() == grams.by_path.keys()
    for k in grams.by_path:
        np.testing.assert_array_equal(loaded.by_path[k], grams.by_path[k])
        np.testing.assert_array_equal(loaded.abs_sums[k], grams.abs_sums[k])
    assert model_fingerprint(other) != key.model
    for changed in (replace(key, model=model_fingerprint(other)), replace(key, tokenizer="tokenizer-b"),
                    replace(key, seed=1)):
        assert cached_path(tmp_path, changed) != path  # a changed key recomputes...
        with pytest.raises(StaleCacheError, match="different setting"):  # ...and a copied file is refused
            load_grams(path, changed)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write left no temporary file
