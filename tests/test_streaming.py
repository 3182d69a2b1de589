"""Layer-by-layer streaming compression equals whole-model compression, within a planned memory budget."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import save_tiny_model_with_tokenizer, tiny_hf_config

from cospadi_jax.calib import collect_grams
from cospadi_jax.checkpoint import ArtifactWriter
from cospadi_jax.compress import compress
from cospadi_jax.methods import method_config
from cospadi_jax.models import decoder_config_from_hf, get_module, load_model, random_model
from cospadi_jax.models.convert import CheckpointMismatchError
from cospadi_jax.sources import CheckpointLayerSource, ModelLayerSource, RandomLayerSource
from cospadi_jax.streaming import plan_memory


@pytest.fixture(scope="module")
def tiny():
    model = random_model(tiny_hf_config("llama_gqa", False), seed=0)
    windows = np.random.default_rng(0).integers(3, 96, size=(8, 32)).astype(np.int32)
    return model, windows


@pytest.mark.parametrize("method", ["cospadi", "svd_llm"])
def test_streaming_equals_whole_model_compress(tiny, tmp_path, method, monkeypatch):
    model, windows = tiny
    config = method_config(method, ratio=0.3, **(dict(ksvd_iterations=2, power_iterations=3) if method == "cospadi" else {}))
    compressed, whole = compress(model, grams=collect_grams(model, windows, progress=False), config=config,
                                 progress=False)
    artifact = ArtifactWriter(tmp_path / "artifact", {"config_fingerprint": method})
    factors, report = compress(ModelLayerSource(model), windows=windows, config=config, budget_gib=4.0,
                               artifact=artifact, progress=False)
    assert report.memory_plan.calib_batch == len(windows)
    assert report.config["streaming"]["calib_batch"] == len(windows)
    from cospadi_jax.methods import base

    assert not base._WHITENING_CACHE  # each layer's whitening factors are freed once the layer is done
    assert [r.path for r in report.matrices] == [r.path for r in whole.matrices]
    for row, ref in zip(report.matrices, whole.matrices):
        assert row.functional_error_calib == pytest.approx(ref.functional_error_calib, rel=1e-6, abs=1e-9)
        reference = get_module(compressed, row.path)
        names = ("D", "indices", "values") if method == "cospadi" else ("A", "B")
        for name in names:
            np.testing.assert_allclose(np.asarray(getattr(factors[row.path], name)),
                                       np.asarray(getattr(reference, name)[...]), rtol=0, atol=1e-6,
                                       err_msg=f"{row.path} {name}")
    # Every unit reached the artifact: a second streaming run reuses them all (nothing refitted), and without
    # kept factors it reads none of them (on the plain rule no layer needs its compressed units).
    from cospadi_jax import checkpoint

    reads = []
    load = checkpoint._load_factors
    monkeypatch.setattr(checkpoint, "_load_factors", lambda unit_dir: reads.append(unit_dir) or load(unit_dir))
    kept, again = compress(ModelLayerSource(model), windows=windows, config=config, budget_gib=4.0,
                           artifact=artifact, keep_factors=False, progress=False)
    assert [r.seconds for r in again.matrices] == [r.seconds for r in report.matrices]
    assert kept == {} and again.units_reused == again.units and reads == []


def test_memory_plan_for_llama3_8b_shapes():
    import transformers

    cfg = decoder_config_from_hf(transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192))
    config = method_config("cospadi", ratio=0.2)
    plan = plan_memory(cfg, config, 32, 512, budget_gib=20.0)
    # bf16 layer = 218M params; float64 Grams of d = 4096 (q, o, gate) and 14336.
    assert plan.resident_gib["layer weights"] == pytest.approx(218_112_000 * 2 / 2**30, rel=1e-3)
    assert plan.resident_gib["Grams (float64)"] == pytest.approx(8 * (3 * 4096**2 + 14336**2) / 2**30)
    assert 16 <= plan.omp_memory_mb <= 4096 and plan.calib_batch >= 1
    assert sum(plan.resident_gib.values()) < plan.predicted_peak_gib <= 20.0
    # Chunks follow the OMP state per column (s·k + s² + ...): the widest dictionaries get the fewest columns.
    assert plan.omp_chunk_columns["k_proj"] > plan.omp_chunk_columns["q_proj"] > plan.omp_chunk_columns["up_proj"]
    with pytest.raises(ValueError, match="below the resident need"):
        plan_memory(cfg, config, 32, 512, budget_gib=4.0)


def test_streaming_rejects_groups_and_discarding_without_artifact(tiny):
    model, windows = tiny
    source = RandomLayerSource(model.config, seed=0)
    with pytest.raises(ValueError, match="group_size=1"):
        compress(source, windows=windows, config=method_config(group_size=2), budget_gib=4.0)
    with pytest.raises(ValueError, match="pass an artifact"):
        compress(source, windows=windows, config=method_config(), budget_gib=4.0, keep_factors=False)
    from cospadi_jax.refine import RefineConfig

    with pytest.raises(ValueError, match="takes no refine.steps, precomputed grams"):
        compress(source, windows=windows, config=method_config(), budget_gib=4.0, refine=RefineConfig(steps=2),
                 grams=collect_grams(model, windows, progress=False))
    with pytest.raises(TypeError, match="with budget_gib= a LayerSource"):
        compress(source, windows=windows, config=method_config())
    with pytest.raises(ValueError, match="need calibration windows"):
        compress(source, config=method_config(), budget_gib=4.0)


def test_checkpoint_source_reads_one_layer_at_a_time_like_a_full_load(tmp_path):
    from flax import nnx

    model_dir = save_tiny_model_with_tokenizer(tmp_path / "tiny", family="qwen3_qknorm", tied=False, layers=2)
    model, _ = load_model(str(model_dir))
    source = CheckpointLayerSource(model_dir)
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_array_equal(source.embed(ids), ModelLayerSource(model).embed(ids))
    for i in range(2):
        ours = nnx.to_flat_state(nnx.state(source.layer(i)))
        full = nnx.to_flat_state(nnx.state(model.model.layers[i]))
        assert [p for p, _ in ours] == [p for p, _ in full]
        for (path, a), (_, b) in zip(ours, full):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    source._file_of.pop("model.layers.1.mlp.up_proj.weight")  # a shard without that tensor
    with pytest.raises(CheckpointMismatchError, match="up_proj"):
        source.layer(1)


def test_streamed_checkpoint_with_a_tokenizer_equals_compress_in_memory(tmp_path):
    """One entry point: a safetensors directory streamed through compress(source, tokenizer, budget_gib=) samples
    the calibration spec's windows and gives the factors of compress() on the loaded model."""
    from cospadi_jax.calib.spec import CalibrationSpec

    model_dir = save_tiny_model_with_tokenizer(tmp_path / "tiny", layers=2)
    model, tokenizer = load_model(str(model_dir))
    spec = CalibrationSpec(nsamples=4, seqlen=16, heldout_source=None)
    config = method_config("svd_llm", ratio=0.3)
    compressed, whole = compress(model, tokenizer, config=config, calibration=spec, progress=False)
    factors, streamed = compress(CheckpointLayerSource(model_dir), tokenizer, config=config, calibration=spec,
                                 budget_gib=4.0, progress=False)
    assert streamed.calibration == {"nsamples": 4, "seqlen": 16}
    assert [r.path for r in streamed.matrices] == [r.path for r in whole.matrices] == list(factors)
    for path, f in factors.items():
        np.testing.assert_allclose(f.A @ f.B, np.asarray(get_module(compressed, path).A[...])
                                   @ np.asarray(get_module(compressed, path).B[...]), rtol=0, atol=1e-5,
                                   err_msg=path)
