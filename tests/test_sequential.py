"""Sequential calibration (cospadi_jax/sequential.py): each layer's Grams on the compressed prefix, for every
method, grouped and streaming; resume bit-identical; precomputed Grams refused."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_hf_config

from cospadi_jax.calib import collect_grams
from cospadi_jax.checkpoint import ArtifactWriter
from cospadi_jax.compress import CalibrationSpec, compress, work_units
from cospadi_jax.methods import method_config
from cospadi_jax.layers import replace_projection
from cospadi_jax.models import get_module, random_model
from cospadi_jax.models.paths import parse_projection_path
from cospadi_jax.refine import factors_of
from cospadi_jax.sequential import blocks
from cospadi_jax.sources import ModelLayerSource

FAST = dict(ratio=0.3, progress=False)
KSVD = dict(ksvd_iterations=2, power_iterations=3)  # CoSpaDi's knobs: the low-rank methods have none


def fast(method: str = "cospadi") -> dict:
    """FAST, and the K-SVD knobs for a CoSpaDi method."""
    return {**FAST, **(KSVD if method.startswith("cospadi") else {})}
SEQUENTIAL = CalibrationSpec(sequential=True, heldout_source=None, batch_size=4)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_hf_config("qwen2_bias", False)
    cfg.num_hidden_layers = 4
    model = random_model(cfg, seed=0)
    windows = np.random.default_rng(0).integers(3, 96, size=(8, 32)).astype(np.int32)
    return model, windows


def _factors(model) -> dict:
    return {p: f for l in range(model.config.num_hidden_layers) for p, f in factors_of(model, l).items()}


def _equal(a, b, paths):
    for p in paths:
        for name in ("D", "indices", "values") if hasattr(a[p], "D") else ("A", "B"):
            np.testing.assert_array_equal(getattr(a[p], name), getattr(b[p], name), err_msg=f"{p} {name}")


def test_layer_l_is_fitted_on_the_grams_of_the_compressed_prefix(tiny):
    """Layer 0 sees the dense model (same as plain); layer 2 sees exactly the Grams that a forward through the
    compressed layers 0-1 gives (SVD-LLM is closed-form, so equal Grams mean equal factors)."""
    model, windows = tiny
    plain, _ = compress(model, grams=collect_grams(model, windows, batch_size=4, progress=False), method="svd_llm",
                        **fast("svd_llm"))
    seq, report = compress(model, windows=windows, calibration=SEQUENTIAL, method="svd_llm", **fast("svd_llm"))
    a, b = _factors(seq), _factors(plain)
    _equal(a, b, [p for p in a if ".layers.0." in p])
    prefix = random_model(_cfg(), seed=0)
    for p in a:
        if int(p.split(".")[2]) < 2:
            replace_projection(prefix, p, a[p])
    grams = collect_grams(prefix, windows, batch_size=4, layers=[2], progress=False)
    layer2, _ = compress(model, grams=grams, method="svd_llm", layers=(2,), **fast("svd_llm"))
    _equal(a, _factors(layer2), [p for p in a if ".layers.2." in p])
    assert not np.allclose(a["model.layers.2.mlp.up_proj"].A, b["model.layers.2.mlp.up_proj"].A)
    assert report.calibration["sequential"] is True


def _cfg():
    cfg = tiny_hf_config("qwen2_bias", False)
    cfg.num_hidden_layers = 4
    return cfg


@pytest.mark.parametrize("method, extra", [
    ("cospadi", {}), ("svd_llm", {}), ("asvd", {}), ("cospadi", {"group_size": 2}),
    ("basis_sharing", {"group_size": 2}),
])
def test_every_method_runs_sequentially_at_the_same_budget(tiny, method, extra):
    model, windows = tiny
    _, plain = compress(model, grams=collect_grams(model, windows, batch_size=4, progress=False), method=method,
                        **fast(method), **extra)
    seq, report = compress(model, windows=windows, calibration=SEQUENTIAL, method=method, **fast(method), **extra)
    assert report.realised_ratio == plain.realised_ratio
    assert [m.path for m in report.matrices] == [m.path for m in plain.matrices]
    assert all(np.isfinite(m.functional_error_calib) for m in report.matrices)
    assert all(not hasattr(get_module(seq, m.path), "kernel") for m in report.matrices)


def test_a_shared_group_is_calibrated_whole_on_the_prefix_before_it(tiny):
    """The rule: a group of m layers is one block; its Grams come from one dense pass through the group on the
    compressed prefix. With one group covering layers 0-1, that is the dense model's Grams exactly."""
    model, windows = tiny
    assert blocks([["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"], ["model.layers.0.mlp.down_proj"],
                   ["model.layers.1.mlp.down_proj"]]) == [[0, 1]]
    layers = dict(layers=(0, 1), group_size=2)
    plain, _ = compress(model, grams=collect_grams(model, windows, batch_size=4, progress=False), **fast(), **layers)
    seq, _ = compress(model, windows=windows, calibration=SEQUENTIAL, **fast(), **layers)
    a = _factors(seq)
    _equal(a, _factors(plain), list(a))


class _Killed(Exception):
    pass


class _DiesAfter(ArtifactWriter):
    def __init__(self, *args, after: int, **kw):
        super().__init__(*args, **kw)
        self.left = after

    def save_unit(self, idx, factors, rows):
        if self.left == 0:
            raise _Killed
        self.left -= 1
        super().save_unit(idx, factors, rows)


def test_an_interrupted_sequential_run_resumes_bit_identical(tiny, tmp_path):
    model, windows = tiny
    reference = _factors(compress(model, windows=windows, calibration=SEQUENTIAL, **fast())[0])
    meta = {"identity": {"run": "seq"}}
    with pytest.raises(_Killed):  # dies inside the third block (7 units per layer)
        compress(model, windows=windows, calibration=SEQUENTIAL, artifact=_DiesAfter(tmp_path, meta, after=17),
                 **fast())
    resumed, report = compress(model, windows=windows, calibration=SEQUENTIAL, artifact=ArtifactWriter(tmp_path, meta),
                               **fast())
    assert report.units_reused == 17
    _equal(_factors(resumed), reference, list(reference))


def test_a_streamed_sequential_run_resumes_reading_each_reused_unit_when_its_layer_comes(tiny, tmp_path,
                                                                                          monkeypatch):
    """A streamed run without kept factors (a model larger than the host) never reads every finished unit's
    factors at once on resume: each reused unit is read once, when its block is swapped in."""
    from cospadi_jax import checkpoint

    model, windows = tiny
    config = method_config("svd_llm", ratio=0.3)
    streamed = dict(windows=windows, config=config, budget_gib=4.0, progress=False,
                    calibration=CalibrationSpec(sequential=True, heldout_source=None))
    reference, _ = compress(ModelLayerSource(model), **streamed)
    meta = {"identity": {"run": "streamed-seq"}}
    with pytest.raises(_Killed):  # dies inside the third layer (7 units per layer)
        compress(ModelLayerSource(model), artifact=_DiesAfter(tmp_path, meta, after=17), **streamed)
    reused = ArtifactWriter(tmp_path, meta).finished_indices()
    reads: list[str] = []
    load = checkpoint._load_factors
    monkeypatch.setattr(checkpoint, "_load_factors", lambda unit_dir: reads.append(unit_dir.name) or load(unit_dir))
    kept, report = compress(ModelLayerSource(model), artifact=ArtifactWriter(tmp_path, meta), keep_factors=False,
                            **streamed)
    assert kept == {} and report.units_reused == 17
    assert sorted(reads) == [f"{i:05d}" for i in reused]  # each reused unit once
    units = work_units(config, model.config.num_hidden_layers)
    layer_of_read = [parse_projection_path(units[int(name)][0])[0] for name in reads]
    assert layer_of_read == sorted(layer_of_read)  # when its layer comes, not all up front
    resumed = {row["path"]: f for fs, rows in ArtifactWriter(tmp_path, meta).finished_units().values()
               for f, row in zip(fs, rows)}
    assert resumed.keys() == reference.keys()
    for p, f in reference.items():
        np.testing.assert_array_equal(resumed[p].A, f.A, err_msg=p)


def test_streaming_sequential_equals_compress_sequential(tiny):
    model, windows = tiny
    config = method_config("svd_llm", ratio=0.3)
    seq, _ = compress(model, windows=windows, calibration=CalibrationSpec(sequential=True, heldout_source=None,
                                                                          batch_size=len(windows)),
                      config=config, progress=False)
    factors, _ = compress(ModelLayerSource(model), windows=windows, config=config, budget_gib=4.0,
                          calibration=CalibrationSpec(sequential=True, heldout_source=None), progress=False)
    a = _factors(seq)
    for p, f in factors.items():
        np.testing.assert_allclose(f.A, a[p].A, rtol=0, atol=1e-6, err_msg=p)
    assert all(hasattr(get_module(model, p), "kernel") for p in factors)  # the source model is untouched


def test_sequential_refuses_precomputed_grams(tiny):
    model, windows = tiny
    with pytest.raises(ValueError, match="precomputed grams would be silently wrong"):
        compress(model, grams=collect_grams(model, windows, progress=False), calibration=SEQUENTIAL, **fast())
    with pytest.raises(ValueError, match="need calibration windows"):
        compress(model, calibration=SEQUENTIAL, **fast())


def test_hydra_sequential_knob_names_the_run():
    from omegaconf import OmegaConf
    from test_run import _compose

    from cospadi_jax.identity import run_name

    cfg = _compose(["calib.sequential=true"])
    assert "-seq-" in run_name(OmegaConf.to_container(cfg, resolve=False))
    assert OmegaConf.to_object(cfg).calib.sequential is True
