"""The notebooks: their stored outputs (what GitHub shows) are complete and clean, and they run
top to bottom at tiny settings (parameters come from environment variables)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ("01_quickstart.ipynb", "02_feature_extraction.ipynb")
REFRESH = "run `python notebooks/refresh_outputs.py` to store a clean run at the default settings"
MAX_BYTES = 1_500_000  # a page GitHub renders quickly; the figures are embedded PNGs
ABSOLUTE_PATH = re.compile(r"/tmp/|/home/|/work/|/root/|/Users/|/private/var/|\b[A-Za-z]:\\")
WARNING_OR_TRACEBACK = re.compile(r"\b\w*Warning\b:|Traceback \(most recent call last\)")
TINY = {"VTL_NB_IMAGES": "8", "VTL_NB_SIZE": "32", "VTL_NB_EPOCHS": "1", "VTL_NB_FOLDS": "2",
        "VTL_NB_BACKBONE": "test_efficientnet", "VTL_NB_PRETRAINED": "false",
        "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


def _joined(text: str | list[str]) -> str:
    return "".join(text) if isinstance(text, list) else text  # the JSON keeps multi-line text as a list


def _output_text(output: dict) -> str:
    """The text of an output as a reader sees it: a stream's, or an execute result's or display's
    text/* forms (not the base64 of its figures)."""
    if output["output_type"] == "stream":
        return _joined(output["text"])
    if output["output_type"] == "error":
        return "\n".join(output.get("traceback", []))
    return "\n".join(_joined(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))


@pytest.mark.parametrize("name", NAMES)
def test_stored_outputs_are_complete_and_clean(name):
    """Every code cell but the parameters shows what it did; no errors, warnings, progress-bar
    redraws, widget state or absolute paths of the machine that ran it; execution counts in
    order; no per-run timestamps; and a size GitHub renders."""
    raw = (NOTEBOOKS / name).read_bytes()
    assert len(raw) <= MAX_BYTES, f"{name} is {len(raw):,} bytes (limit {MAX_BYTES:,}): fewer or smaller figures"
    notebook = json.loads(raw)
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1)), REFRESH
    assert "widgets" not in notebook["metadata"] and "version" not in notebook["metadata"].get("language_info", {})
    assert not ABSOLUTE_PATH.search(json.dumps(notebook["metadata"]))
    for number, cell in enumerate(code, 1):
        where = f"{name}, code cell {number}"
        assert "execution" not in cell["metadata"], f"{where}: execution timestamps; {REFRESH}"
        assert not ABSOLUTE_PATH.search(_joined(cell["source"])), where
        if "parameters" not in cell["metadata"].get("tags", []):
            assert cell["outputs"], f"{where} has no output; {REFRESH}"
        for output in cell["outputs"]:
            text = _output_text(output)
            assert output["output_type"] != "error", f"{where} failed:\n{text}"
            assert not ABSOLUTE_PATH.search(text), f"{where} shows an absolute path:\n{text}"
            assert not WARNING_OR_TRACEBACK.search(text), f"{where} shows a warning:\n{text}"
            assert "\r" not in text, f"{where} stores progress-bar redraws"
            assert not any("widget" in kind for kind in output.get("data", {})), f"{where} stores a widget"


def _execute(name: str, tmp_path: Path, monkeypatch):
    """A copy of the notebook, outputs cleared, run in ``tmp_path``; the file is left as it was."""
    nbformat = pytest.importorskip("nbformat", reason="needs the dev extra: pip install -e '.[dev]'")
    nbclient = pytest.importorskip("nbclient", reason="needs the dev extra: pip install -e '.[dev]'")
    pytest.importorskip("ipykernel", reason="needs the dev extra: pip install -e '.[dev]'")
    for key, value in {**TINY, "VTL_NB_WORK": str(tmp_path / "work")}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    stored = (NOTEBOOKS / name).read_bytes()
    notebook = nbformat.reads(stored.decode("utf-8"), as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []  # only this run's outputs count below, never the stored ones
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert (NOTEBOOKS / name).read_bytes() == stored
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
