"""A model summary as a rich Table: config facts, then the weights pytree by role.

Per-layer roles collapse to one row each (same shape in every layer), so a 32-layer model still fits
on a screen. Works for any leaf kind: dense arrays, packed QTensor and the GPU layout (GpuQTensor);
all three expose `.shape` and `.nbytes`, packed ones also a static `.qtype`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

GLOBAL_ROLES = ("embed", "lm_head", "final_norm", "rope_inv_freq")


@dataclass
class RoleRow:
    role: str  # 'embed' or 'layers[*].wq'
    shape: tuple[int, ...]
    storage: set  # qtype / dtype names seen
    count: int  # how many tensors (layers) share the row
    nbytes: int
    values: int  # logical number of weights
    note: str = ""


def _leaf_info(x) -> tuple[tuple[int, ...], str, int, int]:
    """(logical shape, storage name, device bytes, logical number of values) of one weight."""
    shape = tuple(int(s) for s in x.shape)
    storage = getattr(x, "qtype", None) or str(x.dtype)
    values = 1
    for s in shape:
        values *= s
    return shape, storage, int(x.nbytes), values


def weight_rows(params) -> list[RoleRow]:
    """The summary rows of a Params pytree (a tied LM head is listed, its bytes counted once)."""
    rows: "OrderedDict[str, RoleRow]" = OrderedDict()

    def add(role: str, x, note: str = "", count_bytes: bool = True):
        shape, storage, nbytes, values = _leaf_info(x)
        row = rows.get(role)
        if row is None:
            rows[role] = RoleRow(role, shape, {storage}, 1, nbytes if count_bytes else 0,
                                 values if count_bytes else 0, note)
        else:
            row.storage.add(storage)
            row.count += 1
            row.nbytes += nbytes
            row.values += values

    add("embed", params.embed)
    tied = params.lm_head is params.embed
    add("lm_head", params.lm_head, note="tied to embed" if tied else "", count_bytes=not tied)
    add("final_norm", params.final_norm)
    add("rope_inv_freq", params.rope_inv_freq, note="constant")
    if params.rope_local_inv_freq is not None:
        add("rope_local_inv_freq", params.rope_local_inv_freq, note="constant (sliding layers)")
    for layer in params.layers:
        for f in fields(layer):
            x = getattr(layer, f.name)
            if x is not None:
                add(f"layers[*].{f.name}", x)
    return list(rows.values())


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def summarize(model, params=None):
    """A rich Table describing `model` (an engine Model), or `params` with model's config when given.

    Columns: role, shape, storage (qtype or dtype), tensors, bytes; the caption has the totals and the
    average bits per weight of the matrices and norms (the RoPE table is a constant, not a weight)."""
    from rich.table import Table

    params = model.params if params is None else params
    c = model.config
    title = (f"{c.architecture}: {c.num_layers} layers, hidden {c.hidden_size}, heads {c.num_heads}/"
             f"{c.num_kv_heads} (head_dim {c.head_dim}), ffn {c.intermediate_size}, vocab {c.vocab_size}")
    table = Table(title=title)
    for name, justify in (("role", "left"), ("shape", "left"), ("storage", "left"), ("tensors", "right"),
                          ("bytes", "right"), ("note", "left")):
        table.add_column(name, justify=justify)
    total_bytes = total_values = 0
    for row in weight_rows(params):
        table.add_row(row.role, "x".join(map(str, row.shape)), ",".join(sorted(row.storage)), str(row.count),
                      _human(row.nbytes) if row.nbytes else "-", row.note)
        if row.note != "constant":
            total_bytes += row.nbytes
            total_values += row.values
    bpw = 8 * total_bytes / total_values if total_values else float("nan")
    extra = []
    for attr, label in (("dtype", "compute"), ("kv_dtype", "kv cache"), ("max_seq_len", "max_seq_len")):
        v = getattr(model, attr, None)
        if v is not None:
            extra.append(f"{label} {getattr(v, 'name', v)}")
    table.caption = (f"{total_values:,} weights in {_human(total_bytes)} ({bpw:.2f} bits/weight)"
                     + (" · " + ", ".join(extra) if extra else ""))
    return table


def print_summary(model, params=None, console=None) -> None:
    """Print summarize(model) to `console` (a rich Console; a new one by default)."""
    from rich.console import Console
    (console or Console()).print(summarize(model, params))
