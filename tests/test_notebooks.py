"""The notebooks in notebooks/: executed top to bottom with nbclient on this interpreter (offline,
tiny models, in a temporary working folder), and committed without outputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel", reason="the notebooks run on an ipykernel of this interpreter")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart.ipynb", "train_with_asft.ipynb", "safekey.ipynb"]
KERNEL = "hf-safety-merge-tests"
CELL_TIMEOUT = 300


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One working folder for every notebook (they share the toy models built there), and a
    kernel spec that runs this very interpreter (the venv), whatever kernels are installed."""
    root = tmp_path_factory.mktemp("notebooks")
    spec = root / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hf-safety-merge tests", "language": "python",
    }))
    return root


def _notebook(name: str) -> object:
    path = NOTEBOOKS / name
    assert path.is_file(), f"{path} is missing (every documented notebook ships)"
    return nbformat.read(path, as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _notebook(name)
    monkeypatch.setenv("JUPYTER_PATH", str(workdir / "jupyter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name=KERNEL, allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every code cell ran, and the last code cell produced something to look at
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert code[-1].outputs, f"{name}: the last code cell shows nothing"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs(name: str) -> None:
    nb = _notebook(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for c in code:
        assert c.outputs == [] and c.execution_count is None, f"{name}: strip the outputs before committing"
    assert nb.metadata.get("kernelspec", {}).get("language") == "python"


def test_quickstart_is_short() -> None:
    nb = _notebook("quickstart.ipynb")
    assert len(nb.cells) < 10
