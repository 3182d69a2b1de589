"""What makes two runs the same run: the keys that change a result, the run directory's name, the resume check.

Every key of the resolved :class:`~cospadi_jax.config.RunConfig` is *identity* unless it is listed in
:data:`PLACEMENT_KEYS`: where files go, how a run is logged, named or spread over devices, how much memory a
step may use. Two identities follow:

- the **artifact identity**: what the fitted factors depend on (model, method, calibration, seed). A run
  resumes into a directory whose artifact identity is equal, whatever its ``output_dir``, ``run_name``,
  cache paths, ``parallel`` or memory knobs; a refusal names the keys that differ.
- the **run identity**: the artifact identity plus the evaluation settings and the task, i.e. everything
  that changes ``metrics.json``. The default run directory ends in its hash, so every override of a sweep,
  whatever key it touches, gets its own directory (``tests/test_identity.py`` checks every key).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any

# Dotted keys (a key covers its subtree) that never change what a run computes.
PLACEMENT_KEYS = frozenset({
    "output_dir", "run_name", "artifact", "results_glob", "plot_dir", "paper", "ablation_axis", "logger",
    "export",  # task=export writes a finished artifact out; it computes nothing new
    "generate",  # task=generate samples from a finished artifact or model; it writes no result
    "model.name",  # a short name for directories and plots; the model is model.spec (+ dtype, revision)
    "method.label",  # the method's config name, a key into paper tables and legends
    "method.parallel", "method.omp_memory_mb",  # how the work is spread and chunked, not what it computes
    "calib.cache_dir", "calib.batch_size",  # the Gram cache key excludes the forward batch size
    "eval.dense_cache_dir",
})
# Of the identity keys, those that only change the evaluation, not the fitted factors.
EVALUATION_KEYS = frozenset({"eval", "task"})
# Keys that are identity only when set: at this value they change nothing, and runs written before the key
# existed keep their names and still resume.
INACTIVE_VALUES: dict[str, Any] = {"method.ksvd_snapshots": [], "eval.requantize": None}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _excluded(dotted: str, keys: frozenset[str]) -> bool:
    return any(dotted == k or dotted.startswith(k + ".") for k in keys)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _defaults() -> dict[str, Any]:
    from .config import RunConfig

    return _plain(dataclasses.asdict(RunConfig()))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _complete(config: dict[str, Any]) -> dict[str, Any]:
    """The config over the schema defaults (keys an older artifact lacks take their default), ``hydra`` dropped.

    The ``method`` node is completed over the defaults of its own method's config class and keeps only that
    class's keys: an artifact written when every method carried every knob (an SVD-LLM run with ``rho``) has
    the identity that the same run has now."""
    plain = {k: v for k, v in _plain(config).items() if k != "hydra"}
    merged = _merge(_defaults(), plain)
    method = plain.get("method") or {}
    own = _method_defaults(method.get("name", "cospadi"))
    if own is not None:
        merged["method"] = {**own, **{k: v for k, v in method.items() if k in own}}
    return merged


def _method_defaults(name: str) -> dict[str, Any] | None:
    """The defaults of method ``name``'s config class (None for an unknown name, which validation reports)."""
    from .methods import METHODS

    if name not in METHODS:
        return None
    return _plain(dataclasses.asdict(METHODS[name].config_class(name=name)))


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """Flat ``{dotted key: value}`` of every key of a resolved run config that changes its metrics.

    Keys missing from ``config`` (an artifact written before the key existed) take the schema default, so an
    old artifact still resumes when the new key keeps its default. The ``hydra`` node is never identity.
    """
    flat = flatten(_complete(config))
    return {k: v for k, v in sorted(flat.items())
            if not _excluded(k, PLACEMENT_KEYS) and not (k in INACTIVE_VALUES and v == INACTIVE_VALUES[k])}


def snapshot_config(config: dict[str, Any], ksvd_iterations: int) -> dict[str, Any]:
    """The resolved config of the run that a K-SVD snapshot after ``ksvd_iterations`` iterations equals: the same
    run at T = ``ksvd_iterations`` without snapshots (its identity is that run's, so either resumes the other)."""
    out = copy.deepcopy(_plain(config))
    out["method"] = {**out["method"], "ksvd_iterations": int(ksvd_iterations), "ksvd_snapshots": []}
    if out.get("run_name"):
        out["run_name"] = f"{out['run_name']}-snapshot-T{int(ksvd_iterations)}"
    return out


def artifact_identity(config: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_identity` less the evaluation keys: what the fitted factors depend on."""
    return {k: v for k, v in run_identity(config).items() if not _excluded(k, EVALUATION_KEYS)}


def digest(identity: dict[str, Any], length: int = 8) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:length]


def differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per key whose value differs: ``method.ratio: 0.2 -> 0.3``."""
    def show(tree: dict[str, Any], key: str) -> str:
        return json.dumps(tree[key], default=str) if key in tree else "(absent)"

    return [f"{key}: {show(stored, key)} -> {show(new, key)}" for key in sorted(set(stored) | set(new))
            if key not in stored or key not in new or stored[key] != new[key]]


def run_name(config: dict[str, Any]) -> str:
    """The default run directory name: a readable prefix, then the run identity's hash.

    ``smollm2-135m-cospadi-cr0.2-rho2.0-T60-n256x1024-1f0e93ab``, ``smollm2-135m-svd_llm-cr0.2-n256x1024-5c21d7e0``.
    The prefix is for people (model, method label, CR, the K-SVD knobs of K-SVD methods, calibration size); the
    hash makes the name unique for every setting that changes a result.
    """
    merged = _complete(config)
    model, method, calib = merged["model"], merged["method"], merged["calib"]
    parts = [model["name"], method["label"] or method["name"], f"cr{method['ratio']}"]
    if "ksvd_iterations" in method:  # a K-SVD method: its own knobs in the tag
        parts += [f"rho{method['rho']}", f"T{method['ksvd_iterations']}"]
    if method["group_size"] > 1:
        parts.append(f"m{method['group_size']}")
    if calib["sequential"]:
        parts.append("seq")
    if merged["refine"]["steps"]:
        parts.append(f"R{merged['refine']['steps']}")
    if merged["budget"]["allocation"] != "uniform":
        parts.append(f"A{merged['budget']['allocation']}-{merged['budget']['curve']}")
    parts += [f"n{calib['nsamples']}x{calib['seqlen']}", digest(run_identity(config))]
    return "-".join(str(p) for p in parts)
