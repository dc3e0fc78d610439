"""examples/quickstart.ipynb: committed executed (a reader sees its figures), small, without noise in
its outputs; and it still runs top to bottom (offline, CPU) without an error."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.ipynb")


def check_outputs(nb):
    """No error, no warning text, at most a few outputs per cell, and the four figures."""
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Warning" not in streams and "IProgress" not in streams, streams[:500]
    assert max(len(c.get("outputs", [])) for c in nb.cells if c.cell_type == "code") <= 3  # no progress-bar spam
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # weight curve, training curves, attention map, delta/beta


def test_committed_notebook_shows_its_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    check_outputs(nb)
    assert os.path.getsize(NOTEBOOK) < 300_000  # modest-dpi PNGs


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell if any cell raises
    check_outputs(nb)
