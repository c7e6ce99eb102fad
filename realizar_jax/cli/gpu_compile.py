"""`realizar-jax gpu-compile`: compile every Pallas kernel a model's GPU steps launch, for an NVIDIA
architecture, on a machine without a GPU (realizar_jax/offline_gpu.py), and print what ptxas and the
machine code say of each: registers, spills, shared memory, instructions in the main loop.

    realizar-jax gpu-compile --shape llama3-8b --quant q4_k_m --rows 1,8,64 --prefill 512

The weights are abstract (ShapeDtypeStructs through the GPU repack), so an 8B shape costs no memory.
Exit code 1 when a kernel does not compile: it would not compile on the device either.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from .parser import QUANT_CHOICES, Parser, positive_int, run

PROG = "realizar-jax gpu-compile"


def build_parser() -> argparse.ArgumentParser:
    from .bench import batch_list
    from .synth import SHAPES
    p = Parser(prog=PROG, description="Compile the Pallas GPU kernels of a model's decode and prefill steps "
               "for an NVIDIA GPU on this machine (no GPU needed): registers, spills, shared memory, SASS.")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="bench shape (default llama3-8b)")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="q4_k_m",
                   help="the type mix `convert --quant` writes (default q4_k_m)")
    p.add_argument("--rows", type=batch_list, default=(1, 8, 64), metavar="B[,B...]",
                   help="decode batch sizes, comma-separated (default 1,8,64)")
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens at batch 1; 0 skips (default 512)")
    p.add_argument("--max-seq-len", type=positive_int, default=1024, help="KV cache length (default 1024)")
    p.add_argument("--arch", default="sm_90a", help="ptxas target (default sm_90a: H100/H200)")
    p.add_argument("--tiles", help='KernelConfig tile overrides, JSON like REALIZAR_GEMV_TILES: {"QMM_Q6_K_16": '
                   '[32, 16, 2, 4, 3]}')
    p.add_argument("--kernel", metavar="REGEX", help="compile only the kernels whose name matches (e.g. qmatmul_q6)")
    p.add_argument("--float-activations", action="store_true", help="int8_activations=False")
    p.add_argument("--json", metavar="PATH", help="also write every kernel's figures as JSON")
    return p


def _checked(args):
    """The KernelConfig of the arguments, or a ValueError naming the bad one: before anything is fetched."""
    from ..kernels.tuning import KernelConfig, parse_tiles
    if not re.fullmatch(r"sm_\d\da?", args.arch):
        raise ValueError(f"--arch must look like sm_90a, got {args.arch!r}")
    if args.prefill < 0:
        raise ValueError(f"--prefill must be >= 0, got {args.prefill}")
    if args.kernel:
        try:
            re.compile(args.kernel)
        except re.error as e:
            raise ValueError(f"--kernel is not a regular expression: {e}") from None
    try:
        tiles = parse_tiles(args.tiles) if args.tiles else ()
    except ValueError as e:
        raise ValueError(f"--tiles: {e}") from None
    return KernelConfig(pallas=True, interpret=False, int8_activations=not args.float_activations, tiles=tiles)


def _steps(args, batches, kernels):
    """(label, lowered) for every step asked for."""
    from .. import offline_gpu as og
    from .synth import SHAPES
    config = SHAPES[args.shape]
    params = og.abstract_params(config, args.quant)
    for rows in batches:
        yield f"decode b{rows}", og.lower_decode(params, config, slots=rows, max_seq_len=args.max_seq_len,
                                                 kernels=kernels)
    if args.prefill:
        yield f"prefill {args.prefill}", og.lower_prefill(params, config, batch=1, tokens=args.prefill,
                                                          kernels=kernels)


def _group(compiled) -> list[dict]:
    """Rows of identical kernels (same figures, e.g. one per layer) merged, with their count."""
    out: dict = {}
    for c in compiled:
        row = c.row()
        row.pop("where")
        key = json.dumps({k: v for k, v in row.items() if k != "loop_mix"}, sort_keys=True)
        if key in out:
            out[key]["count"] += 1
        else:
            out[key] = dict(row, count=1)
    return list(out.values())


def format_rows(label: str, rows: list[dict]) -> str:
    head = f"{'kernel':32} {'n':>3} {'grid':>14} {'w/s':>5} {'regs':>4} {'spill B':>7} {'smem KiB':>8} " \
           f"{'SASS':>5} {'loop':>5}  loop mix"
    lines = [f"== {label}", head]
    for r in rows:
        mix = ", ".join(f"{k} {v}" for k, v in list(r["loop_mix"].items())[:4])
        lines.append(f"{r['kernel'][:32]:32} {r['count']:>3} {'x'.join(map(str, r['grid'])):>14} "
                     f"{r['warps']}/{r['stages']:<3} {r['registers']:>4} {r['spills']:>7} {r['shared_kib']:>8} "
                     f"{r['sass']:>5} {r['loop']:>5}  {mix}")
    return "\n".join(lines)


def _gpu_compile(args) -> int:
    from .. import offline_gpu as og
    kernels = _checked(args)
    # every step lowered first: what fails while tracing (a tile of the wrong length) fails before the download
    steps = [(label, og.triton_calls(lowered)) for label, lowered in _steps(args, args.rows, kernels)]
    toolchain = og.Toolchain.fetch(os.environ.get(og.TOOLCHAIN_ENV) or None)
    report = dict(shape=args.shape, quant=args.quant, arch=args.arch, steps={})
    for label, found in steps:
        t = time.perf_counter()
        calls = [c for c in found if not args.kernel or re.search(args.kernel, c.name)]
        compiled = [og.compile_call(c, toolchain, args.arch) for c in calls]
        rows = _group(compiled)
        report["steps"][label] = rows
        print(format_rows(f"{label}: {len(calls)} kernel launches compiled in {time.perf_counter() - t:.1f} s",
                          rows))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def gpu_compile_main(argv=None) -> int:
    return run(PROG, _gpu_compile, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(gpu_compile_main())
