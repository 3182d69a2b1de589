"""Decoder configuration: the few switches that distinguish Llama, Qwen2 and Qwen3, read from a HF config.

Every shape comes from the Hugging Face config (never hard-coded), and attributes that would change the
function computed but that we do not implement are rejected, not ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# RoPE variants whose inverse frequencies do not depend on the sequence length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented by our decoder."""


@dataclass(frozen=True)
class DecoderConfig:
    """Static description of one decoder-only LM (hashable, so it can be a jit static argument)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always, Llama when attention_bias=True
    o_bias: bool  # Llama attention_bias=True only
    mlp_bias: bool
    qk_norm: bool  # Qwen3 RMSNorm over head_dim on q and k
    rope_inv_freq: tuple[float, ...]  # [head_dim // 2], computed once from the config
    rope_attention_scaling: float
    bos_token_id: int | None = None
    # The source HF config as JSON (what an export writes as config.json). Excluded from ==, hash and repr: it
    # changes no computation, so jit caches and model fingerprints (Gram and dense-score caches) ignore it.
    hf_config_json: str | None = field(default=None, compare=False, repr=False)

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def _rope_parameters(hf_config: Any) -> dict:
    """Return the RoPE dict in the transformers>=5 layout (rope_type, rope_theta, scaling keys)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers 4.x: rope_theta + rope_scaling
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _rope_inverse_frequencies(hf_config: Any, head_dim: int) -> tuple[np.ndarray, float]:
    """inv_freq [head_dim // 2] (float64) and the cos/sin scaling factor, exactly as transformers computes them."""
    params = _rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "'dynamic' RoPE changes with the sequence length and would need a per-length recompile."
        )
    if getattr(hf_config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported by this decoder.")
    if rope_type == "default":
        theta = float(params["rope_theta"])
        inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        return inv_freq, 1.0
    # Delegate every scaled variant to transformers itself so the numbers cannot drift from the reference.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq.double().numpy(), float(scaling)


def decoder_config_from_hf(hf_config: Any) -> DecoderConfig:
    """Translate a transformers ``PretrainedConfig`` into our static ``DecoderConfig``.

    Raises ``UnsupportedModelError`` naming the offending attribute for anything we would compute wrongly.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = getattr(hf_config, "architectures", None)
        raise UnsupportedModelError(
            f"unknown architecture: model_type={model_type!r} (architectures={archs}); cospadi-jax supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3/3.1/3.2, SmolLM2, Qwen2, Qwen3). "
            "Convert another family by adding it to cospadi_jax/models/config.py and the key table."
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported; only 'silu' (SwiGLU MLP) is.")
    if getattr(hf_config, "use_sliding_window", False):
        raise UnsupportedModelError("use_sliding_window=True is not supported; windows would change attention.")
    if getattr(hf_config, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedModelError("pretraining_tp > 1 is not supported.")

    num_heads = int(hf_config.num_attention_heads)
    num_kv = int(getattr(hf_config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads)
    if num_heads % num_kv:
        raise UnsupportedModelError(
            f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv}."
        )
    inv_freq, scaling = _rope_inverse_frequencies(hf_config, head_dim)
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    return DecoderConfig(
        model_type=model_type,
        vocab_size=int(hf_config.vocab_size),
        hidden_size=int(hf_config.hidden_size),
        intermediate_size=int(hf_config.intermediate_size),
        num_hidden_layers=int(hf_config.num_hidden_layers),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv,
        head_dim=head_dim,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        max_position_embeddings=int(hf_config.max_position_embeddings),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        rope_inv_freq=tuple(float(x) for x in inv_freq),
        rope_attention_scaling=scaling,
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        hf_config_json=hf_config.to_json_string(use_diff=False) if hasattr(hf_config, "to_json_string") else None,
    )


def projection_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """Projection type -> W shape [d_in, d_out]."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
