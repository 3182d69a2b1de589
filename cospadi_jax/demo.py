"""Main job on the embedded default: compress SmolLM2-135M with CoSpaDi and SVD-LLM at the same ratio and print
held-out perplexity before and after.

    python -m cospadi_jax.demo [--ratio R] [--ksvd-iterations T] [KEY=VALUE ...]

Two jobs of the Hydra app (``cospadi_jax.run.execute`` on a composed config, as ``python -m cospadi_jax.run``
would run them), on the setting of ``experiment=smollm2_methods``: all 210 projections (30 layers x q, k, v, o,
gate, up, down), CoSpaDi at T = 1 K-SVD iteration, 32 x 512 calibration tokens, perplexity on 16 x 512 held-out
windows. At the default ratio (the app's ``method.ratio``, 0.2) they are the README method table's SVD-LLM and
CoSpaDi rows at CR 0.2. The paper runs K-SVD for T = 60 iterations; T = 1 keeps the whole job to about 20
minutes on a 2-core CPU, and the output says so.

Trailing ``KEY=VALUE`` arguments are Hydra overrides for both jobs (``calib.nsamples=64``, ``model.spec=...``,
``logger.mode=disabled``). Each job writes its artifact and ``metrics.json`` to the app's ``output_dir``
(``results/<run name>/``) and resumes from it. For other methods and sweeps use ``python -m cospadi_jax.run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from .config import compose_config, experiment_overrides

EXPERIMENT = "smollm2_methods"  # conf/experiment/smollm2_methods.yaml: the method table's setting
JOBS = (("SVD-LLM", "svd_llm"), ("CoSpaDi", "cospadi"))  # label, conf/method option


def job_overrides(option: str, args: argparse.Namespace) -> list[str]:
    """One job's overrides: the experiment's setting restated for the method, the flags, then the user's."""
    own = [f"method.ratio={args.ratio}"] if args.ratio is not None else []
    if args.ksvd_iterations is not None and option == "cospadi":  # SVD-LLM's config has no K-SVD knobs
        own.append(f"method.ksvd_iterations={args.ksvd_iterations}")
    return experiment_overrides(EXPERIMENT, option, *own, *args.overrides)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=None, help="compression ratio (default: the app's "
                        "method.ratio)")
    parser.add_argument("--ksvd-iterations", type=int, default=None,
                        help=f"CoSpaDi's K-SVD T (default: experiment={EXPERIMENT}'s)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides for both jobs")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"{bad} are not Hydra overrides (KEY=VALUE, e.g. calib.nsamples=64)")
    return args


def _console_log() -> None:
    """The package's INFO messages (time estimate, summary) on stderr; orbax, absl and jax stay at their level."""
    log = logging.getLogger("cospadi_jax")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both jobs, print and return their perplexities, realised ratios and held-out functional errors."""
    from .methods import CoSpaDiConfig
    from .run import execute

    args = _parse(argv)
    if argv is None:  # the command line: the app's progress log on the console, as Hydra's job logging gives it
        _console_log()
    t_start = time.perf_counter()
    configs = {label: compose_config(job_overrides(option, args)) for label, option in JOBS}
    cospadi = configs["CoSpaDi"]
    paper_iterations = CoSpaDiConfig().ksvd_iterations  # the paper's T, CoSpaDi's default
    if cospadi.method.ksvd_iterations < paper_iterations:
        print(f"NOTE: K-SVD runs {cospadi.method.ksvd_iterations} iterations instead of the paper's "
              f"{paper_iterations} so that this demo fits in ~20 minutes on a 2-core CPU (--ksvd-iterations "
              f"{paper_iterations} for the paper's setting).", flush=True)
    source = cospadi.eval.ppl_sources[0]
    results: dict[str, Any] = {
        "model": cospadi.model.name, "ratio": cospadi.method.ratio, "ksvd_iterations": cospadi.method.ksvd_iterations,
        "calibration": f"{cospadi.calib.nsamples} x {cospadi.calib.seqlen} tokens ({cospadi.calib.source})",
        "eval": f"{cospadi.eval.max_windows or 'all'} x {cospadi.eval.seqlen} tokens ({source})", "dense": None}
    for label, cfg in configs.items():
        metrics = execute(cfg)
        if "dense" in metrics:  # both jobs score the same dense model (the second reads the app's cache)
            results["dense"] = metrics["dense"]["perplexity"][source]["perplexity"]
        errors = [m["functional_error_heldout"] for m in metrics["matrices"]
                  if m["functional_error_heldout"] is not None]  # None without held-out Grams
        results[label] = {"perplexity": metrics["compressed"]["perplexity"][source]["perplexity"],
                          "realised_ratio": metrics["realised_ratio"],
                          "mean_functional_error_heldout": sum(errors) / len(errors) if errors else None,
                          "compress_seconds": metrics["timings"]["compress_s"], "output_dir": cfg.output_dir}
    results["total_seconds"] = time.perf_counter() - t_start
    print(json.dumps(results, indent=2))
    print(f"\n{results['model']}, CR {results['ratio']}, held-out perplexity ({results['eval']}):")
    if results["dense"] is not None:
        print(f"  dense    {results['dense']:10.3f}")
    for label, _ in JOBS:
        r = results[label]
        error = "n/a" if r["mean_functional_error_heldout"] is None else f"{r['mean_functional_error_heldout']:.4f}"
        print(f"  {label:8s} {r['perplexity']:10.3f}   realised CR {r['realised_ratio']:.4f}, mean functional "
              f"error {error}, {r['compress_seconds']:.0f} s  ({r['output_dir']})")
    return results


if __name__ == "__main__":
    main()
