"""Zero-shot evaluation through lm-evaluation-harness with our Flax model.

``FlaxLM`` implements lm-eval's ``LM`` interface (``loglikelihood``, ``loglikelihood_rolling``, and a KV-cached
``generate_until``). Requests are packed into batches of one fixed shape per call, [batch_size, length]
with length the smallest power of two that holds the longest request, so the scoring function compiles once.
Tokenisation follows lm-eval's HF model: no special tokens, trailing context spaces move to the continuation,
context + continuation are encoded together and split, and an empty context is replaced by the prefix token.

With a ``mesh`` the scoring is data-parallel (:mod:`cospadi_jax.eval.sharded`): parameters placed by the sharding
rules, each batch split over the ``"batch"`` axis. With a mesh over several processes only process 0 runs lm-eval;
the others follow it (:meth:`FlaxLM.follow`), which :func:`evaluate_zero_shot` arranges.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from lm_eval.api.model import LM
from tqdm.auto import tqdm

from ..parallel import is_primary
from ..errors import HubUnavailableError
from ..models.transformer import CausalLM
from .sharded import ShardedScorer
from .tasks import SHIPPED_TASKS, include_paths

# The paper's tasks and its headline rule: acc_norm where the task reports it, acc otherwise (method.md §5).
PAPER_TASKS = ("piqa", "hellaswag", "lambada_openai", "arc_easy", "arc_challenge", "sciq", "race", "mmlu")
HEADLINE_RULE = "acc_norm where the task reports it, acc otherwise (the paper's 'normalized when available')"


@nnx.jit
def _score(model: CausalLM, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ids, mask [B, T] -> (log p(ids[:, 1:]) [B, T-1] float32, is-greedy [B, T-1] bool)."""
    logits = model(ids, mask)[:, :-1]
    target = ids[:, 1:]
    logp = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    return logp, jnp.argmax(logits, axis=-1) == target


def _bucket(n: int, cap: int) -> int:
    return min(cap, 1 << max(4, (n - 1).bit_length()))


class FlaxLM(LM):
    """lm-eval ``LM`` over a cospadi-jax model.

    ``mesh``: score data-parallel over it; ``batch_size`` (the global batch) is rounded up to a multiple of the
    batch shard count. With a mesh over several processes, process 0 is the driver (lm-eval calls this object
    there) and every other process must run :meth:`follow` until process 0 calls :meth:`release_followers`.
    """

    def __init__(self, model: CausalLM, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None,
                 progress: bool = True, mesh: Mesh | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self._scorer = None if mesh is None else ShardedScorer(_score, model, mesh)
        self.batch_size = batch_size if self._scorer is None else self._scorer.round_batch(batch_size)
        self.max_length = max_length or min(model.config.max_position_embeddings, 2048)
        self.progress = progress
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("the tokenizer has neither BOS nor EOS; lm-eval needs a prefix token for empty contexts")
        self.prefix_token_id = prefix

    # ---------------------------------------------------------------- tokenisation (as lm-eval's HFLM)
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        if not context:
            return [self.prefix_token_id], self._encode(continuation)
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    # ---------------------------------------------------------------- scoring
    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """Sum of continuation log-probs and whether every continuation token is the greedy choice."""
        seqs = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("empty continuation: lm-eval requests must score at least one token")
            tokens = (ctx + cont)[-self.max_length:]  # left-truncate long contexts, as lm-eval does
            seqs.append((tokens, min(len(cont), len(tokens) - 1)))
        length = _bucket(max(len(t) for t, _ in seqs), self.max_length)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not self.progress, unit="batch"):
            ids = np.zeros((self.batch_size, length), np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for row, i in enumerate(batch):
                tokens = seqs[i][0]
                ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
            logp, greedy = self._score_batch(ids, mask)
            for row, i in enumerate(batch):
                tokens, n_cont = seqs[i]
                end = len(tokens) - 1  # logp index j scores token j + 1
                lp = logp[row, end - n_cont : end].astype(np.float64)
                if not np.all(np.isfinite(lp)):
                    raise FloatingPointError(f"non-finite log-probability in an lm-eval request ({desc})")
                results[i] = (float(lp.sum()), bool(greedy[row, end - n_cont : end].all()))
        return results

    def _score_batch(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids, mask [batch_size, T] -> (log-probs [batch_size, T-1], is-greedy [batch_size, T-1]) on the host."""
        if self._scorer is None:
            return tuple(np.asarray(x) for x in _score(self.model, jnp.asarray(ids), jnp.asarray(mask)))
        return self._scorer.drive(ids, mask)

    # ---------------------------------------------------------------- multi-process driver / followers
    @property
    def is_follower(self) -> bool:
        """True on processes other than 0 when the mesh spans several processes: they run :meth:`follow`."""
        return self._scorer is not None and self._scorer.spans_processes and not is_primary()

    def follow(self) -> int:
        """Follower loop: run the sharded scorer on every batch process 0 scores, until it calls
        :meth:`release_followers`. Returns the number of batches served."""
        if not self.is_follower:
            raise RuntimeError("follow() is for processes other than 0 of a FlaxLM with a mesh over several processes.")
        return self._scorer.follow()

    def release_followers(self) -> None:
        """On process 0: end the followers' loops once lm-eval is done (no-op without followers)."""
        if self._scorer is not None:
            self._scorer.release_followers()

    # ---------------------------------------------------------------- lm-eval API
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self._score_pairs(pairs, "loglikelihood")

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for i, req in enumerate(requests):
            windows = get_rolling_token_windows(
                token_list=self._encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._score_pairs(pairs, "loglikelihood_rolling")):
            totals[i] += lp
        return totals

    def generate_until(self, requests: list[Any]) -> list[str]:
        """KV-cached generation (:mod:`cospadi_jax.models.generation`), batched ``batch_size`` requests at a time
        among requests with the same generation arguments, longest first, as lm-eval's HF model does.

        ``do_sample`` false (lm-eval's default) is greedy; otherwise ``temperature`` and ``top_p`` apply, seeded
        with 0. A context is left-truncated to ``max_length - max_gen_toks`` tokens; a row stops at EOS or once
        its text holds one of ``until``, and is cut before it. Runs on this process' default device even with a
        mesh: followers take no part in it."""
        from ..models.generation import Generator, Sampling

        if getattr(self, "_generator", None) is None:
            self._generator = Generator(self.model)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        outputs: list[str] = [""] * len(requests)
        eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id
        bar = tqdm(total=len(requests), desc="generate_until", disable=not self.progress)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            sampling = Sampling(temperature=float(kwargs.get("temperature") or 0.0), top_p=float(kwargs.get("top_p") or 1.0)
                                ) if kwargs.get("do_sample") else Sampling()
            context_tokens = self.max_length - max_new
            if context_tokens < 1:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in max_length={self.max_length}")
            prompts = {i: (self._encode(requests[i].args[0]) or [self.prefix_token_id])[-context_tokens:] for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]

                def stop(row: int, tokens: list[int]) -> bool:
                    text = self.tokenizer.decode(tokens)
                    return any(u in text for u in until)

                tokens = self._generator.generate([prompts[i] for i in batch], max_new, sampling=sampling,
                                                  eos_token_ids=eos, pad_token_id=pad, stop=stop if until else None)
                for i, row in zip(batch, tokens):
                    text = self.tokenizer.decode([t for t in row if t not in eos])
                    for u in until:
                        text = text.split(u)[0]
                    outputs[i] = text
                bar.update(len(batch))
        bar.close()
        return outputs


def headline_scores(results: dict[str, dict[str, Any]], n_samples: dict[str, int] | None = None) -> dict[str, Any]:
    """Per task acc and acc_norm (with stderr), and the paper's headline average.

    ``n_samples``: documents scored per task. lm-eval reports no stderr when run without bootstrap (we run
    without: its bootstrap forks a process pool, unsafe under JAX); the stderr of an accuracy is then the
    closed form lm-eval itself uses for a mean, sqrt(p (1 - p) / (n - 1)).
    """
    per_task, headline = {}, []
    for task, metrics in results.items():
        entry = {m: metrics.get(f"{m},none") for m in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr",
                                                       "perplexity", "word_perplexity")}
        entry = {m: v for m, v in entry.items() if v is not None and v != "N/A"}
        if not entry:
            continue
        n = (n_samples or {}).get(task, 0)
        for m in ("acc", "acc_norm"):
            if m in entry and f"{m}_stderr" not in entry and n > 1:
                entry[f"{m}_stderr"] = math.sqrt(entry[m] * (1 - entry[m]) / (n - 1))
        if n:
            entry["n"] = n
        per_task[task] = entry
        if "acc" in entry:  # perplexity-only tasks (wikitext) are reported but not averaged
            entry["headline"] = "acc_norm" if "acc_norm" in entry else "acc"
            headline.append(entry[entry["headline"]])
    return {"tasks": per_task, "average": float(np.mean(headline)) if headline else None, "rule": HEADLINE_RULE}


def evaluate_zero_shot(model: CausalLM, tokenizer: Any, tasks: list[str] | tuple[str, ...] = PAPER_TASKS, *,
                       batch_size: int = 8, limit: float | None = None, include_path: str | None = None,
                       max_length: int | None = None, progress: bool = True,
                       mesh: Mesh | None = None) -> dict[str, Any] | None:
    """Run lm-eval zero-shot on ``tasks``; returns {'tasks': {task: {acc, acc_norm, ...}}, 'average', 'rule',
    'lm_eval_version', 'raw'}.

    ``limit``: documents per task (an int) or a fraction of them (a float), as lm-eval's ``limit``.
    ``include_path``: a directory of extra task YAMLs; the shipped offline tasks (:mod:`cospadi_jax.eval.tasks`,
    e.g. ``kjv_lambada``) are found without it.
    ``mesh``: score data-parallel over it (see :class:`FlaxLM`). With a mesh over several processes call this on
    every process: process 0 runs lm-eval and returns the results, the others follow it and return None.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    paths = include_paths(tasks, include_path)
    lm = FlaxLM(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress, mesh=mesh)
    if lm.is_follower:
        lm.follow()
        return None
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, log_samples=False, bootstrap_iters=0,
            task_manager=TaskManager(include_path=paths) if paths else None,
        )
    except OSError as exc:  # ConnectionError and the hub clients' offline errors are OSErrors
        remote = [t for t in tasks if t not in SHIPPED_TASKS]
        if not remote:
            raise
        raise HubUnavailableError(
            f"lm-eval could not fetch the data of task(s) {remote} ({type(exc).__name__}: {exc}). Without the "
            f"hub, use the shipped offline task(s) eval.tasks=[{', '.join(SHIPPED_TASKS)}], or task YAMLs with "
            "local data files through eval.task_include_path=<dir>.") from exc
    finally:  # also on an lm-eval error, so that the followers return instead of waiting forever
        lm.release_followers()
    n_samples = {t: int(v.get("effective", v.get("original", 0))) for t, v in out.get("n-samples", {}).items()}
    summary = headline_scores(out["results"], n_samples)
    summary["lm_eval_version"] = lm_eval.__version__ if hasattr(lm_eval, "__version__") else "unknown"
    summary["raw"] = out["results"]
    return summary
