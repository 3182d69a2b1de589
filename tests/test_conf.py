"""Every config shipped in ``cospadi_jax/conf`` composes, passes the schema and ``validate``, and names its run.

The files are discovered by listing the package's config directory, so a new experiment, method, model, calib,
eval or logger file is covered without editing this test. Experiments are composed at every point of their
Hydra sweep too (what ``-m`` would launch). Composing and validating must never reach the network (the paper
experiments name hub models and datasets, which are only fetched at run time): sockets are blocked here.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf

import cospadi_jax.conf
from cospadi_jax.config import RunConfig, register_configs, sweep_points, validate
from cospadi_jax.methods import METHODS

CONF_DIR = Path(cospadi_jax.conf.__file__).parent
# Config groups of the app; hydra/ holds only Hydra's own groups (the SLURM launcher needs an extra plugin).
GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))
                and d.name != "hydra")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


EXPERIMENTS = _options("experiment")
GROUP_OPTIONS = [pytest.param(g, o, id=f"{g}={o}") for g in GROUPS if g != "experiment" for o in _options(g)]
RUN_NAME = re.compile(r"[A-Za-z0-9_.\-]+-[0-9a-f]{8}")


def test_every_config_group_is_discovered():
    """Guards the listing itself: an empty glob would make the parametrised tests below vacuous."""
    assert {"calib", "eval", "experiment", "logger", "method", "model"} <= set(GROUPS)
    assert all(_options(g) for g in GROUPS)
    assert len(EXPERIMENTS) >= 10 and len(GROUP_OPTIONS) >= 15


class _NetworkUsed(AssertionError):
    pass


@pytest.fixture(scope="module", autouse=True)
def no_network():
    def refuse(*args, **kwargs):
        raise _NetworkUsed(f"composing or validating a config tried to reach the network: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


def test_the_network_guard_is_armed():
    with pytest.raises(_NetworkUsed):
        socket.create_connection(("127.0.0.1", 9))


@pytest.fixture(scope="module", autouse=True)
def hydra_app():
    register_configs()
    with initialize_config_module(config_module="cospadi_jax.conf", version_base="1.3"):
        yield


def _check(overrides: list[str], results_dir: str = "results"):
    """Compose, convert through the schema, validate and resolve the run name; returns (cfg, RunConfig).
    ``results_dir``: where the job must write (an experiment's ``hydra.sweep.dir``: its Hydra job directory and
    its output_dir are one directory)."""
    cfg = compose("config", overrides=overrides)
    run_cfg = OmegaConf.to_object(cfg)
    assert isinstance(run_cfg, RunConfig), type(run_cfg)
    validate(run_cfg)
    assert run_cfg.method.name in METHODS, f"{overrides}: method.name={run_cfg.method.name!r} is not registered"
    name = cfg.run_name
    assert isinstance(name, str) and RUN_NAME.fullmatch(name), f"{overrides}: run_name {name!r}"
    assert name.startswith(f"{run_cfg.model.name}-{run_cfg.method.label}-cr{run_cfg.method.ratio}-"), name
    assert f"-n{run_cfg.calib.nsamples}x{run_cfg.calib.seqlen}-" in name, name
    assert cfg.output_dir == f"{results_dir}/{name}", (overrides, cfg.output_dir)
    return cfg, run_cfg


def test_the_default_config():
    cfg, run_cfg = _check([])
    assert run_cfg.task == "compress" and run_cfg.method.name == "cospadi"
    assert compose("config").run_name == cfg.run_name, "the run name is not deterministic"
    assert compose("config", overrides=["method.ratio=0.3"]).run_name != cfg.run_name


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    cfg, run_cfg = _check([f"{group}={option}"])
    # the option is what got composed: every key of its file has the file's value
    shipped = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    shipped.pop("defaults", None)  # a method file's defaults list names its schema (checked below)
    composed = OmegaConf.to_container(cfg[group], resolve=True, enum_to_str=True)
    for key, value in shipped.items():
        assert composed[key] == value, f"{group}={option}: {key} is {composed[key]!r}, the file says {value!r}"
    if group == "method":  # the label keys paper tables and plot legends: it is the config's file name
        assert run_cfg.method.label == option
        # and the file's schema is its method's own config class (a key of another method is refused)
        assert type(run_cfg.method) is METHODS[run_cfg.method.name].config_class


def test_help_lists_only_the_app_groups():
    """``--help`` lists every config group but Hydra's own: the method schemas are stored at the root (as
    ``run_schema``), not in a group that would show up there as a choice."""
    from hydra.core.global_hydra import GlobalHydra

    listed = {g for g in GlobalHydra.instance().hydra.list_all_config_groups() if not g.startswith("hydra")}
    assert listed == set(GROUPS), f"--help would list {sorted(listed - set(GROUPS))} besides the app's groups"


def test_every_registered_method_has_a_config():
    shipped = {OmegaConf.load(p).name for p in (CONF_DIR / "method").glob("*.yaml")}
    assert set(METHODS) <= shipped, f"registered methods without a conf/method file: {set(METHODS) - shipped}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_at_every_sweep_point(experiment):
    hydra_cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True).hydra
    results_dir = hydra_cfg.sweep.dir  # results, or the experiment's own (experiments/results/paper_setting/...)
    _check([f"experiment={experiment}"], results_dir)
    points = sweep_points(experiment)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        assert hydra_cfg.sweeper.params, f"{experiment} is a multirun without sweep parameters"
    names = set()
    for point in points:
        # None is Hydra's null (a sweep over method.quantization=null,bf16,...), not the string 'None'
        cfg, run_cfg = _check([f"experiment={experiment}", *(f"{k}={'null' if v is None else v}" for k, v in point)],
                              results_dir)
        for key, value in point:  # every override of the job took effect
            if "." in key:
                assert OmegaConf.select(cfg, key) == value, (experiment, key, value)
            else:  # a group: the option's file name is its label
                assert cfg[key].label == value, (experiment, key, value)
        if run_cfg.paper is not None:  # run.py prints the paper's numbers beside each job's
            row = run_cfg.paper.get(run_cfg.method.label, {}).get(f"{run_cfg.method.ratio:g}")
            assert row and {"avg_acc", "wiki_ppl", "lambada_ppl"} <= set(row), (experiment, point)
        names.add(cfg.run_name)
    assert len(names) == len(points), f"{experiment}: two jobs of the sweep share a run directory"


def test_unknown_method_key_is_refused_at_composition():
    with pytest.raises(ConfigCompositionException, match="method.not_a_key"):
        compose("config", overrides=["method.not_a_key=1"])
    with pytest.raises(ConfigCompositionException, match="method.ratioo"):  # a typo of a real key
        compose("config", overrides=["method.ratioo=0.3"])


def test_unknown_method_name_is_refused_by_validate():
    cfg = compose("config", overrides=["method.name=not_a_method"])
    with pytest.raises(ValueError, match="unknown method 'not_a_method'; available: .*cospadi"):
        validate(OmegaConf.to_object(cfg))


def test_appended_unknown_method_key_is_refused():
    """BUG (found by this test, left failing on purpose): Hydra's refusal of ``method.ksvd_iteration=5`` says
    "To append to your config use +method.ksvd_iteration=5"; doing so composes, ``OmegaConf.to_object`` adds
    the key to ``MethodConf`` as a plain attribute, and ``validate`` passes: the typo is silently ignored
    (``ksvd_iterations`` stays 60) and only changes the run name's hash. cospadi_jax/config.py (module
    docstring, lines 3-4) and README.md (line 99) promise that an unknown key is an error before any work starts.
    """
    try:
        cfg = compose("config", overrides=["+method.ksvd_iteration=5"])
        validate(OmegaConf.to_object(cfg))
    except (ConfigCompositionException, ValueError, TypeError, AttributeError):
        return
    pytest.fail("+method.ksvd_iteration=5 (an unknown method key, appended) composed and validated: the key is "
                "silently ignored instead of refused")


@pytest.mark.parametrize("method", _options("method"))
def test_experiment_overrides_put_every_method_on_an_experiments_setting(method):
    """experiments/smollm2_methods.py and cospadi_jax.demo run each method on experiment=smollm2_methods'
    setting by restating its values (a low-rank method cannot compose that experiment: it sets
    method.ksvd_iterations): every method composes and validates with them, with the experiment's calib and eval
    nodes, and its K-SVD T where its config has one."""
    from cospadi_jax.config import experiment_overrides

    overrides = experiment_overrides("smollm2_methods", method)
    assert overrides[0] == f"method={method}"
    cfg, run_cfg = _check(overrides)
    setting = compose("config", overrides=["experiment=smollm2_methods"])
    assert cfg.calib == setting.calib and cfg.eval == setting.eval and cfg.logger == setting.logger
    assert cfg.method.get("ksvd_iterations", setting.method.ksvd_iterations) == setting.method.ksvd_iterations
    assert compose("config", overrides=[f"method={method}"]).method == cfg.method or "ksvd_iterations" in cfg.method


def test_experiment_overrides_keep_the_common_method_keys():
    """experiment=demo sets CoSpaDi's T and the common layer range: SVD-LLM gets the layers, not the T."""
    from cospadi_jax.config import experiment_overrides

    overrides = experiment_overrides("demo", "svd_llm")
    assert "method.layers=[10,11]" in overrides and not any("ksvd" in o for o in overrides)
    assert "method.ksvd_iterations=4" in experiment_overrides("demo", "cospadi_free")
    _check(overrides)
