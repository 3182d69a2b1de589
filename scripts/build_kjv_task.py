"""Rebuild the shipped offline zero-shot task ``kjv_lambada`` from the held-out corpus part.

    python scripts/build_kjv_task.py [--items 400] [--seed 0]

LAMBADA-style last-word prediction over the held-out books (Matthew-Acts, never seen in calibration): each item
is one or two consecutive sentences of a chapter; the model must produce the last word of the last sentence
(at least four letters, trailing punctuation removed) greedily, and ``acc`` is the fraction it gets exactly
right (lm-eval's ``is_greedy``). One request per item, at most ``MAX_CHARS`` characters (under 64 SmolLM2
tokens), so scoring 400 items costs about as much as 25k tokens of perplexity. It exists so that accuracy-compression
curves can be drawn offline; it is not one of the paper's tasks and its numbers are not comparable with theirs.
Deterministic under the seed: the committed file is what this script writes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "cospadi_jax" / "data" / "corpus" / "kjv_heldout.txt"
OUT = ROOT / "cospadi_jax" / "eval" / "tasks" / "kjv_lambada.jsonl"
# A sentence ends at . ? or ! followed by a capitalised word; KJV verses are joined by spaces in the corpus.
SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{4,})[.?!:;,]*$", re.S)
MIN_CHARS, MAX_CHARS = 80, 220


def sentences_by_chapter(text: str) -> list[list[str]]:
    return [[s.strip() for s in SENTENCE_END.split(chapter) if s.strip()] for chapter in text.split("\n\n")]


def build(items: int, seed: int) -> list[dict]:
    candidates = []
    for chapter, sents in enumerate(sentences_by_chapter(SOURCE.read_text(encoding="utf-8"))):
        for i in range(len(sents)):
            # Two sentences when they fit (more context), else one.
            pair = " ".join(sents[i - 1:i + 1])
            passage = pair if i and len(pair) <= MAX_CHARS else sents[i]
            match = LAST_WORD.match(passage)
            if match and MIN_CHARS <= len(passage) <= MAX_CHARS:
                candidates.append({"context": match.group(1), "target": match.group(2), "chapter": chapter})
    return random.Random(seed).sample(candidates, items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    docs = build(args.items, args.seed)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    print(f"{len(docs)} items -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
