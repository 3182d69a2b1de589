"""lm-eval zero-shot through our LM subclass, offline, on a local task YAML over local data files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import requires_embedded

pytestmark = [requires_embedded, pytest.mark.real_weights]

DOCS = [
    {"goal": "In the beginning God created", "sol1": "the heaven and the earth.", "sol2": "a small red bicycle.",
     "label": 0},
    {"goal": "To boil water, you should", "sol1": "put it in a freezer.", "sol2": "heat it on a stove.", "label": 1},
    {"goal": "The capital of France is", "sol1": "Paris.", "sol2": "a banana.", "label": 0},
    {"goal": "When it rains, people often carry", "sol1": "a tractor.", "sol2": "an umbrella.", "label": 1},
]


def _write_task(tmp_path):
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return tmp_path


def test_local_task_through_lm_eval(smollm2, tmp_path):
    from cospadi_jax.eval.harness import evaluate_zero_shot

    model, tok = smollm2
    out = evaluate_zero_shot(model, tok, ["tiny_mc"], include_path=str(_write_task(tmp_path)), batch_size=4,
                             progress=False)
    task = out["tasks"]["tiny_mc"]
    assert set(task) >= {"acc", "acc_norm", "headline"} and task["headline"] == "acc_norm"
    assert task["acc"] >= 0.75  # a real 135M model gets these easy ones right
    assert out["average"] == task["acc_norm"] and "acc_norm" in out["rule"]


def test_loglikelihood_equals_direct_scoring(smollm2):
    from types import SimpleNamespace

    from cospadi_jax.eval.harness import FlaxLM
    from cospadi_jax.models import token_logprobs

    model, tok = smollm2
    lm = FlaxLM(model, tok, batch_size=2, progress=False)
    reqs = [SimpleNamespace(args=("Question: In the beginning God created\nAnswer:", " the heaven")),
            SimpleNamespace(args=("The capital of France is ", "Paris")),  # trailing space moves to continuation
            SimpleNamespace(args=("Hello", " world"))]
    got = lm.loglikelihood(reqs)
    for req, (lp, _) in zip(reqs, got):
        ctx, cont = lm._encode_pair(*req.args)
        ids = np.asarray([ctx + cont], np.int32)
        expected = float(np.asarray(token_logprobs(model, ids))[0, -len(cont):].sum())
        assert math.isclose(lp, expected, rel_tol=1e-4, abs_tol=1e-4)
    assert got[1][1] in (True, False)

    text = "And God said, Let there be light: and there was light."
    rolling = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0]
    ids = np.asarray([[lm.prefix_token_id] + lm._encode(text)], np.int32)
    assert math.isclose(rolling, float(np.asarray(token_logprobs(model, ids)).sum()), rel_tol=1e-4)


def test_shipped_kjv_lambada_task(smollm2):
    """The shipped offline task: held-out text only, last words as targets, short items, scored through lm-eval
    with acc, its stderr and the target perplexity."""
    from cospadi_jax.data.text import load_text
    from cospadi_jax.eval.harness import evaluate_zero_shot
    from cospadi_jax.eval.tasks import DATA_DIR, include_paths, task_dir

    model, tok = smollm2
    docs = [json.loads(line) for line in (DATA_DIR / "kjv_lambada.jsonl").read_text().splitlines()]
    assert len(docs) == 400
    heldout, calibration = load_text("embedded:heldout"), load_text("embedded:calibration")
    for d in docs:
        assert f"{d['context']} {d['target']}" in heldout and d["context"][-40:] not in calibration
        assert len(d["target"]) >= 4 and d["target"].isalpha()
        assert len(tok(d["context"] + " " + d["target"])["input_ids"]) <= 64
    assert include_paths(["piqa"], None) is None
    assert include_paths(["kjv_lambada"], "/x") == ["/x", task_dir()]

    n = 24
    out = evaluate_zero_shot(model, tok, ["kjv_lambada"], limit=n, batch_size=8, progress=False)
    task = out["tasks"]["kjv_lambada"]
    assert task["headline"] == "acc" and task["n"] == n and out["average"] == task["acc"]
    assert task["acc_stderr"] == pytest.approx(math.sqrt(task["acc"] * (1 - task["acc"]) / (n - 1)))
    # acc is lm-eval's is_greedy: recompute it for the first items with our own greedy check
    from types import SimpleNamespace

    from cospadi_jax.eval.harness import FlaxLM

    greedy = [g for _, g in FlaxLM(model, tok, batch_size=8, progress=False).loglikelihood(
        [SimpleNamespace(args=(d["context"], " " + d["target"])) for d in docs[:n]])]
    assert task["acc"] == pytest.approx(np.mean(greedy)) and 1 < task["perplexity"] < 1e4


def test_generate_until_equals_uncached_greedy(smollm2):
    """lm-eval's generate_until (KV-cached, batched, left-padded) gives the text of a plain greedy loop over the
    full forward, cut at the stop string."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from cospadi_jax.eval.harness import FlaxLM
    from cospadi_jax.models import forward_logits

    model, tok = smollm2
    lm = FlaxLM(model, tok, batch_size=2, progress=False)
    contexts = ["The Lord is my shepherd;", "In the beginning God created the heaven", "And God said, Let there be"]
    gen_kwargs = {"until": ["."], "max_gen_toks": 10, "do_sample": False}
    got = lm.generate_until([SimpleNamespace(args=(c, gen_kwargs)) for c in contexts])
    width = max(len(tok(c, add_special_tokens=False)["input_ids"]) for c in contexts) + 10
    for context, text in zip(contexts, got):
        tokens = tok(context, add_special_tokens=False)["input_ids"]
        new: list[int] = []
        for _ in range(10):  # greedy without a cache: the whole prefix every step
            # Right-padded to one width (one compile, not one per length): causal attention keeps the padding
            # out of the logits at the prefix's last position.
            prefix = tokens + new
            ids = jnp.asarray([prefix + [0] * (width - len(prefix))])
            nxt = int(jnp.argmax(forward_logits(model, ids)[0, len(prefix) - 1]))
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            if "." in tok.decode(new):
                break
        assert text == tok.decode(new).split(".")[0], (context, text)
