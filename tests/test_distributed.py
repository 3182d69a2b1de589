"""Sharded compression (cospadi_jax.parallel, cospadi_jax.sparse.sharded) equals the single-device run.

The device-count-dependent parts run in subprocesses (tests/_distributed_worker.py) so this
pytest process keeps its own single CPU device:
* 1 process x 8 virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8);
* 2 processes x 4 CPU devices through jax.distributed on localhost (gloo collectives).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import _distributed_worker as worker
import numpy as np
import pytest
from helpers import free_port, run_peer_processes, subprocess_env

WORKER = Path(__file__).with_name("_distributed_worker.py")
TIMEOUT_S = 480  # generous: a loaded 2-core CI box; a hang still fails, after this long


@pytest.fixture(scope="module")
def single8(tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("dist") / "single.npz"
    proc = subprocess.run(
        [sys.executable, str(WORKER), "single", str(out)],
        check=False, env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def reference_omp():
    """Single-process, single-device Batch-OMP of the worker's problem (computed in this process)."""
    from cospadi_jax.sparse.omp import batch_omp

    _, _, G, C = worker.make_problem()
    codes = batch_omp(G, C, worker.S)
    return {k: np.asarray(v) for k, v in codes._asdict().items()}


def test_sharding_rules_and_mesh():
    import jax
    from jax.sharding import PartitionSpec as P

    from cospadi_jax import parallel as dist

    assert isinstance(dist.SHARDING_RULES, dist.ShardingRules)
    assert {f.name for f in dataclasses.fields(dist.SHARDING_RULES)} >= {"columns", "batch", "atoms", "features",
                                                                        "params"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        dist.SHARDING_RULES.params = "data"  # a value: change the layout with use_rules, not by mutation
    assert dist.logical_spec("features", "columns") == P(None, "data")
    mesh = dist.make_mesh()
    assert mesh.devices.size == jax.device_count() and mesh.axis_names == ("data",)
    assert dist.logical_sharding(mesh, "columns", None).spec == P("data", None)
    with pytest.raises(KeyError, match="unknown logical axis"):
        dist.logical_spec("heads")
    with pytest.raises(ValueError, match="logical axis 'columns' to mesh axis 'data'"):
        dist.logical_sharding(dist.make_mesh(axis_name="x"), "columns")
    # Single process, no env: initialize is a no-op and this process is the primary.
    assert not any(os.environ.get(v) for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"))
    assert dist.initialize() is False and dist.is_primary()


def test_sharding_rules_collisions_and_scope():
    """Two dimensions of one array on one mesh axis, or a rule naming a mesh axis the mesh lacks, is an error."""
    from jax.sharding import PartitionSpec as P

    from cospadi_jax import parallel as dist
    from cospadi_jax.parallel.mesh import n_shards

    # columns and batch both map to "data": an array cannot be split over one mesh axis twice.
    with pytest.raises(ValueError, match="'columns' and 'batch' both map to mesh axis 'data'"):
        dist.logical_spec("columns", "batch")
    with pytest.raises(ValueError, match="'columns' and 'columns' both map to mesh axis 'data'"):
        dist.logical_sharding(dist.make_mesh(), "columns", "columns")
    assert dist.logical_spec("atoms", "atoms") == P(None, None)  # replicated dimensions never collide
    # A tuple of mesh axes collides with either of its members.
    two = dist.ShardingRules(columns=("data", "model"), features="model")
    with pytest.raises(ValueError, match="'columns' and 'features' both map to mesh axis 'model'"):
        dist.logical_spec("columns", "features", rules=two)
    # A rule naming a mesh axis that the mesh lacks: clear error when the sharding (or shard count) is built.
    fsdp = dataclasses.replace(dist.SHARDING_RULES, params="model")
    assert dist.logical_spec("params", None, rules=fsdp) == P("model", None)
    with pytest.raises(ValueError, match="logical axis 'params' to mesh axis 'model'.*axes \\('data',\\)"):
        dist.logical_sharding(dist.make_mesh(), "params", None, rules=fsdp)
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        n_shards(dist.make_mesh(), "params", fsdp)
    with pytest.raises(TypeError, match="sharding rule columns"):
        dist.ShardingRules(columns=3)
    with pytest.raises(ValueError, match="repeats a mesh axis"):
        dist.ShardingRules(columns=("data", "data"))
    # use_rules is scoped: the rules in force change inside the block only.
    assert dist.active_rules() is dist.SHARDING_RULES
    with dist.use_rules(fsdp):
        assert dist.active_rules() is fsdp and dist.logical_spec("params") == P("model")
    assert dist.active_rules() is dist.SHARDING_RULES and dist.logical_spec("params") == P(None)


def test_assign_units_round_robin():
    from cospadi_jax.parallel import assign_units

    shares = [assign_units(11, rank, 3) for rank in range(3)]
    assert shares[0] == [0, 3, 6, 9] and shares[2] == [2, 5, 8]
    assert sorted(i for s in shares for i in s) == list(range(11))
    assert assign_units(4) == [0, 1, 2, 3]  # one process owns everything
    with pytest.raises(ValueError, match="rank"):
        assign_units(4, 3, 3)


def test_sharded_omp_8_devices(single8):
    r = single8
    assert int(r["device_count"]) == 8 and int(r["omp_n_shards"]) == 8
    np.testing.assert_array_equal(r["omp_indices"], r["ref_omp_indices"])
    np.testing.assert_allclose(r["omp_values"], r["ref_omp_values"], rtol=0, atol=1e-5)
    assert int(r["omp_early"]) == int(r["ref_omp_early"])  # padding columns do not count
    # n a multiple of 8: the result stays column-sharded (304 / 8 = 38 rows per device).
    assert r["omp304_block_rows"].tolist() == [38]


@pytest.mark.parametrize("method", ["power", "mod"])
def test_sharded_ksvd_8_devices(single8, method):
    r = single8
    p, q = f"ref_ksvd_{method}_", f"ksvd_{method}_"
    np.testing.assert_array_equal(r[q + "indices"], r[p + "indices"])
    np.testing.assert_array_equal(r[q + "n_unused"], r[p + "n_unused"])
    np.testing.assert_allclose(r[q + "D"], r[p + "D"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(r[q + "S"], r[p + "S"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(r[q + "objective"], r[p + "objective"], rtol=1e-5)
    assert r[q + "objective"][-1] < r[q + "objective"][0]


def test_sharded_ksvd_snapshots_are_the_runs_at_their_T(single8):
    """method.ksvd_snapshots under parallel=columns: the padded columns are stripped from every snapshot too."""
    for t in (0, 1):
        for name in ("D", "S", "indices"):
            np.testing.assert_array_equal(single8[f"snapshot{t}_{name}"], single8[f"short{t}_{name}"])
        assert single8[f"snapshot{t}_S"].shape[1] == single8[f"snapshot{t}_indices"].shape[0] == worker.N


def test_sharded_update_dictionary_8_devices(single8):
    r = single8
    assert str(r["upd_S_spec"]) == "(None, 'data')"
    assert int(r["upd_all_reduce"]) >= 1 and int(r["upd_all_gather"]) == 0
    np.testing.assert_allclose(r["upd_D"], r["ref_upd_D"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(r["upd_S"], r["ref_upd_S"], rtol=0, atol=1e-4)


def test_map_units_union_equals_sequential(single8):
    r = single8
    for i in range(worker.N_UNITS):
        np.testing.assert_array_equal(r[f"unit{i}_indices"], r[f"seq_unit{i}_indices"])
        np.testing.assert_allclose(r[f"unit{i}_D"], r[f"seq_unit{i}_D"], rtol=0, atol=1e-6)


def test_first_collective_survives_a_primary_busy_past_the_gloo_connect_timeout(tmp_path):
    """initialize() connects gloo while the processes are in step. Without that, the first collective after 40 s of
    primary-only work (the fitting-time probe of a grouped run) failed: gloo gives up connecting after 30 s."""
    port = free_port()
    outs = [tmp_path / f"late{i}.npz" for i in range(2)]
    run_peer_processes(
        [[sys.executable, str(WORKER), "late_primary", str(outs[i]), f"127.0.0.1:{port}", "2", str(i), "40"]
         for i in range(2)],
        [subprocess_env(JAX_NUM_CPU_DEVICES="1")] * 2, timeout=TIMEOUT_S)
    assert all(bool(np.load(o)["agreed"]) for o in outs)


def test_two_processes_jax_distributed(tmp_path, reference_omp):
    """2 processes x 4 CPU devices via jax.distributed on localhost agree with one process."""
    port = free_port()
    outs = [tmp_path / f"rank{i}.npz" for i in range(2)]
    run_peer_processes(
        [[sys.executable, str(WORKER), "multi", str(outs[i]), f"127.0.0.1:{port}", "2", str(i)] for i in range(2)],
        [subprocess_env(JAX_NUM_CPU_DEVICES="4")] * 2, timeout=TIMEOUT_S)
    res = [dict(np.load(o)) for o in outs]
    ref = reference_omp
    for rank, r in enumerate(res):
        assert int(r["process_index"]) == rank and int(r["process_count"]) == 2
        assert int(r["device_count"]) == 8 and int(r["local_device_count"]) == 4
        assert bool(r["is_primary"]) == (rank == 0)
        np.testing.assert_array_equal(r["indices"], ref["indices"])
        np.testing.assert_array_equal(r["n_nonzero"], ref["n_nonzero"])
        np.testing.assert_allclose(r["values"], ref["values"], rtol=0, atol=1e-5)
        assert int(r["early"]) == int(ref["n_early_stopped"])
        # Column-sharded over both processes, gathered: padding columns are zero codes.
        assert not bool(r["addressable304"])
        np.testing.assert_array_equal(r["indices304"][: worker.N], ref["indices"])
    np.testing.assert_array_equal(res[0]["values"], res[1]["values"])
    # Column-parallel K-SVD over 2 processes equals single-process ksvd.
    from cospadi_jax.sparse.ksvd import ksvd

    _, Y, _, _ = worker.make_problem()
    kref = ksvd(Y, worker.K, worker.S, 2, key=3, dict_update="power")
    for r in res:
        np.testing.assert_array_equal(r["ksvd_indices"], np.asarray(kref.codes.indices))
        np.testing.assert_allclose(r["ksvd_D"], np.asarray(kref.dictionary), rtol=0, atol=1e-5)
        np.testing.assert_allclose(r["ksvd_objective"], kref.objective, rtol=1e-5)
    # Matrix-level: ranks own disjoint round-robin shares whose union is the sequential result.
    assert res[0]["units"].tolist() == [0, 2, 4] and res[1]["units"].tolist() == [1, 3]
    for i in range(worker.N_UNITS):
        r = res[i % 2]
        seq = worker.fit_unit(i, worker.make_units()[i])
        np.testing.assert_array_equal(r[f"unit{i}_indices"], seq["indices"])
        np.testing.assert_allclose(r[f"unit{i}_D"], seq["D"], rtol=0, atol=1e-6)


_COMPRESS_COLUMNS = """
import sys, numpy as np, jax
sys.path.insert(0, {tests!r})
from helpers import tiny_hf_config
from cospadi_jax.calib import collect_grams
from cospadi_jax.compress import compress
from cospadi_jax.models import get_module, random_model
assert jax.device_count() == 8
PROJS = {projs!r}
cfg = tiny_hf_config("llama_gqa", True)
model = random_model(cfg, seed=0)
grams = collect_grams(model, np.random.default_rng(0).integers(3, 96, size=(8, 32)).astype(np.int32), progress=False)
out = {{}}
for parallel in ("none", "columns", "matrices"):
    compressed, _ = compress(model, grams=grams, method="cospadi", ratio=0.3, ksvd_iterations=2, power_iterations=3,
                             layers=(1,), parallel=parallel, progress=False)
    for proj in PROJS:
        m = get_module(compressed, "model.layers.1." + proj)
        for name in ("D", "indices", "values"):
            out[parallel + "/" + proj + "/" + name] = np.asarray(getattr(m, name)[...])
np.savez({out_path!r}, **out)
"""


PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def test_compress_columns_and_matrices_over_8_devices_equal_single_device(tmp_path):
    """compress(parallel="columns") runs CoSpaDi's K-SVD column-sharded, parallel="matrices" spreads the 7 matrices
    over the 8 devices; both give the factors of the sequential single-device run."""
    out_path = tmp_path / "compress.npz"
    code = _COMPRESS_COLUMNS.format(tests=str(Path(__file__).parent), out_path=str(out_path), projs=PROJS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                          env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(out_path)
    for proj in PROJS:
        base, sharded, spread = f"none/{proj}/", f"columns/{proj}/", f"matrices/{proj}/"
        for name in ("D", "indices", "values"):  # same kernel per matrix, only on another device: bit-identical
            np.testing.assert_array_equal(data[spread + name], data[base + name], err_msg=f"matrices {proj}")
        np.testing.assert_array_equal(data[sharded + "indices"], data[base + "indices"], err_msg=proj)
        np.testing.assert_allclose(data[sharded + "D"], data[base + "D"], atol=1e-4, err_msg=proj)
        np.testing.assert_allclose(data[sharded + "values"], data[base + "values"], atol=1e-4, err_msg=proj)


def test_compress_matrices_over_2_processes_equals_single_process(tmp_path):
    """parallel="matrices" with 2 processes x 2 devices (jax.distributed, localhost): each process fits its
    round-robin share of the units into one shared artifact directory; both assemble the sequential result."""
    port = free_port()
    artifact = tmp_path / "artifact"
    outs = [tmp_path / f"compress{i}.npz" for i in range(2)]
    run_peer_processes(
        [[sys.executable, str(WORKER), "compress", str(outs[i]), f"127.0.0.1:{port}", "2", str(i), str(artifact)]
         for i in range(2)],
        [subprocess_env(JAX_NUM_CPU_DEVICES="2")] * 2, timeout=TIMEOUT_S)
    reference = worker.compress_tiny("none")
    n_units = len(reference) // 3
    for rank, out in enumerate(outs):
        got = dict(np.load(out))
        assert sorted(got) == sorted(reference)
        for name, value in reference.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"process {rank}: {name}")
    import json

    shares = [json.loads((artifact / f"progress.p{i}.json").read_text())["finished"] for i in range(2)]
    assert shares == [list(range(0, n_units, 2)), list(range(1, n_units, 2))]
    # Process 0's finalize() turned process 1's staged units into orbax: the artifact restores whole.
    from cospadi_jax.checkpoint import load_artifact

    assert not list(artifact.glob("units/*/*.npz"))
    factors, _ = load_artifact(artifact)
    for path, f in factors.items():
        for name in ("D", "indices", "values"):  # the artifact keeps float64; the model's layers hold float32
            expected = reference[f"{path}/{name}"]
            np.testing.assert_array_equal(np.asarray(getattr(f, name)).astype(expected.dtype), expected, err_msg=path)


def test_calibration_grams_shared_by_2_processes_equal_single_process(tmp_path):
    """Two processes forward 3 batches between them (round-robin: 4 + 2 windows and 4 windows), gather each batch's
    Gram and sum in batch order: both hold the single process's Grams bit for bit, having forwarded half the data."""
    from cospadi_jax.calib import collect_grams

    port = free_port()
    outs = [tmp_path / f"grams{i}.npz" for i in range(2)]
    run_peer_processes(
        [[sys.executable, str(WORKER), "grams", str(outs[i]), f"127.0.0.1:{port}", "2", str(i)] for i in range(2)],
        [subprocess_env(JAX_NUM_CPU_DEVICES="1")] * 2, timeout=TIMEOUT_S)
    model, windows, batch_size = worker.tiny_gram_problem()
    reference = collect_grams(model, windows, batch_size=batch_size, progress=False)
    expected = {**{f"gram::{p}": g for p, g in reference.by_path.items()},
                **{f"abs::{p}": a for p, a in reference.abs_sums.items()}}
    got = [dict(np.load(out)) for out in outs]
    assert [int(g.pop("windows_forwarded")) for g in got] == [6, 4]
    for rank, g in enumerate(got):
        assert int(g.pop("n_tokens")) == reference.n_tokens == windows.size
        assert sorted(g) == sorted(expected)
        for name, value in expected.items():
            assert g[name].dtype == np.float64
            np.testing.assert_array_equal(g[name], value, err_msg=f"process {rank}: {name}")


def test_hydra_app_two_processes_matrices_and_sharded_eval(tmp_path):
    """`python -m cospadi_jax.run method.parallel=matrices` launched as 2 processes x 2 devices (the same command
    on every process, as on a TPU pod): units spread over the processes, evaluation data-parallel over all 4
    devices, only process 0 writes metrics.json; the perplexity equals a single-process run's. The dense scores
    the single-process run cached are read by both processes, not re-evaluated."""
    from helpers import save_tiny_model_with_tokenizer

    tiny = save_tiny_model_with_tokenizer(tmp_path / "tiny", family="llama_gqa", tied=True, layers=2)

    def command(out):
        return [sys.executable, "-m", "cospadi_jax.run", f"model.spec={tiny}", "model.name=tiny",
                f"output_dir={out}", "logger.mode=disabled", "calib.nsamples=8", "calib.seqlen=32",
                "calib.heldout_nsamples=4", "calib.batch_size=4", "calib.cache_dir=null", "eval.seqlen=32",
                "eval.max_windows=6", f"eval.dense_cache_dir={tmp_path / 'dense'}", "method.ksvd_iterations=2",
                "method.power_iterations=2"]

    single = subprocess.run(command(tmp_path / "single"), cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                            timeout=TIMEOUT_S, check=False)
    assert single.returncode == 0, single.stderr[-4000:]
    assert len(list((tmp_path / "dense").glob("dense-*.json"))) == 1
    port = free_port()
    logs = run_peer_processes(
        [[*command(tmp_path / "multi"), "method.parallel=matrices"]] * 2,
        [subprocess_env(JAX_NUM_CPU_DEVICES="2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID=str(i)) for i in range(2)],
        timeout=TIMEOUT_S, cwd=str(tmp_path))
    assert all("dense baseline read from" in out for out in logs), [out[-2000:] for out in logs]
    import json

    multi = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    ref = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert multi["processes"] == 2 and multi["devices"] == 4 and ref["processes"] == 1
    assert multi["dense"] == ref["dense"]
    ppl = multi["compressed"]["perplexity"]["embedded:heldout"]["perplexity"]
    assert ppl == pytest.approx(ref["compressed"]["perplexity"]["embedded:heldout"]["perplexity"], rel=1e-5)
    assert [m["path"] for m in multi["matrices"]] == [m["path"] for m in ref["matrices"]]
    for a, b in zip(multi["matrices"], ref["matrices"]):
        assert a["functional_error_calib"] == pytest.approx(b["functional_error_calib"], rel=1e-6, abs=1e-9)
    # Both processes fitted a share; process 0's finalize() left an all-orbax artifact.
    assert (tmp_path / "multi" / "progress.p0.json").exists() and (tmp_path / "multi" / "progress.p1.json").exists()
    assert not list((tmp_path / "multi").glob("units/*/*.npz"))
