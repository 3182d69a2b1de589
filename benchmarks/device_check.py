"""One GPU check of the sparse engine: GEMM-form and B-form Batch-OMP and the power update, measured beside
the projection's numbers (benchmarks/projection.py), then a Llama-3.2-1B T = 60 total from the measured rates.

    bash benchmarks/device_check.sh              # on a lent GPU machine (H100/H200): < 5 min with compiles
    bash benchmarks/device_check.sh --cpu-smoke  # tiny shapes on this CPU (< 1 min): proves the script runs

What it measures, float32, seeded random problems (the SmolLM2 weights are not on the GPU machine; D is k
unit-norm columns of a second random Gaussian matrix, as K-SVD initialises from columns of Y):

* ``smollm2-up_proj`` shape: d 576, n 1536, k 526, s 263 (all columns);
* ``llama-gate/up_proj`` shape (Llama-3.2-1B gate_proj/up_proj, CR 0.2, ρ 2): d 2048, n 8192, k 2184,
  s 1092; the OMP on a subset of columns (one chunk), scaled by n / subset (per-column work is what the
  model counts; a full-size chunk would only be more efficient), the dictionary update on all k atoms;
* ``batch_omp_gemm`` at precision "highest", "tf32" and "bf16x3" (supports compared with "highest"),
  the "solve" triangular form (up_proj shape), the B-form ``batch_omp`` (25 % of device memory per chunk, as the projection
  assumes), and ``update_dictionary(dict_update="power", power_iterations=8)``.

Each timing is the second of two calls (the first includes the compile, reported separately). A global
deadline (``--budget-s``, default 240 s) skips the remaining items once passed (the items least sure to
be fast come last; the "solve" form is timed on the up_proj shape only), so the run ends in about 5
minutes at worst, inside the device tool's 10-minute command limit; skipped items are listed.

The engine needs only JAX and NumPy: the script registers ``cospadi_jax`` as a bare namespace package so that
its ``__init__`` (which imports the Flax model code) does not run under the GPU image's own Flax/transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if "cospadi_jax" not in sys.modules:  # namespace stub: skip cospadi_jax/__init__.py (Flax models)
    _pkg = types.ModuleType("cospadi_jax")
    _pkg.__path__ = [str(ROOT / "cospadi_jax")]
    sys.modules["cospadi_jax"] = _pkg
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import projection as proj  # noqa: E402
from cospadi_jax.sparse.ksvd import update_dictionary  # noqa: E402
from cospadi_jax.sparse.omp import batch_omp  # noqa: E402
from cospadi_jax.sparse.omp_gemm import batch_omp_gemm, default_memory_budget  # noqa: E402

# batch_omp_gemm(precision=...) -> the projection's precision class (the inverse of its table)
PRECISION_CLASS = {name: cls for cls, name in proj.GEMM_FORM_PRECISIONS.items()}


@dataclass(frozen=True)
class Case:
    """One problem shape; ``omp_cols`` / ``bform_cols`` columns are timed and scaled to n."""

    name: str
    d: int
    n: int
    k: int
    s: int
    omp_cols: int
    bform_cols: int
    solve: bool = True  # also time the "solve" triangular form (cuBLAS trsm; unknown speed at s ~ 1000)


GPU_CASES = [
    Case("smollm2-up_proj", 576, 1536, 526, 263, omp_cols=1536, bform_cols=1536),
    Case("llama-gate/up_proj", 2048, 8192, 2184, 1092, omp_cols=2048, bform_cols=256, solve=False),
]
SMOKE_CASES = [
    Case("smoke-up-like", 48, 96, 40, 20, omp_cols=96, bform_cols=96),
    Case("smoke-gate-like", 64, 256, 60, 30, omp_cols=64, bform_cols=32),
]


class Clock:
    """Global deadline: items that would start after it are skipped (and listed)."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, label: str) -> bool:
        if self.elapsed() < self.budget_s:
            return True
        self.skipped.append(label)
        print(f"  skipped (deadline {self.budget_s:.0f} s passed): {label}", flush=True)
        return False


def timed_twice(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, first call incl. compile, second call) in seconds, each blocked until ready."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, first, time.perf_counter() - t


def match_machine(device: jax.Device) -> tuple[proj.Machine, str]:
    """The projection's Machine for this device and a note on the match."""
    kind = getattr(device, "device_kind", "") or ""
    if device.platform == "cpu":
        return proj.CPU_RECORDED, "CPU: compared with the recorded CPU rates (2026-11-23)"
    for key, name in (("H200", "H200-SXM"), ("H100", "H100-SXM"), ("A100", "A100-SXM-80GB")):
        if key in kind:
            return next(m for m in proj.ACCELERATORS if m.name == name), f"{kind!r} -> {name}"
    if device.platform == "tpu":
        return next(m for m in proj.ACCELERATORS if m.name.startswith("TPU")), f"{kind!r} -> TPU v5e (per chip)"
    return next(m for m in proj.ACCELERATORS if m.name == "H100-SXM"), f"{kind!r} unknown -> H100 rates"


def problem(case: Case, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Y [d, n], D [d, k] unit-norm, GD [k, k], DᵀY [k, n] in float32 on the default device."""
    rng = np.random.default_rng(seed)
    Y = jnp.asarray(rng.standard_normal((case.d, case.n), dtype=np.float32))
    D = jnp.asarray(rng.standard_normal((case.d, case.k), dtype=np.float32))
    D = D / jnp.linalg.norm(D, axis=0)
    hi = jax.lax.Precision.HIGHEST
    return Y, D, jnp.matmul(D.T, D, precision=hi), jnp.matmul(D.T, Y, precision=hi)


def random_codes(case: Case, seed: int = 1) -> jax.Array:
    """Dense S [k, n] with s random atoms per column (the update's cost does not depend on which)."""
    key_sup, key_val = jax.random.split(jax.random.key(seed))
    order = jnp.argsort(jax.random.uniform(key_sup, (case.n, case.k)), axis=1)[:, : case.s]
    vals = jax.random.normal(key_val, (case.n, case.s), jnp.float32)
    cols = jnp.broadcast_to(jnp.arange(case.n)[:, None], order.shape)
    return jnp.zeros((case.k, case.n), jnp.float32).at[order, cols].set(vals)


def support_mask(codes, k: int) -> np.ndarray:
    """[n, k] bool: the selected atoms of each column."""
    idx = np.asarray(codes.indices)
    valid = np.arange(idx.shape[1]) < np.asarray(codes.n_nonzero)[:, None]
    mask = np.zeros((idx.shape[0], k), bool)
    rows = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)
    mask[rows[valid], idx[valid]] = True
    return mask


def support_agreement(a, b, k: int) -> float:
    """Share of columns whose supports (as sets) are identical."""
    return float(np.mean(np.all(support_mask(a, k) == support_mask(b, k), axis=1)))


def rel_error(Y, D, codes, k: int, cols: int) -> float:
    S = codes.to_dense(k)
    R = Y[:, :cols] - jnp.matmul(D, S, precision=jax.lax.Precision.HIGHEST)
    return float(jnp.linalg.norm(R) / jnp.linalg.norm(Y[:, :cols]))


def model_omp_seconds(case: Case, mach: proj.Machine, form: str, precision: str = "highest",
                      triangular: str = "inverse") -> float:
    """The projection's seconds for one OMP pass over all n columns of ``case`` on ``mach``."""
    if form == "bform":
        w = proj.omp_work(case.k, case.s, case.n, mach.chunk_budget())
        return proj.phase_time(w, mach, bandwidth=mach.stream_rate(w.extra["chunk_state_bytes"]))
    gw, tw = proj.omp_gemm_work(case.k, case.s, case.n, mach.chunk_budget(), precision=PRECISION_CLASS[precision],
                                triangular=triangular)
    return proj.omp_gemm_time(gw, tw, mach)


def model_update_seconds(case: Case, mach: proj.Machine, power: int = 8) -> float:
    w = proj.update_work(case.d, case.n, case.k, power)
    return proj.phase_time(w, mach, bandwidth=mach.stream_rate(w.extra["E_bytes"]))


def run_case(case: Case, mach: proj.Machine, clock: Clock, results: list[dict[str, Any]]) -> None:
    print(f"\n## {case.name}: d {case.d}, n {case.n}, k {case.k}, s {case.s}", flush=True)
    Y, D, G, C = problem(case)
    budget = default_memory_budget()
    codes: dict[str, Any] = {}

    def record(item: str, first: float, steady: float, cols: int, model_s: float, **extra: Any) -> None:
        full = steady * case.n / cols
        row = {"case": case.name, "item": item, "columns_timed": cols, "first_call_s": first, "steady_s": steady,
               "full_matrix_s": full, "model_s": model_s, "measured_over_model": full / model_s if model_s else None,
               **extra}
        results.append(row)
        print(f"  {item}: {steady:.3f} s for {cols} columns (first call {first:.1f} s) -> {full:.3f} s for all "
              f"{case.n}; model {model_s:.3f} s; measured/model {full / model_s:.2f}", flush=True)

    def attempt(label: str, fn: Callable[[], None]) -> None:
        if not clock.allows(f"{case.name}: {label}"):
            return
        try:
            fn()
        except Exception as exc:  # report and go on: one unsupported mode must not cost the whole run
            results.append({"case": case.name, "item": label, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            print(f"  {label}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            traceback.print_exc(limit=3)

    cols = case.omp_cols
    Csub = C[:, :cols]

    def gemm(precision: str, triangular: str = "inverse") -> None:
        out, first, steady = timed_twice(lambda: batch_omp_gemm(G, Csub, case.s, precision=precision,
                                                                 chunk_size=cols, triangular=triangular,
                                                                 memory_budget_bytes=budget))
        key = f"gemm-{triangular}-{precision}"
        codes[key] = out
        extra: dict[str, Any] = {"n_early_stopped": int(out.n_early_stopped),
                                 "rel_error": rel_error(Y, D, out, case.k, cols)}
        ref = codes.get("gemm-inverse-highest")
        if ref is not None and key != "gemm-inverse-highest":
            extra["identical_supports_vs_highest"] = support_agreement(out, ref, case.k)
            extra["rel_error_minus_highest"] = extra["rel_error"] - rel_error(Y, D, ref, case.k, cols)
        record(f"batch_omp_gemm {triangular} {precision}", first, steady, cols,
               model_omp_seconds(case, mach, "gemm", precision, triangular), **extra)
        if "identical_supports_vs_highest" in extra:
            print(f"    supports identical to 'highest': {100 * extra['identical_supports_vs_highest']:.1f} % of "
                  f"columns; rel. error {extra['rel_error']:.6f} (Δ {extra['rel_error_minus_highest']:+.2e})")


    def bform() -> None:
        bc = case.bform_cols
        out, first, steady = timed_twice(lambda: batch_omp(G, C[:, :bc], case.s, chunk_size=bc))
        extra: dict[str, Any] = {"rel_error": rel_error(Y, D, out, case.k, bc)}
        ref = codes.get("gemm-inverse-highest")
        if ref is not None:
            sub = type(ref)(ref.indices[:bc], ref.values[:bc], ref.n_nonzero[:bc], ref.n_early_stopped)
            extra["identical_supports_vs_gemm_highest"] = support_agreement(out, sub, case.k)
        record("batch_omp B-form", first, steady, bc, model_omp_seconds(case, mach, "bform"), **extra)

    def update() -> None:
        S = random_codes(case)
        _, first, steady = timed_twice(lambda: update_dictionary(Y, D, S, dict_update="power", power_iterations=8)[0])
        record("update_dictionary power 8", first, steady, case.n, model_update_seconds(case, mach),
               seconds_per_atom=steady / case.k)

    attempt("batch_omp_gemm inverse highest", lambda: gemm("highest"))
    attempt("batch_omp_gemm inverse tf32", lambda: gemm("tf32"))
    attempt("update_dictionary power 8", update)
    attempt("batch_omp B-form", bform)
    attempt("batch_omp_gemm inverse bf16x3", lambda: gemm("bf16x3"))
    if case.solve:
        attempt("batch_omp_gemm solve highest", lambda: gemm("highest", "solve"))


def print_summary(results: list[dict[str, Any]], mach: proj.Machine, cases: list[Case]) -> dict[str, Any]:
    """Measured vs model table and the projected Llama-3.2-1B T = 60 total from the measured factors."""
    print("\n## Measured beside the projection (one OMP pass / one update, all n columns, seconds)")
    print("| case | item | measured | model | measured / model | first call (compile + run) | supports = highest |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | {r['item']} | failed: {r['error'][:80]} | | | | |")
            continue
        agree = r.get("identical_supports_vs_highest", r.get("identical_supports_vs_gemm_highest"))
        agree_s = f"{100 * agree:.1f} %" if agree is not None else ""
        print(f"| {r['case']} | {r['item']} | {r['full_matrix_s']:.3f} | {r['model_s']:.3f} "
              f"| {r['measured_over_model']:.2f} | {r['first_call_s']:.1f} | {agree_s} |")
    # Factors from the largest case (the gate/up shape dominates the model's total: 85 % of the OMP time).
    big = cases[-1].name
    factor = {r["item"]: r["measured_over_model"] for r in results if r["case"] == big and "error" not in r}
    upd = factor.get("update_dictionary power 8")
    args = argparse.Namespace(ratio=0.2, rho=2.0, iterations=60, power=8)
    kw = {"ratio": args.ratio, "rho": args.rho, "iterations": args.iterations, "power": args.power}
    model = proj.project(proj.LLAMA32_1B, mach, **kw)
    print(f"\n## Llama-3.2-1B, T = 60, on this device ({mach.name} model), minutes: model vs measured rates")
    print("(measured rates = the model's per-matrix times × measured/model of the "
          f"{big} shape, per phase; collection, whitening and K-SVD GEMMs from the model)")
    print("| OMP | model OMP | model total | measured/model OMP | measured/model update | total at measured rates "
          "| ÷ paper's 646.8 A100-min |")
    print("|---|---|---|---|---|---|---|")
    summary: dict[str, Any] = {}
    for label, item, key in (("GEMM form, highest", "batch_omp_gemm inverse highest", "f32_highest"),
                             ("GEMM form, bf16x3", "batch_omp_gemm inverse bf16x3", "bf16x3"),
                             ("GEMM form, tf32", "batch_omp_gemm inverse tf32", "tf32"),
                             ("B-form", "batch_omp B-form", None)):
        f_omp = factor.get(item)
        m_omp = model["omp_gemm"][key] if key else model["omp"]
        m_tot = model["total_gemm"][key] if key else model["total"]
        if f_omp is None or upd is None:
            print(f"| {label} | {m_omp / 60:.1f} | {m_tot / 60:.1f} | not measured | {upd if upd else 'not measured'} | | |")
            continue
        scaled = proj.project(proj.LLAMA32_1B, mach, scale={"omp": f_omp, "update": upd}, **kw)
        tot = scaled["total_gemm"][key] if key else scaled["total"]
        summary[label] = {"model_total_min": m_tot / 60, "measured_rate_total_min": tot / 60,
                          "omp_factor": f_omp, "update_factor": upd}
        print(f"| {label} | {m_omp / 60:.1f} | {m_tot / 60:.1f} | {f_omp:.2f} | {upd:.2f} | **{tot / 60:.1f}** "
              f"| {tot / 60 / proj.PAPER_A100_MIN['total']:.2f} |")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (proves the script works)")
    ap.add_argument("--budget-s", type=float, default=None, help="deadline for starting items (default 240, smoke 50)")
    ap.add_argument("--json", default=None, help="write results here (default: $OUT/device_check.json if $OUT is set)")
    args = ap.parse_args()
    clock = Clock(args.budget_s if args.budget_s is not None else (50.0 if args.cpu_smoke else 240.0))
    dev = jax.devices()[0]
    if not args.cpu_smoke and dev.platform == "cpu":
        print("No accelerator visible to JAX (jax.devices() is the CPU). Use --cpu-smoke for the CPU run; see "
              "benchmarks/device_check.sh for the wheels to carry.", file=sys.stderr)
        return 3
    mach, note = match_machine(dev)
    if not args.cpu_smoke:
        mach = dataclasses.replace(mach, omp_budget=None)  # 25 % of device memory, as batch_omp_gemm's default
    print(f"# device_check {datetime.datetime.now():%Y-%m-%d %H:%M}  host {platform.node()}  python "
          f"{platform.python_version()}  jax {jax.__version__}  backend {jax.default_backend()}")
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:
        pass
    print(f"# device {dev} kind {getattr(dev, 'device_kind', '?')!r}  devices {jax.device_count()}  memory_stats "
          f"bytes_limit {(stats or {}).get('bytes_limit')}  chunk budget {default_memory_budget() / 2**30:.2f} GiB")
    print(f"# compared with the projection's machine: {note}")
    results: list[dict[str, Any]] = []
    cases = SMOKE_CASES if args.cpu_smoke else GPU_CASES
    for case in cases:
        run_case(case, mach, clock, results)
    summary = print_summary(results, mach, cases)
    print(f"\n# total {clock.elapsed():.0f} s; skipped: {clock.skipped or 'none'}")
    out_path = args.json or (os.path.join(os.environ["OUT"], "device_check.json") if os.environ.get("OUT") else None)
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
                       "device": str(dev), "device_kind": getattr(dev, "device_kind", None), "machine_model": mach.name,
                       "results": results, "summary": summary, "skipped": clock.skipped,
                       "elapsed_s": clock.elapsed()}, f, indent=1, default=str)
        print(f"# results written to {out_path}")
    failed = [r for r in results if "error" in r]
    return 1 if failed and all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
