"""Parity of our Flax NNX decoder with transformers-PyTorch on tiny random models of every family."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import TINY_FAMILIES, tiny_hf_config

from cospadi_jax import load_model
from cospadi_jax.models import forward_logits, model_state_dict, token_logprobs


def _torch_reference(family: str, tied: bool, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(family, tied)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random biases/norm weights too, so that a wrongly mapped bias or norm cannot hide behind zeros/ones.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    return config, ref


def _batch(vocab: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(2, 48)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 30:] = 0  # right padding in the second row
    ids[1, 30:] = 0
    return ids, mask


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_logits_match_pytorch(family, tied, tmp_path):
    config, ref = _torch_reference(family, tied, tmp_path)
    model, _ = load_model(tmp_path)
    assert model.config.tie_word_embeddings == tied
    assert (model.lm_head is None) == tied
    ids, mask = _batch(config.vocab_size)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    got = np.asarray(forward_logits(model, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    err = np.abs(got - expected)[valid].max()
    assert err < 1e-4, f"{family}/{'tied' if tied else 'untied'}: max |logit diff| = {err:.2e}"


def test_parameter_paths_are_hf_names(tmp_path):
    config, ref = _torch_reference("qwen3_qknorm", False, tmp_path)
    model, _ = load_model(tmp_path)
    ours = model_state_dict(model)
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    # The projection path means the same thing in both: kernel = weight.T.
    np.testing.assert_array_equal(
        np.asarray(model.model.layers[1].mlp.up_proj.kernel[...]), theirs["model.layers.1.mlp.up_proj.weight"].T
    )


def test_token_logprobs_equal_log_softmax(tmp_path):
    config, _ = _torch_reference("llama_gqa", True, tmp_path)
    model, _ = load_model(tmp_path)
    ids, mask = _batch(config.vocab_size)
    logits = np.asarray(forward_logits(model, jnp.asarray(ids), jnp.asarray(mask)), dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )
    expected = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    got = np.asarray(token_logprobs(model, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_padding_does_not_change_real_tokens(tmp_path):
    config, _ = _torch_reference("qwen2_bias", False, tmp_path)
    model, _ = load_model(tmp_path)
    ids, mask = _batch(config.vocab_size)
    full = np.asarray(forward_logits(model, jnp.asarray(ids[1:, :30])))
    padded = np.asarray(forward_logits(model, jnp.asarray(ids[1:]), jnp.asarray(mask[1:])))
    np.testing.assert_allclose(padded[:, :30], full, atol=1e-5)


def test_bfloat16_compute_tracks_float32(tmp_path):
    config, _ = _torch_reference("llama_gqa", False, tmp_path)
    m32, _ = load_model(tmp_path, dtype="float32")
    m16, _ = load_model(tmp_path, dtype="bfloat16")
    assert m16.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    ids, _ = _batch(config.vocab_size)
    a = np.asarray(forward_logits(m32, jnp.asarray(ids)))
    b = np.asarray(forward_logits(m16, jnp.asarray(ids)))
    assert b.dtype == np.float32  # logits always leave in f32
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert rel < 3e-2, rel
