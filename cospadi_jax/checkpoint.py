"""Compressed-model artifacts in orbax, written after every finished matrix or group, resumable.

Layout of an artifact directory::

    metadata.json          config, identity (what must match to resume), wandb run id, model, versions
                           (written once the config is validated, before the first unit)
    units/00017/           one orbax PyTree checkpoint per finished fitting unit: its factors and its report rows
    progress.json          finished unit indices (rewritten atomically after each unit); in a multi-process
                           run process p writes progress.p<p>.json instead and readers take the union
    refined/00003/         a decoder layer's factors after block-output refinement (refine.py), then its
                           record.json; they replace the layer's fitted factors when the artifact is loaded
    report.json            the final report (written last)

A unit's orbax directory is finalised atomically by orbax, and ``progress.json`` is replaced atomically after it,
so a run killed at any instant leaves only complete units listed. Resuming with another identity raises and
names the keys that differ; a resumed single-process run removes the temporary files a kill left; a unit listed but unreadable raises ``CorruptCheckpointError`` rather than being silently refitted.
Nothing here unpickles: factors are arrays, everything else is JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .fileio import atomic_path, atomic_write_json, check_writable
from .identity import differences
from .methods.base import DictFactors, Factors, LowRankFactors

log = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is unreadable or inconsistent."""


class ConfigMismatchError(ValueError):
    """Resuming into an artifact directory written under a different configuration."""


def fingerprint(obj: Any) -> str:
    """sha256 (16 hex) of a JSON-serialisable object, keys sorted."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _factors_tree(factors: Factors) -> dict[str, np.ndarray]:
    if isinstance(factors, DictFactors):
        return {"D": np.asarray(factors.D), "indices": np.asarray(factors.indices, np.int32),
                "values": np.asarray(factors.values)}
    return {"A": np.asarray(factors.A), "B": np.asarray(factors.B)}


def _factors_from_tree(tree: dict[str, np.ndarray], info: dict) -> Factors:
    if "D" in tree:
        return DictFactors(np.asarray(tree["D"]), np.asarray(tree["indices"]), np.asarray(tree["values"]), info)
    return LowRankFactors(np.asarray(tree["A"]), np.asarray(tree["B"]), info)


def _default_identity(metadata: dict[str, Any]) -> Any:
    return metadata.get("identity", metadata.get("config_fingerprint"))


class ArtifactWriter:
    """Incremental artifact: ``save_unit`` after each finished unit, ``finished_units`` to resume.

    ``identity_of(metadata)`` gives what must be equal to resume into an existing directory (default: the
    metadata's ``identity``): a flat dict, so that a refusal can name the keys that differ.
    """

    def __init__(self, directory: str | Path, metadata: dict[str, Any],
                 identity_of: Callable[[dict[str, Any]], Any] = _default_identity):
        self.directory = check_writable(directory)
        (self.directory / "units").mkdir(exist_ok=True)
        meta_path = self.directory / "metadata.json"
        import jax

        rank, world = jax.process_index(), jax.process_count()
        if meta_path.exists():
            try:
                stored = json.loads(meta_path.read_text())
            except json.JSONDecodeError as exc:
                raise CorruptCheckpointError(f"{meta_path} is not valid JSON ({exc}); delete the directory") from exc
            theirs, ours = identity_of(stored), identity_of(metadata)
            if theirs != ours:
                what = ("\n  ".join(differences(theirs, ours)) if isinstance(theirs, dict) and isinstance(ours, dict)
                        else f"{theirs} -> {ours}")
                raise ConfigMismatchError(
                    f"{self.directory} holds an artifact of another setting, so it is never reused. Keys that "
                    f"differ (stored -> this run):\n  {what}\nUse another output_dir, or the stored values to "
                    "resume.")
            if stored.get("host") is not None and stored.get("host") != metadata.get("host"):
                # Still a valid result, but not bit-identical to an uninterrupted run on either host: another
                # XLA:CPU thread pool (core count) reorders float32 reductions and flips some OMP atom choices.
                log.warning("resuming %s on another host setting (%s, was %s): the resumed units will not be "
                            "bit-identical to an uninterrupted run", self.directory, metadata.get("host"),
                            stored.get("host"))
            # Kept from the first attempt: the wandb run id (one run, resumed) and the first start time.
            metadata = {**metadata, **{k: stored[k] for k in ("wandb_run_id", "created") if k in stored}}
            if world == 1:  # other processes may be writing right now; a single process is alone
                _remove_leftovers(self.directory)
        else:
            metadata = {"wandb_run_id": uuid.uuid4().hex[:16], "created": time.time(), **metadata}
            atomic_write_json(meta_path, metadata)
        self.metadata = metadata
        # One progress file per process, so that processes never rewrite each other's list (parallel="matrices").
        self._progress_path = self.directory / ("progress.json" if world == 1 else f"progress.p{rank}.json")
        self._lock = threading.Lock()  # worker threads of one process save units concurrently
        self._identity_of = identity_of
        self._snapshots: dict[int, ArtifactWriter] = {}

    def snapshot(self, ksvd_iterations: int) -> "ArtifactWriter":
        """The artifact of this run's K-SVD snapshot after ``ksvd_iterations`` iterations (``snapshots/T<t>/``,
        opened on first use): a complete artifact whose metadata is that of the same run at T = t without
        snapshots (``identity.snapshot_config``), so resume, ``restore_model`` and evaluation treat it as that run."""
        from .identity import artifact_identity, snapshot_config

        t = int(ksvd_iterations)
        with self._lock:
            if t not in self._snapshots:
                directory = self.directory / SNAPSHOTS / f"T{t}"
                config = {**snapshot_config(self.metadata["config"], t), "output_dir": str(directory)}
                metadata = {k: v for k, v in self.metadata.items() if k not in ("wandb_run_id", "created")}
                metadata.update(config=config, identity=artifact_identity(config), snapshot_of=str(self.directory))
                self._snapshots[t] = ArtifactWriter(directory, metadata, self._identity_of)
            return self._snapshots[t]

    def finished_indices(self) -> list[int]:
        """Indices of the finished units (without reading their factors)."""
        return _finished_indices(self.directory)

    def finished_units(self, total: int | None = None, factors: bool = True
                       ) -> dict[int, tuple[list[Factors], list[dict]]]:
        """Factors and report rows of every unit a previous run (or another process) finished; logs how many
        of ``total`` units are reused. ``factors=False`` reads the rows only (factors ``[]``): a streamed run
        resumed into a model larger than the host reads each unit's factors when it needs them (``unit``)."""
        done = _read_units(self.directory, _finished_indices(self.directory), factors)
        if done and total is not None:
            log.info("resuming %s: %d of %d units reused", self.directory, len(done), total)
        return done

    def unit(self, idx: int) -> tuple[list[Factors], list[dict]]:
        """Factors and report rows of one finished unit."""
        return _read_units(self.directory, [idx])[idx]

    def save_unit(self, idx: int, factors: list[Factors], rows: list[dict]) -> None:
        import jax

        unit_dir = self.directory / "units" / f"{idx:05d}"
        unit_dir.mkdir(exist_ok=True)
        trees = [_factors_tree(f) for f in factors]
        if jax.process_index() == 0:
            _save_orbax(unit_dir, trees)
        else:  # orbax writes NumPy leaves only from process 0: stage, process 0 converts in finalize()
            _save_staged(unit_dir, trees)
        atomic_write_json(unit_dir / "report.json",
                          [{**r, "info": {k: v for k, v in f.info.items()}} for r, f in zip(rows, factors)])
        with self._lock:
            mine = _read_progress(self._progress_path) if self._progress_path.exists() else []
            atomic_write_json(self._progress_path, {"finished": sorted({*mine, idx})})

    def save_refined(self, layer: int, factors: dict[str, Factors], record: dict) -> None:
        """Decoder layer ``layer``'s refined factors (by HF path) and its refinement record (process 0 only:
        every process refines identically). ``record.json`` is written last: a layer is there whole or not at all."""
        import jax

        if jax.process_index() != 0:
            return
        layer_dir = self.directory / REFINED / f"{layer:05d}"
        layer_dir.mkdir(parents=True, exist_ok=True)
        _save_orbax(layer_dir, [_factors_tree(f) for f in factors.values()])
        atomic_write_json(layer_dir / "record.json", {"record": record, "paths": list(factors)})

    def refined_layers(self) -> dict[int, tuple[dict, dict[str, Factors]]]:
        """(record, factors by path) of every layer an earlier attempt refined."""
        return _read_refined(self.directory)

    def save_allocation(self, allocation: dict) -> None:
        """The per-unit ratios of a non-uniform budget (``allocation.json``), written before any unit is fitted."""
        import jax

        if jax.process_index() == 0:
            atomic_write_json(self.directory / ALLOCATION, allocation)

    def allocation(self) -> dict | None:
        """The allocation an earlier attempt saved (reused, so a resumed run fits every unit at its ratio)."""
        path = self.directory / ALLOCATION
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptCheckpointError(f"{path} is not valid JSON ({exc}); delete it to recompute it") from exc

    def finalize(self, report: dict) -> None:
        """Write the final report (process 0, after every process has read the units it needs). Units staged
        by other processes are converted to orbax first, so a finished artifact is orbax throughout."""
        for staged in sorted(self.directory.glob(f"units/*/{STAGED_FACTORS}")):
            _save_orbax(staged.parent, _load_factors(staged.parent)["factors"])
            staged.unlink()
        atomic_write_json(self.directory / "report.json", report)


def _remove_leftovers(directory: Path) -> None:
    """Temporary files and orbax's unfinished checkpoint directories that a killed run left behind."""
    import shutil

    leftovers = [*directory.glob("*.tmp"), *directory.glob("units/*/*.tmp*"),
                 *directory.glob("units/*/*orbax-checkpoint-tmp*"), *directory.glob(f"{REFINED}/*/*.tmp*"),
                 *directory.glob(f"{REFINED}/*/*orbax-checkpoint-tmp*")]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if leftovers:
        log.info("removed %d temporary file(s) left by an interrupted run in %s", len(leftovers), directory)


STAGED_FACTORS = "factors.npz"  # a unit fitted by a process other than 0, until finalize()
REFINED = "refined"  # refined/<layer>/: a decoder layer's factors after block-output refinement (refine.py)
ALLOCATION = "allocation.json"  # per-unit ratios of a non-uniform budget (allocation.py)
SNAPSHOTS = "snapshots"  # snapshots/T<t>/: the complete artifact of the run's K-SVD state after t iterations


def _save_orbax(unit_dir: Path, trees: list[dict[str, np.ndarray]]) -> None:
    checkpointer = _checkpointer()
    checkpointer.save(unit_dir.resolve() / "factors", {"factors": trees}, force=True)
    checkpointer.wait_until_finished()


def _save_staged(unit_dir: Path, trees: list[dict[str, np.ndarray]]) -> None:
    """NumPy .npz (no pickles), written to a temporary name and renamed: a unit is there whole or not at all."""
    with atomic_path(unit_dir / STAGED_FACTORS, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **{f"{i}/{name}": a for i, tree in enumerate(trees) for name, a in tree.items()})


def _checkpointer() -> Any:
    """An orbax checkpointer local to this process: units are written by whichever process fitted them
    (``parallel="matrices"``), so no save may wait on a barrier with the other processes."""
    import jax
    import orbax.checkpoint as ocp

    rank = jax.process_index()
    local = ocp.options.MultiprocessingOptions(primary_host=rank, active_processes={rank},
                                               barrier_sync_key_prefix=f"cospadi-p{rank}")
    return ocp.StandardCheckpointer(multiprocessing_options=local)


def _read_progress(path: Path) -> list[int]:
    try:
        return list(json.loads(path.read_text())["finished"])
    except (json.JSONDecodeError, KeyError) as exc:
        raise CorruptCheckpointError(f"{path} is corrupted ({exc}); delete the directory to restart") from exc


def _finished_indices(directory: Path) -> list[int]:
    """Union of the finished units listed by every process's progress file."""
    return sorted({i for path in directory.glob("progress*.json") for i in _read_progress(path)})


def _load_factors(unit_dir: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    staged = unit_dir / STAGED_FACTORS
    if staged.exists():
        with np.load(staged, allow_pickle=False) as data:
            n = len({name.split("/")[0] for name in data.files})
            trees: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
            for name in data.files:
                i, leaf = name.split("/")
                trees[int(i)][leaf] = data[name]
        return {"factors": trees}
    return _checkpointer().restore(unit_dir.resolve() / "factors")


def _read_units(directory: Path, indices: list[int], factors: bool = True
                ) -> dict[int, tuple[list[Factors], list[dict]]]:
    out = {}
    for idx in indices:
        unit_dir = directory / "units" / f"{idx:05d}"
        try:
            tree = _load_factors(unit_dir) if factors else {"factors": []}
            rows = json.loads((unit_dir / "report.json").read_text())
        except Exception as exc:
            raise CorruptCheckpointError(
                f"unit {idx} is listed as finished but cannot be read ({type(exc).__name__}: {exc}); "
                f"delete {directory} to restart"
            ) from exc
        out[idx] = ([_factors_from_tree(t, r.get("info", {})) for t, r in zip(tree["factors"], rows)], rows)
    return out


def _read_refined(directory: Path) -> dict[int, tuple[dict, dict[str, Factors]]]:
    out = {}
    for record_path in sorted(directory.glob(f"{REFINED}/*/record.json")):
        try:
            stored = json.loads(record_path.read_text())
            trees = _load_factors(record_path.parent)["factors"]
        except Exception as exc:
            raise CorruptCheckpointError(
                f"refined layer {record_path.parent.name} cannot be read ({type(exc).__name__}: {exc}); delete "
                f"{record_path.parent} to refine it again") from exc
        out[int(stored["record"]["layer"])] = (stored["record"], {
            p: _factors_from_tree(t, {}) for p, t in zip(stored["paths"], trees)})
    return out


def load_artifact(directory: str | Path) -> tuple[dict[str, Factors], dict[str, Any]]:
    """Factors by projection path and the metadata of a finished artifact."""
    directory = Path(directory)
    if not (directory / "report.json").exists():
        raise FileNotFoundError(f"{directory} holds no finished artifact (no report.json); resume the run first")
    metadata = json.loads((directory / "metadata.json").read_text())
    factors = {}
    for _, (unit_factors, rows) in sorted(_read_units(directory, _finished_indices(directory)).items()):
        for f, row in zip(unit_factors, rows):
            factors[row["path"]] = f
    for _, refined in _read_refined(directory).values():  # refined factors replace the fitted ones
        factors.update({p: dataclasses.replace(f, info=factors[p].info) for p, f in refined.items()})
    return factors, metadata


def restore_model(directory: str | Path, *, mode: str | None = None, requantize: str | None = None
                  ) -> tuple[Any, Any, dict[str, Any]]:
    """The compressed model of a finished artifact, without recompressing: its base model (from the
    metadata's model spec and dtype) with every fitted projection swapped for its factors.

    ``mode``: the ``DictLinear`` mode to build (default: the artifact's ``method.mode``). ``requantize``: round
    the coefficient values to this grid first (``layers.QUANTIZATIONS``); the artifact must hold unrounded values
    and no refined layers (refinement rounds inside its own acceptance test). Returns (model, tokenizer, metadata).
    """
    from .layers import quantize_coefficients, replace_projection
    from .models import load_model

    factors, metadata = load_artifact(directory)
    if requantize is not None:
        config = metadata.get("config", {})
        if (config.get("method") or {}).get("quantization") or (config.get("refine") or {}).get("steps"):
            raise ValueError(f"{directory} was fitted with method.quantization or refine.steps set: its values are "
                             "already rounded or refined to one grid. Requantize an artifact fitted without them.")
        factors = {p: dataclasses.replace(f, values=quantize_coefficients(f.values, requantize))
                   if isinstance(f, DictFactors) else f for p, f in factors.items()}
    model_conf = metadata["model"]
    model, tokenizer = load_model(model_conf["spec"], model_conf["dtype"], revision=model_conf.get("revision"))
    mode = mode or metadata["config"]["method"]["mode"]
    for path, f in factors.items():
        replace_projection(model, path, f, mode=mode)
    return model, tokenizer, metadata
