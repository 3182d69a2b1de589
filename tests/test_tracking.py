"""wandb logging never blocks or fails a run without a network."""

from __future__ import annotations

import time

import pytest

from cospadi_jax.tracking import Tracker


@pytest.fixture(autouse=True)
def _no_wandb_env(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: no network


def test_offline_run_logs_everything_locally(tmp_path):
    t = Tracker(mode="offline", directory=str(tmp_path), config={"method": {"name": "cospadi"}},
                tags=["ablation:ksvd_iterations"])
    assert t.active and t.mode == "offline"
    t.log({"ppl": 12.5})
    t.log_table("matrices", [{"path": "model.layers.0.mlp.up_proj", "err": 0.1, "objective": [1.0, 0.5]}])
    t.log_objective("model.layers.0.mlp.up_proj", [1.0, 0.6, 0.5])
    t.summary({"realised_ratio": 0.2})
    t.finish()
    assert not t.active
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_online_without_network_falls_back_quickly(tmp_path):
    start = time.monotonic()
    t = Tracker(mode="online", directory=str(tmp_path), init_timeout=5)
    assert t.mode in ("offline", "disabled") and time.monotonic() - start < 60
    t.log({"x": 1})  # never raises
    t.finish()


def test_disabled_and_bad_mode(tmp_path):
    t = Tracker(mode="disabled", directory=str(tmp_path))
    assert not t.active
    t.log({"x": 1})
    t.finish()
    with pytest.raises(ValueError, match="wandb mode must be one of"):
        Tracker(mode="sometimes")
