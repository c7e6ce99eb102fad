"""`realizar-jax inspect PATH [--json]`: architecture, config, memory estimate and tensors by role.

The memory estimate holds the quantized tensors packed (as on a GPU) and, for a file that has them,
also dequantized (`memory.dequantized`: what load() holds on a CPU when that fits).

Opening validates the file, so a damaged one ends here with exit code 1 and a one-line error.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from .parser import DTYPES, Parser, positive_int, run

PROG = "realizar-jax inspect"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Show a model's architecture, config, memory estimate and tensors.")
    p.add_argument("path", help="a .gguf file or an HF model folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="context length for the memory estimate (default: the model's context length)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size for the memory estimate")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype dense weights get on the device")
    p.add_argument("--kv-dtype", default="bfloat16", choices=DTYPES, help="KV cache dtype for the memory estimate")
    return p


def describe(source, max_seq_len=None, batch=1, dtype="bfloat16", kv_dtype="bfloat16") -> dict:
    """The inspect report of an opened ModelSource as a JSON-able dict."""
    from ..formats.validate import validate_roles
    from ..memory import dense_weights_fit, estimate_memory, weight_bytes_of
    from ..quant.types import qtype_info

    c = source.config
    roles = {name: key for key, name in validate_roles(source).items()}
    tensors = []
    for name, t in source.tensors.items():
        role, layer = roles.get(name, (None, None))
        tensors.append({"name": name, "role": role, "layer": layer, "qtype": t.qtype,
                        "shape": list(t.shape), "nbytes": t.nbytes})
    est = estimate_memory(c, max_seq_len or c.context_length, batch, kv_dtype,
                          weight_bytes=weight_bytes_of(source, dtype))
    memory = {**est.to_dict(), "dense_dtype": dtype}
    if not all(qtype_info(t.qtype).is_dense for t in source.tensors.values()):
        # what load() holds on a CPU when the dense form fits (load's dense_weights=None)
        dense = weight_bytes_of(source, dtype, dequantized=True)
        memory["dequantized"] = {"weights": dense, "total": est.total - est.weights + dense,
                                 "within_limit": dense_weights_fit(dense, None)}
    config = c.to_dict()
    return {
        "path": str(source.path), "format": source.format, "architecture": c.architecture,
        "num_layers": c.num_layers, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size, "context_length": c.context_length, "config": config,
        "file_bytes": sum(t["nbytes"] for t in tensors), "tensors": tensors,
        "memory": memory,
    }


def _gib(n: int) -> str:
    return f"{n / 1024 ** 3:.3f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.2f} MiB"


def _print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(title=f"{report['path']} ({report['format']})", show_header=False)
    for key, value in report["config"].items():
        head.add_row(key, str(value))
    console.print(head)

    # Per-layer roles collapse to one row each: the same shape in every layer, qtypes listed.
    groups: dict[tuple, dict] = defaultdict(lambda: {"layers": 0, "qtypes": set(), "nbytes": 0, "shape": None})
    for t in report["tensors"]:
        g = groups[(t["role"] or t["name"], t["layer"] is not None)]
        g["layers"] += t["layer"] is not None
        g["qtypes"].add(t["qtype"])
        g["nbytes"] += t["nbytes"]
        g["shape"] = t["shape"]
        g["name"] = t["name"] if t["layer"] is None else t["name"].replace(f".{t['layer']}.", ".{i}.", 1)
    table = Table(title="tensors by role")
    for col in ("role", "name", "layers", "qtype", "shape", "bytes"):
        table.add_column(col)
    for (role, per_layer), g in groups.items():
        table.add_row(role, g["name"], str(g["layers"]) if per_layer else "-", ",".join(sorted(g["qtypes"])),
                      "x".join(map(str, g["shape"])), _gib(g["nbytes"]))
    console.print(table)

    m = report["memory"]
    console.print(f"memory for max_seq_len={m['max_seq_len']} batch={m['batch']}: weights {_gib(m['weights'])} "
                  f"({m['dense_dtype']} dense) + KV cache {_gib(m['kv_cache'])} ({m['kv_dtype']}: {m['kv_pages']} "
                  f"pages of {m['page_size']} positions, {m['kv_page_bytes'] / 2**20:.2f} MiB each) + workspace "
                  f"{_gib(m['workspace'])} = [bold]{_gib(m['total'])}[/bold]")
    d = m.get("dequantized")
    if d is not None:
        from ..memory import DENSE_WEIGHTS_MAX_BYTES, DENSE_WEIGHTS_MAX_FRACTION
        limit = f"under {_gib(DENSE_WEIGHTS_MAX_BYTES)} and {DENSE_WEIGHTS_MAX_FRACTION:.0%} of the free memory"
        verdict = (f"total [bold]{_gib(d['total'])}[/bold]" if d["within_limit"]
                   else "over the limit: they stay packed")
        console.print(f"on a CPU, load() dequantizes the quantized matrices to {m['dense_dtype']} when that takes "
                      f"{limit}: weights {_gib(d['weights'])}, {verdict}")


def inspect_main(argv=None) -> int:
    return run(PROG, _inspect, build_parser().parse_args(argv))


def _inspect(args) -> int:
    from ..formats import open_model
    report = describe(open_model(args.path), args.max_seq_len, args.batch, args.dtype, args.kv_dtype)
    if args.json:
        print(json.dumps(report))
    else:
        _print_tables(report)
    return 0


if __name__ == "__main__":
    sys.exit(inspect_main())
