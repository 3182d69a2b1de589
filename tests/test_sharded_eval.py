"""Sharded (data-parallel) evaluation equals the single-device evaluation.

The device-count-dependent parts run this file as a script in subprocesses, so this pytest process keeps its
own single CPU device:
* ``single``: 1 process x 8 virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8);
* ``multi``: 2 processes x 4 CPU devices through jax.distributed on localhost (gloo collectives), process 0
  driving lm-eval and process 1 following it.
The single-device references are computed in this pytest process.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, run_peer_processes, subprocess_env

TIMEOUT_S = 480  # generous: a loaded 2-core CI box; a hang still fails, after this long
# 13 windows: not a multiple of 8 (or 4), so the padded last batch is exercised; batch_size 3 -> 8 rows sharded.
N_WINDOWS, SEQLEN, BATCH = 13, 32, 3
REQUESTS = [  # (context, continuation): lm-eval loglikelihood requests, tokenised one byte per token
    ("Question: In the beginning God created\nAnswer:", " the heaven"),
    ("The capital of France is ", "Paris"),  # trailing space moves to the continuation
    ("", "Hello world"),  # empty context: the prefix token
    ("To boil water, you should", " heat it on a stove."),
    ("When it rains, people carry", " an umbrella."),
]
ROLLING = "And God said, Let there be light: and there was light."


class ByteTokenizer:
    """Deterministic stand-in tokenizer for the 96-token tiny model: one id per byte, BOS = 1, EOS = 2."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + b % 93 for b in text.encode()]}


def tiny_model():
    """The tests' tiny random Llama (helpers.TINY_FAMILIES['llama_gqa'], tied), built without importing
    transformers (seconds per subprocess on a loaded 2-core box)."""
    from types import SimpleNamespace

    from helpers import TINY_COMMON, TINY_FAMILIES

    from cospadi_jax.models import random_model

    cfg = SimpleNamespace(model_type="llama", **TINY_COMMON, **TINY_FAMILIES["llama_gqa"][1], tie_word_embeddings=True)
    return random_model(cfg, seed=0)


def windows() -> np.ndarray:
    return np.random.default_rng(0).integers(3, 96, size=(N_WINDOWS, SEQLEN)).astype(np.int32)


def instances(kind: str, args: list[tuple[str, ...]]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def local_task_manager() -> type:
    """lm-eval's TaskManager without its index of built-in tasks: the tests only use the local task, and scanning
    the thousands of built-in YAML files takes 10-20 s on a loaded 2-core box."""
    from lm_eval.tasks import TaskManager

    class LocalTaskManager(TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, include_defaults=False, **kwargs)

    return LocalTaskManager


def score_requests(lm) -> dict[str, np.ndarray]:
    """loglikelihood of REQUESTS and loglikelihood_rolling of ROLLING through ``lm``; the longest sequence of
    each call has 55-57 tokens, so with 8 rows per batch each call is one [8, 64] batch."""
    ll = lm.loglikelihood(instances("loglikelihood", REQUESTS))
    rolling = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(ROLLING,)]))
    return {"ll": np.asarray([v for v, _ in ll]), "greedy": np.asarray([g for _, g in ll]),
            "rolling": np.asarray(rolling)}


# --------------------------------------------------------------------------- subprocess workers


def run_single(out: str) -> None:
    import jax

    from cospadi_jax import parallel as dist
    from cospadi_jax.eval import windows_perplexity
    from cospadi_jax.eval.harness import FlaxLM
    from cospadi_jax.eval.sharded import ShardedScorer, param_sharding
    from cospadi_jax.models import token_logprobs

    assert jax.device_count() == 8
    model, mesh = tiny_model(), dist.make_mesh()
    res = {"ppl": windows_perplexity(model, windows(), batch_size=BATCH, progress=False, mesh=mesh).to_dict()}
    lm = FlaxLM(model, ByteTokenizer(), batch_size=2, progress=False, mesh=mesh)
    res["lm_batch_size"] = lm.batch_size
    scores = score_requests(lm)
    # What the compiled scorer really gets: batch split 8 ways, parameters replicated, no communication.
    scorer = ShardedScorer(token_logprobs, model, mesh)
    ids = jax.device_put(windows()[:8], scorer.batch_sharding)
    compiled = scorer.lower(ids, ids).compile()
    params_in, ids_in, mask_in = compiled.input_shardings[0]
    hlo, param_shardings = compiled.as_text(), jax.tree.leaves(params_in)
    res.update(
        ids_spec=str(ids_in.spec), mask_spec=str(mask_in.spec),
        params_replicated=bool(param_shardings) and all(s.is_fully_replicated for s in param_shardings),
        ids_shard_rows=sorted({s.data.shape[0] for s in ids.addressable_shards}),
        collectives=sum(hlo.count(op) for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")),
    )
    # The same rules table shards parameters instead (dimension 0 over "data", FSDP-style): same perplexity.
    with dist.use_rules(dataclasses.replace(dist.SHARDING_RULES, params="data")):
        fsdp = ShardedScorer(token_logprobs, model, mesh)
        res["fsdp_embedding_spec"] = str(fsdp.params["model"]["embed_tokens"]["embedding"].sharding.spec)
        res["fsdp_ppl"] = windows_perplexity(model, windows(), batch_size=BATCH, progress=False, mesh=mesh).perplexity
        try:
            param_sharding(mesh, (12, 4))
        except ValueError as exc:
            res["fsdp_indivisible_error"] = str(exc)
    # Outside the block the default rules are back: parameters replicated.
    res["params_rule_after"] = repr(dist.active_rules().params)
    Path(out).write_text(json.dumps(res))
    np.savez(Path(out).with_suffix(".npz"), **scores)


def run_multi(out: str, coordinator: str, num_processes: int, process_id: int, task_dir: str) -> None:
    from cospadi_jax import parallel as dist

    assert dist.initialize(coordinator, num_processes, process_id), "jax.distributed did not start"
    import jax
    import lm_eval.tasks

    from cospadi_jax.eval import windows_perplexity
    from cospadi_jax.eval.harness import FlaxLM, evaluate_zero_shot

    model, mesh = tiny_model(), dist.make_mesh()
    res = {"process_index": jax.process_index(), "device_count": jax.device_count(),
           "ppl": windows_perplexity(model, windows(), batch_size=BATCH, progress=False, mesh=mesh).to_dict()}
    lm = FlaxLM(model, ByteTokenizer(), batch_size=2, progress=False, mesh=mesh)
    res["is_follower"] = lm.is_follower
    scores = {}
    if lm.is_follower:
        res["served"] = lm.follow()
    else:
        scores = score_requests(lm)
        lm.release_followers()
    # lm-eval end to end: process 0 runs simple_evaluate on the local task, process 1 follows automatically.
    lm_eval.tasks.TaskManager = local_task_manager()
    res["zero_shot"] = evaluate_zero_shot(model, ByteTokenizer(), ["tiny_mc"], include_path=task_dir,
                                          batch_size=4, progress=False, mesh=mesh)
    if res["zero_shot"] is not None:
        res["zero_shot"].pop("raw")
    Path(out).write_text(json.dumps(res))
    np.savez(Path(out).with_suffix(".npz"), **scores)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def reference() -> dict:
    """Single-device perplexity and lm-eval scores, in this (one-device) pytest process."""
    from cospadi_jax.eval import windows_perplexity
    from cospadi_jax.eval.harness import FlaxLM

    model = tiny_model()
    return {"ppl": windows_perplexity(model, windows(), batch_size=BATCH, progress=False).to_dict(),
            **score_requests(FlaxLM(model, ByteTokenizer(), batch_size=2, progress=False))}


def _check_ppl(got: dict, ref: dict) -> None:
    assert got["n_windows"] == N_WINDOWS and got["n_tokens"] == ref["n_tokens"] == N_WINDOWS * (SEQLEN - 1)
    np.testing.assert_allclose(got["perplexity"], ref["perplexity"], rtol=1e-5)
    np.testing.assert_allclose(got["mean_nll"], ref["mean_nll"], rtol=1e-5)


def _check_scores(got, ref: dict) -> None:
    np.testing.assert_allclose(got["ll"], ref["ll"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["greedy"], ref["greedy"])
    np.testing.assert_allclose(got["rolling"], ref["rolling"], rtol=1e-5)


def test_sharded_eval_8_devices(tmp_path, reference):
    """1 process x 8 devices: perplexity (13 windows, padded) and FlaxLM scores equal one device."""
    out = tmp_path / "single.json"
    proc = subprocess.run([sys.executable, __file__, "single", str(out)], check=False, capture_output=True,
                          text=True, timeout=TIMEOUT_S,
                          env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    _check_ppl(res["ppl"], reference["ppl"])
    _check_scores(np.load(out.with_suffix(".npz")), reference)
    assert res["lm_batch_size"] == 8  # batch_size 2 rounded up to the 8 batch shards
    # The compiled scorer takes ids and mask split over "data" (one row per device), parameters replicated,
    # and needs no collective at all: pure data parallelism.
    from jax.sharding import PartitionSpec as P

    assert res["ids_spec"] == res["mask_spec"] == str(P("data", None))
    assert res["ids_shard_rows"] == [1] and res["params_replicated"] and res["collectives"] == 0
    assert res["fsdp_embedding_spec"] == str(P("data", None))  # [vocab, hidden]: vocab rows over "data"
    np.testing.assert_allclose(res["fsdp_ppl"], reference["ppl"]["perplexity"], rtol=1e-5)
    assert "sharding rule params='data'" in res["fsdp_indivisible_error"]
    assert res["params_rule_after"] == "None"


def test_one_device_mesh_and_misuse(reference):
    """A one-device mesh takes the sharded path with identical results; misuse raises errors naming the fix."""
    from cospadi_jax.parallel import make_mesh
    from cospadi_jax.eval import windows_perplexity
    from cospadi_jax.eval.harness import FlaxLM
    from cospadi_jax.eval.sharded import ShardedScorer
    from cospadi_jax.models import token_logprobs

    model, mesh = tiny_model(), make_mesh()
    got = windows_perplexity(model, windows(), batch_size=BATCH, progress=False, mesh=mesh)
    _check_ppl(got.to_dict(), reference["ppl"])
    lm = FlaxLM(model, ByteTokenizer(), batch_size=2, progress=False, mesh=mesh)
    assert lm.batch_size == 2 and not lm.is_follower
    _check_scores(score_requests(lm), reference)
    lm.release_followers()  # no followers in one process: a no-op
    with pytest.raises(RuntimeError, match="processes other than 0"):
        lm.follow()
    scorer = ShardedScorer(token_logprobs, model, mesh)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        scorer(np.zeros((2, 8), np.int32), np.zeros((2, 4), np.int32))


def test_sharded_eval_two_processes(tmp_path, reference, monkeypatch):
    """2 processes x 4 devices: perplexity on both, lm-eval driven by process 0 with process 1 following."""
    from test_harness import _write_task

    from cospadi_jax.eval.harness import evaluate_zero_shot

    task_dir = _write_task(tmp_path)
    port = free_port()
    outs = [tmp_path / f"rank{i}.json" for i in range(2)]
    run_peer_processes(
        [[sys.executable, __file__, "multi", str(outs[i]), f"127.0.0.1:{port}", "2", str(i), str(task_dir)]
         for i in range(2)],
        [subprocess_env(JAX_NUM_CPU_DEVICES="4")] * 2, timeout=TIMEOUT_S)
    res = [json.loads(o.read_text()) for o in outs]
    for rank, r in enumerate(res):
        assert r["process_index"] == rank and r["device_count"] == 8 and r["is_follower"] == (rank == 1)
        _check_ppl(r["ppl"], reference["ppl"])
    _check_scores(np.load(outs[0].with_suffix(".npz")), reference)
    assert res[1]["served"] == 2  # one loglikelihood and one rolling batch, then the stop message
    # evaluate_zero_shot: results on process 0 only, equal to the single-process run of the same task.
    assert res[1]["zero_shot"] is None
    monkeypatch.setattr("lm_eval.tasks.TaskManager", local_task_manager())
    single = evaluate_zero_shot(tiny_model(), ByteTokenizer(), ["tiny_mc"], include_path=str(task_dir),
                                batch_size=4, progress=False)
    assert res[0]["zero_shot"]["tasks"] == single["tasks"]
    assert res[0]["zero_shot"]["average"] == single["average"]


if __name__ == "__main__":
    mode, out_path = sys.argv[1], sys.argv[2]
    if mode == "single":
        run_single(out_path)
    elif mode == "multi":
        run_multi(out_path, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        raise SystemExit(f"unknown mode {mode!r}; use single or multi")
