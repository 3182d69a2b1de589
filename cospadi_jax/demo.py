"""Main job on the embedded default: evaluate SmolLM2-135M on the shipped held-out corpus.

    python -m cospadi_jax.demo [--model smollm2-135m] [--seqlen 512] [--max-windows 16]
"""

from __future__ import annotations

import argparse
import json
import time

from . import load_model
from .data import load_text
from .eval import perplexity


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default="embedded:heldout")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    dense = perplexity(model, tokenizer, load_text(args.text), seqlen=args.seqlen,
                       max_windows=args.max_windows, batch_size=args.batch_size)
    result = {"model": args.model, "text": args.text, "dense": dense.to_dict()}
    print(json.dumps(result, indent=2))
    print(f"dense perplexity on {args.text}: {dense.perplexity:.3f} ({dense.n_tokens} tokens)")
    return result


if __name__ == "__main__":
    main()
