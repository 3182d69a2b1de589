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
