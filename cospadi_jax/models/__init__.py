"""Flax NNX decoder for Llama / Qwen2 / Qwen3 with HF parameter paths, and its loaders."""

from ..errors import HubUnavailableError
from .config import DecoderConfig, UnsupportedModelError, decoder_config_from_hf
from .convert import CheckpointMismatchError, model_state_dict
from .loading import embedded_model_path, load_model, random_model
from .paths import PROJECTION_TYPES, get_module, projection_path, projection_weight
from .transformer import CausalLM, forward_logits, token_logprobs

__all__ = [
    "CausalLM", "CheckpointMismatchError", "DecoderConfig", "HubUnavailableError", "PROJECTION_TYPES",
    "UnsupportedModelError", "decoder_config_from_hf", "embedded_model_path", "forward_logits", "get_module",
    "load_model", "model_state_dict", "projection_path", "projection_weight", "random_model", "token_logprobs",
]
