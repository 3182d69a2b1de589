"""The Hydra app end to end on a tiny model: metrics, artifacts, evaluate, plot, crash-safe resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import save_tiny_model_with_tokenizer
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

import cospadi_jax.run as run_app
from cospadi_jax.budget import budget
from cospadi_jax.checkpoint import ConfigMismatchError, load_artifact

CONF = str(Path(run_app.__file__).parent / "conf")  # shipped inside the package


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny"), family="qwen2_bias", tied=False,
                                          layers=2)


def _overrides(tiny_dir, out, *extra):
    """A fast tiny-model job; CoSpaDi (the default method) at 2 K-SVD and 2 power iterations. A ``method=...``
    in ``extra`` picks another method (and drops the K-SVD knobs, which low-rank methods do not have)."""
    method = next((e.split("=", 1)[1] for e in extra if e.startswith("method=")), "cospadi")
    ksvd = ["method.ksvd_iterations=2", "method.power_iterations=2"] if method.startswith("cospadi") else []
    return [f"model.spec={tiny_dir}", "model.name=tiny", f"output_dir={out}", "logger.mode=offline",
            "calib.nsamples=8", "calib.seqlen=32", "calib.heldout_nsamples=4", "calib.batch_size=4",
            f"calib.cache_dir={out}/../gram-cache", f"eval.dense_cache_dir={out}/../dense-cache", "eval.seqlen=32",
            "eval.max_windows=4", *ksvd, *extra]


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_compress_job_writes_metrics_artifact_and_wandb(tiny_dir, tmp_path, caplog, capsys):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="cospadi_jax"):
        metrics = run_app.execute(_compose(_overrides(tiny_dir, out)))
    assert "estimated fitting time" in caplog.text and "for 14 units (T = 2" in caplog.text
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("config", "realised_ratio", "dense", "compressed", "matrices", "timings", "git_sha", "versions",
                "calibration_key", "host"):
        assert key in saved, key
    assert saved["host"]["cpu_count"] == os.cpu_count() and "xla_flags" in saved["host"]
    assert saved["config"]["method"]["ratio"] == 0.2
    spent = sum(budget(m["d_in"], m["d_out"], 0.2).total_bytes for m in saved["matrices"])
    assert saved["realised_ratio"] == pytest.approx(1 - spent / sum(2 * m["dense_params"] for m in saved["matrices"]))
    assert len(saved["matrices"]) == 2 * 7 and saved["versions"]["jax"]
    assert saved["calibration_key"]["nsamples"] == 8
    # the resolved Batch-OMP backend (auto -> the fused CPU kernel here) and the time per phase are recorded
    assert saved["config"]["method"]["omp_backend"] == "auto"
    assert saved["engine"]["omp_backend"] == "cpu_kernel" and saved["engine"]["phase_seconds"]["omp"] > 0
    assert {m["omp_backend"] for m in saved["matrices"]} == {"cpu_kernel"}
    assert (out / "wandb").exists()  # offline wandb run, no network needed
    # the artifact restores into a model with the same perplexity, without recompressing
    evaluated = run_app.execute(_compose(_overrides(tiny_dir, out, "task=evaluate", f"artifact={out}")))
    ours = metrics["compressed"]["perplexity"]["embedded:heldout"]["perplexity"]
    assert evaluated["compressed"]["perplexity"]["embedded:heldout"]["perplexity"] == pytest.approx(ours, rel=1e-6)
    assert evaluated["eval"] == saved["config"]["eval"]  # the artifact's own evaluation settings
    assert [p.name for p in out.glob("evaluation-*.json")] and not (out / "evaluation.json").exists()
    # task=generate streams the compressed model's greedy continuation (python -m cospadi_jax.generate)
    from cospadi_jax.checkpoint import restore_model
    from cospadi_jax.generate import _shorthand
    from cospadi_jax.models.generation import Generator

    prompt = _shorthand("prompt=In the beginning, God: one; two").partition("=")[2]
    generated = run_app.execute(_compose(_overrides(tiny_dir, out, "task=generate", f"artifact={out}",
                                                    f"generate.prompt={prompt}", "generate.max_new_tokens=6",
                                                    "generate.mode=sparse")))
    model, tok, _ = restore_model(out, mode="sparse")
    ids = tok("In the beginning, God: one; two", add_special_tokens=False)["input_ids"]
    expected = Generator(model).generate([ids], 6, eos_token_ids=[tok.eos_token_id])[0]
    assert generated["tokens"] == [t for t in expected if t != tok.eos_token_id]
    assert generated["text"] in capsys.readouterr().out
    # and the plot task draws it
    plotted = run_app.execute(_compose(_overrides(tiny_dir, out, "task=plot", f"results_glob={out}/metrics.json",
                                                  f"plot_dir={tmp_path / 'plots'}")))
    assert any(f.endswith(".png") for f in plotted["figures"]) and any(f.endswith(".svg") for f in plotted["figures"])
    assert "tiny" in Path(plotted["table"]).read_text()


def _run_cli(tiny_dir, out, *extra, env=None):
    cmd = [sys.executable, "-m", "cospadi_jax.run", *_overrides(tiny_dir, out, *extra), "eval.dense_baseline=false"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tiny_dir, tmp_path):
    """SIGKILL mid-way, restart with the same config: continues from the last finished unit, same factors."""
    extra = ["method.ksvd_iterations=6", "logger.mode=disabled"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    reference = _run_cli(tiny_dir, tmp_path / "ref", *extra, env=env)
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()[-2000:]

    out = tmp_path / "killed"
    proc = _run_cli(tiny_dir, out, *extra, env=env)
    progress, finished = out / "progress.json", []
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if progress.exists():
            finished = json.loads(progress.read_text())["finished"]
            if len(finished) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "report.json").exists() and 2 <= len(finished) < 14

    resumed = _run_cli(tiny_dir, out, *extra, env=env)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    ref_factors, _ = load_artifact(tmp_path / "ref")
    got_factors, _ = load_artifact(out)
    assert ref_factors.keys() == got_factors.keys() and len(got_factors) == 14
    for path, ref in ref_factors.items():
        got = got_factors[path]
        for name in ("D", "indices", "values"):
            np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=f"{path}.{name}")
    ref_ppl = json.loads((tmp_path / "ref" / "metrics.json").read_text())["compressed"]["perplexity"]
    got_ppl = json.loads((out / "metrics.json").read_text())["compressed"]["perplexity"]
    assert ref_ppl == got_ppl


def test_bad_inputs(tiny_dir, tmp_path):
    with pytest.raises(ConfigCompositionException):  # wrong type for a typed key
        _compose(_overrides(tiny_dir, tmp_path / "a", "method.ratio=abc"))
    with pytest.raises(ConfigCompositionException):  # unknown key
        _compose(_overrides(tiny_dir, tmp_path / "a", "method.ratioo=0.3"))
    for bad, match in (("method.omp_backend=fast", "omp_backend must be one of"),
                       ("method.sparse_coder=lasso", "unknown sparse_coder 'lasso'"),
                       ("+method.ksvd_iteration=5", r"unknown key\(s\) \['method.ksvd_iteration'\]"),
                       ("method=svd_llm method.rho=2", None)):
        if match is None:  # a knob the method does not have: refused when composed
            with pytest.raises(ConfigCompositionException, match="rho"):
                _compose(_overrides(tiny_dir, tmp_path / "a", *bad.split()))
            continue
        with pytest.raises(ValueError, match=match):  # before any work
            run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "a", bad)))
        assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="ratio must be in"):  # impossible value, before any work
        run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "b", "method.ratio=1.5")))
    assert not (tmp_path / "b").exists()
    with pytest.raises((MissingConfigException, ConfigCompositionException), match="nope"):
        _compose(_overrides(tiny_dir, tmp_path / "a", "experiment=nope"))
    with pytest.raises(FileNotFoundError, match="model not found"):
        run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "c", "model.spec=/no/such/model")))
    assert not (tmp_path / "c" / "metadata.json").exists()  # a failed first attempt blocks nothing
    with pytest.raises(ValueError, match="layer index"):  # validation needing the model: still before metadata
        run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "c", "method.layers=[5]")))
    assert not (tmp_path / "c" / "metadata.json").exists()
    with pytest.raises(PermissionError, match="cannot write to the output directory"):
        run_app.execute(_compose(_overrides(tiny_dir, "/proc/cospadi-forbidden")))
    with pytest.raises(ValueError, match="task=evaluate needs artifact"):
        run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "d", "task=evaluate")))


def test_slurm_launcher_without_its_extra_names_the_install(tmp_path):
    if run_app._importable("hydra_plugins.hydra_submitit_launcher"):
        pytest.skip("the [slurm] extra is installed here")
    done = subprocess.run([sys.executable, "-m", "cospadi_jax.run", "-m", "hydra/launcher=slurm"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and 'pip install "cospadi-jax[slurm]"' in done.stderr


def test_resume_with_a_different_config_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run_app.execute(_compose(_overrides(tiny_dir, out, "method=svd_llm", "eval.dense_baseline=false")))
    with pytest.raises(ConfigMismatchError, match=r"(?s)Keys that differ.*method\.ratio: 0\.2 -> 0\.3"):
        run_app.execute(_compose(_overrides(tiny_dir, out, "method=svd_llm", "method.ratio=0.3")))


def test_resume_survives_a_moved_directory_and_placement_knobs(tiny_dir, tmp_path, caplog):
    """The artifact identity is what changes the result: a moved directory, another cache location, run name,
    parallel mode or OMP memory knob resume (every unit reused), and the wandb run id and fit time carry over."""
    import shutil

    first = tmp_path / "first"
    metrics = run_app.execute(_compose(_overrides(tiny_dir, first, "eval.dense_baseline=false")))
    assert metrics["resumed"] == {"units_reused": 0, "units": 14}
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    (moved / "metrics.json").unlink()
    # leftovers of a killed run are cleaned on resume
    (moved / ".progress.json.abc.tmp").write_text("half")
    (moved / "units" / "00003" / "factors.orbax-checkpoint-tmp-123").mkdir()
    with caplog.at_level("INFO", logger="cospadi_jax"):
        again = run_app.execute(_compose(_overrides(
            tiny_dir, moved, "eval.dense_baseline=false", "run_name=renamed", "method.omp_memory_mb=4",
            "method.parallel=matrices", f"calib.cache_dir={tmp_path}/other-cache")))
    assert f"resuming {moved}: 14 of 14 units reused" in caplog.text
    assert again["resumed"] == {"units_reused": 14, "units": 14}
    assert again["compressed"] == metrics["compressed"]  # nothing refitted, same model
    assert again["timings"]["fit_s_cumulative"] == pytest.approx(metrics["timings"]["fit_s_cumulative"])
    assert not list(moved.glob("*.tmp")) and not list(moved.glob("units/*/*orbax-checkpoint-tmp*"))
    first_meta = json.loads((first / "metadata.json").read_text())
    assert json.loads((moved / "metadata.json").read_text())["wandb_run_id"] == first_meta["wandb_run_id"]


def test_files_honour_the_umask(tiny_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        run_app.execute(_compose(_overrides(tiny_dir, out, "method=svd_llm", "method.layers=[0]",
                                            "method.proj_types=[q_proj]")))
    finally:
        os.umask(old)
    written = [out / "metrics.json", out / "metadata.json", out / "progress.json", out / "report.json",
               *(tmp_path / "gram-cache").glob("*.npz"), *(tmp_path / "dense-cache").glob("*.json")]
    assert len(written) >= 6
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_every_experiment_config_composes():
    names = sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml"))
    assert {"demo", "ablation_ksvd_iterations", "ablation_power_iterations", "ablation_dict_update",
            "ablation_calib_size", "ablation_rho", "sweep_smollm2", "paper_table1_llama32_1b"} <= set(names)
    for name in names:
        cfg = _compose([f"experiment={name}"])
        run_app.validate(run_app.OmegaConf.to_object(cfg))
    paper = _compose(["experiment=paper_table1_llama32_1b"])
    assert paper.paper.cospadi["0.2"].avg_acc == 42.7 and paper.paper.svd_llm["0.4"].wiki_ppl == 1600


def test_corrupted_checkpoint_is_refused(tmp_path):
    import shutil

    from cospadi_jax.checkpoint import ArtifactWriter, CorruptCheckpointError
    from cospadi_jax.methods.base import DictFactors, LowRankFactors

    meta = {"config_fingerprint": "abc", "config": {}}
    writer = ArtifactWriter(tmp_path, meta)
    rng = np.random.default_rng(0)
    lr = LowRankFactors(rng.normal(size=(6, 2)), rng.normal(size=(2, 5)), {"rank": 2})
    dl = DictFactors(rng.normal(size=(6, 4)), np.zeros((5, 2), np.int32), rng.normal(size=(5, 2)), {"k": 4})
    writer.save_unit(0, [lr], [{"path": "model.layers.0.self_attn.q_proj"}])
    writer.save_unit(1, [dl], [{"path": "model.layers.0.mlp.up_proj"}])
    restored = ArtifactWriter(tmp_path, meta).finished_units()
    np.testing.assert_array_equal(restored[0][0][0].A, lr.A)
    np.testing.assert_array_equal(restored[1][0][0].values, dl.values)
    shutil.rmtree(tmp_path / "units" / "00001" / "factors")  # a unit listed as finished but gone
    with pytest.raises(CorruptCheckpointError, match="unit 1 is listed as finished"):
        ArtifactWriter(tmp_path, meta).finished_units()
    (tmp_path / "progress.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="progress.json is corrupted"):
        ArtifactWriter(tmp_path, meta).finished_units()


def test_resume_on_another_host_setting_warns(tmp_path, caplog):
    """Resuming is allowed, but another core count (XLA:CPU thread pool) breaks bit-identity: the resume says so."""
    from cospadi_jax.checkpoint import ArtifactWriter

    host = {"machine": "x86_64", "cpu_count": 2, "cpus_usable": 2, "device_kind": "cpu", "xla_flags": ""}
    ArtifactWriter(tmp_path, {"config_fingerprint": "abc", "host": host})
    with caplog.at_level("WARNING", logger="cospadi_jax.checkpoint"):
        ArtifactWriter(tmp_path, {"config_fingerprint": "abc", "host": host})
    assert not caplog.records
    with caplog.at_level("WARNING", logger="cospadi_jax.checkpoint"):
        ArtifactWriter(tmp_path, {"config_fingerprint": "abc", "host": {**host, "cpus_usable": 1}})
    assert "not be bit-identical" in caplog.text


def test_demo_main_job_runs_end_to_end(tiny_dir, tmp_path, capsys, monkeypatch):
    """The README's first command, on a tiny model: dense vs SVD-LLM vs CoSpaDi perplexity at one ratio, as two
    jobs of the Hydra app (trailing KEY=VALUE arguments are the app's overrides)."""
    from cospadi_jax import demo

    monkeypatch.chdir(tmp_path)  # the app's default output_dir (results/<run name>) and its caches land here
    results = demo.main([f"model.spec={tiny_dir}", "model.name=tiny", "calib.nsamples=8", "calib.seqlen=32",
                         "calib.heldout_nsamples=4", "calib.batch_size=4", "eval.seqlen=32", "eval.max_windows=4",
                         "logger.mode=disabled"])
    out = capsys.readouterr().out
    assert "K-SVD runs 1 iterations instead of the paper's 60" in out and "CoSpaDi" in out and "dense" in out
    for label in ("SVD-LLM", "CoSpaDi"):
        assert abs(results[label]["realised_ratio"] - 0.2) < 0.05 and np.isfinite(results[label]["perplexity"])
        metrics = json.loads((Path(results[label]["output_dir"]) / "metrics.json").read_text())
        assert metrics["compressed"]["perplexity"]["embedded:heldout"]["perplexity"] == results[label]["perplexity"]
        assert metrics["dense"]["perplexity"]["embedded:heldout"]["perplexity"] == results["dense"]
        assert metrics["config"]["eval"]["max_windows"] == 4 and metrics["config"]["method"]["ratio"] == 0.2
    cospadi = json.loads((Path(results["CoSpaDi"]["output_dir"]) / "metrics.json").read_text())["config"]["method"]
    assert cospadi["name"] == "cospadi" and cospadi["ksvd_iterations"] == 1  # experiment=smollm2_methods' T


def test_demo_flags_set_ratio_and_ksvd_iterations():
    """--ratio reaches both jobs, --ksvd-iterations only CoSpaDi's (SVD-LLM's config has no such key), and the
    user's overrides come last."""
    from cospadi_jax import demo

    args = demo._parse(["--ratio", "0.3", "--ksvd-iterations", "5", "calib.nsamples=8"])
    svd, cospadi = demo.job_overrides("svd_llm", args), demo.job_overrides("cospadi", args)
    assert "method.ratio=0.3" in svd and not any("ksvd" in o for o in svd) and svd[-1] == "calib.nsamples=8"
    assert [o for o in cospadi if o.startswith("method.ksvd_iterations=")] == ["method.ksvd_iterations=5"]
    with pytest.raises(SystemExit):
        demo._parse(["calib.nsamples"])


def test_dense_baseline_is_cached_per_setting(tiny_dir, tmp_path, monkeypatch):
    """A sweep scores the dense model once: later jobs read it back; another eval setting, or a file whose
    stored key does not match, is evaluated afresh."""
    calls = []
    evaluate = run_app._evaluate
    monkeypatch.setattr(run_app, "_evaluate", lambda *a: calls.append(a) or evaluate(*a))
    first = run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "a", "method=svd_llm")))
    assert len(calls) == 2  # dense + compressed
    cached = list((tmp_path / "dense-cache").glob("dense-*.json"))
    assert len(cached) == 1
    second = run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "b", "method=svd_llm",
                                                 "method.ratio=0.3")))
    assert len(calls) == 3 and second["dense"] == first["dense"]  # only the compressed model was evaluated
    run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "c", "method=svd_llm", "eval.max_windows=3")))
    assert len(calls) == 5  # another eval setting: dense evaluated again
    stored = json.loads(cached[0].read_text())
    stored["key"]["model"] = "another-model"
    cached[0].write_text(json.dumps(stored))
    run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "d", "method=svd_llm")))
    assert len(calls) == 7 and json.loads(cached[0].read_text())["key"]["model"] != "another-model"


@pytest.mark.slow
def test_multirun_over_keys_the_old_template_left_out(tiny_dir, tmp_path):
    """A Hydra multirun over quantization and layers: four jobs, four directories, none aborted."""
    cmd = [sys.executable, "-m", "cospadi_jax.run", "-m", *_overrides(tiny_dir, tmp_path / "unused"),
           "output_dir=results/${run_name}", f"hydra.sweep.dir={tmp_path}/sweep", "hydra.sweep.subdir=${run_name}",
           "logger.mode=disabled", "eval.dense_baseline=false", "method.ksvd_iterations=1",
           "method.proj_types=[q_proj,up_proj]", "method.quantization=null,int8", "method.layers=[0],[1]"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted((tmp_path / "results").glob("*/metrics.json"))
    assert len(runs) == 4
    settings = {(json.loads(p.read_text())["config"]["method"]["quantization"],
                 tuple(json.loads(p.read_text())["config"]["method"]["layers"])) for p in runs}
    assert settings == {(None, (0,)), (None, (1,)), ("int8", (0,)), ("int8", (1,))}
