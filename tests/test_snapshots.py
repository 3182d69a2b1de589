"""K-SVD snapshots (method.ksvd_snapshots): each snapshot of a run at T is the result of the run at T = t, bit
for bit, in the engine (every backend), through compress() and its artifacts, and through the Hydra app."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_hf_config
from test_run import _compose, _overrides, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

import cospadi_jax.run as run_app
from cospadi_jax.calib import collect_grams
from cospadi_jax.checkpoint import ArtifactWriter, load_artifact
from cospadi_jax.compress import compress
from cospadi_jax.identity import artifact_identity, run_identity
from cospadi_jax.methods import method_config
from cospadi_jax.models import random_model
from cospadi_jax.sparse import ksvd

SNAPSHOTS = (0, 1, 3)


def _same_state(snap, run):
    np.testing.assert_array_equal(np.asarray(snap.dictionary), np.asarray(run.dictionary))
    np.testing.assert_array_equal(np.asarray(snap.coefficients), np.asarray(run.coefficients))
    for a, b in zip(snap.codes, run.codes):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(snap.objective, run.objective)
    np.testing.assert_array_equal(snap.n_unused_atoms, run.n_unused_atoms)


@pytest.mark.parametrize("options", [dict(omp_backend="xla"), dict(omp_backend="cpu_kernel"),
                                     dict(omp_backend="xla", dict_update="exact"), dict(sparse_coder="ormp")],
                         ids=["xla-power", "cpu_kernel-power", "xla-exact", "ormp"])
def test_each_snapshot_is_the_run_at_that_T(options):
    Y = np.random.default_rng(0).standard_normal((24, 200)).astype(np.float32)
    long = ksvd(Y, 32, 4, 5, key=7, power_iterations=3, snapshots=SNAPSHOTS, **options)
    assert sorted(long.snapshots) == list(SNAPSHOTS)
    for t in SNAPSHOTS:
        _same_state(long.snapshots[t], ksvd(Y, 32, 4, t, key=7, power_iterations=3, **options))
    assert not ksvd(Y, 32, 4, 2, key=7, power_iterations=3, **options).snapshots  # none asked for, none kept


@pytest.mark.parametrize("bad", [[5], [-1], [1, 1], [True], [2.0]])
def test_bad_snapshots_are_refused(bad):
    Y = np.random.default_rng(0).standard_normal((8, 40))
    with pytest.raises(ValueError, match="ksvd_snapshots must be distinct iteration counts"):
        ksvd(Y, 10, 2, 5, snapshots=bad)
    with pytest.raises(ValueError, match="ksvd_snapshots"):
        method_config("cospadi", ksvd_iterations=5, ksvd_snapshots=bad).validate()


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_hf_config("qwen2_bias", False)
    cfg.num_hidden_layers = 2
    model = random_model(cfg, seed=0)
    windows = np.random.default_rng(0).integers(3, 96, size=(8, 32)).astype(np.int32)
    return model, collect_grams(model, windows, batch_size=4, progress=False)


def _artifact(path, config):
    metadata = {"config": config, "identity": artifact_identity(config)}
    return ArtifactWriter(path, metadata, identity_of=lambda m: artifact_identity(m["config"]))


def test_snapshot_artifacts_equal_runs_at_their_T(tiny, tmp_path):
    """compress() at T = 3 with snapshots (grouped units of m = 2, quantised values): every snapshot artifact holds
    the factors and report rows of the run at T = t, and is resumable as that run."""
    model, grams = tiny
    knobs = dict(method="cospadi", ratio=0.3, power_iterations=2, group_size=2, progress=False, grams=grams,
                 quantization="bf16-14bit")
    config = {"method": {"name": "cospadi", "ksvd_iterations": 3, "ksvd_snapshots": [0, 2], "group_size": 2}}
    artifact = _artifact(tmp_path / "long", config)
    compress(model, ksvd_iterations=3, ksvd_snapshots=[0, 2], artifact=artifact, **knobs)
    for t in (0, 2):
        snap = artifact.snapshot(t)
        assert snap.directory == tmp_path / "long" / "snapshots" / f"T{t}"
        assert snap.metadata["config"]["method"]["ksvd_iterations"] == t
        assert snap.metadata["config"]["method"]["ksvd_snapshots"] == []
        short = _artifact(tmp_path / f"T{t}", snap.metadata["config"])
        _, report = compress(model, ksvd_iterations=t, artifact=short, **knobs)
        got, want = snap.finished_units(), short.finished_units()
        assert sorted(got) == sorted(want) == list(range(report.units))
        for i in want:
            for f, g in zip(got[i][0], want[i][0]):
                for name in ("D", "indices", "values"):
                    np.testing.assert_array_equal(getattr(f, name), getattr(g, name))
            for r, q in zip(got[i][1], want[i][1]):
                drop = ("seconds", "phase_seconds", "info")
                assert {k: v for k, v in r.items() if k not in drop} == {k: v for k, v in q.items() if k not in drop}
    # The snapshot's identity is the short run's: a run at T = t resumes into it (and reuses every unit).
    _, resumed = compress(model, ksvd_iterations=2, artifact=_artifact(snap.directory, snap.metadata["config"]),
                          **knobs)
    assert resumed.units_reused == resumed.units


def test_snapshots_need_an_artifact_and_refuse_levers_that_break_them(tiny):
    model, grams = tiny
    knobs = dict(method="cospadi", ratio=0.3, ksvd_iterations=2, ksvd_snapshots=[1], power_iterations=2,
                 progress=False, grams=grams)
    with pytest.raises(ValueError, match="artifacts of their own: pass artifact="):
        compress(model, **knobs)
    from cospadi_jax.allocation import AllocationConfig
    from cospadi_jax.refine import RefineConfig

    with pytest.raises(ValueError, match="would be no run's result"):
        compress(model, refine=RefineConfig(steps=2), windows=np.zeros((2, 8), np.int32), **knobs)
    with pytest.raises(ValueError, match="would be no run's result"):
        compress(model, allocation=AllocationConfig(allocation="greedy"), **knobs)
    from cospadi_jax.sources import ModelLayerSource

    with pytest.raises(ValueError, match="keeps one layer resident, so it takes no method.ksvd_snapshots"):
        compress(ModelLayerSource(model), windows=np.zeros((2, 8), np.int32), budget_gib=1.0,
                 config=method_config("cospadi", ratio=0.3, ksvd_iterations=2, ksvd_snapshots=[1]))


def test_app_evaluates_each_snapshot_as_its_own_run(tiny_dir, tmp_path):  # noqa: F811
    """The Hydra app writes snapshots/T<t>/metrics.json with the config, rows and scores of the run at T = t, whose
    identity is the plain run's at that T; a run without snapshots keeps its identity (no ksvd_snapshots key)."""
    out = tmp_path / "run"
    overrides = _overrides(tiny_dir, out, "method.ksvd_snapshots=[0,1]", "eval.dense_baseline=false")
    metrics = run_app.execute(_compose(overrides))
    assert [s["ksvd_iterations"] for s in metrics["snapshots"]] == [0, 1]
    for t in (0, 1):
        saved = json.loads((out / "snapshots" / f"T{t}" / "metrics.json").read_text())
        assert saved["config"]["method"]["ksvd_iterations"] == t and saved["config"]["method"]["ksvd_snapshots"] == []
        assert len(saved["matrices"]) == 14 and all(len(m["objective"]) == t + 1 for m in saved["matrices"])
        assert metrics["snapshots"][t]["scores"]["ppl/embedded:heldout"] == \
            saved["compressed"]["perplexity"]["embedded:heldout"]["perplexity"]
        factors, _ = load_artifact(out / "snapshots" / f"T{t}")
        assert len(factors) == 14
        plain = {**metrics["config"], "method": {**metrics["config"]["method"], "ksvd_iterations": t,
                                                 "ksvd_snapshots": []}}
        assert run_identity(saved["config"]) == run_identity(plain)
        assert "method.ksvd_snapshots" not in run_identity(plain)
    assert run_identity(metrics["config"])["method.ksvd_snapshots"] == [0, 1]
