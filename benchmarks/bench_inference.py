"""Inference speed and memory of compressed SmolLM2-135M: prefill, batch-1 KV-cached decode, resident bytes, peak RSS.

    python benchmarks/bench_inference.py [--ratios 0.2 0.3 0.4 0.5] [--ug-ratios 0.4 0.5] [--rounds 3]
        [--cores 0,1] [--json docs/bench_inference.json] [--plot docs/figures/inference.png]

Models (all from the embedded SmolLM2, float32 compute):
  - dense f32 and dense bf16 (every weight in bf16, the paper's storage reference);
  - SVD-LLM-shaped low rank (A, B in float32, the fast XLA:CPU dot) at every ratio, all 210 projections or only up/gate ("UG");
  - CoSpaDi at every ratio and in every ``DictLinear`` mode: ``dense`` (W̃ = D·S rebuilt inside every call, a
    GEMM per projection and token: at CR 0.3 only), ``factored`` (XLA gather) and each packed mode of :mod:`cospadi_jax.layers` (bf16 D and values, int16 indices
    or a bitmask, read by the Numba kernel on the CPU).
Factors have the budget's exact shapes (k, s or r from :func:`cospadi_jax.budget.budget`, ρ = 2, the storage that
matches the mode's layout) with random values and supports: speed and bytes depend on shapes, not on what was fitted.

Timings are interleaved (round r measures every model once, in a fixed order), medians over rounds; the process is
pinned to ``--cores`` and XLA and Numba use those cores. Prefill: one call on a [1, P] prompt (P = 16, 64, 256),
tokens/s = P / time. Decode: ``--decode-steps`` one-token steps after a 16-token prompt, each step's token read back
to the host as generation does, tokens/s = steps / time. Resident weight bytes: every array of the model's state
(parameters, supports, scales). Peak memory: one fresh process per model builds it, frees the dense source,
returns freed heap pages to the kernel (``malloc_trim``), resets the kernel's high-water mark
(/proc/self/clear_refs) and runs the prefills and the decode: VmHWM then (the peak), and VmHWM minus the RSS before
inference (the working set: activations, KV cache, compiled code, XLA buffers).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPTS = (16, 64, 256)
UG = ("gate_proj", "up_proj")


def variants(ratios: list[float], ug_ratios: list[float], modes: list[str]) -> list[dict]:
    """Every model of the benchmark as a small JSON-able description (what a worker process rebuilds)."""
    out = [{"name": "dense f32", "kind": "dense", "dtype": "float32"},
           {"name": "dense bf16", "kind": "dense", "dtype": "bfloat16"}]
    for scope, scope_ratios in (("all", ratios), ("UG", ug_ratios)):
        for ratio in scope_ratios:
            tag = f"CR {ratio:g}" + (" UG" if scope == "UG" else "")
            out.append({"name": f"low-rank {tag}", "kind": "low_rank", "ratio": ratio, "scope": scope})
            out += [{"name": f"cospadi {mode} {tag}", "kind": "cospadi", "mode": mode, "ratio": ratio, "scope": scope}
                    for mode in modes if mode != "dense" or (ratio == 0.3 and scope == "all")]
    return out


# The budget accounting each DictLinear layout stores exactly ("dense"/"factored" hold float32 and int32 ids,
# so their shapes are drawn at the paper's default accounting).
MODE_STORAGE = {"sparse": "eq10", "sparse_coo16": "coo16"}


def _storage(mode: str) -> str:
    return MODE_STORAGE.get(mode, "eq11")


def build(base, spec: dict, seed: int = 0):
    """The model of ``spec``: ``base`` itself for dense f32, else a copy with its weights cast or its projections
    replaced (embeddings and norms stay as in ``base``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cospadi_jax.budget import budget
    from cospadi_jax.layers import replace_projection
    from cospadi_jax.methods.base import DictFactors, LowRankFactors
    from cospadi_jax.models.paths import get_module

    if spec["kind"] == "dense":
        if spec["dtype"] == "float32":
            return base
        model = nnx.clone(base)  # bf16 storage, float32 compute (Linear casts the kernel inside its dot)
        nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
        return model
    model = nnx.clone(base)
    rng = np.random.default_rng(seed)
    for path in projections(model, spec["scope"]):
        d_in, d_out = get_module(model, path).kernel.shape
        if spec["kind"] == "low_rank":
            r = budget(d_in, d_out, spec["ratio"], kind="low_rank").rank
            f = LowRankFactors(rng.standard_normal((d_in, r)) * 0.05, rng.standard_normal((r, d_out)) * 0.05)
            # A, B in float32: XLA:CPU's bf16 dot is ~2.6x slower than its f32 one, so a bf16-stored low-rank
            # model would be measured at XLA's bf16 speed, not at its bytes (docs/benchmarks.md).
            replace_projection(model, path, f)
        else:
            b = budget(d_in, d_out, spec["ratio"], rho=2.0, accounting=_storage(spec["mode"]))
            supports = np.sort(np.argsort(rng.random((d_out, b.n_atoms)), axis=1)[:, :b.sparsity], axis=1)
            f = DictFactors(_bf16(rng.standard_normal((d_in, b.n_atoms)) * 0.05), supports.astype(np.int32),
                            _bf16(rng.standard_normal((d_out, b.sparsity)) * 0.05))
            replace_projection(model, path, f, mode=spec["mode"])
    return model


def projections(model, scope: str) -> list[str]:
    from cospadi_jax.models.paths import PROJECTION_TYPES, projection_path

    types = UG if scope == "UG" else PROJECTION_TYPES
    return [projection_path(i, t) for i in range(model.config.num_hidden_layers) for t in types]


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round to bf16 and back, so that a layout storing bf16 holds the same numbers as one storing f32."""
    import jax.numpy as jnp

    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def resident_bytes(model, paths: list[str] | None = None) -> int:
    """Bytes of every array the model (or the modules at ``paths``) holds: parameters, supports, scales."""
    import jax
    from flax import nnx

    from cospadi_jax.models.paths import get_module

    modules = [model] if paths is None else [get_module(model, p) for p in paths]
    return int(sum(x.nbytes for m in modules for x in jax.tree.leaves(nnx.state(m))))


class Timer:
    """Compiled prefill and decode of one model; ``measure()`` returns one round of timings."""

    def __init__(self, model, decode_steps: int):
        from cospadi_jax.models.generation import Generator

        self.gen = Generator(model)
        self.decode_steps = decode_steps
        self.vocab = model.config.vocab_size
        for p in PROMPTS:  # compile every shape before any timing
            self.prefill(p)
        self.decode(2)

    def _prompt(self, n: int) -> list[list[int]]:
        return [list(np.random.default_rng(n).integers(3, self.vocab, size=n))]

    def prefill(self, n: int) -> float:
        ids, mask, cache = self.gen.prepare(self._prompt(n), 1)
        start = time.perf_counter()
        token, _, cache = self.gen.step(ids, mask, cache)
        token.block_until_ready()
        return time.perf_counter() - start

    def decode(self, steps: int) -> float:
        ids, mask, cache = self.gen.prepare(self._prompt(16), self.decode_steps)
        token, _, cache = self.gen.step(ids, mask, cache)
        ones = np.ones((1, 1), np.int32)
        start = time.perf_counter()
        for i in range(steps):
            token, _, cache = self.gen.step(np.asarray(token)[:, None], ones, cache, step=i + 1)
            int(np.asarray(token)[0])  # to the host, as streaming generation does
        return time.perf_counter() - start

    def measure(self) -> dict:
        return {**{f"prefill_{p}_s": self.prefill(p) for p in PROMPTS}, "decode_s": self.decode(self.decode_steps)}


def _peak_rss(spec: dict, decode_steps: int, cores: str, random_weights: bool) -> dict:
    """Peak RSS of a fresh process that builds ``spec`` and runs its prefills and decode (bytes)."""
    cmd = ["taskset", "-c", cores, sys.executable, __file__, "--worker", json.dumps(spec),
           "--decode-steps", str(decode_steps), *(["--random-weights"] if random_weights else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(cores))
    if done.returncode:
        raise RuntimeError(f"memory worker for {spec['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _env(cores: str) -> dict:
    n = str(len(cores.split(",")))
    return {**os.environ, "NUMBA_NUM_THREADS": n, "OMP_NUM_THREADS": n, "JAX_PLATFORMS": "cpu"}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# SmolLM2-135M-Instruct's architecture (its GGUF's config), for --random-weights.
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def base_model(random_weights: bool):
    """The embedded SmolLM2 (float32), or a random model of its shapes."""
    from cospadi_jax import load_model

    if random_weights:
        from transformers import LlamaConfig

        return load_model(LlamaConfig(**SMOLLM2_CONFIG))[0]
    return load_model("smollm2-135m")[0]


def worker(spec: dict, decode_steps: int, random_weights: bool) -> None:
    base = base_model(random_weights)
    model = build(base, spec)
    if model is not base:
        del base
    gc.collect()
    # Hand the freed dense source back to the kernel: glibc keeps freed heap pages mapped, and VmHWM would
    # count them as this model's memory.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    timer = Timer(model, decode_steps)
    timer.measure()
    peak = _status("VmHWM")
    print(json.dumps({"rss_before_inference": before, "peak_rss_inference": peak,
                      "inference_working_set": peak - before, "resident_weight_bytes": resident_bytes(model)}))


def machine() -> str:
    import jax

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    device = jax.devices()[0]
    where = "" if device.platform == "cpu" else f"{device.device_kind} ({device.platform}); host "
    return f"{where}{cpu}, {os.cpu_count()} cores visible, python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.3, 0.4, 0.5])
    p.add_argument("--ug-ratios", type=float, nargs="*", default=[0.4, 0.5])
    p.add_argument("--modes", nargs="*", default=None, help="DictLinear modes (default: all of layers.DICT_MODES)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--cores", default="0,1")
    p.add_argument("--no-memory", action="store_true", help="skip the per-model peak-RSS processes")
    p.add_argument("--json", type=Path, default=HERE.parent / "docs" / "bench_inference.json")
    p.add_argument("--plot", type=Path, default=HERE.parent / "docs" / "figures" / "inference.png")
    p.add_argument("--memory-ratios", type=float, nargs="*", default=[0.3, 0.5],
                   help="ratios whose models get a peak-RSS process (each loads the model: ~30 s)")
    p.add_argument("--random-weights", action="store_true",
                   help="SmolLM2's shapes with random weights (a machine without the embedded GGUF, e.g. a GPU node)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker), args.decode_steps, args.random_weights)
    if args.cores != "none" and os.environ.get("_BENCH_PINNED") != "1":  # pinned, threads set before jax loads
        env = {**_env(args.cores), "_BENCH_PINNED": "1"}
        os.execvpe("taskset", ["taskset", "-c", args.cores, sys.executable, *sys.argv], env)

    from cospadi_jax import layers

    modes = args.modes or list(getattr(layers, "DICT_MODES", ("dense", "factored")))
    specs = variants(args.ratios, args.ug_ratios, modes)
    base = base_model(args.random_weights)
    timers, rows = [], []
    for i, spec in enumerate(specs):
        t = time.perf_counter()
        model = build(base, spec, seed=i)
        rows.append({**spec, "resident_weight_bytes": resident_bytes(model),
                     "projection_bytes": resident_bytes(model, projections(model, spec.get("scope", "all")))})
        timers.append(Timer(model, args.decode_steps))
        print(f"[{i + 1}/{len(specs)}] {spec['name']}: built and compiled in {time.perf_counter() - t:.1f} s",
              flush=True)
    rounds: list[list[dict]] = [[] for _ in specs]
    for r in range(args.rounds):
        for i, timer in enumerate(timers):  # interleaved: every model once per round
            rounds[i].append(timer.measure())
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    dense = None
    for row, measured in zip(rows, rounds):
        med = {k: float(np.median([m[k] for m in measured])) for k in measured[0]}
        row.update({f"prefill_{p}_tok_s": p / med[f"prefill_{p}_s"] for p in PROMPTS})
        row["decode_tok_s"] = args.decode_steps / med["decode_s"]
        row["rounds"] = measured
        if row["name"] == "dense f32":
            dense = row
    for row in rows:
        row["decode_vs_dense_f32"] = row["decode_tok_s"] / dense["decode_tok_s"]
        row["prefill_256_vs_dense_f32"] = row["prefill_256_tok_s"] / dense["prefill_256_tok_s"]
    if not args.no_memory and args.cores != "none":
        del timers, base
        gc.collect()
        for row, spec in zip(rows, specs):
            if spec["kind"] != "dense" and (spec["ratio"] not in args.memory_ratios or spec["scope"] != "all"):
                continue
            row.update(_peak_rss(spec, args.decode_steps, args.cores, args.random_weights))
            print(f"peak memory of {spec['name']}: {row['peak_rss_inference'] / 2**20:.0f} MiB", flush=True)
    from cospadi_jax.models.paths import get_module

    model = base_model(args.random_weights)
    bf16 = next(r for r in rows if r["name"] == "dense bf16")["resident_weight_bytes"]
    for row in rows:
        row["resident_vs_dense_bf16"] = row["resident_weight_bytes"] / bf16
        if "ratio" in row:  # the goal: compressed projections <= (1 - CR) x their dense bf16 bytes, within 2 %
            dense_bf16 = 2 * sum(get_module(model, p).kernel.size for p in projections(model, row["scope"]))
            row["projection_vs_budget"] = row["projection_bytes"] / ((1 - row["ratio"]) * dense_bf16)
    import jax

    report = {"date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "machine": machine(), "cores": args.cores, "jax": jax.__version__, "decode_steps": args.decode_steps,
              "rounds": args.rounds, "models": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    plot(report, args.plot)
    print(table(report))


def table(report: dict) -> str:
    lines = ["| model | prefill 16 / 64 / 256 tok/s | decode tok/s | decode × dense f32 | projections MiB "
             "| × (1 − CR) dense bf16 | whole model MiB | peak RSS (working set) MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        peak = (f"{r['peak_rss_inference'] / 2**20:.0f} ({r['inference_working_set'] / 2**20:.0f})"
                if "peak_rss_inference" in r else "–")
        budget = f"{r['projection_vs_budget']:.3f}" if "projection_vs_budget" in r else "–"
        lines.append(f"| {r['name']} | {r['prefill_16_tok_s']:.0f} / {r['prefill_64_tok_s']:.0f} / "
                     f"{r['prefill_256_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['decode_vs_dense_f32']:.2f} | "
                     f"{r['projection_bytes'] / 2**20:.1f} | {budget} | {r['resident_weight_bytes'] / 2**20:.1f} | "
                     f"{peak} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Six panels: prefill at each prompt length, decode, resident weights (against CR) and peak memory (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["models"] if r["kind"] != "dense" and r.get("scope") == "all"]
    dense = {r["name"]: r for r in report["models"] if r["kind"] == "dense"}
    series = sorted({r["name"].rsplit(" CR", 1)[0] for r in rows})
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [(f"prefill_{p}_tok_s", f"prefill, {p}-token prompt (tokens/s)") for p in PROMPTS]
    panels += [("decode_tok_s", "batch-1 decode (tokens/s)"), ("resident_weight_bytes", "resident weights (MiB)")]
    for ax, (key, title) in zip(axes.flat, panels):
        scale = 2**20 if key == "resident_weight_bytes" else 1
        for name in series:
            pts = sorted((r["ratio"], r[key] / scale) for r in rows if r["name"].startswith(name + " CR"))
            ax.plot(*zip(*pts), marker="o", label=name)
        for name, r in dense.items():
            ax.axhline(r[key] / scale, ls="--", lw=1, color="k" if "f32" in name else "grey", label=name)
        ax.set_xlabel("compression ratio (all 210 projections)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if key.startswith("prefill") or key == "decode_tok_s":
            ax.set_yscale("log")
    axes.flat[3].legend(fontsize=7)
    measured = [r for r in report["models"] if "peak_rss_inference" in r]
    ax = axes.flat[5]
    y = np.arange(len(measured))
    ax.barh(y, [(r["peak_rss_inference"] - r["inference_working_set"]) / 2**20 for r in measured],
            label="RSS before inference")
    ax.barh(y, [r["inference_working_set"] / 2**20 for r in measured],
            left=[(r["peak_rss_inference"] - r["inference_working_set"]) / 2**20 for r in measured],
            label="inference working set")
    ax.set_yticks(y, [r["name"] for r in measured], fontsize=7)
    ax.invert_yaxis()
    ax.set_title("peak process memory (MiB)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"SmolLM2-135M inference on {report['machine'].split(',')[0]} (cores {report['cores']}), "
                 f"{report['date']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
