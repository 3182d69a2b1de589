"""Text sources: pinned hub datasets, local .txt/.jsonl files, and the shipped public-domain corpus.

A source is named by one string, so configs and cache keys can refer to it:

- ``embedded:calibration`` / ``embedded:heldout``: the shipped KJV corpus (disjoint books), see README;
- ``wikitext2:test``, ``wikitext2:train``, ``c4:validation``, ``fineweb:train``, ``refinedweb:train``,
  ``lambada_openai:test``: hub datasets with pinned names, configs and joiners (SparseGPT protocol);
- a path to a ``.txt`` file (read as is) or a ``.jsonl`` file (one JSON object per line, field ``text``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import HubUnavailableError

EMBEDDED_PARTS = ("calibration", "heldout")


@dataclass(frozen=True)
class HubText:
    """A pinned hub text dataset and how its documents are joined into one string."""

    path: str
    split: str
    name: str | None = None
    text_field: str = "text"
    joiner: str = "\n\n"
    max_documents: int | None = None  # take the first N documents (c4 / web samples)
    data_files: dict[str, str] = field(default_factory=dict)
    streaming: bool = False
    revision: str | None = None


HUB_SOURCES: dict[str, HubText] = {
    # SparseGPT / SVD-LLM perplexity protocol: wikitext-2 raw, documents joined with "\n\n".
    "wikitext2:test": HubText("Salesforce/wikitext", "test", name="wikitext-2-raw-v1"),
    "wikitext2:train": HubText("Salesforce/wikitext", "train", name="wikitext-2-raw-v1"),
    # SparseGPT's c4: the first validation shard, first 1100 documents joined with a space.
    "c4:validation": HubText(
        "allenai/c4", "validation", joiner=" ", max_documents=1100,
        data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
    # The paper calibrates on RefinedWeb (256 x 1024 tokens); FineWeb sample-10BT is the group's loader.
    "refinedweb:train": HubText(
        "tiiuae/falcon-refinedweb", "train", text_field="content", max_documents=2000, streaming=True
    ),
    "fineweb:train": HubText(
        "HuggingFaceFW/fineweb", "train", name="sample-10BT", max_documents=2000, streaming=True
    ),
    "lambada_openai:test": HubText("EleutherAI/lambada_openai", "test", name="en"),
}


def available_sources() -> list[str]:
    return [f"embedded:{p}" for p in EMBEDDED_PARTS] + sorted(HUB_SOURCES) + ["<path>.txt", "<path>.jsonl"]


def embedded_text(part: str) -> str:
    """The shipped corpus: ``calibration`` (KJV Genesis-Esther) or ``heldout`` (KJV Matthew-Acts)."""
    if part not in EMBEDDED_PARTS:
        raise ValueError(f"unknown embedded corpus part {part!r}; use one of {EMBEDDED_PARTS}")
    return resources.files("cospadi_jax.data").joinpath("corpus", f"kjv_{part}.txt").read_text(encoding="utf-8")


def _load_hub(spec: HubText, source: str) -> str:
    import datasets

    try:
        ds = datasets.load_dataset(
            spec.path, spec.name, split=spec.split, data_files=spec.data_files or None,
            streaming=spec.streaming, revision=spec.revision,
        )
    except Exception as exc:  # datasets raises several connection/offline error types
        raise HubUnavailableError(
            f"cannot load the hub dataset for {source!r} ({spec.path}, config {spec.name}): "
            f"{type(exc).__name__}: {exc}. Offline alternatives: 'embedded:calibration' / 'embedded:heldout' "
            "(shipped corpus), or a local .txt / .jsonl file."
        ) from exc
    docs = []
    for i, row in enumerate(ds):
        if spec.max_documents is not None and i >= spec.max_documents:
            break
        docs.append(row[spec.text_field])
    return spec.joiner.join(docs)


def _load_jsonl(path: Path, text_field: str) -> str:
    docs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line") from None
        if not isinstance(row, dict) or text_field not in row:
            raise ValueError(f"{path}:{lineno}: no {text_field!r} field; each line must be an object with it")
        docs.append(str(row[text_field]))
    return "\n\n".join(docs)


def load_text(source: str, *, text_field: str = "text") -> str:
    """Return the text of one source (see module docstring). Raises on unknown, missing or empty sources."""
    if not isinstance(source, str):
        raise TypeError(f"a text source is one name or path such as 'embedded:calibration' or 'my.txt', got "
                        f"{type(source).__name__} {source!r}")
    if source.startswith("embedded:"):
        text = embedded_text(source.split(":", 1)[1])
    elif source in HUB_SOURCES:
        text = _load_hub(HUB_SOURCES[source], source)
    elif source.endswith((".txt", ".jsonl")):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        text = _load_jsonl(path, text_field) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
    else:
        raise ValueError(f"unknown text source {source!r}; available: {', '.join(available_sources())}")
    if not text.strip():
        raise ValueError(f"text source {source!r} is empty; nothing to calibrate or evaluate on.")
    return text
