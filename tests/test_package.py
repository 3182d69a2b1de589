"""The package works as a package: a wheel built from the source, installed without the checkout, runs its
console scripts from a directory outside the checkout, with the configs shipped inside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import save_tiny_model_with_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding only our wheel; every dependency comes from the test environment's site-packages
    (a plain path entry, so the checkout's editable-install hook is not loaded)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT / "cospadi_jax", source / "cospadi_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((work / "dist").glob("cospadi_jax-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, capture_output=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv, wheel


def test_wheel_ships_the_configs(installed):
    import zipfile

    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("cospadi_jax/conf/") and n.endswith(".yaml")}
    expected = {f"cospadi_jax/conf/{p.relative_to(ROOT / 'cospadi_jax' / 'conf')}"
                for p in (ROOT / "cospadi_jax" / "conf").rglob("*.yaml")}
    assert expected and shipped == expected


@pytest.mark.slow
def test_console_scripts_run_outside_the_checkout(installed, tmp_path):
    venv, _ = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"

    def run(*args):
        done = subprocess.run([str(venv / "bin" / "cospadi-run"), *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import cospadi_jax; print(cospadi_jax.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where  # the wheel, not the checkout
    help_text = run("--help")
    assert "cospadi-run: compress an LLM" in help_text and "task=" in help_text
    assert "_schema" not in help_text  # the internal schema nodes are not config options
    # a user's own config group, on the search path next to the shipped ones
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\nmethod:\n  ratio: 0.35\n")
    assert "ratio: 0.35" in run("--config-dir", str(tmp_path / "my_conf"), "experiment=mine", "--cfg", "job")
    tiny = save_tiny_model_with_tokenizer(tmp_path / "tiny", layers=2)
    out = tmp_path / "run"
    run(f"model.spec={tiny}", "model.name=tiny", f"output_dir={out}", "logger.mode=disabled", "method=svd_llm",
        "calib.nsamples=4", "calib.seqlen=32", "calib.heldout_nsamples=2", "calib.cache_dir=null",
        "eval.seqlen=32", "eval.max_windows=2", "eval.dense_cache_dir=null")
    assert json.loads((out / "metrics.json").read_text())["resumed"]["units"] == 14
    log = (out / "run.log").read_text()
    assert "absl" not in log and "orbax" not in log and len(log.splitlines()) < 30  # quiet, useful output
    assert f"metrics: {out}/metrics.json" in log and "whole model:" in log
    assert not list(elsewhere.iterdir())  # nothing stray in the working directory
