"""Text sources, the seeded calibration sampler and the perplexity protocol."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import requires_embedded

from cospadi_jax.data import embedded_text, load_text, sample_windows, tokenizer_fingerprint
from cospadi_jax.eval import make_windows, perplexity, windows_perplexity


class CharTokenizer:
    """A deterministic stand-in tokenizer: one id per byte, BOS = 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b + 2 for b in text.encode()]}

    def get_vocab(self):
        return {chr(i): i for i in range(258)}


def test_embedded_corpus_parts_are_disjoint_and_nonempty():
    calib, held = embedded_text("calibration"), embedded_text("heldout")
    assert len(calib) > 1_000_000 and len(held) > 400_000
    assert calib.startswith("In the beginning God created")
    assert held.startswith("The book of the generation of Jesus Christ")
    paragraphs = set(calib.split("\n\n"))
    assert not any(p in paragraphs for p in held.split("\n\n") if len(p) > 200)


def test_local_txt_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        load_text(str(tmp_path / "bad.jsonl"))


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="unknown text source .*embedded:calibration"):
        load_text("wikitext103")


def test_hub_dataset_without_network_names_offline_alternatives():
    from cospadi_jax.errors import HubUnavailableError

    with pytest.raises(HubUnavailableError, match="embedded:calibration"):
        load_text("wikitext2:test")


def test_calibration_sampler_is_seeded_and_disjoint():
    tok = CharTokenizer()
    text = embedded_text("heldout")[:50_000]
    a = sample_windows(tok, text, nsamples=16, seqlen=128, seed=3)
    b = sample_windows(tok, text, nsamples=16, seqlen=128, seed=3)
    c = sample_windows(tok, text, nsamples=16, seqlen=128, seed=4)
    assert a.shape == (16, 128) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({w.tobytes() for w in a}) == 16  # non-overlapping windows, drawn without replacement
    with pytest.raises(ValueError, match="fewer than nsamples"):
        sample_windows(tok, "short text", nsamples=2, seqlen=8, seed=0)


def test_make_windows_drops_remainder_and_handles_bos():
    tok = CharTokenizer()
    w = make_windows(tok, "abcdefghij", seqlen=4)
    assert w.shape == (2, 4)  # 10 tokens -> 2 windows, 2 tokens dropped
    w_bos = make_windows(tok, "abcdefghij", seqlen=4, add_bos=True)
    assert w_bos.shape == (3, 4) and (w_bos[:, 0] == 1).all()
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(tok, "abc", seqlen=8)


def test_tokenizer_fingerprint_distinguishes_vocabularies():
    class Other(CharTokenizer):
        def get_vocab(self):
            return {"x": 0}

    assert tokenizer_fingerprint(CharTokenizer()) != tokenizer_fingerprint(Other())


@pytest.fixture(scope="module")
def tiny_model():
    from helpers import tiny_hf_config

    from cospadi_jax.models import random_model

    return random_model(tiny_hf_config("llama_gqa", True), seed=0)


def test_perplexity_is_token_weighted_and_batch_invariant(tiny_model):
    from cospadi_jax.models import token_logprobs

    rng = np.random.default_rng(0)
    windows = rng.integers(3, 96, size=(5, 32)).astype(np.int32)
    r1 = windows_perplexity(tiny_model, windows, batch_size=1, progress=False)
    r3 = windows_perplexity(tiny_model, windows, batch_size=3, progress=False)  # last batch padded
    assert r1.n_tokens == 5 * 31 and r1.n_windows == 5
    assert math.isclose(r1.perplexity, r3.perplexity, rel_tol=1e-6)
    logp = np.asarray(token_logprobs(tiny_model, windows), dtype=np.float64)
    assert math.isclose(r1.perplexity, math.exp(-logp.mean()), rel_tol=1e-6)


def test_perplexity_bad_input(tiny_model):
    with pytest.raises(ValueError, match="empty text"):
        perplexity(tiny_model, CharTokenizer(), "   ", seqlen=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity(tiny_model, CharTokenizer(), "x" * 2000, seqlen=512)


def test_non_finite_logits_raise(tiny_model):
    import jax.numpy as jnp
    from flax import nnx

    broken = nnx.clone(tiny_model)
    broken.model.norm.weight[...] = jnp.full_like(broken.model.norm.weight[...], jnp.nan)
    with pytest.raises(FloatingPointError, match="window 0"):
        windows_perplexity(broken, np.ones((2, 8), np.int32), progress=False)


@requires_embedded
@pytest.mark.real_weights
@pytest.mark.slow
def test_smollm2_perplexity_matches_pytorch(smollm2, smollm2_torch):
    """Same windows, same GGUF weights: our perplexity within 0.5% of transformers-PyTorch's."""
    import torch

    model, tok = smollm2
    windows = make_windows(tok, embedded_text("heldout"), seqlen=256, max_windows=3)
    ours = windows_perplexity(model, windows, batch_size=3, progress=False)
    with torch.no_grad():
        logits = smollm2_torch(torch.from_numpy(windows).long()).logits[:, :-1].double()
        logp = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(windows[:, 1:]).long()[..., None])
    theirs = math.exp(-logp.mean().item())
    assert abs(ours.perplexity / theirs - 1) < 0.005, (ours.perplexity, theirs)
