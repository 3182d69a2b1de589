"""KV-cached generation: cached logits equal the full forward, greedy continuations equal transformers' generate,
sampling is seeded and obeys top-p, and bad requests are refused."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_FAMILIES, requires_embedded, tiny_hf_config

from cospadi_jax import load_model
from cospadi_jax.layers import replace_projection
from cospadi_jax.methods.base import DictFactors, LowRankFactors
from cospadi_jax.models import forward_logits
from cospadi_jax.models.generation import Generator, Sampling, sample_tokens
from cospadi_jax.models.loading import random_model

PROMPTS = [[5, 9, 14, 3, 22, 7, 31], [40, 12], [8, 8, 19, 60]]  # three lengths: two rows are left-padded


def _compress_some(model, mode: str):
    """Swap a q_proj for a dictionary (with padded duplicate slots, as early-stopped OMP leaves them) and an
    up_proj for low-rank factors, so the cached path runs through every factored module."""
    rng = np.random.default_rng(1)
    q = model.model.layers[0].self_attn.q_proj.kernel[...]
    d_in, d_out = q.shape
    indices = rng.integers(0, 24, size=(d_out, 4)).astype(np.int32)
    indices[::3, -1] = 0
    values = rng.standard_normal((d_out, 4)).astype(np.float32) * 0.3
    values[::3, -1] = 0.0
    replace_projection(model, "model.layers.0.self_attn.q_proj",
                       DictFactors(rng.standard_normal((d_in, 24)).astype(np.float32) * 0.2, indices, values), mode=mode)
    up = model.model.layers[-1].mlp.up_proj.kernel[...]
    replace_projection(model, f"model.layers.{len(model.model.layers) - 1}.mlp.up_proj",
                       LowRankFactors(rng.standard_normal((up.shape[0], 8)).astype(np.float32) * 0.2,
                                      rng.standard_normal((8, up.shape[1])).astype(np.float32) * 0.2))
    return model


def _cached_logits(gen: Generator, prompts, steps: int):
    """Logits [steps + 1, B, V] from one prefill and ``steps`` decode steps, feeding the greedy tokens."""
    ids, mask, cache = gen.prepare(prompts, steps + 1)
    token, logits, cache = gen.step(ids, mask, cache)
    out, fed = [np.asarray(logits)], [np.asarray(token)]
    for i in range(steps):
        token, logits, cache = gen.step(np.asarray(token)[:, None], np.ones((len(prompts), 1), np.int32), cache,
                                        step=i + 1)
        out.append(np.asarray(logits))
        fed.append(np.asarray(token))
    return np.stack(out), np.stack(fed, axis=1)


CASES = [(family, None) for family in TINY_FAMILIES] + [
    (family, mode) for family in ("llama_gqa", "qwen2_bias") for mode in ("dense", "factored")] + [
    ("llama_gqa", "sparse"), ("qwen3_qknorm", "sparse_coo16")]  # the packed layouts of the CPU kernel


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m or 'uncompressed'}" for f, m in CASES])
def test_cached_decoding_equals_full_forward(family, mode):
    model = random_model(tiny_hf_config(family, tied=family != "llama_gqa"), seed=3)
    if mode is not None:
        _compress_some(model, mode)
    steps = 6
    logits, tokens = _cached_logits(Generator(model), PROMPTS, steps=steps)
    # The full (uncached) forward of every row's prompt + fed tokens, right-padded (real positions 0..n-1).
    rows = [prompt + tokens[row, :-1].tolist() for row, prompt in enumerate(PROMPTS)]
    width = max(map(len, rows))
    ids = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int32)
    full = np.asarray(forward_logits(model, jnp.asarray(ids), jnp.asarray(mask)))
    for row, prompt in enumerate(PROMPTS):
        expected = full[row, len(prompt) - 1: len(prompt) + steps]
        err = np.abs(logits[:, row] - expected).max()
        assert err < 1e-5, f"{family}/{mode} row {row}: max |cached - full| = {err:.2e}"


def _hf_reference(family: str, tied: bool, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(family, tied)
    config.initializer_range = 0.2  # peaked next-token distributions: no near-ties for float noise to flip
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    ref.generation_config.eos_token_id = None  # both sides generate exactly max_new_tokens
    ref.generation_config.pad_token_id = 0
    ref.save_pretrained(tmp_path, safe_serialization=True)
    return ref


def _hf_greedy(ref, prompts, n: int, **config) -> list[list[int]]:
    """transformers' batched greedy generate with left padding: exactly n new tokens (``config`` overrides the
    model's generation config, on a copy: the reference may be shared by the session)."""
    import torch

    generation = copy.deepcopy(ref.generation_config)
    generation.update(max_new_tokens=n, min_new_tokens=n, do_sample=False, **config)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
    return out[:, width:].tolist()


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_greedy_equals_transformers_generate(family, tmp_path):
    tied = family in ("llama_mha", "qwen2_bias", "llama3_rope")
    ref = _hf_reference(family, tied, tmp_path)
    model, _ = load_model(tmp_path)
    ours = Generator(model).generate(PROMPTS, 16)
    assert ours == _hf_greedy(ref, PROMPTS, 16), family


@pytest.mark.slow
@requires_embedded
def test_smollm2_greedy_equals_transformers(smollm2, smollm2_torch):
    """32 greedy tokens of the real SmolLM2, batched with left padding, equal transformers-PyTorch's."""
    model, tok = smollm2
    texts = ["The Lord is my shepherd; I shall not", "In the beginning God created the heaven and the earth. And"]
    prompts = [tok(t)["input_ids"] for t in texts]
    # No EOS, so neither side stops early.
    expected = _hf_greedy(smollm2_torch, prompts, 32, eos_token_id=None, pad_token_id=tok.pad_token_id)
    ours = Generator(model).generate(prompts, 32, pad_token_id=tok.pad_token_id)
    assert ours == expected, [tok.decode(o) for o in ours] + [tok.decode(e) for e in expected]


def test_sampling_is_seeded_and_top_p_restricts():
    model = random_model(tiny_hf_config("llama_gqa", True), seed=0)
    gen = Generator(model)
    hot = Sampling(temperature=1.5, top_p=1.0, seed=7)
    a, b = gen.generate(PROMPTS, 12, sampling=hot), gen.generate(PROMPTS, 12, sampling=hot)
    assert a == b  # deterministic under a seed
    assert a != gen.generate(PROMPTS, 12, sampling=Sampling(1.5, 1.0, seed=8))
    assert a != gen.generate(PROMPTS, 12)  # not greedy
    # A nucleus smaller than the top token's probability leaves only the top token: greedy, whatever the seed.
    assert gen.generate(PROMPTS, 12, sampling=Sampling(1.0, 1e-6, seed=3)) == gen.generate(PROMPTS, 12)


def test_sample_tokens_follows_the_nucleus_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda k, p: sample_tokens(logits, k, jnp.float32(1.0), p)[0], in_axes=(0, None))
    full = np.bincount(np.asarray(draw(keys, jnp.float32(1.0))), minlength=4) / 4000
    np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_p = 0.6: 0.5 alone does not reach it, 0.5 + 0.3 does, so exactly tokens {0, 1}, renormalised.
    nucleus = np.bincount(np.asarray(draw(keys, jnp.float32(0.6))), minlength=4) / 4000
    assert nucleus[2:].sum() == 0
    np.testing.assert_allclose(nucleus[:2], [0.625, 0.375], atol=0.03)


def test_eos_and_stop_end_rows():
    model = random_model(tiny_hf_config("llama_mha", True), seed=0)
    gen = Generator(model)
    free = gen.generate(PROMPTS, 10)
    eos = free[0][3]
    ended = gen.generate(PROMPTS, 10, eos_token_ids=[eos])
    assert ended[0] == free[0][: free[0].index(eos) + 1]  # up to and including the first EOS
    for row in (1, 2):
        cut = free[row].index(eos) + 1 if eos in free[row] else 10
        assert ended[row] == free[row][:cut]
    stopped = gen.generate(PROMPTS, 10, stop=lambda row, tokens: len(tokens) == 2 + row)
    assert [len(t) for t in stopped] == [2, 3, 4] and stopped[2] == free[2][:4]


def test_bad_requests_are_refused():
    model = random_model(tiny_hf_config("llama_mha", True), seed=0)  # 256 positions
    gen = Generator(model)
    with pytest.raises(ValueError, match="longer than the model's 256 positions"):
        gen.generate([[1] * 300], 4)
    with pytest.raises(ValueError, match="lower max_new_tokens to <= 56"):
        gen.generate([[1] * 200], 64)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be an integer >= 1"):
        gen.generate(PROMPTS, 0)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[]], 4)
    with pytest.raises(ValueError, match="outside \\[0, 96\\)"):
        gen.generate([[1, 200]], 4)
    with pytest.raises(ValueError, match="temperature=-0.5 must be >= 0"):
        Sampling(temperature=-0.5)
    with pytest.raises(ValueError, match="top_p=0 must be in"):
        Sampling(top_p=0)


def test_set_dict_mode_equals_building_in_that_mode():
    from cospadi_jax.layers import DictLinear, set_dict_mode

    built = _compress_some(random_model(tiny_hf_config("llama_gqa", True), seed=3), "sparse")
    switched = _compress_some(random_model(tiny_hf_config("llama_gqa", True), seed=3), "dense")
    assert set_dict_mode(switched, "sparse") == 1
    assert isinstance(switched.model.layers[0].self_attn.q_proj, DictLinear)
    ids = jnp.asarray([PROMPTS[0]])
    np.testing.assert_array_equal(np.asarray(forward_logits(switched, ids)), np.asarray(forward_logits(built, ids)))
    # and back: the bf16 numbers of the sparse layout are kept exactly by the dense mode
    assert set_dict_mode(switched, "dense") == 1
    np.testing.assert_allclose(np.asarray(forward_logits(switched, ids)), np.asarray(forward_logits(built, ids)),
                               atol=1e-5)
    with pytest.raises(ValueError, match="unknown DictLinear mode 'fast'"):
        set_dict_mode(switched, "fast")
