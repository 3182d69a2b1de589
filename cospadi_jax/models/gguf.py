"""GGUF files without PyTorch: the config, the tokenizer and the tensors, read with gguf-py.

transformers reads the config and tokenizer of a Llama/Qwen2/Qwen3 GGUF only through its PyTorch checkpoint loader
(``load_gguf_checkpoint``, which refuses to run without torch). Everything here needs gguf-py, tokenizers and
transformers' torch-free pieces only:

- the metadata: gguf-py's ``GGUFReader`` (``field.contents()``);
- the config: :data:`CONFIG_KEYS`, one declarative table from llama.cpp's key names to transformers' (read in
  one direction only: GGUF files are inputs, never outputs);
- the tokenizer: transformers' GGUF tokenizer builder (``convert_gguf_tokenizer``, torch-free), fed with the
  metadata under llama.cpp's names;
- the tensors: gguf-py's dequantisers; the q/k row permutation llama.cpp applies to Llama's attention is undone
  by the rule in :func:`unpermute_rule`. ``tests/test_gguf.py`` checks all three against transformers' path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
HF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# llama.cpp key (after "<arch>.") -> transformers config key. Keys a file lacks take the config class's default.
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                 "padding_token_id": "pad_token_id"}


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata field of a ``gguf.GGUFReader`` as a Python value (arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def architecture(metadata: dict[str, Any]) -> str:
    return str(metadata.get("general.architecture", "<missing>"))


def hf_config(metadata: dict[str, Any], tensor_names: list[str]) -> Any:
    """The transformers config of a Llama/Qwen2/Qwen3 GGUF, from its metadata and tensor names."""
    from transformers import AutoConfig

    arch = architecture(metadata)
    values = {hf: metadata[f"{arch}.{key}"] for key, hf in CONFIG_KEYS.items() if f"{arch}.{key}" in metadata}
    if "vocab_size" not in values and "tokenizer.ggml.tokens" in metadata:
        values["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    values.update({hf: metadata[f"tokenizer.ggml.{key}"] for key, hf in TOKEN_ID_KEYS.items()
                   if f"tokenizer.ggml.{key}" in metadata})
    # llama.cpp writes the output projection only when it is not the embedding matrix
    values["tie_word_embeddings"] = "output.weight" not in tensor_names
    if arch in ("qwen2", "qwen3"):
        values["use_sliding_window"] = False
    return AutoConfig.for_model(HF_MODEL_TYPE[arch], **values)


def tokenizer(metadata: dict[str, Any]) -> Any:
    """The fast tokenizer a GGUF describes (vocabulary, merges, special tokens, chat template)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata} for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(architecture(metadata), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def unpermute_rule(arch: str, config: Any) -> Callable[[str, np.ndarray], np.ndarray]:
    """``(hf_name, weight) -> weight`` in HF layout. llama.cpp stores Llama's q and k rows interleaved per head
    (the rotary pairs of ``convert_hf_to_gguf.py``'s ``permute``); this is its inverse. Qwen files are stored as is."""
    if arch != "llama":
        return lambda name, w: w
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}

    def rule(name: str, w: np.ndarray) -> np.ndarray:
        proj = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if proj not in heads:
            return w
        n = heads[proj]  # llama.cpp's permute is reshape(n, 2, rows/n/2).swapaxes(1, 2); this undoes it
        return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return rule
