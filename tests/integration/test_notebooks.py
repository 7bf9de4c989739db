"""The notebooks run top to bottom at tiny settings (parameters come from environment variables)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the dev extra: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="needs the dev extra: pip install -e '.[dev]'")
pytest.importorskip("ipykernel", reason="needs the dev extra: pip install -e '.[dev]'")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
TINY = {"VTL_NB_IMAGES": "8", "VTL_NB_SIZE": "32", "VTL_NB_EPOCHS": "1", "VTL_NB_FOLDS": "2",
        "VTL_NB_BACKBONE": "test_efficientnet", "VTL_NB_PRETRAINED": "false",
        "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


def _execute(name: str, tmp_path: Path, monkeypatch) -> nbformat.NotebookNode:
    for key, value in {**TINY, "VTL_NB_WORK": str(tmp_path / "work")}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return notebook


def _text(notebook) -> str:
    return "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
    notebook = _execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    work = tmp_path / "work"
    run = work / "runs" / "frozen" / "version_0"
    assert (run / "report.html").is_file() and (work / "model.onnx").is_file()
    assert any(p.suffix == ".png" for p in (work / "explain").iterdir())
    assert "escape_rate" in _text(notebook) and "crack_0000.png" in _text(notebook)


@pytest.mark.slow
def test_feature_extraction_notebook(tmp_path, monkeypatch):
    notebook = _execute("02_feature_extraction.ipynb", tmp_path, monkeypatch)
    assert (tmp_path / "work" / "features.npz").is_file()
    assert "test_efficientnet" in _text(notebook)
