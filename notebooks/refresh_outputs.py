"""Run the notebooks at their default settings and store their outputs, for GitHub to show.

    python notebooks/refresh_outputs.py                      # both notebooks
    python notebooks/refresh_outputs.py 01_quickstart.ipynb  # one

Each notebook runs top to bottom in a fresh kernel whose working directory is a new temporary
folder, so it starts from no cache and what it prints names ``notebook_work/...``, not where the
repository lives. Then what changes on every run without changing the results is dropped: the
timestamps nbclient writes into each cell's metadata and the kernel's version in
``language_info``. ``tests/integration/test_notebooks.py`` checks what is stored (outputs present,
no absolute paths, no errors or warnings, the size).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent


def refresh(path: Path) -> float:
    """Execute ``path`` in place at its defaults; returns the seconds it took."""
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="vtl-notebook-") as cwd:
        client = nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                                         resources={"metadata": {"path": cwd}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    notebook.metadata.pop("widgets", None)
    notebook.metadata["language_info"] = {"name": "python"}
    nbformat.write(notebook, path)
    return seconds


def main(names: list[str]) -> int:
    overrides = sorted(name for name in os.environ if name.startswith("VTL_NB_"))
    if overrides:  # the kernel inherits the environment: the stored outputs would not be the defaults
        print(f"unset {', '.join(overrides)} first: the stored outputs are the default run's", file=sys.stderr)
        return 2
    paths = [NOTEBOOKS / name for name in names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        seconds = refresh(path)
        print(f"{path.name}: {seconds:.0f} s, {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
