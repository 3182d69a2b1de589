"""Bad input is refused early and clearly: at load, before calibration, or with a warning that names the
problem (issue: hardening). Each message names the key or the tensor and the fix."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from helpers import has_embedded_model, save_tiny_model_with_tokenizer, tiny_hf_config
from hydra import compose, initialize_config_dir

import cospadi_jax.run as run_app
from cospadi_jax.compress import CalibrationSpec, compress
from cospadi_jax.errors import HubUnavailableError
from cospadi_jax.models import load_model, random_model
from cospadi_jax.models.convert import CheckpointMismatchError
from test_run import CONF, _compose, _overrides


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny"), layers=2)


def test_non_finite_weights_are_named_at_load(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_config(tiny_hf_config("llama_gqa", True))
    with torch.no_grad():
        ref.model.layers[1].mlp.down_proj.weight[3, 4] = float("nan")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*1 NaN/inf"):
        load_model(tmp_path)


@pytest.mark.real_weights
@pytest.mark.skipif(not has_embedded_model(), reason="needs the embedded SmolLM2 GGUF")
def test_truncated_gguf_is_named(tmp_path):
    from cospadi_jax.models.loading import embedded_model_path

    source = embedded_model_path("smollm2-135m")
    truncated = tmp_path / "model.gguf"
    with open(source, "rb") as f:
        truncated.write_bytes(f.read(2_000_000))
    with pytest.raises(CheckpointMismatchError, match="probably truncated"):
        load_model(truncated)


def test_app_checks_that_need_the_model(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="calib.seqlen=512 exceeds the model's max_position_embeddings=256"):
        run_app.execute(_compose(_overrides(tiny_dir, tmp_path / "a", "calib.seqlen=512")))
    weights_only = tmp_path / "weights-only"
    shutil.copytree(tiny_dir, weights_only,
                    ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "vocab.json"))
    with pytest.raises(FileNotFoundError, match="has weights but no tokenizer"):
        run_app.execute(_compose(_overrides(weights_only, tmp_path / "b")))
    for out in ("a", "b"):
        assert not (tmp_path / out / "metadata.json").exists()


def test_unwritable_job_directory_is_named_at_composition(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={blocker}/run"], return_hydra_config=True)
    with pytest.raises(Exception, match="cannot write to .*choose a writable output_dir"):
        _ = cfg.hydra.run.dir


def test_unwritable_caches_warn_and_the_run_goes_on(tiny_dir, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        metrics = run_app.execute(_compose(_overrides(
            tiny_dir, tmp_path / "run", "method=svd_llm", "method.layers=[0]", "method.proj_types=[q_proj]",
            f"calib.cache_dir={blocker}/grams", f"eval.dense_cache_dir={blocker}/dense")))
    assert "Gram cache" in caplog.text and "dense-score cache" in caplog.text
    assert np.isfinite(metrics["compressed"]["perplexity"]["embedded:heldout"]["perplexity"])


def test_degenerate_calibration_warns_with_the_effective_rank(tiny_dir, tmp_path, caplog):
    model, tokenizer = load_model(tiny_dir)
    repeated = tmp_path / "repeated.txt"
    repeated.write_text("the " * 4000)
    spec = CalibrationSpec(source=str(repeated), nsamples=4, seqlen=32, heldout_source=None)
    with caplog.at_level(logging.WARNING, logger="cospadi_jax.compress"):
        compress(model, tokenizer, calibration=spec, method="svd_llm", layers=(0,), proj_types=("q_proj",),
                 progress=False)
    assert "rank-deficient" in caplog.text and "effective rank" in caplog.text


def test_api_type_errors_name_the_argument(tiny_dir):
    from cospadi_jax.data.text import load_text
    from cospadi_jax.eval import perplexity

    model, tokenizer = load_model(tiny_dir)
    with pytest.raises(TypeError, match="a text source is one name or path"):
        load_text(["embedded:calibration"])
    for seqlen in (0, 1):
        with pytest.raises(ValueError, match="seqlen must be an integer >= 2"):
            perplexity(model, tokenizer, "some text here", seqlen=seqlen)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        perplexity(model, None, "some text here", seqlen=8)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        compress(random_model(tiny_hf_config("llama_gqa", True)), None, method="svd_llm", progress=False)


def test_offline_lm_eval_task_points_to_the_shipped_one(tiny_dir, monkeypatch):
    import lm_eval

    from cospadi_jax.eval.harness import evaluate_zero_shot

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'ybisk/piqa' on the Hub")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    model, tokenizer = load_model(tiny_dir)
    with pytest.raises(HubUnavailableError, match=r"task\(s\) \['piqa'\].*eval.tasks=\[kjv_lambada\]"):
        evaluate_zero_shot(model, tokenizer, ["piqa"], progress=False)
