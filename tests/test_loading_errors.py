"""Every bad model input raises a clear error that names the problem and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import requires_embedded, tiny_hf_config

from cospadi_jax import load_model
from cospadi_jax.errors import HubUnavailableError
from cospadi_jax.models import CheckpointMismatchError, UnsupportedModelError


def _save_tiny(tmp_path, family="llama_gqa", tied=False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_hf_config(family, tied)).save_pretrained(tmp_path)
    return tmp_path


def test_unknown_architecture(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="unknown architecture: model_type='gpt2'.*llama, qwen2, qwen3"):
        load_model(GPT2Config(n_layer=1, n_embd=32, n_head=2))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_missing_safetensors_refuses_pickles(tmp_path):
    d = _save_tiny(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        load_model(d)


def test_config_weight_shape_mismatch(tmp_path):
    d = _save_tiny(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"mlp\.\w+_proj\.weight.* has shape .*config implies"):
        load_model(d)


def test_missing_and_leftover_keys(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _save_tiny(tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors.pop("model.norm.weight")
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['model\.norm\.weight'\].*extra_proj"):
        load_model(d)


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gpt2' is not supported.*'llama'"):
        load_model(path)


def test_hub_id_without_network():
    with pytest.raises(HubUnavailableError, match="Offline alternatives.*smollm2-135m"):
        load_model("meta-llama/Llama-3.2-1B")


def test_bad_dtype_and_spec_type(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_model(tiny_hf_config("llama_mha", True), dtype="fp8")
    with pytest.raises(TypeError, match="model spec must be"):
        load_model(42)


@requires_embedded
@pytest.mark.real_weights
def test_embedded_default_is_smollm2(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.tie_word_embeddings) == (9, 3, True)
    assert model.lm_head is None
    assert tok("In the beginning")["input_ids"] and tok.vocab_size == c.vocab_size
