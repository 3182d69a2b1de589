"""Curves and the Markdown table from a set of metrics.json files (no model needed)."""

from __future__ import annotations

import json
import math

import pytest

from cospadi_jax.plots import main, plot_results, row_from_metrics


def _metrics(method: str, ratio: float, ppl: float, accs: dict[str, tuple[float, float]]) -> dict:
    tasks = {t: {"acc": a, "acc_stderr": se, "headline": "acc"} for t, (a, se) in accs.items()}
    zero_shot = {"tasks": tasks, "average": sum(a for a, _ in accs.values()) / len(accs)}
    return {"config": {"model": {"name": "m"}, "method": {"name": method, "label": method, "ratio": ratio}},
            "realised_ratio": ratio + 0.001,
            "dense": {"perplexity": {"src": {"perplexity": 10.0}}, "zero_shot": {**zero_shot, "average": 0.5}},
            "compressed": {"perplexity": {"src": {"perplexity": ppl}}, "zero_shot": zero_shot}}


def test_rows_figures_and_table(tmp_path, capsys):
    paths = []
    for method, base in (("svd_llm", 20.0), ("cospadi", 15.0)):
        for ratio in (0.2, 0.3, 0.4):
            p = tmp_path / f"{method}-{ratio}" / "metrics.json"
            p.parent.mkdir()
            p.write_text(json.dumps(_metrics(method, ratio, base * (1 + ratio), {"a": (0.4, 0.03), "b": (0.6, 0.04)})))
            paths.append(p)
    row = row_from_metrics(json.loads(paths[0].read_text()))
    assert row["acc_tasks"] == "a,b" and row["avg_acc"] == pytest.approx(0.5)
    assert row["avg_acc_stderr"] == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)  # SE of a mean of two tasks
    assert row["dense_avg_acc"] == 0.5 and row["dense_ppl/src"] == 10.0

    out = plot_results(paths, tmp_path / "plots")
    names = sorted(p.rsplit("/", 1)[1] for p in out["figures"])
    assert names == ["m_avg_acc.png", "m_avg_acc.svg", "m_ppl_src.png", "m_ppl_src.svg"]
    table = (tmp_path / "plots" / "results.md").read_text().splitlines()
    assert table[0] == "| model | method | CR | realised CR | avg_acc | ppl/src |"
    assert table[2].startswith("| m | cospadi | 0.2 | 0.2010 | 0.5 ± 0.025 | 18 |") and len(table) == 8

    main([str(tmp_path / "*" / "metrics.json"), "--out", str(tmp_path / "cli")])
    assert "| m | svd_llm | 0.4 |" in capsys.readouterr().out


def test_nothing_to_plot_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results to plot"):
        plot_results([], tmp_path)


def test_curves_split_by_every_axis_that_differs(tmp_path):
    """Runs of one method at another T are their own curve, labelled by T; the shared axes go to the title;
    methods get display names and fixed colours."""
    from cospadi_jax.plots import COLOURS, _curves, _label, setting_title

    rows = []
    for T in (1, 60):
        for ratio in (0.2, 0.3):
            m = _metrics("cospadi", ratio, 10 + T * ratio, {"a": (0.4, 0.03)})
            m["config"]["method"].update(name="cospadi", ksvd_iterations=T, rho=2.0, group_size=1)
            m["config"]["calib"] = {"nsamples": 32, "seqlen": 512, "seed": 42}
            rows.append(row_from_metrics(m))
    low_rank = _metrics("svd_llm", 0.2, 30.0, {"a": (0.3, 0.03)})
    low_rank["config"]["method"].update(ksvd_iterations=60, group_size=1)  # K-SVD knobs a low-rank run ignores
    low_rank["config"]["calib"] = {"nsamples": 32, "seqlen": 512, "seed": 42}
    rows.append(row_from_metrics(low_rank))
    curves, shared, varying = _curves(rows)
    assert varying == ["T"]
    assert sorted(_label(method, key, varying) for method, key in curves) == [
        "CoSpaDi (T=1)", "CoSpaDi (T=60)", "SVD-LLM"]
    assert all(len(points) == 2 for (method, _), points in curves.items() if method == "cospadi")
    assert "calib 32×512" in setting_title("m", shared) and "ρ 2.0" in setting_title("m", shared)
    assert COLOURS["cospadi"] != COLOURS["svd_llm"]
