"""Done-when check of the export (issue 16, part 3): a CoSpaDi artifact of SmolLM2, exported as ``hf-dense`` by the
Hydra app, gives the same held-out perplexity in transformers-PyTorch as in our evaluation (within 0.5 %), on
exactly the same token windows; and its ``factored`` export is as large as the budget says and loads back.

    # the artifact (CoSpaDi, CR 0.3, T = 1, 32 x 512 calibration tokens; several minutes on 2 cores):
    python -m cospadi_jax.run method.ratio=0.3 method.ksvd_iterations=1 calib.nsamples=32 calib.seqlen=512 \\
        output_dir=results/cr03 logger.mode=disabled
    python experiments/hf_dense_parity.py --artifact results/cr03

Writes experiments/results/hf_dense_parity.json. The exports go to ``<artifact>/export-hf-dense`` and
``<artifact>/export-factored`` (written by ``task=export``, replaced on every run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cospadi_jax import load_model
from cospadi_jax.checkpoint import restore_model
from cospadi_jax.data import load_text
from cospadi_jax.eval import make_windows, windows_perplexity
from cospadi_jax.fileio import atomic_write_json

OUT = Path(__file__).parent / "results" / "hf_dense_parity.json"
TOLERANCE = 0.005  # relative perplexity difference allowed between our evaluation and PyTorch's


def export(artifact: Path, fmt: str) -> tuple[Path, float]:
    """Run the Hydra app's ``task=export`` (as a user would); returns the export directory and its wall time."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cospadi_jax.run", "task=export", f"artifact={artifact}",
                    f"export.format={fmt}", "export.overwrite=true", "logger.mode=disabled"], check=True)
    return artifact / f"export-{fmt}", time.perf_counter() - t0


def torch_perplexity(directory: Path, windows: np.ndarray, batch_size: int) -> dict:
    """Perplexity of an hf-dense export under transformers-PyTorch (float32) on our windows, by the protocol of
    cospadi_jax/eval/ppl.py: every window scored on its last seqlen - 1 tokens, token-weighted mean NLL."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[start:start + batch_size]).long()
            logp = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)
            target = logp.gather(-1, ids[:, 1:, None])[..., 0]
            nll -= float(target.double().sum())
            tokens += target.numel()
    return {"perplexity": math.exp(nll / tokens), "mean_nll": nll / tokens, "n_tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=Path("results/cr03"))
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    artifact = args.artifact
    metrics = json.loads((artifact / "metrics.json").read_text())
    ev = metrics["config"]["eval"]
    source, seqlen, max_windows = ev["ppl_sources"][0], ev["seqlen"], ev["max_windows"]

    model, tokenizer, metadata = restore_model(artifact)
    windows = make_windows(tokenizer, load_text(source), seqlen, max_windows=max_windows)
    t0 = time.perf_counter()
    ours = windows_perplexity(model, windows, batch_size=args.batch_size).to_dict()
    ours["seconds"] = time.perf_counter() - t0
    del model

    dense_dir, dense_export_s = export(artifact, "hf-dense")
    from transformers import AutoTokenizer

    exported_windows = make_windows(AutoTokenizer.from_pretrained(dense_dir), load_text(source), seqlen,
                                    max_windows=max_windows)
    t0 = time.perf_counter()
    theirs = torch_perplexity(dense_dir, windows, args.batch_size)
    theirs["seconds"] = time.perf_counter() - t0
    rel = abs(theirs["perplexity"] - ours["perplexity"]) / ours["perplexity"]

    factored_dir, factored_export_s = export(artifact, "factored")
    manifest = json.loads((factored_dir / "cospadi.json").read_text())
    loaded, _ = load_model(factored_dir)
    t0 = time.perf_counter()
    reloaded = windows_perplexity(loaded, windows, batch_size=args.batch_size).to_dict()
    reloaded["seconds"] = time.perf_counter() - t0

    method = metrics["config"]["method"]
    result = {
        "artifact": str(artifact), "source": source, "seqlen": seqlen, "n_windows": int(len(windows)),
        "method": {k: method[k] for k in ("name", "ratio", "rho", "accounting", "quantization", "group_size",
                                          "ksvd_iterations", "mode")},
        "realised_ratio": metrics["realised_ratio"], "artifact_ppl": metrics["compressed"]["perplexity"][source],
        "ours": ours, "pytorch_hf_dense": theirs, "relative_difference": rel, "tolerance": TOLERANCE,
        "holds": rel <= TOLERANCE, "exported_tokenizer_gives_the_same_windows": bool(
            np.array_equal(exported_windows, windows)),
        "hf_dense": {"file_bytes": (dense_dir / "model.safetensors").stat().st_size, "export_s": dense_export_s},
        "factored": {"bytes": manifest["bytes"], "export_s": factored_export_s,
                     "values": sorted({e.get("values", "-") for e in manifest["projections"].values()}),
                     "support": sorted({e.get("support", "-") for e in manifest["projections"].values()}),
                     "loaded_ppl": reloaded,
                     "loaded_ppl_relative_to_ours": reloaded["perplexity"] / ours["perplexity"] - 1},
        "artifact_git_sha": metadata.get("git_sha"), "export_git_sha": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    atomic_write_json(OUT, result)
    print(json.dumps({k: result[k] for k in ("ours", "pytorch_hf_dense", "relative_difference", "holds")}, indent=2))
    print(f"factored: {manifest['bytes']}; loaded perplexity {reloaded['perplexity']:.4f}")


if __name__ == "__main__":
    main()
