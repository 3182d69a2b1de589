"""Memory-bounded streaming compression of a Llama-3-8B-shaped model (random bf16 weights) on this host.

The whole model is 16 GB in bfloat16 and does not fit a 24 GB host together with float64 Grams and fitting
buffers; streamed layer by layer (cospadi_jax.streaming) it needs the resident set of one layer. Shapes are the real
Llama-3-8B ones (hidden 4096, intermediate 14336, 32 heads / 8 KV heads, head_dim 128, vocab 128256); only the
number of compressed layers and K-SVD iterations are limited for time. Calibration tokens are seeded random ids
(no Llama-3 tokenizer offline), which changes the statistics, not the shapes or the memory.

    OPENBLAS_NUM_THREADS=1 python experiments/memory_llama3_8b.py --layers 0 --method svd_llm
    OPENBLAS_NUM_THREADS=1 python experiments/memory_llama3_8b.py --layers 0 --method cospadi \
        --proj-types k_proj v_proj --ksvd-iterations 1

Writes experiments/results/memory_llama3_8b_<method>.json (plan, per-layer timings, per-matrix rows, peak RSS)
and a PNG of resident memory over time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def llama3_8b_config():
    """Llama-3-8B's architecture (meta-llama/Meta-Llama-3-8B config.json), built offline."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


class RssSampler(threading.Thread):
    """Resident set size of this process every ``interval`` seconds (from /proc/self/statm)."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.samples, self._stop_event = interval, [], threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while not self._stop_event.is_set():
            with open("/proc/self/statm") as f:
                rss_pages = int(f.read().split()[1])
            self.samples.append((time.perf_counter() - self._t0, rss_pages * self._page / 2**30))
            self._stop_event.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._stop_event.set()
        self.join()
        return self.samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[0])
    parser.add_argument("--method", default="cospadi")
    parser.add_argument("--proj-types", nargs="+", default=None, help="default: all seven")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--ksvd-iterations", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--budget-gib", type=float, default=20.0, help="host memory the run may plan for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default=None, help="suffix of the output files (default: the method)")
    parser.add_argument("--checkpoint", default=None,
                        help="stream a real HF safetensors directory (e.g. Meta-Llama-3-8B) instead of random weights")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from cospadi_jax.checkpoint import ArtifactWriter
    from cospadi_jax.methods import method_config
    from cospadi_jax.models import decoder_config_from_hf
    from cospadi_jax.models.paths import PROJECTION_TYPES
    from cospadi_jax.sources import CheckpointLayerSource, RandomLayerSource
    from cospadi_jax.compress import compress
    from cospadi_jax.streaming import peak_rss_gib

    sampler = RssSampler()
    sampler.start()
    if args.checkpoint:
        source = CheckpointLayerSource(args.checkpoint, dtype=jnp.float32)
        cfg = source.config
    else:
        cfg = decoder_config_from_hf(llama3_8b_config())
        source = RandomLayerSource(cfg, weight_dtype=jnp.bfloat16, dtype=jnp.float32, seed=args.seed)
    windows = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.nsamples, args.seqlen), np.int32)
    ksvd = {"ksvd_iterations": args.ksvd_iterations} if args.method == "cospadi" else {}
    config = method_config(args.method, ratio=args.ratio, layers=list(args.layers),
                           proj_types=list(args.proj_types or PROJECTION_TYPES), **ksvd)
    layer_stats = {}

    def on_layer(index: int, stats: dict) -> None:
        layer_stats[index] = {**stats, "t_end_s": time.perf_counter() - sampler._t0}
        print(f"layer {index}: {stats['seconds']:.0f} s (calibration {stats['calibration_s']:.0f} s), "
              f"peak RSS {stats['peak_rss_gib']:.2f} GiB", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        artifact = ArtifactWriter(Path(tmp) / "artifact", {"config_fingerprint": "memory-run"})
        _, report = compress(source, windows=windows, config=config, seed=args.seed, budget_gib=args.budget_gib,
                             artifact=artifact, keep_factors=False, on_layer=on_layer)
        plan = report.memory_plan
        artifact_gib = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**30
    samples = sampler.stop()
    print(plan.describe())
    n_params = _llama_params(cfg)
    tag = args.tag or args.method
    out = {
        "command": "python experiments/memory_llama3_8b.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs, jax {jax.__version__}",
        "model": args.checkpoint or "Llama-3-8B shapes, random bfloat16-valued weights, float32 compute", "whole_model_gib_bf16": n_params * 2 / 2**30,
        "plan": plan.__dict__, "layers": layer_stats, "peak_rss_gib": peak_rss_gib(), "artifact_gib": artifact_gib,
        "seconds": report.seconds,
        "matrices": [{k: getattr(m, k) for k in ("path", "d_in", "d_out", "k", "s", "rank", "realised_ratio",
                                                  "functional_error_calib", "seconds", "early_stopped_columns")}
                     for m in report.matrices],
        "rss_samples": samples[:: max(1, len(samples) // 2000)],
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"memory_llama3_8b_{tag}.json"
    path.write_text(json.dumps(out, indent=1, default=float))
    _plot(out, RESULTS / f"memory_llama3_8b_{tag}.png")  # redraw from the JSON: _plot(json.load(...), path)
    print(f"peak RSS {out['peak_rss_gib']:.2f} GiB (whole model {out['whole_model_gib_bf16']:.1f} GiB in bf16); "
          f"{report.seconds:.0f} s; wrote {path}")


def _llama_params(cfg) -> int:
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return cfg.num_hidden_layers * per_layer + 2 * cfg.vocab_size * h + h


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, rss = zip(*out["rss_samples"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(np.asarray(t) / 60, rss, lw=1.2, label="resident set size")
    ax.axhline(out["peak_rss_gib"], color="C1", ls="--", lw=1, label=f"peak {out['peak_rss_gib']:.1f} GiB")
    predicted = out["plan"].get("predicted_peak_gib")
    if predicted:
        ax.axhline(predicted, color="C2", ls="-.", lw=1, label=f"planned peak {predicted:.1f} GiB")
    ax.axhline(24, color="k", ls=":", lw=1, label="host RAM (24 GB)")
    for index, stats in out["layers"].items():
        ax.axvline(stats["t_end_s"] / 60, color="0.7", lw=0.8)
        ax.text(stats["t_end_s"] / 60, 0.5, f" L{index}", color="0.4", fontsize=8)
    ax.set(xlabel="minutes", ylabel="GiB", ylim=(0, 25))
    ax.set_title(f"Streaming {out['model']}\n{out['command'].split('.py ')[1]}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
