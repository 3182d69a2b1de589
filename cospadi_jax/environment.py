"""Where a result was computed: the git SHA, package versions and the host, recorded in every artifact."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

_VERSIONED = ("jax", "jaxlib", "flax", "orbax-checkpoint", "transformers", "torch", "numpy", "lm-eval", "hydra-core",
              "wandb", "cospadi-jax")


def environment() -> dict[str, Any]:
    """Git SHA and package versions for every artifact."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import jax

    # CoSpaDi is bit-reproducible only with the same device kind and XLA:CPU thread pool, which XLA sizes from the
    # usable cores: another pool reorders float32 reductions and flips some of OMP's atom choices
    # (docs/benchmarks.md, "Reproducibility across hosts").
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "cpus_usable": usable,
            "device_kind": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    return {"git_sha": sha, "versions": versions, "backend": jax.default_backend(),
            "devices": jax.device_count(), "processes": jax.process_count(), "host": host}
