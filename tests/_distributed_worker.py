"""Worker for tests/test_distributed.py, run in a subprocess so the device count is its own.

    python tests/_distributed_worker.py single OUT.npz
        (env XLA_FLAGS=--xla_force_host_platform_device_count=8): one process, 8 CPU devices;
        writes single-device references and the sharded results.
    python tests/_distributed_worker.py multi OUT.npz COORDINATOR NUM_PROCESSES PROCESS_ID
        (env JAX_NUM_CPU_DEVICES=4): one process of a jax.distributed run; sharded OMP over all
        global devices, gathered to the host, plus this rank's share of independent units.
    python tests/_distributed_worker.py compress OUT.npz COORDINATOR NUM_PROCESSES PROCESS_ID ARTIFACT_DIR
        (env JAX_NUM_CPU_DEVICES=2): compress(parallel="matrices") of a tiny model across the processes.
    python tests/_distributed_worker.py grams OUT.npz COORDINATOR NUM_PROCESSES PROCESS_ID
        calibration Grams of a tiny model, the batches shared between the processes.
"""

from __future__ import annotations

import sys
import time

import numpy as np

# Problem sizes: tiny on purpose (the CI box has 2 cores). n = 301 is not a multiple of 8,
# so the padding path is exercised.
D_IN, K, N, S = 32, 48, 301, 6
N_UNITS, UNIT_N, UNIT_K, UNIT_S = 5, 64, 16, 3


def make_problem(seed: int = 0):
    """Unit-norm D [d, k], Y [d, n], Gram DᵀD [k, k], correlations DᵀY [k, n] (float32, float64 products)."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((D_IN, K))
    D /= np.linalg.norm(D, axis=0)
    Y = rng.standard_normal((D_IN, N))
    return D.astype(np.float32), Y.astype(np.float32), (D.T @ D).astype(np.float32), (D.T @ Y).astype(np.float32)


def make_units(seed: int = 1) -> list[np.ndarray]:
    """Independent fitting units (stand-ins for matrices / shared groups): targets [d, UNIT_N]."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((D_IN, UNIT_N)).astype(np.float32) for _ in range(N_UNITS)]


def fit_unit(index: int, Y: np.ndarray) -> dict[str, np.ndarray]:
    """What compress() does per unit, reduced: K-SVD with the unit's key folded from the seed."""
    import jax

    from cospadi_jax.sparse.ksvd import ksvd

    key = jax.random.fold_in(jax.random.key(42), index)
    res = ksvd(Y, UNIT_K, UNIT_S, 2, key=key)
    return {"D": np.asarray(res.dictionary), "indices": np.asarray(res.codes.indices)}


def run_single(out: str) -> None:
    import jax

    from cospadi_jax import parallel as dist
    from cospadi_jax.sparse import sharded
    from cospadi_jax.sparse.ksvd import ksvd
    from cospadi_jax.sparse.omp import batch_omp

    mesh = dist.make_mesh()
    D, Y, G, C = make_problem()
    res: dict[str, np.ndarray] = {"device_count": np.asarray(jax.device_count())}
    ref = batch_omp(G, C, S)  # uncommitted inputs: runs on one device
    sh = sharded.sharded_batch_omp(G, C, S, mesh)
    res.update(ref_omp_indices=ref.indices, ref_omp_values=ref.values, ref_omp_early=ref.n_early_stopped,
               omp_indices=sh.indices, omp_values=sh.values, omp_early=sh.n_early_stopped,
               omp_n_shards=np.asarray(len({s.device for s in sh.indices.addressable_shards})))
    # n = 304 (multiple of 8): the result stays column-sharded, one block per device.
    sh304 = sharded.sharded_batch_omp(G, np.pad(C, ((0, 0), (0, 3))), S, mesh)
    res["omp304_block_rows"] = np.asarray(sorted({s.data.shape[0] for s in sh304.indices.addressable_shards}))
    for method in ("power", "mod"):
        r = ksvd(Y, K, S, 2, key=3, dict_update=method)
        q = sharded.sharded_ksvd(Y, K, S, 2, mesh, key=3, dict_update=method)
        for name, a, b in (("D", r.dictionary, q.dictionary), ("S", r.coefficients, q.coefficients),
                           ("indices", r.codes.indices, q.codes.indices), ("objective", r.objective, q.objective),
                           ("n_unused", r.n_unused_atoms, q.n_unused_atoms)):
            res[f"ref_ksvd_{method}_{name}"] = np.asarray(a)
            res[f"ksvd_{method}_{name}"] = np.asarray(b)
    # Snapshots of the sharded K-SVD (n padded to the device count): each equal to the sharded run at that T.
    long = sharded.sharded_ksvd(Y, K, S, 2, mesh, key=3, snapshots=[0, 1])
    for t in (0, 1):
        short = sharded.sharded_ksvd(Y, K, S, t, mesh, key=3)
        for name, a, b in (("D", long.snapshots[t].dictionary, short.dictionary),
                           ("S", long.snapshots[t].coefficients, short.coefficients),
                           ("indices", long.snapshots[t].codes.indices, short.codes.indices)):
            res[f"snapshot{t}_{name}"], res[f"short{t}_{name}"] = np.asarray(a), np.asarray(b)
    # Dictionary update alone on n = 304 columns (already a multiple of 8): stays column-sharded.
    from cospadi_jax.sparse.ksvd import update_dictionary

    Yp = np.pad(Y, ((0, 0), (0, 3)))
    Sd = np.asarray(batch_omp(G, D.T @ Yp, S).to_dense(K))
    D_ref, S_ref, _ = update_dictionary(Yp, D, Sd, dict_update="power")
    D_sh, S_sh, _ = sharded.sharded_update_dictionary(Yp, D, Sd, mesh, dict_update="power")
    # GSPMD must keep the update column-parallel: reductions (all-reduce), never a gather of Y or S.
    Yg = jax.device_put(Yp, dist.logical_sharding(mesh, "features", "columns"))
    Sg = jax.device_put(Sd, dist.logical_sharding(mesh, "atoms", "columns"))
    Dg = jax.device_put(D, dist.logical_sharding(mesh, "features", "atoms"))
    hlo = sharded._update_fn(mesh, dist.SHARDING_RULES, "power", 8, "skip").lower(Yg, Dg, Sg).compile().as_text()
    res["upd_all_reduce"] = np.asarray(hlo.count("all-reduce("))
    res["upd_all_gather"] = np.asarray(hlo.count("all-gather("))
    res.update(ref_upd_D=D_ref, ref_upd_S=S_ref, upd_D=D_sh, upd_S=S_sh,
               upd_S_spec=np.asarray(str(tuple(S_sh.sharding.spec))))
    # Matrix-level: two simulated ranks each fit their round-robin share on their devices.
    units = make_units()
    merged = {}
    for rank in range(2):
        merged.update(dist.map_units(fit_unit, units, rank=rank, world=2, concurrent=True))  # the threaded path
    for i in range(N_UNITS):
        seq = fit_unit(i, units[i])
        res[f"unit{i}_D"], res[f"unit{i}_indices"] = merged[i]["D"], merged[i]["indices"]
        res[f"seq_unit{i}_D"], res[f"seq_unit{i}_indices"] = seq["D"], seq["indices"]
    np.savez(out, **{k: np.asarray(v) for k, v in res.items()})


def run_multi(out: str, coordinator: str, num_processes: int, process_id: int) -> None:
    from cospadi_jax import parallel as dist
    from cospadi_jax.sparse import sharded

    assert dist.initialize(coordinator, num_processes, process_id), "jax.distributed did not start"
    import jax

    mesh = dist.make_mesh()
    _, _, G, C = make_problem()
    sh = sharded.sharded_batch_omp(G, C, S, mesh)
    res = {
        "process_index": np.asarray(jax.process_index()),
        "process_count": np.asarray(jax.process_count()),
        "device_count": np.asarray(jax.device_count()),
        "local_device_count": np.asarray(jax.local_device_count()),
        "is_primary": np.asarray(dist.is_primary()),
        "indices": dist.to_host(sh.indices),
        "values": dist.to_host(sh.values),
        "n_nonzero": dist.to_host(sh.n_nonzero),
        "early": dist.to_host(sh.n_early_stopped),
    }
    # Column-sharded result on n = 304 (no stripping): each process holds only its own blocks.
    sh304 = sharded.sharded_batch_omp(G, np.pad(C, ((0, 0), (0, 3))), S, mesh)
    res["indices304"] = dist.to_host(sh304.indices)
    res["addressable304"] = np.asarray(sh304.indices.is_fully_addressable)
    # Column-parallel K-SVD across both processes (gloo all-reduces in the dictionary update).
    _, Y, _, _ = make_problem()
    q = sharded.sharded_ksvd(Y, K, S, 2, mesh, key=3, dict_update="power")
    res.update(ksvd_D=dist.to_host(q.dictionary), ksvd_indices=dist.to_host(q.codes.indices),
               ksvd_objective=q.objective)
    units = make_units()
    mine = dist.map_units(fit_unit, units)
    res["units"] = np.asarray(sorted(mine))
    for i, r in mine.items():
        res[f"unit{i}_D"], res[f"unit{i}_indices"] = r["D"], r["indices"]
    np.savez(out, **res)


def compress_tiny(parallel: str, artifact: str | None = None, finalize: bool = False) -> dict[str, np.ndarray]:
    """compress() a tiny random Llama (2 layers, CoSpaDi, T = 2): {path/D|indices|values: array}."""
    from helpers import tiny_hf_config

    from cospadi_jax.calib import collect_grams
    from cospadi_jax.checkpoint import ArtifactWriter
    from cospadi_jax.compress import compress
    from cospadi_jax.models import get_module, random_model

    model = random_model(tiny_hf_config("llama_gqa", True), seed=0)
    tokens = np.random.default_rng(0).integers(3, 96, size=(8, 32)).astype(np.int32)
    grams = collect_grams(model, tokens, progress=False)
    writer = ArtifactWriter(artifact, {"config_fingerprint": "tiny"}) if artifact else None
    compressed, report = compress(model, grams=grams, method="cospadi", ratio=0.3, ksvd_iterations=2,
                                  power_iterations=3, parallel=parallel, artifact=writer, progress=False)
    if finalize:
        writer.finalize(report.to_dict())
    out = {}
    for row in report.matrices:
        m = get_module(compressed, row.path)
        for name in ("D", "indices", "values"):
            out[f"{row.path}/{name}"] = np.asarray(getattr(m, name)[...])
    return out


def run_compress(out: str, coordinator: str, num_processes: int, process_id: int, artifact: str) -> None:
    from cospadi_jax import parallel as dist

    assert dist.initialize(coordinator, num_processes, process_id), "jax.distributed did not start"
    import jax

    np.savez(out, **compress_tiny("matrices", artifact, finalize=jax.process_index() == 0))


def tiny_gram_problem():
    """A tiny random Llama and 10 windows of 32 tokens in batches of 4: 3 batches, the last one short."""
    from helpers import tiny_hf_config

    from cospadi_jax.models import random_model

    model = random_model(tiny_hf_config("llama_gqa", True), seed=0)
    return model, np.random.default_rng(1).integers(3, 96, size=(10, 32)).astype(np.int32), 4


def run_grams(out: str, coordinator: str, num_processes: int, process_id: int) -> None:
    """collect_grams across the processes; also records how many windows this process forwarded."""
    from cospadi_jax import parallel as dist

    assert dist.initialize(coordinator, num_processes, process_id), "jax.distributed did not start"
    from cospadi_jax.calib import grams as grams_module

    forwarded = []
    embed = grams_module.embed_batches

    def counting_embed(*args, **kwargs):
        batches = embed(*args, **kwargs)
        forwarded.extend(len(b) for b in batches)
        return batches

    grams_module.embed_batches = counting_embed
    model, windows, batch_size = tiny_gram_problem()
    grams = grams_module.collect_grams(model, windows, batch_size=batch_size, progress=False)
    np.savez(out, windows_forwarded=np.asarray(sum(forwarded)), n_tokens=np.asarray(grams.n_tokens),
             **{f"gram::{p}": g for p, g in grams.by_path.items()},
             **{f"abs::{p}": a for p, a in grams.abs_sums.items()})


def run_late_primary(out: str, coordinator: str, num_processes: int, process_id: int, busy_s: float) -> None:
    """The primary computes alone for ``busy_s`` before the first collective of the run; its peer waits there."""
    from cospadi_jax import parallel as dist

    assert dist.initialize(coordinator, num_processes, process_id), "jax.distributed did not start"
    import jax.numpy as jnp

    if dist.is_primary():
        a, t0 = jnp.ones((512, 512)), time.perf_counter()
        while time.perf_counter() - t0 < busy_s:
            a = (a @ a / 512.0).block_until_ready()
    np.savez(out, agreed=np.asarray(dist.on_every_process(True)))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "single":
        run_single(out)
    elif mode == "multi":
        run_multi(out, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "grams":
        run_grams(out, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "compress":
        run_compress(out, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    elif mode == "late_primary":
        run_late_primary(out, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
    else:
        raise SystemExit(f"unknown mode {mode!r}; use single, multi, grams, compress or late_primary")
