"""The quickstart notebook runs top to bottom, offline, in a fresh kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this process's environment: offline hub, offline W&B, the tests' feature cache.
    workdir = {"metadata": {"path": str(tmp_path)}}
    NotebookClient(notebook, timeout=180, kernel_name="python3", resources=workdir).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert printed.count("predicted") == 5
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the scatter plot
    assert (tmp_path / "quickstart_run" / "my-model" / "model.safetensors").is_file()
