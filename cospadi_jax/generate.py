"""Generate text with a (compressed) model, streamed token by token to the console.

    python -m cospadi_jax.generate prompt='The Lord is my shepherd'                    # the embedded SmolLM2
    python -m cospadi_jax.generate artifact=results/<run> prompt='...' max_new_tokens=128 mode=sparse
    python -m cospadi_jax.generate model.spec=<exported dir> generate.chat=true generate.temperature=0.7 \\
        generate.top_p=0.9 seed=1 prompt='Name three rivers.'

It is the Hydra app's ``task=generate`` (cospadi_jax/run.py): every key of the app's config is accepted, and
``prompt=`` is short for ``generate.prompt=``. With ``artifact=`` the artifact's own base model is restored with its
factors (:func:`cospadi_jax.checkpoint.restore_model`); otherwise ``model.spec`` is loaded.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("cospadi_jax")


def run_generate(cfg: Any) -> dict[str, Any]:
    """task=generate: load, prefill, stream the continuation to stdout; returns the text and the timings."""
    from .checkpoint import restore_model
    from .models import load_model
    from .models.generation import Generator, Sampling

    g = cfg.generate
    sampling = Sampling(g.temperature, g.top_p, cfg.seed)
    if cfg.artifact:
        model, tokenizer, _ = restore_model(cfg.artifact)
    else:
        model, tokenizer = load_model(cfg.model.spec, cfg.model.dtype, revision=cfg.model.revision)
    if g.mode:
        from .layers import set_dict_mode

        log.info("%d CoSpaDi layers rebuilt in mode %s", set_dict_mode(model, g.mode), g.mode)
    if tokenizer is None:
        raise ValueError(f"{cfg.artifact or cfg.model.spec} has no tokenizer; generation needs one to encode the prompt")
    if g.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": g.prompt}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = g.prompt
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = Generator(model)
    start = time.perf_counter()
    tokens: list[int] = []
    stamps: list[float] = []  # when each token arrived
    shown = ""
    sys.stdout.write("" if g.chat else g.prompt)
    for step in generator.stream([ids], g.max_new_tokens, sampling=sampling, eos_token_ids=eos, pad_token_id=pad):
        stamps.append(time.perf_counter())
        if step[0] < 0 or int(step[0]) in eos:
            break
        tokens.append(int(step[0]))
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        sys.stdout.write(text[len(shown):])  # decode the whole continuation: a token may complete a character
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    first_s = stamps[0] - start
    # From the second decoded token on: the first decode step includes its compilation.
    rate = (len(stamps) - 2) / (stamps[-1] - stamps[1]) if len(stamps) > 2 else float("nan")
    log.info("%d prompt tokens, %d generated; first token after %.2f s (prefill and compilation), then %.1f "
             "tokens/s", len(ids), len(tokens), first_s, rate)
    return {"prompt": g.prompt, "text": shown, "tokens": tokens, "prompt_tokens": len(ids),
            "first_token_s": first_s, "decode_tokens_per_s": rate}


_SHORT_KEYS = ("prompt", "max_new_tokens", "temperature", "top_p", "chat", "mode")


def _shorthand(arg: str) -> str:
    """``prompt=...`` -> ``generate.prompt='...'``: quoted, so that free text (``;``, ``,``, ``=``, ``:``) is not
    read as Hydra's override grammar."""
    key, eq, value = arg.partition("=")
    if not eq or key.lstrip("+~") not in (*_SHORT_KEYS, *(f"generate.{k}" for k in _SHORT_KEYS)):
        return arg
    key = key if key.startswith("generate.") else f"generate.{key}"
    if key == "generate.prompt" and not (value[:1] == value[-1:] and value[:1] in ("'", '"') and len(value) > 1):
        value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={value}"


def main(argv: list[str] | None = None) -> None:
    """``python -m cospadi_jax.generate KEY=VALUE...``: the Hydra app with ``task=generate``."""
    argv = [_shorthand(a) for a in (sys.argv[1:] if argv is None else argv)]
    sys.argv = [sys.argv[0], "task=generate", *argv]
    from .run import cli

    cli()


if __name__ == "__main__":
    main()
