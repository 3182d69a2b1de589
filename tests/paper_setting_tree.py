"""Synthetic results trees for experiments/paper_setting.py: metrics.json files made from committed ones (so the
keys are the ones ``cospadi_jax.run`` writes), with the setting and the scores of each test case."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COSPADI = ROOT / "experiments/results/t60/smollm2-135m-cospadi-cr0.2-T60-n32x512/metrics.json"
LOW_RANK = ROOT / "experiments/results/sweeps/smollm2-135m-svd_llm-cr0.2-rho2.0-m1-T1-p8-power-n32x512-s42/metrics.json"
LAYER0 = "model.layers.0."  # the matrices kept: layer 0's seven projections (all types, small files)


def load_script() -> Any:
    """experiments/paper_setting.py as a module (experiments/ is not a package)."""
    if "paper_setting" in sys.modules:
        return sys.modules["paper_setting"]
    spec = importlib.util.spec_from_file_location("paper_setting", ROOT / "experiments" / "paper_setting.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_setting"] = module
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=2)
def _template(low_rank: bool) -> str:
    m = json.loads((LOW_RANK if low_rank else COSPADI).read_text())
    m["matrices"] = [r for r in m["matrices"] if r["path"].startswith(LAYER0)]
    return json.dumps(m)


def metrics(method: str = "cospadi", ratio: float = 0.2, ppl: float = 20.0, acc: float | None = 0.2, *,
            T: int = 60, error_scale: float = 1.0, proj_types: list[str] | None = None,
            phase_seconds: dict[str, float] | None = None, fit_s: float = 100.0, nsamples: int = 256,
            seqlen: int = 1024, **method_keys: Any) -> dict[str, Any]:
    """One metrics.json: ``method`` is the label (cospadi_grouped is name cospadi), scores as given."""
    low_rank = method in ("svd", "svd_llm", "basis_sharing")
    m = json.loads(_template(low_rank))
    node = m["config"]["method"]
    node.update(name="cospadi" if method == "cospadi_grouped" else method, label=method, ratio=ratio,
                ksvd_iterations=T, **method_keys)
    if proj_types is not None:
        node["proj_types"] = proj_types
        m["matrices"] = [r for r in m["matrices"] if r["path"].rsplit(".", 1)[-1] in proj_types]
    m["config"]["calib"].update(nsamples=nsamples, seqlen=seqlen)
    m["compressed"]["perplexity"]["embedded:heldout"]["perplexity"] = ppl
    task = m["compressed"]["zero_shot"]["tasks"]["kjv_lambada"]
    if acc is None:
        del m["compressed"]["zero_shot"]
    else:
        task["acc"] = acc
    for r in m["matrices"]:
        r["realised_ratio"] = ratio
        r["functional_error_heldout"] *= error_scale
    m["realised_ratio"] = ratio
    m["timings"]["fit_s_cumulative"] = fit_s
    m["engine"] = {"omp_backend": "cpu_kernel",
                   "phase_seconds": phase_seconds or {"gemm": 1.0, "omp": 30.0, "update": 60.0, "whitening": 1.0}}
    return copy.deepcopy(m)


def write(root: Path, deliverable: str, run: str, m: dict[str, Any]) -> Path:
    path = root / deliverable / run / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))
    return path


def write_evaluation(root: Path, run: str, requantize: str, ppl: float, acc: float = 0.2) -> Path:
    """``task=evaluate eval.requantize=<width>``'s file in the methods run ``run`` (as cospadi_jax.run writes it)."""
    m = json.loads(_template(False))
    eval_conf = {**m["config"]["eval"], "requantize": requantize}
    m["compressed"]["perplexity"]["embedded:heldout"]["perplexity"] = ppl
    m["compressed"]["zero_shot"]["tasks"]["kjv_lambada"]["acc"] = acc
    path = root / "methods" / run / f"evaluation-{requantize}.json"
    path.write_text(json.dumps({"artifact": str(path.parent), "eval": eval_conf, "compressed": m["compressed"]}))
    return path


def full_tree(root: Path) -> Path:
    """A point for every deliverable (the K-SVD curve from snapshots of one run, the bit widths from requantized
    evaluations of the methods runs), at T = 60 except that curve."""
    for method, base in (("svd_llm", 30.0), ("cospadi", 20.0), ("cospadi_grouped", 18.0), ("basis_sharing", 25.0),
                         ("cospadi_free", 900.0), ("svd", 5000.0)):
        for r in (0.1, 0.2, 0.3, 0.4, 0.5):
            write(root, "methods", f"{method}-{r}", metrics(method, r, base * (1 + 5 * r), 0.25 - 0.4 * r + 0.2,
                                                            error_scale=0.5 if method == "cospadi" else 1.0))
    for t in (0, 1, 5, 20, 60):
        write(root, "ksvd_iterations", f"run-cr0.2/snapshots/T{t}", metrics("cospadi", 0.2, 40.0 / (1 + t), T=t))
    write(root, "ksvd_iterations", "run-cr0.2", metrics("cospadi", 0.2, 0.6, T=100))
    for p in (1, 2, 4, 8, 16):
        write(root, "power_iterations", f"p{p}", metrics("cospadi", 0.2, 20 + 8 / p, power_iterations=p))
    for r in (0.2, 0.3, 0.4):
        for rho in (1.0, 1.5, 2.0, 3.0, 5.0):
            write(root, "rho", f"r{r}-{rho}", metrics("cospadi", r, 20 * (1 + r) + (rho - 2) ** 2, rho=rho))
        for q, bits in (("bf16", 16), ("bf16-14bit", 14), ("bf16-12bit", 12), ("bf16-10bit", 10), ("int8", 8)):
            write_evaluation(root, f"cospadi-{r}", q, 20 * (1 + 5 * r) + 2 ** (12 - bits))
    for u, ppl in (("power", 20.0), ("exact", 20.1), ("mod", 24.0)):
        write(root, "dict_update", u, metrics("cospadi", 0.2, ppl, dict_update=u, fit_s={"exact": 300.0}.get(u, 100.0)))
    for method in ("cospadi", "svd_llm"):
        for n in (16, 64, 256):
            for L in (256, 1024):
                write(root, "calib_size", f"{method}-{n}x{L}", metrics(method, 0.2, 20 + 100 / n, nsamples=n,
                                                                      seqlen=L))
        for u, g in ((0.4, 0.2), (0.5, 0.25)):
            write(root, "ug", f"{method}-ug{u}", metrics(method, u, 21.0, proj_types=["gate_proj", "up_proj"]))
            write(root, "ug", f"{method}-uni{g}", metrics(method, g, 20.5))
    return root
