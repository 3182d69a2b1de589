"""GGUF without PyTorch: our config, tokenizer and tensors equal transformers' PyTorch GGUF path on the real
SmolLM2 file, and the embedded model loads in a process where torch cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import has_embedded_model

pytestmark = [pytest.mark.real_weights,
              pytest.mark.skipif(not has_embedded_model(), reason="needs the embedded SmolLM2 GGUF")]


@pytest.fixture(scope="module")
def gguf_file():
    from cospadi_jax.models import embedded_model_path

    return embedded_model_path("smollm2-135m")


def test_config_equals_transformers(gguf_file):
    from gguf import GGUFReader
    from transformers import AutoConfig

    from cospadi_jax.models import decoder_config_from_hf
    from cospadi_jax.models import gguf as ours

    reader = GGUFReader(str(gguf_file))
    mine = ours.hf_config(ours.read_metadata(reader), [t.name for t in reader.tensors])
    theirs = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert decoder_config_from_hf(mine) == decoder_config_from_hf(theirs)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "model_type"):
        assert getattr(mine, key) == getattr(theirs, key), key


def test_tokenizer_equals_transformers(gguf_file):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from cospadi_jax.data.calibration import tokenizer_fingerprint
    from cospadi_jax.data.text import embedded_text
    from cospadi_jax.models import gguf as ours

    mine = ours.tokenizer(ours.read_metadata(GGUFReader(str(gguf_file))))
    theirs = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    text = embedded_text("heldout")[:20000] + " <|im_start|>user\nHi<|im_end|>  tabs\tand  ünïcödé"
    assert mine(text)["input_ids"] == theirs(text)["input_ids"]
    assert mine.decode(mine(text)["input_ids"]) == theirs.decode(theirs(text)["input_ids"])
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(mine, name) == getattr(theirs, name), name
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert mine.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
    assert tokenizer_fingerprint(mine) == tokenizer_fingerprint(theirs)


def test_tensors_equal_transformers(smollm2, smollm2_torch):
    """The q/k un-permutation rule and the dequantisation give transformers' weights exactly."""
    from cospadi_jax.models import projection_weight

    model, _ = smollm2
    ref = smollm2_torch
    for layer in (0, 17):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
            path = f"model.layers.{layer}.{proj}"
            expected = ref.get_submodule(path).weight.detach().numpy().T
            np.testing.assert_array_equal(projection_weight(model, path), expected, err_msg=path)


@pytest.mark.slow
def test_embedded_model_loads_without_torch():
    """torch is a test/reference extra: loading, calibration, compression and lm-eval never import it."""
    script = textwrap.dedent("""
        import importlib.machinery, sys
        real = importlib.machinery.PathFinder.find_spec
        def hide_torch(name, path=None, target=None):
            return None if name == "torch" or name.startswith("torch.") else real(name, path, target)
        importlib.machinery.PathFinder.find_spec = staticmethod(hide_torch)
        from cospadi_jax import load_model
        from cospadi_jax.compress import CalibrationSpec, compress
        from cospadi_jax.eval.harness import evaluate_zero_shot
        model, tok = load_model("smollm2-135m")
        compressed, _ = compress(model, tok, method="cospadi", layers=(3,), proj_types=("q_proj",),
                                 ksvd_iterations=1, progress=False,
                                 calibration=CalibrationSpec(nsamples=4, seqlen=64, heldout_nsamples=2))
        scores = evaluate_zero_shot(compressed, tok, ["kjv_lambada"], limit=4, progress=False)
        assert 0 <= scores["average"] <= 1
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
