"""Structured configs of the Hydra app (registered in Hydra's ConfigStore as schemas).

Every YAML under ``conf/`` is validated against these dataclasses before any work starts: an unknown key or a
wrong type is an error from OmegaConf, and impossible values are errors from :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .allocation import AllocationConfig
from .calib.spec import CalibrationSpec
from .methods import METHODS, MethodConfig
from .refine import RefineConfig


@dataclass
class ModelConf:
    spec: str = "smollm2-135m"  # embedded name, .gguf path, HF directory or hub id
    name: str = "smollm2-135m"  # short name used in run names and plots
    dtype: str = "float32"
    revision: Optional[str] = None


@dataclass
class EvalConf:
    ppl_sources: list[str] = field(default_factory=lambda: ["embedded:heldout"])
    seqlen: int = 512
    max_windows: Optional[int] = 32
    batch_size: int = 4
    dense_baseline: bool = True
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks, e.g. the paper's eight
    task_limit: Optional[float] = None
    task_include_path: Optional[str] = None
    task_batch_size: int = 8
    data_parallel: bool = True  # batches split over all devices (and processes) when there is more than one
    # The dense model's scores, keyed by model and tokenizer fingerprints and this eval config, are reused by
    # every job of a sweep instead of being recomputed per job (single-process runs; null disables).
    dense_cache_dir: Optional[str] = ".cache/dense_eval"
    # task=evaluate only: round the coefficient values of an artifact fitted without quantization to this grid
    # (method.quantization's schemes) before scoring. The fit is not changed by the width (the values are rounded
    # after it), so one fit serves every width of paper Fig. 3, equal to fitting with method.quantization set.
    requantize: Optional[str] = None


@dataclass
class LoggerConf:
    mode: str = "offline"  # offline | online | disabled
    project: str = "cospadi-jax"
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class GenerateConf:
    """task=generate (``python -m cospadi_jax.generate``): KV-cached generation, streamed to the console."""

    prompt: Optional[str] = None
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    chat: bool = False  # wrap the prompt in the tokenizer's chat template (instruction-tuned models)
    mode: Optional[str] = None  # rebuild CoSpaDi layers in this DictLinear mode, e.g. sparse (fast CPU decode)


@dataclass
class ExportConf:
    """task=export: write the artifact's compressed model as a checkpoint (cospadi_jax/export.py)."""

    format: str = "factored"  # factored (the factors at their accounted sizes) | hf-dense (W̃ for transformers)
    path: Optional[str] = None  # null: <artifact>/export-<format>
    overwrite: bool = False  # replace a non-empty path


@dataclass
class RunConfig:
    model: ModelConf = field(default_factory=ModelConf)
    # The method's own config (methods/*.py): conf/method/<file>.yaml picks its schema (cospadi_schema, ...)
    method: MethodConfig = field(default_factory=MethodConfig)
    calib: CalibrationSpec = field(default_factory=CalibrationSpec)
    refine: RefineConfig = field(default_factory=RefineConfig)  # block-output refinement, off at steps=0
    budget: AllocationConfig = field(default_factory=AllocationConfig)  # per-unit ratios, uniform by default
    eval: EvalConf = field(default_factory=EvalConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    generate: GenerateConf = field(default_factory=GenerateConf)
    export: ExportConf = field(default_factory=ExportConf)
    task: str = "compress"  # compress | evaluate | export | plot | generate
    seed: int = 42
    run_name: str = "run"  # conf/config.yaml: model-method-CR-...-<hash of the run identity> (identity.py)
    output_dir: str = "results/run"
    artifact: Optional[str] = None  # task=evaluate | export | generate: artifact directory to restore
    results_glob: str = "results/**/metrics.json"  # task=plot
    plot_dir: str = "results/plots"
    ablation_axis: Optional[str] = None  # tagged in wandb: ksvd_iterations | power_iterations | ...
    paper: Optional[dict[str, Any]] = None  # the paper's numbers for this setting, printed beside ours


TASKS = ("compress", "evaluate", "export", "plot", "generate")
EXPORT_JOB_DIR = "export"  # task=export's Hydra job directory inside the artifact (never the export itself)


def schema_name(config_class: type) -> str:
    """The ConfigStore name of a method config class, which ``conf/method/*.yaml`` name in their defaults list
    (``- /cospadi_schema@_here_``): ``CoSpaDiConfig`` -> ``cospadi_schema``, ``LowRankConfig`` ->
    ``low_rank_schema``, ``ASVDConfig`` -> ``asvd_schema``.

    Stored at the root, as ``run_schema``, and not in a config group: ``--help`` lists every group but Hydra's
    own (``hydra/...``), so a ``schema/method`` group would show up there as if it were something to choose."""
    stem = config_class.__name__.removesuffix("Config")
    return {"CoSpaDi": "cospadi", "LowRank": "low_rank"}.get(stem, stem.lower()) + "_schema"


def register_configs() -> None:
    """The schema of the whole tree (``run_schema``, typing every group), one schema per method config class
    (:func:`schema_name`; ``conf/method/*.yaml`` name theirs in their defaults list), and the resolvers of
    conf/config.yaml."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for config_class in {cls.config_class for cls in METHODS.values()}:
        store.store(name=schema_name(config_class), node=config_class)
    OmegaConf.register_new_resolver("cospadi_run_name", _run_name, replace=True)
    OmegaConf.register_new_resolver("cospadi_job_dir", _job_dir, replace=True)


_IDENTITY_NODES = ("model", "method", "calib", "refine", "budget", "eval", "task", "seed")


def _identity_config(root: DictConfig) -> dict[str, Any]:
    # Only the nodes that can be identity: run_name and output_dir interpolate the resolver itself.
    return {k: OmegaConf.to_container(root[k], resolve=True, enum_to_str=True) if OmegaConf.is_config(root[k])
            else root[k] for k in _IDENTITY_NODES if k in root}


def _run_name(*, _root_: DictConfig) -> str:
    from .identity import run_name

    return run_name(_identity_config(_root_))


def _job_dir(*, _root_: DictConfig) -> str:
    """Hydra's job directory (``.hydra/`` and ``run.log``): the run directory for ``task=compress``; for
    ``task=evaluate`` the artifact's ``evaluate/`` and for ``task=export`` its ``export/`` (so the artifact's own
    ``.hydra`` is never overwritten, no stray default-named directory appears, and the export directory, which
    must be new or empty, is not the one Hydra writes into); ``plot_dir`` for plots."""
    task = _root_.task
    if task in ("evaluate", "export", "generate") and _root_.artifact:
        job_dir = Path(_root_.artifact) / (EXPORT_JOB_DIR if task == "export" else task)
    elif task == "generate":  # a model spec only: its logs beside the other results
        job_dir = Path("results") / "generate"
    else:
        job_dir = Path(_root_.plot_dir if task == "plot" else _root_.output_dir)
    from .fileio import can_create_in

    if not can_create_in(job_dir):  # else Hydra's log handler fails with "Unable to configure handler 'file'"
        raise PermissionError(f"cannot write to {job_dir} (read-only, or not a directory): choose a writable "
                              f"{'plot_dir' if task == 'plot' else 'output_dir'}=... or fix its permissions.")
    return str(job_dir)


def _check_known_keys(node: Any, prefix: str = "") -> None:
    """Raise for a key that its schema does not have. OmegaConf refuses ``key=value`` for an unknown key, but a
    forced addition (``+method.ksvd_iteration=5``, as Hydra's own error suggests) becomes a plain attribute of the
    dataclass that nothing would read: a silently ignored typo."""
    if not dataclasses.is_dataclass(node):
        return
    fields = {f.name for f in dataclasses.fields(node)}
    unknown = sorted(set(vars(node)) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {[prefix + k for k in unknown]}: {type(node).__name__} has "
                         f"{sorted(fields)}; remove the + override or fix its spelling")
    for name in fields:
        _check_known_keys(getattr(node, name), f"{prefix}{name}.")


def validate(cfg: RunConfig, n_layers: int | None = None) -> None:
    """Impossible values raise ValueError naming the key, before any model is loaded or computed."""
    _check_known_keys(cfg)
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not one of {TASKS}")
    if cfg.logger.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.mode={cfg.logger.mode!r}; use offline, online or disabled")
    if cfg.eval.seqlen < 2 or (cfg.eval.max_windows is not None and cfg.eval.max_windows < 1):
        raise ValueError("eval.seqlen >= 2 and eval.max_windows >= 1 (or null) required")
    if cfg.eval.requantize is not None:
        from .layers import QUANTIZATIONS

        if cfg.eval.requantize not in QUANTIZATIONS:
            raise ValueError(f"eval.requantize={cfg.eval.requantize!r} is not one of {QUANTIZATIONS[1:]}")
        if cfg.task != "evaluate":
            raise ValueError("eval.requantize re-rounds a finished artifact's coefficients: use it with task=evaluate "
                             "artifact=...; to fit at a coefficient width, set method.quantization instead")
    if cfg.task in ("evaluate", "export") and not cfg.artifact:
        raise ValueError(f"task={cfg.task} needs artifact=<directory of a finished compression run>")
    if cfg.task == "export":
        _validate_export(cfg)
    if cfg.task == "generate":
        from .models.generation import Sampling

        if not cfg.generate.prompt:
            raise ValueError("task=generate needs generate.prompt='...' (python -m cospadi_jax.generate prompt='...')")
        if cfg.generate.max_new_tokens < 1:
            raise ValueError(f"generate.max_new_tokens={cfg.generate.max_new_tokens} must be >= 1")
        Sampling(cfg.generate.temperature, cfg.generate.top_p, cfg.seed)  # raises on a bad temperature / top_p
    # Each node checks its own fields; the layer range is checked again once the model is loaded (compress()).
    cfg.method.validate(n_layers)
    cfg.calib.validate()
    cfg.refine.validate()
    cfg.budget.validate()


def compose_config(overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> DictConfig:
    """The app's config as ``python -m cospadi_jax.run <overrides>`` composes it, for callers that run or read it
    in-process (``cospadi_jax.demo``, ``experiments/*.py``); with ``return_hydra_config`` also its ``hydra`` node
    (sweep parameters, sweep directory). Composes inside the active Hydra context when there is one (a test's
    ``initialize_config_module``), since Hydra refuses a second one."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    with initialize_config_module(config_module="cospadi_jax.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def sweep_points(experiment: str) -> list[list[tuple[str, Any]]]:
    """The jobs of ``python -m cospadi_jax.run -m experiment=<experiment>``: one list of (key, value) overrides per
    job, the cartesian product of the experiment's ``hydra.sweeper.params`` as Hydra's basic sweeper builds it
    (``[[]]`` for an experiment without sweep parameters). A value is Python's (``None`` is Hydra's null)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_cfg = compose_config([f"experiment={experiment}"], return_hydra_config=True).hydra
    params = OmegaConf.to_container(hydra_cfg.sweeper.params) if hydra_cfg.sweeper.params else {}
    if not params:
        return [[]]
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[(o.get_key_element(), value) for value in o.sweep_iterator()] if o.is_sweep_override()
            else [(o.get_key_element(), o.value())] for o in parsed]
    return [list(point) for point in itertools.product(*axes)]


# The nodes an experiment's setting can change for a job (not task, output paths or Hydra's own node).
_SETTING_NODES = ("model", "method", "calib", "refine", "budget", "eval", "logger", "seed")


def _override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (strings quoted, so ``embedded:heldout`` parses as one string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a Hydra override")


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _flat(child, f"{prefix}.{key}").items()}
    return {prefix: node}


def experiment_overrides(experiment: str, method: str, *own: str) -> list[str]:
    """``method=<method>`` and the ``key=value`` overrides that put its job on ``experiment``'s setting: every
    value that ``experiment=<experiment>`` changes from the defaults, method keys only where ``method``'s config
    has them; then the job's ``own`` overrides, which replace the experiment's value of the same key (so that the
    command line shows each key once).

    For an experiment that sets a knob only some methods have (``method.ksvd_iterations``): ``experiment=X
    method=svd_llm`` fails to compose, since ``LowRankConfig`` has no such key, so every method's job restates the
    experiment's values instead, and one YAML file stays the only home of the setting."""
    from .methods import method_class

    base, setting = compose_config(), compose_config([f"experiment={experiment}"])
    if setting.method.name != base.method.name or setting.method.group_size != base.method.group_size:
        raise ValueError(f"experiment={experiment} picks its own method ({setting.method.label}); "
                         "experiment_overrides() restates values on top of the default method only")
    target = compose_config([f"method={method}"]).method
    fields = {f.name for f in dataclasses.fields(method_class(target.name).config_class)}
    changed = []
    for node in _SETTING_NODES:
        old = _flat(OmegaConf.to_container(base[node], resolve=True) if OmegaConf.is_config(base[node])
                    else base[node], node)
        new = _flat(OmegaConf.to_container(setting[node], resolve=True) if OmegaConf.is_config(setting[node])
                    else setting[node], node)
        for key, value in new.items():
            if old.get(key) != value and (node != "method" or key.split(".")[1] in fields):
                changed.append(f"{key}={_override_value(value)}")
    replaced = {o.split("=", 1)[0] for o in own}
    return [f"method={method}", *(o for o in changed if o.split("=", 1)[0] not in replaced), *own]


def export_path(cfg: RunConfig) -> Path:
    """Where task=export writes: ``export.path``, or ``<artifact>/export-<format>``."""
    return Path(cfg.export.path) if cfg.export.path else Path(cfg.artifact) / f"export-{cfg.export.format}"


def _validate_export(cfg: RunConfig) -> None:
    from .export import FORMATS

    if cfg.export.format not in FORMATS:
        raise ValueError(f"export.format={cfg.export.format!r}; use one of {FORMATS}")
    if export_path(cfg).absolute() == (Path(cfg.artifact) / EXPORT_JOB_DIR).absolute():
        raise ValueError(f"export.path={cfg.export.path} is the job's log directory (Hydra writes .hydra/ there); "
                         "choose another export.path.")
