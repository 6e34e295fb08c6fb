"""The quickstart notebook runs top to bottom, offline, in a fresh kernel."""

from __future__ import annotations


def test_quickstart_notebook_runs(notebook_beside):
    folder, running = notebook_beside  # run beside the tests before this one (conftest.py)
    notebook = running.result()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert printed.count("predicted") == 5
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the scatter plot
    assert (folder / "quickstart_run" / "my-model" / "model.safetensors").is_file()
