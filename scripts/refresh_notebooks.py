"""Re-run every notebook in notebooks/ on the embedded model and save it with its outputs, so a reader
on GitHub sees the text and figures. tests/test_notebooks.py runs them again and checks what is
committed (executed in order, no errors, figures present, small).

    python scripts/refresh_notebooks.py [NAME ...]   # names like 01_quickstart; default every notebook
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "realizar-jax-refresh"


def main() -> int:
    with tempfile.TemporaryDirectory() as home:
        spec = Path(home) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        env = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "JAX_PLATFORMS": "cpu",
               "PYTHONWARNINGS": "ignore::DeprecationWarning"}
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "realizar-jax", "language": "python", "env": env}))
        os.environ["JUPYTER_PATH"] = home
        os.environ.pop("REALIZAR_NOTEBOOK_MODEL", None)   # the embedded model, as a reader's machine has
        paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
        wanted = set(sys.argv[1:])
        if unknown := wanted - {p.stem for p in paths}:
            print(f"refresh_notebooks: no notebook named {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        for path in [p for p in paths if not wanted or p.stem in wanted]:
            nb = nbformat.read(path, as_version=4)
            t = time.perf_counter()
            nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600, allow_errors=False,
                                    resources={"metadata": {"path": str(path.parent)}}).execute()
            nb.metadata.pop("widgets", None)
            nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
            nbformat.write(nb, path)
            print(f"{path.name}: {time.perf_counter() - t:.1f} s, {path.stat().st_size / 1e3:.0f} kB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
