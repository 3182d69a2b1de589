"""OMP and K-SVD throughput on 1, 2, 4 and 8 virtual CPU devices (issue 6, part 5).

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_scaling.py            # full run (~4-5 min on 2 cores)
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_scaling.py --quick    # smoke run (~1 min)

Every device count runs in its own subprocess (the CPU device count is fixed when JAX starts; set
through ``XLA_FLAGS=--xla_force_host_platform_device_count``), one after the other, never
concurrently, on the same inputs written once by the parent:

* problem: by default the real whitened target Y = L·W of SmolLM2-135M layer 10 ``self_attn.q_proj``
  (``benchmarks/_real_problem.py``: 32×256 calibration tokens, float64 Cholesky whitening, CR 0.2,
  ρ 2, Eq. 11, paper orientation: Y 576×576, k 307, s 153), cast to float32. ``--projection
  mlp.up_proj`` (576×1536, k 526, s 263) is the larger matrix of docs/benchmarks.md, but with the
  default 16 MiB chunks its 1-device sharded OMP program holds 81 chunks × 9 step blocks of while
  loops and compiles for minutes (the sharded path unrolls the chunk loop into one program), which
  does not fit a ~5 minute run on 2 shared cores. ``--random`` (and ``--quick``) use a seeded
  Gaussian target of ``--shape`` instead;
* OMP: :func:`cospadi_jax.sparse.sharded.sharded_batch_omp` on GD = DᵀD, DᵀY with D = k random
  normalised columns of Y (seed 42), the same for every device count;
* update: :func:`cospadi_jax.sparse.sharded.sharded_update_dictionary` (power, 8 steps) on that D and
  the dense S of the 1-device OMP codes;
* K-SVD iteration: :func:`cospadi_jax.sparse.sharded.sharded_ksvd` with ``ksvd_iterations=1`` (seeded
  initial dictionary, coding GEMMs, OMP, dense S, the power update and both objective evaluations).

One thing in ``cospadi_jax.sparse.sharded`` shapes how this is measured (reported, not fixed):

* With jax/jaxlib 0.10.2 the sharded OMP deadlocks on XLA:CPU at real sizes when the process has
   only N devices. The batched LAPACK triangular solve at the end of each OMP chunk (jaxlib's
   ``lapack_strsm_ffi``) splits its batch over XLA:CPU's intra-op pool (``jax::ParallelBatchMap``)
   and blocks its pool thread until the pieces are done; the pool has max(cores, devices) threads,
   so once as many solves run at once as the pool has threads (2 devices on 2 cores, or 1 device
   whose independent chunks are scheduled concurrently) no thread is left to run the pieces (gdb:
   the ``tf_XLAEigen`` threads in ``ParallelBatchMap``, the device executions in
   ``BlockUntilReady``). Each child therefore starts with ``--pool-devices`` (32) virtual devices,
   which makes the pool 32 threads (idle threads cost nothing), and meshes only the first N: the
   computation runs on exactly N devices and the pool is the same for every N, so rows compare.
   ``--pool-devices 0`` gives N devices per process (and hangs on this jaxlib).

Each child compiles once (warm-up, reported as ``first call``), then times ``--reps`` calls of each
phase and reports the median and the minimum; columns/s = d_out / median. It also records what the
machine was doing: the XLA:CPU intra-op threads (``tf_XLAEigen``) of the process, the CPU time of the
process per wall second during the timed calls (cores used by us) and the whole machine's busy cores
from ``/proc/stat`` over the same interval (the difference is other people's load). Virtual CPU
devices are not cores: they share one intra-op thread pool and the machine's physical cores, so
with 2 physical cores a speed-up above 2× is impossible.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# --------------------------------------------------------------------------- machine state


def _proc_stat_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) of all CPUs from /proc/stat (idle and iowait count as not busy)."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - fields[3] - fields[4], total


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _thread_names() -> dict[str, int]:
    """Thread names of this process, counted (XLA:CPU's intra-op pool threads are ``tf_XLAEigen``)."""
    names: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        names[name] = names.get(name, 0) + 1
    return names


class LoadMeter:
    """Cores used by this process and by the whole machine between ``start()`` and ``stop()``."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()
        self.busy, self.total = _proc_stat_busy()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall
        ours = (_cpu_seconds() - self.cpu) / wall
        busy, total = _proc_stat_busy()
        machine = (busy - self.busy) / max(total - self.total, 1.0) * (os.cpu_count() or 1)
        return {"cores_ours": ours, "cores_machine": machine, "cores_others": max(machine - ours, 0.0)}


# --------------------------------------------------------------------------- problem


def build_problem(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Write the shared inputs (Y, D, GD = DᵀD, DᵀY, k, s) to ``path`` (npz); return a description."""
    import jax

    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, str(HERE))
    from _real_problem import build_real_problems, initial_dictionary

    from cospadi_jax.budget import budget

    source = None
    if not args.random:
        try:
            p = build_real_problems((args.projection,))[args.projection]
            Y, k, s = p.Y, p.n_atoms, p.sparsity
            source = (f"SmolLM2-135M layer 10 {args.projection}, whitened Y = L·W "
                      f"({p.n_tokens} calibration tokens, cond(G) {p.condition_number:.2e})")
        except Exception as exc:  # noqa: BLE001 - any failure to build offline falls back, and says so
            print(f"# real problem unavailable ({type(exc).__name__}: {exc}); using a seeded random problem")
    if source is None:
        d, n = args.shape
        Y = np.random.default_rng(args.seed).standard_normal((d, n))
        b = budget(d, n, 0.2, rho=2.0)
        k, s = b.n_atoms, b.sparsity
        source = f"seeded Gaussian Y {d}×{n} (seed {args.seed}), k, s from budget(CR 0.2, ρ 2)"
    D = initial_dictionary(Y, k, seed=42)
    np.savez(path, Y=Y.astype(np.float32), D=D.astype(np.float32), gram=(D.T @ D).astype(np.float32),
             corr=(D.T @ Y).astype(np.float32), k=k, s=s)
    return {"source": source, "d": int(Y.shape[0]), "n": int(Y.shape[1]), "k": int(k), "s": int(s)}


# --------------------------------------------------------------------------- child: one device count


def _timed(fn: Callable[[], Any], reps: int, meter: LoadMeter) -> tuple[list[float], dict[str, float]]:
    """Wall times of ``reps`` calls of ``fn`` and the load measured over them."""
    times = []
    meter.start()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times, meter.stop()


def child(args: argparse.Namespace) -> None:
    """Run in a subprocess whose XLA_FLAGS fix the device count; write a JSON + npz next to the problem."""
    import jax
    import jax.numpy as jnp

    from cospadi_jax.parallel import make_mesh
    from cospadi_jax.sparse.sharded import sharded_batch_omp, sharded_ksvd, sharded_update_dictionary
    from cospadi_jax.sparse.omp import omp_chunk_size

    n_dev = args.child
    if jax.device_count() < n_dev:
        raise RuntimeError(f"asked for {n_dev} CPU devices, JAX started with {jax.device_count()}")
    data = np.load(args.problem)
    Y, gram, corr, k, s = data["Y"], data["gram"], data["corr"], int(data["k"]), int(data["s"])
    mesh = make_mesh(jax.devices()[:n_dev])  # the computation uses exactly n_dev devices
    f32 = jnp.float32
    budget = int(args.memory_budget_mib * 2**20)

    def omp() -> Any:
        codes = sharded_batch_omp(gram, corr, s, mesh, dtype=f32, memory_budget_bytes=budget)
        codes.values.block_until_ready()
        return codes

    # Warm-up: compile every jitted piece once (the K-SVD call compiles the same OMP kernel).
    t0 = time.perf_counter()
    codes = omp()
    first_omp = time.perf_counter() - t0
    indices = np.asarray(codes.indices)
    S = np.asarray(codes.to_dense(k)) if n_dev == 1 else None
    if S is None:  # the update runs on the 1-device codes for every device count (same work)
        S = np.load(args.codes)["S"]
    D0 = data["D"]

    def update() -> None:
        D, S_new, _ = sharded_update_dictionary(Y, D0, S, mesh, dict_update="power", power_iterations=8)
        D.block_until_ready()
        S_new.block_until_ready()

    def ksvd_iteration() -> Any:
        r = sharded_ksvd(Y, k, s, 1, mesh, key=42, dict_update="power", power_iterations=8, dtype=f32,
                         omp_memory_mb=budget // 2**20)
        r.dictionary.block_until_ready()
        return r

    meter = LoadMeter()
    chunk = omp_chunk_size(k, s, 4, budget)
    per_dev = -(-Y.shape[1] // n_dev)
    out: dict[str, Any] = {"devices": n_dev, "process_devices": jax.device_count(),
                           "loadavg_start": os.getloadavg(), "chunk": chunk, "chunks_per_device": -(-per_dev // chunk)}

    def record(name: str, fn: Callable[[], Any]) -> None:
        times, load = _timed(fn, args.reps, meter)
        out[name] = {"times": times, "median": statistics.median(times), "min": min(times), **load}

    t0 = time.perf_counter()
    update()
    first_update = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = ksvd_iteration()
    first_ksvd = time.perf_counter() - t0
    out["threads"] = _thread_names()
    for name, fn in (("omp", omp), ("update", update), ("ksvd", ksvd_iteration)):
        record(name, fn)
    out["first_call"] = {"omp": first_omp, "update": first_update, "ksvd": first_ksvd}
    out["loadavg_end"] = os.getloadavg()
    out["objective"] = [float(x) for x in result.objective]
    out["n_early_stopped"] = int(codes.n_early_stopped)
    np.savez(args.out + ".npz", indices=indices, **({"S": S} if n_dev == 1 else {}))
    Path(args.out).write_text(json.dumps(out))


# --------------------------------------------------------------------------- parent


def run_device_count(n_dev: int, args: argparse.Namespace, problem: Path, work: Path) -> dict[str, Any]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    pool = max(n_dev, args.pool_devices)
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={pool}", *args.xla_flags])
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = work / f"dev{n_dev}.json"
    cmd = [sys.executable, __file__, "--child", str(n_dev), "--problem", str(problem), "--reps", str(args.reps),
           "--memory-budget-mib", str(args.memory_budget_mib),
           "--out", str(out), "--codes", str(work / "dev1.json.npz")]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    res = json.loads(out.read_text())
    res["process_seconds"] = time.perf_counter() - t
    res["indices"] = np.load(str(out) + ".npz")["indices"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--reps", type=int, default=3, help="timed calls per phase after the warm-up")
    ap.add_argument("--projection", default="self_attn.q_proj")
    ap.add_argument("--random", action="store_true", help="seeded Gaussian problem instead of the real one")
    ap.add_argument("--shape", type=int, nargs=2, default=[576, 576], metavar=("D", "N"),
                    help="shape of the random problem (default: that of SmolLM2 q_proj)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: random 576×576 problem, devices 1 2, 1 rep")
    ap.add_argument("--xla-flags", nargs="*", default=[], help="extra XLA_FLAGS for every child")
    ap.add_argument("--pool-devices", type=int, default=32,
                    help="virtual devices each child process starts with (sizes XLA:CPU's intra-op pool, see "
                         "the module docstring); the mesh uses only the first N of them")
    ap.add_argument("--memory-budget-mib", type=float, default=16.0,
                    help="OMP working-memory budget per device and chunk (library default 16 MiB)")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--problem", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--codes", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args)
        return
    if args.quick:
        args.random, args.shape, args.devices, args.reps = True, [576, 576], [1, 2], 1
    if args.devices[0] != 1:
        args.devices = [1, *[d for d in args.devices if d != 1]]  # 1 device is the reference and supplies S
    t_start = time.perf_counter()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.processor() or platform.machine()}  "
          f"cpus={os.cpu_count()} (affinity {len(os.sched_getaffinity(0))})  python {platform.python_version()}  "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}  loadavg {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        work = Path(tmp)
        problem = work / "problem.npz"
        t = time.perf_counter()
        desc = build_problem(args, problem)
        print(f"# problem: {desc['source']}; Y {desc['d']}×{desc['n']}, k {desc['k']}, s {desc['s']}, float32 "
              f"(built in {time.perf_counter() - t:.1f} s)", flush=True)
        results = []
        for n_dev in args.devices:
            res = run_device_count(n_dev, args, problem, work)
            results.append(res)
            print(f"# {n_dev} device(s): done in {res['process_seconds']:.1f} s, XLA threads "
                  f"{res['threads'].get('tf_XLAEigen', 0)}", flush=True)
    print_table(results, desc, args)
    print(f"# total wall time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        for r in results:
            r.pop("indices")
        Path(args.json).write_text(json.dumps({"problem": desc, "results": results}, indent=1))


def print_table(results: list[dict[str, Any]], desc: dict[str, Any], args: argparse.Namespace) -> None:
    """Two markdown tables: throughput per phase (median, min, columns/s, speed-up vs 1 device) and run conditions."""
    n = desc["n"]
    ref = results[0]

    def cell(r: dict[str, Any], phase: str, cols: bool = False) -> str:
        m = r[phase]
        text = f"{m['median']:.2f} ({m['min']:.2f})"
        if cols:
            text += f" | {n / m['median']:.0f}"
        return f"{text} | {ref[phase]['median'] / m['median']:.2f}"

    print(f"\nseconds: median (min) of {args.reps} timed call(s) after warm-up; cols/s = {n} columns / median; "
          "× = 1-device median / median")
    print("| devices | OMP chunks/device | OMP s | OMP cols/s | × | update s | × | K-SVD iteration s | K-SVD cols/s | × |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['devices']} | {r['chunks_per_device']}×{r['chunk']} | {cell(r, 'omp', True)} | {cell(r, 'update')} "
              f"| {cell(r, 'ksvd', True)} |")
    print("\n| devices | devices in process / XLA intra-op threads | cores ours / others (K-SVD calls) "
          "| first call s: OMP, K-SVD | supports = 1 device | objective after 1 iteration |")
    print("|---|---|---|---|---|---|")
    for r in results:
        same = float(np.mean(np.all(np.sort(r["indices"], 1) == np.sort(ref["indices"], 1), axis=1)))
        print(f"| {r['devices']} | {r['process_devices']} / {r['threads'].get('tf_XLAEigen', 0)} "
              f"| {r['ksvd']['cores_ours']:.2f} / {r['ksvd']['cores_others']:.2f} "
              f"| {r['first_call']['omp']:.1f}, {r['first_call']['ksvd']:.1f} | {same:.1%} "
              f"| {r['objective'][-1]:.6f} |")
    print("cores ours / others: CPU-seconds of our process per wall second during the timed K-SVD calls, and the "
          "rest of the machine's busy cores (/proc/stat) over the same interval.")


if __name__ == "__main__":
    main()
