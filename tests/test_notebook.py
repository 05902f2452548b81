"""notebooks/assignment.ipynb runs top to bottom (quick mode: one epoch on a subset) in a real
Jupyter kernel, and its cells show what they claim: a trained model's report and predictions."""

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "assignment.ipynb"


def test_assignment_notebook_runs(tmp_path, dataset):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["FMNIST_NOTEBOOK_QUICK"] = "1"
    try:
        nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("FMNIST_NOTEBOOK_QUICK", None)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "test accuracy" in text and "precision" in text and "(true: " in text
    acc = float(text.split("test accuracy ")[1].split("%")[0])
    assert acc > 60, f"one quick epoch should learn well above chance, got {acc}%"
    assert (tmp_path / "runs" / "notebook").is_dir()       # ran where it was told, not in the repo
