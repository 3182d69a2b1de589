"""experiments/smollm2_methods.py, the method table: each job is the Hydra app on experiment=smollm2_methods'
setting, and the table is read back from the jobs' metrics.json (no model is run here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    """The script as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location("smollm2_methods", ROOT / "experiments" / "smollm2_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["smollm2_methods"] = module
    spec.loader.exec_module(module)
    return module


def _metrics(option: str, name: str, ratio: float, ppl: float, errors: tuple[float, float], t: int | None = 1,
             group_size: int = 1) -> dict:
    method = {"name": name, "label": option, "ratio": ratio, "group_size": group_size}
    if t is not None:
        method.update(ksvd_iterations=t, power_iterations=8)
    source = "embedded:heldout"
    return {"config": {"method": method, "calib": {"nsamples": 32, "seqlen": 512, "heldout_nsamples": 16},
                       "eval": {"ppl_sources": [source], "seqlen": 512, "max_windows": 16},
                       "output_dir": f"jobs/{option}-cr{ratio}"},
            "matrices": [{"path": f"m{i}", "functional_error_heldout": e, "functional_error_calib": e / 2}
                         for i, e in enumerate(errors)],
            "compressed": {"perplexity": {source: {"perplexity": ppl}}}, "realised_ratio": ratio + 0.001,
            "timings": {"compress_s": 12.0}, "dense": {"perplexity": {source: {"perplexity": 13.6}}},
            "calibration_key": {"nsamples": 32}, "host": {"machine": "x86_64", "cpu_count": 2, "device_kind": "cpu"}}


def _write(jobs: Path, name: str, metrics: dict) -> None:
    (jobs / name).mkdir(parents=True)
    (jobs / name / "metrics.json").write_text(json.dumps(metrics))


def test_job_overrides_restate_the_experiment_and_set_t_only_for_ksvd_methods(script, tmp_path):
    svd = script.job_overrides("svd_llm", 0.3, 5, tmp_path / "a")
    cospadi = script.job_overrides("cospadi_grouped", 0.3, 5, tmp_path / "b")
    for overrides in (svd, cospadi):
        assert {"calib.nsamples=32", "calib.seqlen=512", "calib.heldout_nsamples=16", "eval.max_windows=16",
                "method.ratio=0.3", "logger.mode=disabled"} <= set(overrides)
    assert svd[0] == "method=svd_llm" and not any("ksvd" in o for o in svd)
    assert [o for o in cospadi if "ksvd" in o] == ["method.ksvd_iterations=5"]  # the flag, not the experiment's
    assert script.job_dir(tmp_path, "svd_llm", 0.3, 5).name == "svd_llm-cr0.3"
    assert script.job_dir(tmp_path, "cospadi", 0.3, 5).name == "cospadi-T5-cr0.3"
    assert list(script.METHODS)[:2] == ["SVD-LLM", "CoSpaDi"] and script.METHODS["CoSpaDi†"] == "cospadi_free"


def test_the_table_is_read_from_the_jobs_metrics(script, tmp_path):
    jobs, out = tmp_path / "smollm2_methods", tmp_path / "smollm2_methods.json"
    _write(jobs, "svd_llm-cr0.2", _metrics("svd_llm", "svd_llm", 0.2, 46.5, (0.2, 0.1), t=None))
    _write(jobs, "cospadi-T1-cr0.2", _metrics("cospadi", "cospadi", 0.2, 40.3, (0.1, 0.3)))
    _write(jobs, "cospadi-T4-cr0.2", _metrics("cospadi", "cospadi", 0.2, 30.0, (0.1, 0.1), t=4))  # another T
    results = script.aggregate(jobs, out, 1)
    assert results["meta"] == {"ksvd_iterations": 1, "power_iterations": 8, "nsamples": 32, "seqlen": 512,
                               "heldout_nsamples": 16, "eval_seqlen": 512, "eval_windows": 16,
                               "machine": "x86_64, 2 CPUs, CPU-only JAX"}
    rows = {r["label"]: r for r in results["runs"]}
    assert set(rows) == {"SVD-LLM", "CoSpaDi"} and results["dense"]["perplexity"] == 13.6
    assert rows["CoSpaDi"]["perplexity"] == 40.3 and rows["CoSpaDi"]["per_matrix_heldout"] == {"m0": 0.1, "m1": 0.3}
    assert rows["CoSpaDi"]["functional_error_heldout"] == pytest.approx(0.2)
    assert rows["SVD-LLM"]["method"] == "svd_llm" and rows["SVD-LLM"]["seconds"] == 12.0
    text = script.markdown(results)
    assert "| 0.2 | SVD-LLM | 46.50 | 0.2010 | 0.1500 | 12 |" in text
    assert "CR 0.2: CoSpaDi < SVD-LLM in perplexity: holds (40.30 vs 46.50)" in text
    assert "CR 0.2: per-matrix functional error CoSpaDi < SVD-LLM at equal budget on 1/2 matrices" in text


def test_rows_of_an_earlier_table_on_the_same_setting_are_kept(script, tmp_path):
    jobs, out = tmp_path / "smollm2_methods", tmp_path / "smollm2_methods.json"
    _write(jobs, "svd_llm-cr0.2", _metrics("svd_llm", "svd_llm", 0.2, 46.5, (0.2, 0.1), t=None))
    old_meta = {"ksvd_iterations": 1, "power_iterations": 8, "nsamples": 32, "seqlen": 512, "eval_seqlen": 512,
                "eval_windows": 16, "machine": "elsewhere"}
    old_rows = [{"ratio": 0.2, "label": "SVD-LLM", "perplexity": 1.0},
                {"ratio": 0.3, "label": "SVD", "perplexity": 2.0}]
    out.write_text(json.dumps({"meta": old_meta, "runs": old_rows, "dense": {"perplexity": 13.0}}))
    runs = script.aggregate(jobs, out, 1)["runs"]
    assert sorted((r["ratio"], r["label"], r["perplexity"]) for r in runs) == [(0.2, "SVD-LLM", 46.5),
                                                                             (0.3, "SVD", 2.0)]
    out.write_text(json.dumps({"meta": {**old_meta, "nsamples": 64}, "runs": old_rows}))  # another setting
    assert [r["label"] for r in script.aggregate(jobs, out, 1)["runs"]] == ["SVD-LLM"]


def test_jobs_on_different_settings_are_refused(script, tmp_path):
    jobs = tmp_path / "smollm2_methods"
    _write(jobs, "svd_llm-cr0.2", _metrics("svd_llm", "svd_llm", 0.2, 46.5, (0.2, 0.1), t=None))
    other = _metrics("svd", "svd", 0.2, 1e6, (0.3, 0.3), t=None)
    other["config"]["calib"]["nsamples"] = 64
    _write(jobs, "svd-cr0.2", other)
    with pytest.raises(SystemExit, match="different settings"):
        script.aggregate(jobs, tmp_path / "smollm2_methods.json", 1)
    with pytest.raises(SystemExit, match="no finished job"):
        script.aggregate(tmp_path / "empty", tmp_path / "x.json", 1)
