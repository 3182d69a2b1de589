"""Evaluation throughput: our jit-compiled Flax perplexity against transformers-PyTorch, same windows, same CPU.

    python benchmarks/bench_eval.py [--seqlen 512] [--windows 8] [--batch-size 4]

Both score the same windows of the shipped held-out corpus with the same dequantised SmolLM2 weights in float32.
Prints a table, then a one-line summary with the speed ratio (ours / PyTorch tokens per second).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np


def torch_perplexity(model, windows: np.ndarray, batch_size: int) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[s : s + batch_size]).long()
            logits = model(ids).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])
            nll -= logp.double().sum().item()
            count += logp.numel()
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from cospadi_jax import load_model
    from cospadi_jax.data import load_text
    from cospadi_jax.eval import make_windows, windows_perplexity
    from cospadi_jax.models import embedded_model_path

    model, tok = load_model("smollm2-135m")
    windows = make_windows(tok, load_text("embedded:heldout"), args.seqlen, max_windows=args.windows)
    path = embedded_model_path("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    n_tokens = windows.size

    t0 = time.perf_counter()
    windows_perplexity(model, windows[: args.batch_size], batch_size=args.batch_size, progress=False)
    compile_s = time.perf_counter() - t0

    rows = []
    for name, fn in (
        ("cospadi-jax (jit, f32)", lambda: windows_perplexity(model, windows, batch_size=args.batch_size,
                                                               progress=False).perplexity),
        (f"transformers-PyTorch {torch.__version__} (f32, {torch.get_num_threads()} threads)",
         lambda: torch_perplexity(ref, windows, args.batch_size)),
    ):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ppl = fn()
            times.append(time.perf_counter() - t0)
        rows.append((name, ppl, min(times), n_tokens / min(times)))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.windows} windows x {args.seqlen} tokens, batch {args.batch_size}; best of {args.repeats}")
    print(f"{'implementation':60s} {'perplexity':>11s} {'seconds':>8s} {'tokens/s':>9s}")
    for name, ppl, sec, tps in rows:
        print(f"{name:60s} {ppl:11.4f} {sec:8.2f} {tps:9.1f}")
    print(f"(our one-time compilation: {compile_s:.1f} s, excluded)")
    ratio = rows[0][3] / rows[1][3]
    print(f"SUMMARY eval speed ours/PyTorch = {ratio:.2f}x ({rows[0][3]:.0f} vs {rows[1][3]:.0f} tokens/s), "
          f"perplexity {rows[0][1]:.4f} vs {rows[1][1]:.4f} ({100 * (rows[0][1] / rows[1][1] - 1):+.3f}%)")


if __name__ == "__main__":
    main()
