"""The house's rules, read from the source: imports run downward, model code names no kernel, format
or quant type, and nothing but kernels/tuning.py, compile_cache.py (both when load() builds a model,
never while jit traces) and the CLI reads the environment."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "realizar_jax"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path.relative_to(PKG), ast.parse(path.read_text(), str(path))


def _imports(rel: Path, tree) -> set[str]:
    """Absolute dotted names (inside realizar_jax, without the prefix) that a module imports."""
    pkg = list(rel.parent.parts)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
                if not node.module:
                    out.update(".".join(base + [a.name]) for a in node.names)
            elif node.module and node.module.startswith("realizar_jax"):
                out.add(node.module.removeprefix("realizar_jax").lstrip("."))
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("realizar_jax").lstrip(".") for a in node.names
                       if a.name.startswith("realizar_jax"))
    return out


RULES = [  # (modules under, may not import from)
    ("kernels", ("ops", "models", "engine", "generate", "formats", "cli", "text", "weights")),
    ("ops", ("models", "engine", "generate", "formats", "cli", "text")),
    ("models", ("kernels", "formats", "quant", "engine", "generate", "cli")),
    ("quant", ("ops", "models", "engine", "generate", "kernels", "cli")),
    ("formats", ("ops", "models", "engine", "generate", "kernels", "cli", "text")),
]


@pytest.mark.parametrize("room,forbidden", RULES)
def test_imports_run_downward(room, forbidden):
    bad = [(str(rel), name) for rel, tree in _modules() if rel.parts[0] == room
           for name in _imports(rel, tree) if name.split(".")[0] in forbidden]
    assert not bad, bad


def test_only_load_time_modules_and_the_cli_read_the_environment():
    readers = set()
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.add(str(rel))
    allowed = {"kernels/tuning.py", "compile_cache.py"}
    assert readers <= allowed | {str(r) for r, _ in _modules() if r.parts[0] == "cli"}, readers
