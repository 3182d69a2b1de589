"""experiments/paper_setting.py (issue 15): grouping, the claims (one case that holds, one that does not, one
not measured), the mixed-T refusal, the figures and their titles, claims.json's schema, deterministic output."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.ticker
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from paper_setting_tree import full_tree, load_script, metrics, write, write_evaluation

ps = load_script()


def _claims(root: Path) -> dict[str, dict]:
    out = ps.write_all(root)
    return {c["claim"].split(".")[0]: c for c in out["claims"]}


def test_grouping_snapshots_and_unknown_directories(tmp_path):
    full_tree(tmp_path)
    by = ps.group(ps.load_points(tmp_path))
    assert set(by) == set(ps.DELIVERABLES)
    assert {k: len(v) for k, v in by.items()} == {"methods": 30, "ksvd_iterations": 6, "power_iterations": 5,
                                                   "rho": 15, "dict_update": 3, "calib_size": 12, "bits": 18, "ug": 8}
    snaps = [p for p in by["ksvd_iterations"] if p.snapshot]
    assert sorted(p.T for p in snaps) == [0, 1, 5, 20, 60]
    assert ps.ksvd_curve(by["ksvd_iterations"])[0.2].keys() == {0, 1, 5, 20, 60, 100}
    svd_llm = next(p for p in by["methods"] if p.method == "svd_llm")
    assert svd_llm.T is None and svd_llm.rho is None  # a low-rank run has no K-SVD setting
    grouped = next(p for p in by["methods"] if p.method == "cospadi_grouped")
    assert grouped.name == "cospadi" and grouped.T == 60
    write(tmp_path, "metods", "typo", metrics())
    with pytest.raises(ValueError, match="'metods' is not a deliverable"):
        ps.load_points(tmp_path)


def test_a_run_shared_with_another_deliverable_is_its_point_there(tmp_path):
    """same_run.json: the methods run's metrics as a point of power_iterations (no second fit); a link whose run is
    missing, in its own deliverable or of another name is refused; the point's own fit, if made later, wins."""
    write(tmp_path, "methods", "run-a", metrics("cospadi", 0.2, 27.0, power_iterations=8))
    link = tmp_path / "power_iterations" / "run-a" / ps.SAME_RUN
    link.parent.mkdir(parents=True)
    link.write_text(json.dumps({"run": "methods/run-a"}))
    by = ps.group(ps.load_points(tmp_path))
    (shared,) = by["power_iterations"]
    assert (shared.ppl, shared.power_iterations, shared.path) == (27.0, 8, "power_iterations/run-a/same_run.json")
    assert [p.path for p in by["methods"]] == ["methods/run-a/metrics.json"]
    write(tmp_path, "power_iterations", "run-a", metrics("cospadi", 0.2, 26.0, power_iterations=8))
    assert [p.ppl for p in ps.group(ps.load_points(tmp_path))["power_iterations"]] == [26.0]
    (link.parent / "metrics.json").unlink()
    for target in ("methods/run-b", "power_iterations/run-a", "methods/other", "/abs/run-a"):
        link.write_text(json.dumps({"run": target}))
        with pytest.raises(ValueError, match="not a finished run of the same name in another deliverable"):
            ps.load_points(tmp_path)


def test_a_snapshot_whose_config_disagrees_with_its_directory_is_refused(tmp_path):
    write(tmp_path, "ksvd_iterations", "run/snapshots/T5", metrics(T=10))
    with pytest.raises(ValueError, match="snapshot directory says T5 but its config has method.ksvd_iterations=10"):
        ps.load_points(tmp_path)


def test_figures_are_written_and_every_title_states_T_within_the_figure(tmp_path, monkeypatch):
    full_tree(tmp_path)
    titles, overflow, sci_ticks = {}, [], []
    save = ps._save

    def spy(fig, out, name):
        titles[name] = (fig._suptitle.get_text() if fig._suptitle else "") + fig.axes[0].get_title()
        for ax in fig.axes:  # 27, 30 on a perplexity axis, not 2.7x10^1 (LogFormatterSciNotation, the default)
            if "perplexity" in ax.get_ylabel() and ax.get_yscale() == "log":
                if type(ax.yaxis.get_major_formatter()) is not matplotlib.ticker.LogFormatter:
                    sci_ticks.append((name, ax.get_ylabel()))
        path = save(fig, out, name)
        renderer = FigureCanvasAgg(fig).get_renderer()  # the closed figure's canvas no longer renders
        for text, room in [(t, fig.bbox) for t in fig.texts] + [(ax.title, ax.bbox) for ax in fig.axes]:
            box = text.get_window_extent(renderer)
            if box.x0 < 0 or box.x1 > fig.bbox.x1 or box.width > room.width:  # matplotlib cuts it at the edge
                overflow.append((name, text.get_text()))
        return path

    monkeypatch.setattr(ps, "_save", spy)
    out = ps.write_all(tmp_path)
    assert sorted(out["figures"]) == sorted(ps.DELIVERABLES)
    for name, path in out["figures"].items():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Path(path) == tmp_path / "figures" / f"{name}.png"
    for name, title in titles.items():
        expected = "K-SVD T = 0..100 (the x axis)" if name == "ksvd_iterations" else "K-SVD T = 60"
        assert expected in title, (name, title)
        assert ("calibration 256 x 1024 tokens" in title) == (name != "calib_size"), (name, title)
    assert not overflow
    assert not sci_ticks
    md = (tmp_path / "results.md").read_text()
    assert "![rho](figures/rho.png)" in md and "| cospadi | 0.2 |" in md


def test_the_objective_panel_draws_objective_t_at_iteration_t_from_0(tmp_path, monkeypatch):
    # objective[t] is the error after t K-SVD iterations ([0]: the first OMP on the initial dictionary), so a T = 100
    # run has 101 entries, drawn at t = 0..100; the panel takes the mean over matrices of the longest run.
    m = metrics("cospadi", 0.2, 27.0, T=100)
    for i, row in enumerate(m["matrices"]):
        row["objective"] = [(i + 1) / (t + 1) for t in range(101)]
    write(tmp_path, "ksvd_iterations", "run-cr0.2", m)
    short = metrics("cospadi", 0.2, 30.0, T=5)
    for row in short["matrices"]:
        row["objective"] = [1.0] * 6
    write(tmp_path, "ksvd_iterations", "run-cr0.2/snapshots/T5", short)
    drawn = {}
    save = ps._save

    def spy(fig, out, name):
        if name == "ksvd_iterations":
            (line,) = fig.axes[2].lines
            drawn["x"], drawn["y"] = list(line.get_xdata()), list(line.get_ydata())
        return save(fig, out, name)

    monkeypatch.setattr(ps, "_save", spy)
    ps.write_all(tmp_path)
    mean_i = sum(range(1, len(m["matrices"]) + 1)) / len(m["matrices"])
    assert drawn["x"] == list(range(101))
    assert drawn["y"] == pytest.approx([mean_i / (t + 1) for t in range(101)])


def test_a_collapsed_method_leaves_the_perplexity_axis_to_the_others_and_is_named_instead(tmp_path, monkeypatch):
    full_tree(tmp_path)  # plain SVD at 7500-17500 PPL, over 100 x the dense 14.68; CoSpaDi† at 1350-3150 is not
    assert ps.collapsed_methods(ps.group(ps.load_points(tmp_path))["methods"]) == {"svd": (7500.0, 17500.0)}
    drawn = {}
    save = ps._save

    def spy(fig, out, name):
        if name == "methods":
            ppl, acc = fig.axes
            drawn[name] = ({line.get_label() for line in ppl.lines}, {c.get_label() for c in acc.containers},
                           ppl.get_title())
        return save(fig, out, name)

    monkeypatch.setattr(ps, "_save", spy)
    ps.write_all(tmp_path)
    ppl_lines, acc_lines, note = drawn["methods"]
    assert "SVD" in acc_lines and "SVD" not in ppl_lines and "CoSpaDi†" in ppl_lines
    assert note == "off scale (collapsed): SVD PPL 7.5e+03-1.8e+04"


def test_mixed_T_in_one_figure_is_refused(tmp_path):
    write(tmp_path, "methods", "a", metrics("cospadi", 0.2, T=60))
    write(tmp_path, "methods", "b", metrics("cospadi", 0.3, T=1))
    with pytest.raises(ps.MixedTError, match=r"methods: .*different K-SVD T \[1, 60\]"):
        ps.write_all(tmp_path)
    # low-rank points have no T and do not count as another one
    ps.figure_setting([ps.point_from_metrics(metrics("svd_llm", T=1), "methods", "x")], "methods")
    write(tmp_path, "methods", "b", metrics("svd_llm", 0.3, T=1))
    assert "methods" in ps.write_all(tmp_path)["figures"]


def test_mixed_calibration_size_in_one_figure_is_refused(tmp_path):
    """A reduced-setting (32 x 512) SVD-LLM point must not sit silently beside paper-setting (256 x 1024) ones."""
    write(tmp_path, "methods", "a", metrics("svd_llm", 0.2))
    write(tmp_path, "methods", "b", metrics("svd_llm", 0.3, nsamples=32, seqlen=512))
    with pytest.raises(ps.MixedCalibrationError, match=r"methods: .*different sizes .*'32x512'.*'256x1024'"):
        ps.write_all(tmp_path)
    # plain SVD never reads the calibration, so its configured size does not count
    write(tmp_path, "methods", "b", metrics("svd", 0.3, nsamples=32, seqlen=512))
    assert "methods" in ps.write_all(tmp_path)["figures"]
    # along the calibration-size axis mixed sizes are the point; T must still agree
    for i, (n, l) in enumerate([(16, 256), (256, 1024)]):
        write(tmp_path, "calib_size", f"c{i}", metrics("cospadi", 0.2, nsamples=n, seqlen=l))
    assert "calib_size" in ps.write_all(tmp_path)["figures"]
    write(tmp_path, "calib_size", "c2", metrics("cospadi", 0.2, T=1, nsamples=64, seqlen=256))
    with pytest.raises(ps.MixedTError, match="calib_size"):
        ps.write_all(tmp_path)


def test_claims_json_schema_with_no_results(tmp_path):
    out = ps.write_all(tmp_path)
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert claims == out["claims"] and not out["figures"]
    assert [c["claim"].split(".")[0] for c in claims] == ["1", "2", "3", "4a", "4b", "4c", "4d", "5", "6", "7", "8",
                                                         "9", "10", "11", "12"]
    for c in claims:
        assert set(c) == {"claim", "paper", "ours", "holds"}
        assert all(isinstance(c[k], str) and c[k] for k in ("claim", "paper", "ours"))
        assert c["holds"] in (True, False, None)
    measured = {c["claim"].split(".")[0] for c in claims if c["holds"] is not None}
    assert measured == {"6"}  # computed from the budget function, not from runs
    assert all(c["ours"].startswith(("not measured yet", "not testable on SmolLM2")) for c in claims
               if c["holds"] is None)


def _methods(root: Path, cospadi_ppl: dict[float, float], crs=(0.2, 0.3, 0.4)) -> None:
    for r in crs:
        write(root, "methods", f"svd_llm-{r}", metrics("svd_llm", r, 50.0, 0.10))
        write(root, "methods", f"cospadi-{r}", metrics("cospadi", r, cospadi_ppl[r], 0.12))


def test_claim_1_holds_fails_and_waits_for_missing_points(tmp_path):
    _methods(tmp_path / "a", {0.2: 30.0, 0.3: 40.0, 0.4: 45.0})
    assert _claims(tmp_path / "a")["1"]["holds"] is True
    _methods(tmp_path / "b", {0.2: 30.0, 0.3: 40.0, 0.4: 55.0})  # CoSpaDi loses at CR 0.4
    c = _claims(tmp_path / "b")["1"]
    assert c["holds"] is False and "CR 0.4: ppl 55.00 vs 50.00" in c["ours"]
    _methods(tmp_path / "c", {0.2: 30.0, 0.3: 40.0}, crs=(0.2, 0.3))
    c = _claims(tmp_path / "c")["1"]
    assert c["holds"] is None and "not measured yet" in c["ours"] and "CR 0.4" in c["ours"]


def test_rho_bits_and_functional_error_claims(tmp_path):
    for r in (0.2, 0.3, 0.4):
        for rho in (1.0, 1.5, 2.0, 3.0, 4.0):
            best = 4.0 if r == 0.4 else 2.0  # the optimum moves away from 2 at CR 0.4
            write(tmp_path, "rho", f"{r}-{rho}", metrics("cospadi", r, 20 + (rho - best) ** 2, rho=rho))
        write(tmp_path, "bits", f"{r}-16", metrics("cospadi", r, 20.0, 0.2, quantization="bf16"))
        write(tmp_path, "bits", f"{r}-14", metrics("cospadi", r, 20.1 if r < 0.4 else 21.0, 0.2,
                                                   quantization="bf16-14bit"))
    write(tmp_path, "methods", "c", metrics("cospadi", 0.2, error_scale=0.9))
    write(tmp_path, "methods", "s", metrics("svd_llm", 0.2))
    claims = _claims(tmp_path)
    assert claims["3"]["holds"] is False and "CR 0.4: best rho by ppl 4" in claims["3"]["ours"]
    assert claims["5"]["holds"] is False and "CR 0.4: ppl x1.0500" in claims["5"]["ours"]
    # the committed templates: CoSpaDi's functional errors x 0.9 vs SVD-LLM's, matrix by matrix
    c, s = (ps.point_from_metrics(metrics(m, 0.2, error_scale=e), "methods", m) for m, e in
            (("cospadi", 0.9), ("svd_llm", 1.0)))
    expected = all(c.matrices[k][4] < s.matrices[k][4] for k in c.matrices)
    assert claims["10"]["holds"] is expected and "7 matrices" in claims["10"]["ours"]
    write(tmp_path, "methods", "c", metrics("cospadi", 0.2, error_scale=0.01))
    assert _claims(tmp_path)["10"]["holds"] is True


def test_solver_claims_4a_4b(tmp_path):
    # 4a: power within 1 % of exact in PPL and exact below MOD; 4b: the update phase, not the whole fit, is timed
    for root, exact_ppl, exact_update in ((tmp_path / "a", 20.1, 90.0), (tmp_path / "b", 19.0, 30.0)):
        for u, ppl, upd in (("power", 20.0, 60.0), ("exact", exact_ppl, exact_update), ("mod", 24.0, 5.0)):
            write(root, "dict_update", u, metrics("cospadi", 0.2, ppl, dict_update=u, fit_s=100.0,
                                                  phase_seconds={"omp": 50.0, "update": upd}))
    a, b = _claims(tmp_path / "a"), _claims(tmp_path / "b")
    assert a["4a"]["holds"] is True and b["4a"]["holds"] is False  # b: power 5 % above exact
    assert a["4b"]["holds"] is True and b["4b"]["holds"] is False
    assert b["4b"]["ours"] == "dictionary update 60 s (power) vs 30 s (exact), ratio 2.00; whole fit 100 s vs 100 s"
    assert _claims(tmp_path / "none")["4b"]["holds"] is None


def test_ug_global_ratio_and_claim_9(tmp_path):
    for m in ("cospadi", "svd_llm"):
        for u, g in ((0.4, 0.2), (0.5, 0.25)):
            write(tmp_path, "ug", f"{m}-ug{u}", metrics(m, u, 21.0 if m == "cospadi" else 30.0,
                                                        proj_types=["gate_proj", "up_proj"]))
            write(tmp_path, "ug", f"{m}-{g}", metrics(m, g, 20.5))
    rows = ps.ug_table(ps.group(ps.load_points(tmp_path))["ug"])
    # gate + up are half of SmolLM2's projection weights: the global CR is UG CR / 2
    assert [(r["method"], r["ug_ratio"], r["global_ratio"], r["uniform_ratio"]) for r in rows] == [
        ("cospadi", 0.4, pytest.approx(0.2), 0.2), ("cospadi", 0.5, pytest.approx(0.25), 0.25),
        ("svd_llm", 0.4, pytest.approx(0.2), 0.2), ("svd_llm", 0.5, pytest.approx(0.25), 0.25)]
    assert _claims(tmp_path)["9"]["holds"] is False  # SVD-LLM^UG is 46 % worse than uniform


def test_output_is_deterministic(tmp_path):
    full_tree(tmp_path)
    first = ps.write_all(tmp_path)
    files = [tmp_path / "claims.json", tmp_path / "results.md", *map(Path, first["figures"].values())]
    before = {f: f.read_bytes() for f in files}
    ps.write_all(tmp_path)
    assert {f: f.read_bytes() for f in files} == before


def test_bit_widths_come_from_requantized_evaluations_of_the_methods_runs(tmp_path):
    """Each float32 CoSpaDi run of the methods deliverable is the 32-bit point; every task=evaluate
    eval.requantize=<width> file in it is a point at that width with its own scores; --requantize lists exactly the
    evaluations still missing, for CoSpaDi at CR 0.2-0.4 only."""
    for r in (0.1, 0.2):
        write(tmp_path, "methods", f"cospadi-{r}", metrics("cospadi", r, 20.0))
    write(tmp_path, "methods", "svd_llm-0.2", metrics("svd_llm", 0.2, 30.0))
    write_evaluation(tmp_path, "cospadi-0.2", "bf16", 20.5)
    write_evaluation(tmp_path, "cospadi-0.2", "int8", 26.0)
    bits = sorted(ps.group(ps.load_points(tmp_path))["bits"], key=lambda p: ps.BITS[p.quantization])
    assert [(p.ratio, p.quantization, p.ppl) for p in bits] == [(0.2, "int8", 26.0), (0.2, "bf16", 20.5),
                                                                (0.2, None, 20.0)]
    assert all(p.T == 60 and p.method == "cospadi" for p in bits)
    rows = {r["quantization"]: r for r in ps.bits_table(bits)}
    assert rows["int8"]["rel_ppl"] == pytest.approx(26.0 / 20.5)
    jobs = ps.requantize_jobs(tmp_path)
    assert [j[-2] for j in jobs] == ["eval.requantize=bf16-14bit", "eval.requantize=bf16-12bit",
                                     "eval.requantize=bf16-10bit"]
    assert all(j[3:5] == ["task=evaluate", f"artifact={tmp_path / 'methods' / 'cospadi-0.2'}"] for j in jobs)


def _runs_script():
    import importlib.util
    import sys

    if "paper_setting_runs" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "paper_setting_runs", Path(__file__).resolve().parent.parent / "experiments" / "paper_setting_runs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["paper_setting_runs"] = module
        spec.loader.exec_module(module)
    return sys.modules["paper_setting_runs"]


def test_session_sized_runs_restate_a_reduced_setting_only_where_it_applies(tmp_path):
    """experiments/paper_setting_runs.py: every point of the sweep, T only on K-SVD methods, snapshots cut below T,
    the calibration axes of calib_size left to the sweep, names that say the setting, finished jobs skipped."""
    runs = _runs_script()
    jobs = runs.plan_jobs("methods", ksvd_iterations=4, nsamples=32, seqlen=512, root=tmp_path)
    assert len(jobs) == 30 and len({j.run_name for j in jobs}) == 30
    for job in jobs:
        assert job.output_dir == tmp_path / "methods" / job.run_name
        assert "-n32x512-" in job.run_name
        ksvd = any(o.startswith("method=cospadi") for o in job.overrides)  # cospadi, _grouped, _free
        assert ("method.ksvd_iterations=4" in job.overrides) == ksvd, job.overrides
        assert ("-T4-" in job.run_name) == ksvd, job.run_name
    paper = runs.plan_jobs("methods", where={"method": "svd_llm", "method.ratio": "0.2"})
    assert [j.overrides for j in paper] == [("experiment=paper_smollm2_methods", "method=svd_llm", "method.ratio=0.2")]
    assert "-n256x1024-" in paper[0].run_name  # the paper's setting by default

    (snapshots,) = runs.plan_jobs("ksvd_iterations", ksvd_iterations=10, where={"method.ratio": "0.4"}, root=tmp_path)
    assert "method.ksvd_snapshots=[0,1,2,5]" in snapshots.overrides
    calib = runs.plan_jobs("calib_size", ksvd_iterations=4, nsamples=32, seqlen=512, root=tmp_path)
    assert len(calib) == 20  # 5 nsamples x 2 seqlen x {CoSpaDi, SVD-LLM}: the sweep's axes, never restated
    for job in calib:
        keys = [o.split("=", 1)[0] for o in job.overrides]
        assert keys.count("calib.nsamples") == keys.count("calib.seqlen") == 1, job.overrides
    assert len({j.run_name.split("-n")[-1].split("-")[0] for j in calib}) == 10
    (jobs[0].output_dir).mkdir(parents=True)
    (jobs[0].output_dir / "metrics.json").write_text("{}")
    assert jobs[0].finished and not jobs[1].finished
    with pytest.raises(ValueError, match="unknown sweep 'method'"):
        runs.plan_jobs("method")


def test_a_point_another_sweep_has_run_is_linked_not_fitted_again(tmp_path):
    """power_iterations' p = 8 at CR 0.2 is methods' CoSpaDi at CR 0.2 (the same run name): with that run finished,
    the point is linked to it and counts as finished; without it, or where the point has its own fit, nothing is
    written."""
    runs = _runs_script()
    jobs = runs.plan_jobs("power_iterations", root=tmp_path)
    (methods,) = runs.plan_jobs("methods", where={"method": "cospadi", "method.ratio": "0.2"}, root=tmp_path)
    (same,) = [j for j in jobs if j.run_name == methods.run_name]
    assert "method.power_iterations=8" in same.overrides
    assert runs.link_same_runs(jobs) == [] and not any(j.finished for j in jobs)
    methods.output_dir.mkdir(parents=True)
    (methods.output_dir / "metrics.json").write_text("{}")
    assert runs.link_same_runs(jobs) == [same] and [j for j in jobs if j.finished] == [same]
    assert json.loads((same.output_dir / runs.SAME_RUN).read_text()) == {"run": f"methods/{methods.run_name}"}
    assert sorted(p.name for p in same.output_dir.iterdir()) == [runs.SAME_RUN]  # no temporary file left
    assert runs.link_same_runs(jobs) == []  # idempotent
    assert runs.link_same_runs([methods]) == []  # its own fit: never linked


def test_a_snapshot_run_killed_before_its_snapshots_were_scored_is_not_finished(tmp_path):
    """run.py writes a snapshot run's metrics.json after its own evaluation, then again with "snapshots": between
    the two the job must stay to do (the next call evaluates the snapshots missing), and no other sweep links it."""
    runs = _runs_script()
    job = runs.Job(("experiment=x",), "run", tmp_path / "ksvd_iterations" / "run")
    other = runs.Job(("experiment=y",), "run", tmp_path / "methods" / "run")
    job.output_dir.mkdir(parents=True)
    with_snapshots = {"config": {"method": {"ksvd_snapshots": [0, 5]}}}
    (job.output_dir / "metrics.json").write_text(json.dumps(with_snapshots))
    assert not job.finished and runs.link_same_runs([other]) == []
    (job.output_dir / "metrics.json").write_text(json.dumps({**with_snapshots, "snapshots": []}))
    assert job.finished and runs.link_same_runs([other]) == [other]
    (job.output_dir / "metrics.json").write_text(json.dumps({"config": {"method": {"ksvd_snapshots": []}}}))
    assert job.finished


def test_commit_sweeps_up_finished_jobs_an_earlier_call_left_uncommitted(tmp_path, monkeypatch):
    """A runner killed between a job's end and its commit must not leave that job's metrics uncommitted for good:
    the next ``--commit`` call (even ``--list``) commits them, and only them."""
    import subprocess

    runs = _runs_script()
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@example.org")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "root"], cwd=tmp_path, check=True)
    monkeypatch.setattr(runs, "REPO", tmp_path)
    jobs = [runs.Job(("experiment=x",), f"run{i}", tmp_path / "methods" / f"run{i}") for i in range(3)]
    monkeypatch.setattr(runs, "plan_jobs", lambda *a, **k: jobs)
    for job in jobs[:2]:
        job.output_dir.mkdir(parents=True)
        (job.output_dir / "metrics.json").write_text("{}")
    (tmp_path / "unrelated.txt").write_text("staged elsewhere")
    subprocess.run(["git", "add", "unrelated.txt"], cwd=tmp_path, check=True)
    assert runs.main(["methods", "--list", "--commit"]) == 0
    log = subprocess.run(["git", "log", "--format=%s", "--name-only"], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout
    assert "methods/run0/metrics.json" in log and "methods/run1/metrics.json" in log and "run2" not in log
    assert "unrelated.txt" not in log  # other staged changes stay staged
    assert runs.commit(jobs[0]) is False  # nothing left to commit: idempotent


def test_processes_launch_peers_that_share_the_units_and_stop_together(tmp_path, monkeypatch):
    """``--processes N``: N peers of one jax.distributed run (one coordinator, ranks 0..N-1, cores/N threads each,
    method.parallel=matrices unless the point sets it); a failing peer stops the others instead of leaving them
    waiting in a collective."""
    import os
    import sys
    import time

    runs = _runs_script()
    monkeypatch.setattr(runs, "REPO", tmp_path)
    job = runs.Job(("experiment=x", "method=cospadi"), "run", tmp_path / "run")
    assert runs.job_command(job)[-1] == "method=cospadi"
    assert runs.job_command(job, 2)[-1] == "method.parallel=matrices"
    placed = runs.Job(("experiment=x", "method.parallel=columns"), "run", tmp_path / "run")
    assert not any("matrices" in arg for arg in runs.job_command(placed, 2))

    record = ("import json, os; keys = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', "
              "'NUMBA_NUM_THREADS', 'OPENBLAS_NUM_THREADS'); rank = os.environ['JAX_PROCESS_ID']; "
              "open(f'rank{rank}.json', 'w').write(json.dumps({k: os.environ[k] for k in keys})); print('rank', rank)")
    assert runs.launch([sys.executable, "-c", record], 3, log_dir=tmp_path / "logs") == 0
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [s["JAX_PROCESS_ID"] for s in seen] == ["0", "1", "2"]
    assert len({s["JAX_COORDINATOR_ADDRESS"] for s in seen}) == 1 and {s["JAX_NUM_PROCESSES"] for s in seen} == {"3"}
    threads = str(max(1, len(os.sched_getaffinity(0)) // 3))
    assert {s["NUMBA_NUM_THREADS"] for s in seen} == {s["OPENBLAS_NUM_THREADS"] for s in seen} == {threads}
    assert (tmp_path / "logs" / "process1.log").read_text() == "rank 1\n"  # rank 0 prints to the runner's output

    # Rank 1 fails at once; rank 0 would wait an hour for it (as in a collective): it is stopped, and the
    # failure is returned.
    hang = "import os, sys, time; sys.exit(7) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(3600)"
    t0 = time.monotonic()
    assert runs.launch([sys.executable, "-c", hang], 2, log_dir=tmp_path / "logs") == 7
    assert time.monotonic() - t0 < 60
    with pytest.raises(ValueError, match="processes must be >= 1"):
        runs.launch([sys.executable, "-c", "pass"], 0, log_dir=tmp_path)


def test_sigterm_to_the_runner_stops_its_peers(tmp_path):
    """``kill`` of a ``--processes 2`` runner stops both peers of its job (they kept fitting, orphaned, before)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    peer = ("import os, time; open(f\"peer{os.environ['JAX_PROCESS_ID']}.pid\", 'w').write(str(os.getpid())); "
            "time.sleep(3600)")
    driver = (f"import pathlib, sys; sys.path.insert(0, {str(root / 'experiments')!r}); import paper_setting_runs as r; "
              f"r.REPO = pathlib.Path({str(tmp_path)!r}); r.launch([sys.executable, '-c', {peer!r}], 2, r.REPO / 'logs')")
    runner = subprocess.Popen([sys.executable, "-c", driver], cwd=root)
    pid_files = [tmp_path / f"peer{rank}.pid" for rank in range(2)]
    pids = []
    try:
        deadline = time.monotonic() + 120
        while not all(f.is_file() and f.read_text() for f in pid_files):
            assert runner.poll() is None and time.monotonic() < deadline, "the peers did not start"
            time.sleep(0.2)
        pids = [int(f.read_text()) for f in pid_files]
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 128 + signal.SIGTERM  # it unwound (SIGTERM's default would be -15)
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # stopped and reaped
    finally:
        runner.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
