"""Per-matrix y = x·W for the SmolLM2-135M projection shapes: dense f32 / bf16 GEMV (XLA) against CoSpaDi's
y = (x·D)·S through the XLA gather path and the fused CPU kernel (cospadi_jax.sparse.spmm), coo16 and bitmask.

    python benchmarks/bench_spmm.py [--cores 1] [--ratios 0.2 0.3 0.4 0.5] [--tokens 1 16 64] [--rounds 7]
        [--shapes q k up down] [--no-cold] [--json out.json]

Shapes (d_in × d_out): q/o 576×576, k/v 576×192, gate/up 576×1536, down 1536×576. For each compression ratio
and storage (coo16: int16 ids; eq10: bitmask, both with bf16 D and values) k and s are budget.budget(kind=
"cospadi", rho=2, storage=...)'s; D, supports and values are random (speed depends on shapes only).

Each measurement is one jitted function applying M products in sequence (each product's input depends on the
previous output, so nothing is hoisted or overlapped); time / M per product, median over ``--rounds`` rounds, the
methods of one configuration interleaved within each round. ``hot``: the same weights M times (they stay in
L2/L3, as in a loop over one matrix). ``cold`` (T = 1): M distinct copies covering ≥ 2× L3, so every product
streams its weights from DRAM, as a decode step over 210 different matrices does (the XLA gather path is left out
there). Bytes moved: the weights'
resident bytes plus x and y (f32). Floors: the single-core read bandwidth measured here from L3 (hot) or DRAM
(cold) by a streaming Numba sum. The process, XLA and Numba are pinned to ``--cores``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"q": (576, 576), "k": (576, 192), "up": (576, 1536), "down": (1536, 576)}
SHAPE_NAMES = {"q": "q/o", "k": "k/v", "up": "gate/up", "down": "down"}
STORAGE_LAYOUT = {"coo16": "coo16", "eq10": "bitmask"}
L3_BYTES = 32 * 2**20
SETTLE_S = 0.05


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cores", default="1", help="CPU ids to pin to, e.g. 1 or 0,1 (default: 1)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-cold", action="store_true", help="skip the DRAM-streaming T = 1 measurements")
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    return ap.parse_args()


def pin(cores: str) -> list[int]:
    """Pin this process (and the threads XLA and Numba start later) to ``cores``; must run before importing jax."""
    ids = [int(c) for c in cores.split(",")]
    os.sched_setaffinity(0, ids)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(len(ids)))
    return ids


def read_bandwidth(nbytes: int, repeats: int) -> float:
    """GB/s of one core summing a float32 array of ``nbytes`` (8 independent vector accumulators)."""
    import numba
    import numpy as np

    @numba.njit(fastmath=True, cache=False)
    def total(a, reps):  # fastmath: LLVM splits the sum over vector accumulators
        acc = np.float32(0.0)
        for _ in range(reps):
            for i in range(a.size):
                acc += a[i]
        return acc

    a = np.ones(nbytes // 4, np.float32)
    total(a[:1024], 1)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        total(a, repeats)
        best = min(best, time.perf_counter() - t)
    return nbytes * repeats / best / 1e9


def weights(d_in: int, d_out: int, ratio: float, storage: str, rng):
    """(D bf16, support, values bf16) of budget-sized random factors in ``storage``'s layout, on the device."""
    import jax.numpy as jnp
    import numpy as np

    from cospadi_jax.budget import budget
    from cospadi_jax.sparse import spmm

    b = budget(d_in, d_out, ratio, kind="cospadi", rho=2.0, accounting=storage)
    k, s = b.n_atoms, b.sparsity
    idx = np.argsort(rng.random((d_out, k)), axis=1)[:, :s]
    val = rng.standard_normal((d_out, s)) * 0.05
    pack = spmm.pack_coo16 if storage == "coo16" else spmm.pack_bitmask
    support, values = pack(idx, val, k)
    D = rng.standard_normal((d_in, k)) / np.sqrt(d_in)
    return (jnp.asarray(D, jnp.bfloat16), jnp.asarray(support), jnp.asarray(values)), (k, s)


def methods(d_in: int, d_out: int, ratios: list[float], rng) -> list[dict]:
    """Every implementation of one shape: name, the product f(x, *w) and its weight arrays."""
    import jax.numpy as jnp

    from cospadi_jax.sparse import spmm

    W = rng.standard_normal((d_in, d_out)) / d_in**0.5
    out = [
        dict(name="dense f32", ratio=None, storage=None, fn=lambda x, w: x @ w, w=(jnp.asarray(W, jnp.float32),)),
        dict(name="dense bf16", ratio=None, storage=None,
             fn=lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32),
             w=(jnp.asarray(W, jnp.bfloat16),)),
    ]
    for ratio in ratios:
        for storage, layout in STORAGE_LAYOUT.items():
            w, (k, s) = weights(d_in, d_out, ratio, storage, rng)
            product = spmm.coo16_matmul if layout == "coo16" else spmm.bitmask_matmul
            for backend, label in (("xla", "XLA gather"), ("auto", "kernel")):
                out.append(dict(name=f"{label} {layout}", ratio=ratio, storage=storage, k=k, s=s, w=w,
                                fn=lambda x, *ws, p=product, b=backend: p(x, *ws, backend=b)))
    return out


def chain(fn):
    """jit of x ↦ one product per weight set, in sequence (x_{i+1} = x + 0·y_i[0, 0]: a true dependency)."""
    import jax
    import jax.numpy as jnp

    def run(x, sets):
        acc = jnp.zeros((), jnp.float32)
        y = None
        for ws in sets:
            y = fn(x + acc, *ws)
            acc = y[0, 0] * 0.0
        return y

    return jax.jit(run)


def copies(arrays, m: int):
    """m distinct device copies of a tuple of arrays (distinct buffers, so each is read from memory)."""
    import jax.numpy as jnp

    return [tuple(jnp.array(a, copy=True) for a in arrays) for _ in range(m)]


def measure(configs: list[dict], x, rounds: int) -> None:
    """Fill config["times"] with per-product seconds: compile, warm, then ``rounds`` interleaved rounds."""
    import jax

    for c in configs:
        c["jit"] = chain(c["fn"])
        jax.block_until_ready(c["jit"](x, c["sets"]))
        c["times"] = []
    for _ in range(rounds):
        for c in configs:
            # XLA's pool threads spin for a while after a parallel op; on pinned cores they would steal the next
            # measurement's cycles (the dense f32 GEMV measured 5x slower right after an XLA bf16 dot).
            time.sleep(SETTLE_S)
            t = time.perf_counter()
            jax.block_until_ready(c["jit"](x, c["sets"]))
            c["times"].append((time.perf_counter() - t) / len(c["sets"]))


def main() -> None:
    args = parse_args()
    cores = pin(args.cores)
    import jax
    import jax.numpy as jnp
    import numba
    import numpy as np

    from cospadi_jax.sparse import spmm_cpu

    bw_l3 = read_bandwidth(8 * 2**20, 40)
    bw_dram = read_bandwidth(512 * 2**20, 1)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"# {now}  {platform.processor() or platform.machine()}  pinned cores {cores} of {os.cpu_count()}  "
          f"jax {jax.__version__} ({jax.default_backend()})  numba {numba.__version__}  kernel ISA "
          f"{'avx512' if spmm_cpu.AVX512 else 'portable'}  loadavg {tuple(round(v, 2) for v in os.getloadavg())}")
    print(f"# single-core read bandwidth: L3 (8 MiB) {bw_l3:.1f} GB/s, DRAM (512 MiB) {bw_dram:.1f} GB/s")
    rng = np.random.default_rng(0)
    records = []
    for shape in args.shapes:
        d_in, d_out = SHAPES[shape]
        impls = methods(d_in, d_out, args.ratios, rng)
        regimes = [("hot", t) for t in args.tokens] + ([] if args.no_cold else [("cold", 1)])
        for regime, T in regimes:
            x = jnp.asarray(rng.standard_normal((T, d_in)), jnp.float32)
            configs = []
            for impl in impls:
                if regime == "cold" and impl["name"].startswith("XLA gather"):
                    continue  # 10-300x slower than the kernel hot already; 256-op chains of it take minutes to compile
                wbytes = sum(int(a.nbytes) for a in impl["w"])
                if regime == "hot":
                    m = 16 if T == 1 else 4
                    sets = [impl["w"]] * m
                else:
                    m = min(256, max(16, -(-2 * L3_BYTES // wbytes)))
                    sets = copies(impl["w"], m)
                configs.append(dict(impl, sets=sets, wbytes=wbytes))
            measure(configs, x, args.rounds)
            bw = bw_l3 if regime == "hot" else bw_dram
            print(f"\n### {SHAPE_NAMES[shape]} {d_in}×{d_out}, T = {T}, {regime} "
                  f"({'weights in L2/L3' if regime == 'hot' else 'weights from DRAM'}; floor at {bw:.1f} GB/s)\n")
            print("| CR | storage | k, s | implementation | µs | weight bytes | GB/s | of floor | × dense f32 |")
            print("|---|---|---|---|---|---|---|---|---|")
            dense_f32 = float(np.median(configs[0]["times"]))
            for c in configs:
                t = float(np.median(c["times"]))
                moved = c["wbytes"] + 4 * T * (d_in + d_out)
                rec = dict(shape=SHAPE_NAMES[shape], d_in=d_in, d_out=d_out, T=T, regime=regime, name=c["name"],
                           ratio=c["ratio"], storage=c["storage"], k=c.get("k"), s=c.get("s"), us=t * 1e6,
                           us_all=[v * 1e6 for v in c["times"]], weight_bytes=c["wbytes"], bytes_moved=moved,
                           gbs=moved / t / 1e9, floor_fraction=moved / bw / 1e9 / t, speedup=dense_f32 / t)
                records.append(rec)
                ks = f"{c['k']}, {c['s']}" if c.get("k") else ""
                print(f"| {c['ratio'] if c['ratio'] is not None else ''} | {c['storage'] or ''} | {ks} | {c['name']} "
                      f"| {rec['us']:.1f} | {c['wbytes']:,} | {rec['gbs']:.1f} | {rec['floor_fraction']:.2f} | "
                      f"{rec['speedup']:.2f} |", flush=True)
            del configs
    if args.json:
        args.json.write_text(json.dumps(dict(date=now, cores=cores, bw_l3=bw_l3, bw_dram=bw_dram,
                                             isa="avx512" if spmm_cpu.AVX512 else "portable",
                                             records=records), indent=1))


if __name__ == "__main__":
    main()
