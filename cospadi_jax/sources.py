"""Where a model's weights come from, one decoder layer at a time: the layer loop of sequential calibration and
of streaming compression (:func:`cospadi_jax.sequential.fit_blocks`) reads them through :class:`LayerSource`.

An in-memory model (:class:`ModelLayerSource`), a Hugging Face safetensors directory read one layer at a time
(:class:`CheckpointLayerSource`), or seeded random weights built from a config (:class:`RandomLayerSource`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .calib.grams import embed_tokens
from .models.config import DecoderConfig, decoder_config_from_hf
from .models.convert import assign_tensors
from .models.transformer import CausalLM, DecoderLayer, Embed


class LayerSource(Protocol):
    """Where the streamed weights come from: the config, the token embeddings and one decoder layer at a time."""

    config: DecoderConfig
    dtype: Any

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """ids [b, T] int32 -> hidden states [b, T, hidden] in ``dtype``."""

    def layer(self, index: int) -> DecoderLayer:
        """Decoder layer ``index`` (its weights are released when the caller drops it)."""


class ModelLayerSource:
    """Layers of a model already in memory (for models that fit, and to test streaming against ``compress``)."""

    def __init__(self, model: CausalLM):
        self.model, self.config, self.dtype = model, model.config, model.dtype

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(embed_tokens(self.model.model.embed_tokens, jnp.asarray(ids), self.dtype))

    def layer(self, index: int) -> DecoderLayer:
        return self.model.model.layers[index]


class RandomLayerSource:
    """Seeded random weights built from a config one layer at a time (e.g. Llama-3-8B shapes).

    Weights take the values of ``weight_dtype`` (bfloat16 by default, as the checkpoints) and compute in
    ``dtype`` (float32: XLA:CPU has no fast bfloat16 GEMM, and Grams are accumulated in float32 anyway). Layer i
    is initialised from ``fold_in(seed, i)``, so it is the same whichever layers are built, and never more than
    one layer (plus, while embedding, the embedding table) exists.
    """

    def __init__(self, config: DecoderConfig, *, weight_dtype: Any = jnp.bfloat16, dtype: Any = jnp.float32,
                 seed: int = 0):
        self.config, self.weight_dtype, self.dtype, self.seed = config, weight_dtype, dtype, seed

    def _build(self, module: Any, index: int) -> Any:
        built = module(rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(self.seed), index)))
        state = nnx.state(built, nnx.Param)
        nnx.update(built, jax.tree.map(lambda x: x.astype(self.weight_dtype).astype(self.dtype), state))
        return built

    def embed(self, ids: np.ndarray) -> np.ndarray:
        # The table exists only while embedding; its key index follows the layers' (0 .. L-1).
        table = self._build(partial(Embed, self.config.vocab_size, self.config.hidden_size, dtype=self.dtype),
                            self.config.num_hidden_layers)
        return np.asarray(embed_tokens(table, jnp.asarray(ids), self.dtype))

    def layer(self, index: int) -> DecoderLayer:
        return self._build(partial(DecoderLayer, self.config, dtype=self.dtype), index)


class CheckpointLayerSource:
    """One layer at a time from a Hugging Face directory (config.json + safetensors, sharded index supported).

    Only the tensors of the requested layer are read (safetensors reads tensor by tensor), converted through the
    key table to ``dtype`` and checked like a whole-model load; the embedding table is read once to embed the
    windows and dropped. This is how a real 8B checkpoint streams through a host that cannot hold it.
    """

    def __init__(self, model_dir: str | Path, *, dtype: Any = jnp.float32):
        from .models.loading import _safetensors_files, hf_directory_config

        self.model_dir = Path(model_dir)
        self.config = decoder_config_from_hf(hf_directory_config(self.model_dir))
        self.dtype = dtype
        self._file_of: dict[str, Path] = {}
        from safetensors import safe_open

        for file in _safetensors_files(self.model_dir):
            with safe_open(str(file), framework="flax") as f:
                self._file_of.update(dict.fromkeys(f.keys(), file))

    def _tensors(self, prefix: str):
        from safetensors import safe_open

        names = [n for n in self._file_of if n.startswith(prefix)]
        for file in sorted({self._file_of[n] for n in names}):
            with safe_open(str(file), framework="flax") as f:
                for name in names:
                    if self._file_of[name] == file:
                        yield name, f.get_tensor(name)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        abstract = nnx.eval_shape(lambda: Embed(self.config.vocab_size, self.config.hidden_size, dtype=self.dtype,
                                                rngs=nnx.Rngs(0)))
        table = assign_tensors(abstract, self._tensors("model.embed_tokens."), dtype=self.dtype,
                               tied_embeddings=False, source=str(self.model_dir), prefix="model.embed_tokens.")
        return np.asarray(embed_tokens(table, jnp.asarray(ids), self.dtype))

    def layer(self, index: int) -> DecoderLayer:
        prefix = f"model.layers.{index}."
        abstract = nnx.eval_shape(lambda: DecoderLayer(self.config, dtype=self.dtype, rngs=nnx.Rngs(0)))
        return assign_tensors(abstract, self._tensors(prefix), dtype=self.dtype, tied_embeddings=False,
                              source=str(self.model_dir), prefix=prefix)
