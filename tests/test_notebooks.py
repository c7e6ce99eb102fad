"""Every notebook in notebooks/ runs top to bottom (nbclient) and fails the test on any cell error, and
is committed with the outputs of such a run (scripts/refresh_notebooks.py).

The notebooks carry their own assertions (hand-written decode == full forward, packed == dense quantized
perplexity, gradient == finite difference, ...), so a pass means more than "no exception".
They run on the embedded default model when realizar_jax/data/default.gguf exists; otherwise (while it
is being rebuilt) on a fixture GGUF, passed through REALIZAR_NOTEBOOK_MODEL, which every notebook reads.
The kernel is this interpreter (a kernelspec written to a temp JUPYTER_PATH, nothing installed or fetched);
figures render headless through matplotlib-inline (an Agg canvas) so the test can check they exist.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DEFAULT_MODEL = ROOT / "realizar_jax" / "data" / "default.gguf"
KERNEL = "realizar-jax-test"
# notebooks that must show at least this many figures
MIN_FIGURES = {"02_inside_the_model.ipynb": 2, "03_quantization.ipynb": 1, "04_gradients.ipynb": 1}


def test_notebooks_found():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_inside_the_model.ipynb", "03_quantization.ipynb",
                     "04_gradients.ipynb"]


MAX_BYTES = 400_000   # a notebook with its outputs: readable on GitHub, a small diff when refreshed


def _figures(nb) -> list:
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    return [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_with_outputs(path):
    """Committed as scripts/refresh_notebooks.py leaves them, so a reader on GitHub sees the results:
    every code cell run once, in order, from a fresh kernel; no errors or tracebacks; the figures
    present; no path of the machine that ran it; small."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path.name}: not run in order"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Traceback" not in text and "/tmp/" not in text and str(ROOT) not in text
    assert len(_figures(nb)) >= MIN_FIGURES.get(path.name, 0)
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes with outputs"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, model_files):
    """Environment for the notebook kernels: a kernelspec for sys.executable, and the model to use."""
    home = tmp_path_factory.mktemp("jupyter")
    spec_dir = home / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    model = None if DEFAULT_MODEL.is_file() else str(model_files.gguf("llama", "q8_0"))
    env = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "JAX_PLATFORMS": "cpu",
           "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    if model is not None:
        env["REALIZAR_NOTEBOOK_MODEL"] = model
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "realizar-jax tests", "language": "python", "env": env}))
    return home, model


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env, monkeypatch, tmp_path):
    home, model = kernel_env
    monkeypatch.setenv("JUPYTER_PATH", str(home))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    if model is None:  # the default model exists: the notebooks must use it
        monkeypatch.delenv("REALIZAR_NOTEBOOK_MODEL", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600, allow_errors=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
    elapsed = time.perf_counter() - t0
    print(f"{path.name}: {elapsed:.1f} s on {model or 'the default model'}")

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Traceback" not in text
    pngs = _figures(nb)
    assert len(pngs) >= MIN_FIGURES.get(path.name, 0), f"{path.name}: expected figures, got {len(pngs)}"
    for o in pngs:  # a real rendered figure, not an empty canvas
        assert len(o.data["image/png"]) > 5000
