"""Perplexity and accuracy against the K-SVD iterations T on SmolLM2-135M at the sweep setting, from one run's
snapshots (``method.ksvd_snapshots``) plus the committed T = 60 run of the same setting.

    python -m cospadi_jax.run method.ratio=0.2 method.ksvd_iterations=10 'method.ksvd_snapshots=[0,1,2,4,5]' \\
        calib.nsamples=32 calib.seqlen=512 eval.max_windows=16 'eval.tasks=[kjv_lambada]' eval.task_batch_size=16 \\
        eval.dense_baseline=false output_dir=experiments/results/ksvd_snapshots/cospadi-cr0.2-T10
    python experiments/ksvd_snapshots.py

Reads ``experiments/results/ksvd_snapshots/*/metrics.json`` and their ``snapshots/T*/metrics.json``, and every
extra run in ``EXTRA`` whose calibration and evaluation settings are the same (a point with other settings is
refused, not drawn); writes ``experiments/results/ksvd_snapshots/ksvd_snapshots.png``. Not the paper's setting
(256 x 1024 calibration tokens): that is ``experiment=paper_smollm2_ksvd_iterations`` (issue 15).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS / "ksvd_snapshots"
EXTRA = [RESULTS / "t60" / "smollm2-135m-cospadi-cr0.2-T60-n32x512" / "metrics.json"]
SETTING = ("calib", "eval")  # config nodes that must agree for two points to share a curve
# Keys of those nodes that change no score (where files go, batching, whether the dense model is also scored).
NOT_SETTING = ("cache_dir", "dense_cache_dir", "batch_size", "task_batch_size", "data_parallel", "dense_baseline")


def _point(metrics: dict) -> dict:
    method = metrics["config"]["method"]
    task = metrics["compressed"]["zero_shot"]["tasks"]["kjv_lambada"]
    return {"T": method["ksvd_iterations"], "ratio": method["ratio"], "acc": task["acc"], "stderr": task["acc_stderr"],
            "ppl": metrics["compressed"]["perplexity"]["embedded:heldout"]["perplexity"],
            "setting": {k: {n: v for n, v in metrics["config"][k].items() if n not in NOT_SETTING} for k in SETTING}}


def _same(a: dict, b: dict) -> bool:
    """Equal settings, a key that one side lacks (a run older than the key) taking the other's value."""
    return all(a[k].get(n, b[k].get(n)) == b[k].get(n, a[k].get(n)) for k in SETTING for n in {*a[k], *b[k]})


def points() -> list[dict]:
    files = sorted(ROOT.glob("*/metrics.json")) + sorted(ROOT.glob("*/snapshots/T*/metrics.json")) + EXTRA
    out = [_point(json.loads(f.read_text())) for f in files if f.exists()]
    for p in out[1:]:
        if not _same(p["setting"], out[0]["setting"]) or p["ratio"] != out[0]["ratio"]:
            raise ValueError(f"the point at T = {p['T']} has other calibration/evaluation settings or CR than the "
                             "first: it belongs on another curve")
    return sorted(out, key=lambda p: p["T"])


def main() -> None:
    pts = points()
    calib, evaluation = pts[0]["setting"]["calib"], pts[0]["setting"]["eval"]
    fig, (ax_ppl, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    T = [max(p["T"], 0.5) for p in pts]  # T = 0 drawn at 0.5 on the log axis
    ax_ppl.plot(T, [p["ppl"] for p in pts], marker="o", color="#d62728")
    ax_acc.errorbar(T, [p["acc"] for p in pts], yerr=[p["stderr"] for p in pts], marker="o", color="#d62728",
                    capsize=3)
    for ax, label in ((ax_ppl, "held-out perplexity (log)"), (ax_acc, "kjv_lambada accuracy ± stderr")):
        ax.set_xscale("log")
        ax.set_xticks(T, [str(p["T"]) for p in pts])
        ax.set_xlabel("K-SVD iterations T")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_ppl.set_yscale("log")
    fig.suptitle(f"CoSpaDi on SmolLM2-135M, CR {pts[0]['ratio']}: T = 0-10 from one run's snapshots, T = 60 a "
                 f"separate run; calib {calib['nsamples']}x{calib['seqlen']}, eval {evaluation['max_windows']} "
                 f"x {evaluation['seqlen']} windows", fontsize=9)
    fig.tight_layout()
    fig.savefig(ROOT / "ksvd_snapshots.png", dpi=130)
    for p in pts:
        print(f"T = {p['T']:3d}: ppl {p['ppl']:.3f}, acc {p['acc']:.4f} ± {p['stderr']:.4f}")


if __name__ == "__main__":
    main()
