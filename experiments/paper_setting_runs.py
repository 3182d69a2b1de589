"""Run the jobs of issue 15's paper-setting sweeps one at a time, resumably, within a session's time.

    python experiments/paper_setting_runs.py methods --list                    # the jobs, finished or not
    python experiments/paper_setting_runs.py methods --where method.ratio=0.2 --deadline-minutes 150 --commit
    python experiments/paper_setting_runs.py rho --ksvd-iterations 4 --nsamples 32 --seqlen 512   # a reduced setting

``<sweep>`` names ``experiment=paper_smollm2_<sweep>`` (methods, ksvd_iterations, power_iterations, rho,
dict_update, calib_size, ug, ug_uniform). Its jobs are the points of the experiment's Hydra sweep
(:func:`cospadi_jax.config.sweep_points`), each run as its own ``python -m cospadi_jax.run hydra.mode=RUN
experiment=... <point> <setting>`` process (the Hydra app, nothing re-implemented; one process per job frees its
memory). What this adds to ``-m``:

- **Resumable across sessions.** A job whose directory holds its final ``metrics.json`` (with its snapshots scored,
  if it keeps any) is finished and skipped; a killed one resumes from its artifact (the app's resume,
  bit-identical).
- **Session-sized.** ``--deadline-minutes``: no job starts after that many minutes; ``--where key=value`` picks a
  part of the sweep. Progress and an ETA (the mean of this call's finished jobs) are printed after every job.
- **Committed as it goes.** ``--commit`` commits each finished job's ``metrics.json`` (and its snapshots' and
  evaluations', which .gitignore keeps) at once, so a new work tree loses nothing; it first commits any finished
  job that a killed earlier call left uncommitted.
- **All the cores on one job.** ``--processes N`` runs each job as N ``jax.distributed`` peers on this host with
  ``method.parallel=matrices`` (each process fits its round-robin share of the units, with cores/N threads): on
  the 2-core VM, 2 x 1 thread fit CoSpaDi's MLP units in about 49 s each against about 85 s for 1 x 2 threads
  (both beside other work: a rough figure). The placement keys stay out of a run's identity, so a job resumes
  under either launch.
- **No fit twice.** A point whose run another sweep has already finished (the same run name, so the same identity
  config: e.g. power_iterations' 8, dict_update's power and rho's 2 are all methods' CoSpaDi at that CR) is not
  fitted again: its directory gets a ``same_run.json`` naming that run, which ``experiments/paper_setting.py`` reads
  as this sweep's point.
- **A reduced setting, said in every name.** ``--ksvd-iterations``, ``--nsamples``, ``--seqlen`` replace the
  paper's T = 60 and 256 x 1024 where the machine cannot afford them: T only on jobs whose method has K-SVD (a
  low-rank config refuses the key), K-SVD snapshots cut to those below T, and neither where the sweep itself sets
  the key (calib_size's axes). Run names carry T and the calibration size, so reduced runs never share a directory
  with paper-setting runs, and ``experiments/paper_setting.py`` refuses a figure that mixes T values.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cospadi_jax.config import compose_config, sweep_points
from cospadi_jax.methods import method_class

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling module, whether run or imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_setting_data import SAME_RUN  # noqa: E402

SWEEPS = ("methods", "ksvd_iterations", "power_iterations", "rho", "dict_update", "calib_size", "ug", "ug_uniform")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Job:
    overrides: tuple[str, ...]  # after ``python -m cospadi_jax.run hydra.mode=RUN``
    run_name: str
    output_dir: Path

    @property
    def finished(self) -> bool:
        """Fitted and scored here, or linked to the same run of another sweep (:func:`link_same_runs`)."""
        return run_complete(self.output_dir) or (self.output_dir / SAME_RUN).is_file()


def run_complete(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the run's final ``metrics.json``. A run with K-SVD snapshots writes it once after
    its own evaluation and again, with ``"snapshots"``, after evaluating them: a run killed in between is not done
    (run again, it reuses every unit and evaluates only the snapshots still missing)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return False
    metrics = json.loads(path.read_text())
    return "snapshots" in metrics or not metrics.get("config", {}).get("method", {}).get("ksvd_snapshots")


def link_same_runs(jobs: list[Job]) -> list[Job]:
    """Mark each unfinished job whose run another sweep under the same root has finished (a directory of the same
    run name holding its final metrics.json) as finished, by writing ``<output_dir>/same_run.json`` = ``{"run": "<sweep
    dir>/<run name>"}``. Returns the jobs linked."""
    linked = []
    for job in jobs:
        if job.finished:
            continue
        root = job.output_dir.parent.parent
        same = [m.parent for m in sorted(root.glob(f"*/{job.run_name}/metrics.json"))
                if m.parent != job.output_dir and run_complete(m.parent)]
        if same:
            job.output_dir.mkdir(parents=True, exist_ok=True)
            tmp = job.output_dir / f".{SAME_RUN}.tmp"  # renamed into place: never a half-written link
            tmp.write_text(json.dumps({"run": same[0].relative_to(root).as_posix()}) + "\n")
            tmp.replace(job.output_dir / SAME_RUN)
            linked.append(job)
    return linked


def _value(value: object) -> str:
    return "null" if value is None else str(value)


def plan_jobs(sweep: str, *, ksvd_iterations: int | None = None, nsamples: int | None = None,
              seqlen: int | None = None, where: dict[str, str] | None = None, root: Path | None = None) -> list[Job]:
    """The jobs of ``experiment=paper_smollm2_<sweep>`` in sweep order, each composed and validated by Hydra.

    ``ksvd_iterations``/``nsamples``/``seqlen``: a reduced setting (see the module docstring); ``where``: keep the
    points whose override ``key`` has the string value given; ``root``: write under ``<root>/<sweep dir>/`` instead
    of ``experiments/results/paper_setting/<sweep dir>/`` (tests)."""
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}: use one of {SWEEPS}")
    experiment = f"experiment=paper_smollm2_{sweep}"
    where = where or {}
    base = compose_config([experiment])
    has_ksvd: dict[str, bool] = {}  # method label -> whether its config has K-SVD knobs

    def ksvd(label: str) -> bool:
        if label not in has_ksvd:
            name = compose_config([f"method={label}"]).method.name
            has_ksvd[label] = "ksvd_iterations" in {f.name for f in dataclasses.fields(method_class(name).config_class)}
        return has_ksvd[label]

    jobs = []
    for point in sweep_points(f"paper_smollm2_{sweep}"):
        point_overrides = [f"{k}={_value(v)}" for k, v in point]
        given = dict(o.split("=", 1) for o in point_overrides)
        if any(given.get(k) != v for k, v in where.items()):
            continue
        setting = []
        if ksvd_iterations is not None and ksvd(given.get("method", base.method.label)) \
                and "method.ksvd_iterations" not in given:
            setting.append(f"method.ksvd_iterations={ksvd_iterations}")
            if base.method.get("ksvd_snapshots"):
                kept = [t for t in base.method.ksvd_snapshots if t < ksvd_iterations]
                setting.append(f"method.ksvd_snapshots=[{','.join(map(str, kept))}]")
        for key, value in (("calib.nsamples", nsamples), ("calib.seqlen", seqlen)):
            if value is not None and key not in given:
                setting.append(f"{key}={value}")
        if root is not None:
            setting.append(f"output_dir={Path(root) / Path(base.output_dir).parent.name}/${{run_name}}")
        cfg = compose_config([experiment, *point_overrides, *setting])  # Hydra composes and names the job
        output_dir = Path(cfg.output_dir)
        jobs.append(Job((experiment, *point_overrides, *setting), cfg.run_name,
                        output_dir if output_dir.is_absolute() else REPO / output_dir))
    return jobs


def job_command(job: Job, processes: int = 1) -> list[str]:
    """The Hydra app's command line for ``job``; with several processes, ``method.parallel=matrices`` (unless the
    sweep point sets the placement itself), so that the processes share the units."""
    command = [sys.executable, "-m", "cospadi_jax.run", "hydra.mode=RUN", *job.overrides]
    if processes > 1 and not any(o.startswith("method.parallel=") for o in job.overrides):
        command.append("method.parallel=matrices")
    return command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM raises SystemExit here instead of ending the process at once, so the ``finally`` blocks that stop a
    job's processes run: a ``kill`` of this runner stops its peers too (they would otherwise keep fitting)."""
    def unwind(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield
        return
    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch(command: list[str], processes: int, log_dir: Path) -> int:
    """Run ``command`` in this repository: once, or as ``processes`` jax.distributed peers on localhost, each with
    its share of this process's cores as NumPy/Numba threads. Process 0 prints here; process i > 0 appends to
    ``<log_dir>/process<i>.log``. A peer that fails leaves the others waiting in a collective, so they are
    stopped, as they are when this process gets SIGTERM or Ctrl-C. Returns 0, or the exit status of the peer that
    failed."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    with _sigterm_unwinds():
        return _launch(command, processes, Path(log_dir))


def _launch(command: list[str], processes: int, log_dir: Path) -> int:
    if processes == 1:  # subprocess.run kills its child when an exception (SIGTERM's included) interrupts it
        return subprocess.run(command, cwd=REPO).returncode
    threads = str(max(1, len(os.sched_getaffinity(0)) // processes))
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": str(processes),
           "NUMBA_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, status = [], 0
    try:
        for rank in range(processes):
            # appended: a resumed job keeps its earlier attempt's log
            log = None if rank == 0 else open(log_dir / f"process{rank}.log", "a")
            procs.append(subprocess.Popen(command, cwd=REPO, env={**env, "JAX_PROCESS_ID": str(rank)}, stdout=log,
                                          stderr=subprocess.STDOUT if log else None))
            if log:
                log.close()  # the child holds its own descriptor
        while True:
            states = [p.poll() for p in procs]
            status = next((rc for rc in states if rc), 0)  # the peer that failed, not those stopped below
            if status or all(rc is not None for rc in states):
                break
            time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
    return status


def commit(job: Job) -> bool:
    """Commit the job's kept files (.gitignore keeps metrics.json, evaluation-*.json, same_run.json and the
    snapshots') and nothing else: other staged changes stay staged."""
    path = str(job.output_dir)
    subprocess.run(["git", "add", "--", path], cwd=REPO, check=True)
    staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", path], cwd=REPO).returncode != 0
    if staged:
        subprocess.run(["git", "commit", "-qm", f"Issue 15 run, SmolLM2: {job.run_name}", "--", path], cwd=REPO,
                       check=True)
    return staged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", choices=SWEEPS)
    parser.add_argument("--list", action="store_true", help="print the jobs and their state; run nothing")
    parser.add_argument("--where", nargs="*", default=[], metavar="KEY=VALUE",
                        help="only the sweep points with these values (e.g. method.ratio=0.2 method=cospadi)")
    parser.add_argument("--ksvd-iterations", type=int, help="reduced setting: K-SVD T (paper: 60)")
    parser.add_argument("--nsamples", type=int, help="reduced setting: calibration windows (paper: 256)")
    parser.add_argument("--seqlen", type=int, help="reduced setting: calibration window length (paper: 1024)")
    parser.add_argument("--deadline-minutes", type=float, help="start no job after this many minutes")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished job's metrics at once")
    parser.add_argument("--processes", type=int, default=1,
                        help="run each job as N jax.distributed processes sharing the units (method.parallel=matrices)")
    args = parser.parse_args(argv)
    where = dict(w.split("=", 1) for w in args.where)
    jobs = plan_jobs(args.sweep, ksvd_iterations=args.ksvd_iterations, nsamples=args.nsamples, seqlen=args.seqlen,
                     where=where)
    for job in link_same_runs(jobs):
        print(f"linked {job.run_name}: the same run as {json.loads((job.output_dir / SAME_RUN).read_text())['run']}")
    todo = [j for j in jobs if not j.finished]
    print(f"{args.sweep}: {len(jobs)} jobs, {len(jobs) - len(todo)} finished, {len(todo)} to run")
    if args.commit:  # a call killed between a job's end and its commit left it finished but uncommitted
        late = [j.run_name for j in jobs if j.finished and commit(j)]
        if late:
            print(f"committed {len(late)} finished jobs an earlier call had not: {', '.join(late)}")
    if args.list:
        for job in jobs:
            print(f"  [{'done' if job.finished else 'todo'}] {job.run_name}\n         "
                  f"python {' '.join(job_command(job, args.processes)[1:])}"
                  + (f"  # x {args.processes} processes" if args.processes > 1 else ""))
        return 0
    t_start, durations, failed = time.monotonic(), [], []
    for i, job in enumerate(todo, 1):
        elapsed = (time.monotonic() - t_start) / 60
        if args.deadline_minutes is not None and elapsed >= args.deadline_minutes:
            print(f"deadline: {elapsed:.0f} min >= {args.deadline_minutes:g}; {len(todo) - i + 1} jobs left")
            break
        print(f"[{i}/{len(todo)}] {job.run_name}", flush=True)
        t0 = time.monotonic()
        rc = launch(job_command(job, args.processes), args.processes, log_dir=job.output_dir)
        durations.append(time.monotonic() - t0)
        if rc != 0 or not job.finished:
            failed.append(job.run_name)
            print(f"  FAILED (exit {rc}): {job.run_name}; its artifact resumes on the next call", flush=True)
            continue
        committed = commit(job) if args.commit else False
        eta = sum(durations) / len(durations) * (len(todo) - i) / 60
        print(f"  finished in {durations[-1] / 60:.1f} min{', committed' if committed else ''}; "
              f"{len(todo) - i} left, ETA {eta:.0f} min", flush=True)
    if failed:
        print(f"{len(failed)} failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
