"""Structured configs of the Hydra app (registered in Hydra's ConfigStore as schemas).

Every YAML under ``conf/`` is validated against these dataclasses before any work starts: an unknown key or a
wrong type is an error from OmegaConf, and impossible values are errors from :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .allocation import AllocationConfig
from .compress import DEFAULT_SHARED_TYPES, CalibrationSpec, CompressionConfig
from .models.paths import PROJECTION_TYPES
from .refine import RefineConfig
from .sparse.backend import OMP_BACKENDS
from .sparse.ksvd import SPARSE_CODERS

# An Enum, so that OmegaConf refuses an unknown backend when the config is composed, before any work.
OmpBackend = Enum("OmpBackend", {name: name for name in OMP_BACKENDS}, type=str)
SparseCoder = Enum("SparseCoder", {name: name for name in SPARSE_CODERS}, type=str)


@dataclass
class ModelConf:
    spec: str = "smollm2-135m"  # embedded name, .gguf path, HF directory or hub id
    name: str = "smollm2-135m"  # short name used in run names and plots
    dtype: str = "float32"
    revision: Optional[str] = None


@dataclass
class MethodConf:
    name: str = "cospadi"
    label: str = "cospadi"  # the method's config name: key into paper tables and plot legends
    ratio: float = 0.2
    rho: float = 2.0
    accounting: str = "eq11"
    group_size: int = 1
    shared_types: list[str] = field(default_factory=lambda: list(DEFAULT_SHARED_TYPES))
    layers: Optional[list[int]] = None
    proj_types: list[str] = field(default_factory=lambda: list(PROJECTION_TYPES))
    ksvd_iterations: int = 60
    power_iterations: int = 8
    dict_update: str = "power"
    reseed_unused: bool = False
    mode: str = "dense"
    quantization: Optional[str] = None
    # none | columns (one matrix's columns sharded over all devices: shard_map OMP) | matrices (independent
    # matrices/groups spread over processes and their local devices)
    parallel: str = "none"
    # working memory of one OMP chunk per device; null = the backend's default (xla: 16 MiB, an L3-sized chunk;
    # gemm: 25 % of the device's memory)
    omp_memory_mb: Optional[int] = None
    # Batch-OMP implementation: auto (cpu_kernel on CPU, gemm on GPU/TPU) | xla | cpu_kernel | gemm
    omp_backend: OmpBackend = OmpBackend.auto
    # K-SVD's sparse coder: omp (the paper) | ormp (order-recursive matching pursuit: lower error at the same s)
    sparse_coder: SparseCoder = SparseCoder.omp


@dataclass
class CalibConf:
    source: str = "embedded:calibration"
    nsamples: int = 256
    seqlen: int = 1024
    seed: int = 42
    heldout_source: Optional[str] = "embedded:heldout"
    heldout_nsamples: int = 32
    batch_size: int = 8
    cache_dir: Optional[str] = ".cache/grams"
    sequential: bool = False  # Grams of layer l on the model whose layers < l are compressed (sequential.py)


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
    method: MethodConf = field(default_factory=MethodConf)
    calib: CalibConf = field(default_factory=CalibConf)
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


def register_configs() -> None:
    """The schema of the whole tree (``run_schema``, typing every group) and the resolvers of conf/config.yaml."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
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


def compression_config(cfg: RunConfig) -> CompressionConfig:
    m = cfg.method
    return CompressionConfig(
        method=m.name, ratio=m.ratio, rho=m.rho, accounting=m.accounting, group_size=m.group_size,
        shared_types=tuple(m.shared_types), layers=tuple(m.layers) if m.layers is not None else None,
        proj_types=tuple(m.proj_types), ksvd_iterations=m.ksvd_iterations, power_iterations=m.power_iterations,
        dict_update=m.dict_update, reseed_unused=m.reseed_unused, seed=cfg.seed, mode=m.mode,
        quantization=m.quantization, parallel=m.parallel, omp_memory_mb=m.omp_memory_mb,
        omp_backend=OmpBackend(m.omp_backend).value, sparse_coder=SparseCoder(m.sparse_coder).value,
    )


def calibration_spec(cfg: RunConfig) -> CalibrationSpec:
    c = cfg.calib
    return CalibrationSpec(source=c.source, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed,
                           heldout_source=c.heldout_source, heldout_nsamples=c.heldout_nsamples,
                           batch_size=c.batch_size, cache_dir=c.cache_dir, sequential=c.sequential)


def validate(cfg: RunConfig, n_layers: int | None = None) -> None:
    """Impossible values raise ValueError naming the key, before any model is loaded or computed."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not one of {TASKS}")
    if cfg.logger.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.mode={cfg.logger.mode!r}; use offline, online or disabled")
    if cfg.calib.nsamples < 1 or cfg.calib.seqlen < 2:
        raise ValueError(f"calib.nsamples >= 1 and calib.seqlen >= 2 required, got {cfg.calib.nsamples}, "
                         f"{cfg.calib.seqlen}")
    if cfg.eval.seqlen < 2 or (cfg.eval.max_windows is not None and cfg.eval.max_windows < 1):
        raise ValueError("eval.seqlen >= 2 and eval.max_windows >= 1 (or null) required")
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
    # Method fields are checked by the compression config itself; layer-dependent checks rerun after loading.
    compression_config(cfg).validate(n_layers)
    cfg.refine.validate()
    cfg.budget.validate()


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
