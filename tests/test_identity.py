"""Run identity: every config key either reaches the run directory's name or is declared placement, and an
artifact resumes across every placement change but never across a result-changing one."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cospadi_jax
import cospadi_jax.run  # noqa: F401  (registers the schema and the resolvers)
from cospadi_jax.config import RunConfig
from cospadi_jax.methods import METHODS, CoSpaDiConfig, LowRankConfig, MethodConfig
from cospadi_jax.identity import (
    EVALUATION_KEYS,
    PLACEMENT_KEYS,
    artifact_identity,
    differences,
    flatten,
    run_identity,
    run_name,
)

CONF = str(Path(cospadi_jax.__file__).parent / "conf")


def _defaults(method: MethodConfig | None = None) -> dict:
    """The schema's defaults with ``method``'s config (default: CoSpaDi's, the app's default method)."""
    run = RunConfig(method=method if method is not None else CoSpaDiConfig())
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True, enum_to_str=True)


def _changed(value):
    """Another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, Enum):
        return next(m for m in type(value) if m is not value).value
    if isinstance(value, list):
        return [*value, value[0] if value else 3]
    if value is None:
        return 7
    if isinstance(value, dict):
        return {**value, "extra": 1}
    raise TypeError(value)


def _set(tree: dict, dotted: str, value) -> dict:
    import copy

    tree = copy.deepcopy(tree)
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return tree


def _leaf_keys(base: dict) -> list[str]:
    """Every leaf of the schema, nested dataclasses expanded (a field defaulting to {} or None is one leaf)."""
    return sorted(flatten(base))


# One config of every method config class, so that each class's own keys are checked.
METHOD_CONFIGS: dict[str, MethodConfig] = {}
for _name, _method in METHODS.items():
    METHOD_CONFIGS.setdefault(_method.config_class.__name__, _method.config_class(name=_name))


@pytest.mark.parametrize("config_class", sorted(METHOD_CONFIGS))
def test_every_key_is_identity_or_placement(config_class):
    base = _defaults(METHOD_CONFIGS[config_class])
    name, artifact = run_name(base), artifact_identity(base)
    checked = 0
    for key in _leaf_keys(base):
        if key.startswith("hydra"):
            continue
        changed = _set(base, key, _changed(flatten(base)[key]))
        placement = any(key == k or key.startswith(k + ".") for k in PLACEMENT_KEYS)
        evaluation = any(key == k or key.startswith(k + ".") for k in EVALUATION_KEYS)
        if placement:
            assert artifact_identity(changed) == artifact, f"{key} is placement but changes the artifact identity"
            if key not in ("model.name", "method.label"):  # these two are in the readable prefix on purpose
                assert run_name(changed) == name, f"{key} is placement but changes the run directory"
        else:
            assert run_name(changed) != name, f"{key} changes a result but not the run directory"
            assert (artifact_identity(changed) == artifact) == evaluation, key
        checked += 1
    assert checked > 40


def test_identity_of_an_old_artifact_fills_new_keys_with_defaults():
    """A metadata.json written before a key existed resumes while the key keeps its default, and not otherwise."""
    base = _defaults()
    old = _set(base, "method", {k: v for k, v in base["method"].items() if k != "omp_backend"})
    assert artifact_identity(old) == artifact_identity(base)
    assert artifact_identity(_set(base, "method.omp_backend", "xla")) != artifact_identity(old)


def test_differences_name_the_keys():
    base = _defaults()
    lines = differences(artifact_identity(base), artifact_identity(_set(base, "method.ratio", 0.3)))
    assert lines == ["method.ratio: 0.2 -> 0.3"]
    assert differences({"a": 1}, {"b": 2}) == ["a: 1 -> (absent)", "b: (absent) -> 2"]


def test_run_name_is_readable_and_method_specific():
    base = _defaults()
    assert run_name(base).startswith("smollm2-135m-cospadi-cr0.2-rho2.0-T60-n256x1024-")
    low_rank = _set(_set(base, "method.name", "svd_llm"), "method.label", "svd_llm")
    assert run_name(low_rank).startswith("smollm2-135m-svd_llm-cr0.2-n256x1024-")  # no K-SVD knobs


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("sweep", [
    ["method.quantization=null", "method.quantization=int8"],
    ["method.layers=[10]", "method.layers=[11]"],
    ["method.accounting=eq11", "method.accounting=eq10"],
    ["calib.seed=1", "calib.seed=2"],
    ["model.dtype=float32", "model.dtype=bfloat16"],
    ["method.mode=dense", "method.mode=factored"],
    ["eval.max_windows=8", "eval.max_windows=16"],
])
def test_sweep_points_get_their_own_directories(sweep):
    """What a multirun over these keys composes: one directory per point (the old template collided)."""
    dirs = set()
    for override in sweep:
        cfg = _compose([override])
        dirs.add(cfg.output_dir)
        assert cfg.hydra.run.dir == cfg.output_dir and cfg.hydra.sweep.subdir == cfg.run_name
    assert len(dirs) == len(sweep)


def test_job_directory_per_task(tmp_path):
    """task=evaluate and task=plot no longer create a stray default-named run directory."""
    evaluate = _compose(["task=evaluate", f"artifact={tmp_path}/run"])
    assert evaluate.hydra.run.dir == f"{tmp_path}/run/evaluate"
    plot = _compose(["task=plot", f"plot_dir={tmp_path}/plots"])
    assert plot.hydra.run.dir == f"{tmp_path}/plots"


def test_identity_ignores_hydra_and_a_dataclass_equals_its_container():
    base = _defaults()
    assert run_identity({**base, "hydra": {"x": 1}}) == run_identity(base)
    assert run_identity(dataclasses.asdict(RunConfig(method=CoSpaDiConfig()))) == run_identity(base)


def test_an_old_low_rank_artifact_with_every_knob_keeps_its_identity():
    """Before each method owned its config, an SVD-LLM run stored CoSpaDi's knobs too (rho, ksvd_iterations, ...):
    its identity is the one the same run has now, so it still resumes, and those knobs no longer name it."""
    new = _defaults(LowRankConfig(name="svd_llm", label="svd_llm"))
    old = _set(new, "method", {**_defaults()["method"], "name": "svd_llm", "label": "svd_llm", "rho": 3.0})
    assert artifact_identity(old) == artifact_identity(new) and run_name(old) == run_name(new)
    assert "-T60-" not in run_name(old)
    assert artifact_identity(_set(old, "method.ratio", 0.3)) != artifact_identity(new)
