"""The notebooks in notebooks/ run top to bottom (small settings: ACTATLAS_NB_SMALL=1) so they never rot.

They run in one working directory, in order, so later notebooks reuse the run the quickstart built
(`build` skips finished stages).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat/nbclient/ipykernel "
                                                  "(requirements-test.txt)")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert "01_quickstart.ipynb" in names and len(names) >= 3, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, workdir, monkeypatch):
    monkeypatch.setenv("ACTATLAS_NB_SMALL", "1")
    monkeypatch.setenv("ACTATLAS_NB_OUT", str(workdir / "runs"))
    monkeypatch.setenv("NUMBA_CACHE_DIR", os.environ.get("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba")))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()   # raises CellExecutionError (with the cell's traceback) on any failing cell
    finally:
        art = ROOT / "test-artifacts" / "notebooks"
        art.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, art / path.name)     # the executed notebook, outputs included, for inspection
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # every code cell ran and produced its output
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
