"""The notebook that draws the curves from committed results runs top to bottom."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_curves_notebook_executes(tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / "curves.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook drew no figure"


def test_committed_notebook_keeps_its_figures():
    """Viewed on GitHub or nbviewer without running it, the notebook still shows its figures."""
    nb = nbformat.read(ROOT / "notebooks" / "curves.ipynb", as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "commit the notebook with its outputs"
    assert not [o for o in outputs if o.get("output_type") == "error"]


def _run_paper_setting_notebook(monkeypatch, results: Path | None) -> list[dict]:
    if results is not None:  # the kernel inherits the environment: the notebook reads this tree instead
        monkeypatch.setenv("PAPER_SETTING_ROOT", str(results))
    nb = nbformat.read(ROOT / "notebooks" / "paper_setting.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return outputs


def test_paper_setting_notebook_executes_on_the_committed_results(monkeypatch):
    """Whatever is committed under experiments/results/paper_setting (nothing yet, or partial results)."""
    monkeypatch.delenv("PAPER_SETTING_ROOT", raising=False)
    outputs = _run_paper_setting_notebook(monkeypatch, None)
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "| claim | paper | ours | holds |" in text


def test_paper_setting_notebook_draws_the_figures(monkeypatch, tmp_path):
    from paper_setting_tree import full_tree

    outputs = _run_paper_setting_notebook(monkeypatch, full_tree(tmp_path))
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 8, "one figure per deliverable"
