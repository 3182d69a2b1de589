"""wandb logging that never blocks or fails a run: process 0 only, offline by default, finish() per job.

``mode`` is ``offline`` (default: written under ``dir``, sync later with ``wandb sync``), ``online`` or
``disabled``. If ``online`` cannot reach the server within ``init_timeout`` seconds the run continues offline
with a warning; any other wandb failure downgrades to ``disabled`` with a warning. Only process 0 of a
multi-process JAX run logs. ``run_id`` resumes the run of that id (``resume="allow"``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

log = logging.getLogger(__name__)
MODES = ("offline", "online", "disabled")


class Tracker:
    def __init__(self, *, mode: str = "offline", project: str = "cospadi-jax", name: str | None = None,
                 group: str | None = None, tags: list[str] | tuple[str, ...] = (), config: dict | None = None,
                 directory: str | None = None, init_timeout: float = 20.0, run_id: str | None = None):
        if mode not in MODES:
            raise ValueError(f"wandb mode must be one of {MODES}, got {mode!r}")
        self.mode = mode if jax.process_index() == 0 else "disabled"
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        # A stable ``run_id`` (kept in the artifact's metadata) makes a resumed job continue its wandb run
        # instead of leaving a crashed one beside a second.
        kwargs = dict(project=project, name=name, group=group, tags=list(tags), config=config or {}, dir=directory,
                      reinit="finish_previous", settings=wandb.Settings(init_timeout=init_timeout, silent=True),
                      **({"id": run_id, "resume": "allow"} if run_id else {}))
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as exc:  # network, auth, or server errors must not kill a compression run
            if self.mode == "online":
                log.warning("wandb online init failed (%s); logging offline instead", exc)
                self.mode = "offline"
                try:
                    self.run = wandb.init(mode="offline", **kwargs)
                    return
                except Exception as exc2:  # pragma: no cover - offline init failing is an environment problem
                    exc = exc2
            log.warning("wandb disabled for this run: %s", exc)
            self.mode, self.run = "disabled", None

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        """One wandb Table from a list of flat dicts (e.g. the per-matrix report)."""
        if self.run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        data = [[_scalar(r.get(c)) for c in columns] for r in rows]
        self.run.log({key: wandb.Table(columns=columns, data=data)})

    def log_objective(self, path: str, objective: list[float]) -> None:
        """K-SVD objective ‖Y − DS‖/‖Y‖ per iteration of one matrix, as a line series."""
        self.log_curve(f"ksvd_objective/{path}", "iteration", "objective", objective)

    def log_curve(self, key: str, x: str, y: str, values: list[float]) -> None:
        """``values`` against their index, as one wandb line plot under ``key``."""
        if self.run is not None and values:
            import wandb

            table = wandb.Table(columns=[x, y], data=[[i, v] for i, v in enumerate(values)])
            self.run.log({key: wandb.plot.line(table, x, y, title=key.split("/", 1)[-1])})

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        """Close the run (one wandb run per Hydra job: LHT #289)."""
        if self.run is not None:
            self.run.finish()
            self.run = None


def _scalar(v: Any) -> Any:
    if isinstance(v, (list, tuple, dict)):
        return str(v)
    return v
