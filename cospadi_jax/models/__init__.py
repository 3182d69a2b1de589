"""Flax NNX decoder for Llama / Qwen2 / Qwen3 with HF parameter paths, and its loaders."""

from .config import DecoderConfig, UnsupportedModelError, decoder_config_from_hf
from .convert import CheckpointMismatchError, model_state_dict
from .paths import PROJECTION_TYPES, get_module, projection_path, projection_weight
from .loading import HubUnavailableError, embedded_model_path, load_model, random_model
from .transformer import CausalLM, forward_logits, token_logprobs

__all__ = [
    "CausalLM", "CheckpointMismatchError", "DecoderConfig", "HubUnavailableError", "PROJECTION_TYPES", "get_module", "projection_path", "projection_weight", "UnsupportedModelError",
    "decoder_config_from_hf", "embedded_model_path", "forward_logits", "load_model", "model_state_dict",
    "random_model", "token_logprobs",
]
