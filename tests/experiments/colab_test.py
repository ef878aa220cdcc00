"""The Colab demo notebook runs top to bottom on the tiny checkpoint (so it cannot rot)."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_colab_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(REPO / "experiments/colab/kimia_jax_demo.ipynb", as_version=4)
    monkeypatch.setenv("KIMIA_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("KIMIA_MODEL_DIR", "")
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, like a user's runtime
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})  # fmt: skip
    client.execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "steps/s" in outputs  # the ASR and speech cells printed their timing summaries
    html = [o for c in nb.cells for o in c.get("outputs", []) if "data" in o]
    assert any("audio" in str(o["data"]).lower() for o in html)  # the inline player
    assert os.path.isdir(tmp_path / "work" / "kimia-orbax")
