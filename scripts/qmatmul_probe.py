"""Device probe for the batched decode matmul: per 8B layer shape and activation rows M, the time of
the GEMV route (M <= 8), the unpack + XLA dot route and kernels/qmatmul.py under several tiles, each
checked against x times the bf16-rounded dequantized weight. Prints one line per measurement and
writes JSON to $OUT/qmatmul_probe.json (BENCHMARKS.md records what it chose).

    python scripts/qmatmul_probe.py [--quick]
"""
from __future__ import annotations

import ast
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from realizar_jax.cli.synth import random_blocks
from realizar_jax.kernels import GpuQTensor, KernelConfig, repack_blocks
from realizar_jax.kernels.gemv import gemv
from realizar_jax.kernels.layout import dequantize_gpu
from realizar_jax.kernels.qmatmul import MIN_ROWS, matmul_packed, row_cap
from realizar_jax.ops import routes, using

REPEATS = 20
CFG = KernelConfig.from_env(pallas=True)   # interpreted off the GPU: a dry run of the script
SHAPES = [("Q4_K", 14336, 4096), ("Q6_K", 4096, 14336), ("Q4_K", 1024, 4096), ("Q4_K", 4096, 14336),
          ("Q6_K", 1024, 4096), ("Q8_0", 4096, 4096)]
TILES = [(64, 64, 1, 4, 4), (128, 64, 1, 8, 3), (128, 32, 2, 4, 3), (256, 32, 1, 8, 2), (64, 32, 2, 4, 3),
         (128, 16, 2, 4, 3), (64, 16, 2, 4, 3), (128, 64, 1, 4, 3), (256, 64, 1, 8, 2)]


def timed(fn, xs) -> float:
    """Seconds per call of fn over REPEATS different x, unrolled in one jitted call (a scan's while
    loop would add its per-iteration host round trip to every call)."""
    run = jax.jit(lambda xs: sum(fn(xs[i]).astype(jnp.float32).sum() for i in range(REPEATS)))
    jax.block_until_ready(run(xs))
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(run(xs))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) / REPEATS


def main() -> int:
    quick = "--quick" in sys.argv
    path = os.path.join(os.environ.get("OUT", "/tmp"), "qmatmul_probe.json")
    out, rows_list = [], [1, 8, 16, 32, 64, 128, 256] if quick else [1, 4, 8, 16, 32, 64, 128, 256]
    try:
        sweep(out, rows_list, SHAPES[:3] if quick else SHAPES, TILES[:6] if quick else TILES, path)
    except KeyboardInterrupt:   # timeout -s INT: choose from what was measured
        print("interrupted: choosing from the rows measured so far", flush=True)
    # per (type, row cap): the tile with the least time summed over the row counts it serves,
    # among those that built at every one of them
    times: dict = {}
    for r in out:
        if r["variant"].startswith("qmm") and r["m"] >= 8:
            cap = row_cap(max(MIN_ROWS, 1 << (r["m"] - 1).bit_length()))
            times.setdefault((r["qtype"], cap), {}).setdefault(r["variant"], []).append(r.get("us"))
    chosen = {}
    for (qtype, cap), by_tile in times.items():
        full = max(len(v) for v in by_tile.values())
        ok = {t: sum(v) for t, v in by_tile.items() if len(v) == full and None not in v}
        if ok:
            chosen[f"QMM_{qtype}_{cap}"] = list(ast.literal_eval(min(ok, key=ok.get)[3:]))
    print("chosen tiles:", json.dumps(chosen), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "qmm_tiles.json"), "w") as fh:
        json.dump(chosen, fh)
    return 0


def sweep(out, rows_list, shapes, tiles, path):
    rng = np.random.default_rng(0)
    for qtype, n, k in shapes:
        w = GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(random_blocks(qtype, n, k, rng), qtype, (n, k))),
                       qtype, (n, k))
        wb = dequantize_gpu(w, jnp.bfloat16)
        for m in rows_list:
            xs = jnp.asarray(rng.standard_normal((REPEATS, m, k)), jnp.bfloat16)
            want = np.asarray(jax.lax.dot_general(xs[0], wb, (((1,), (1,)), ((), ())),
                                                  preferred_element_type=jnp.float32), np.float64)
            variants = {"unpack_dot": lambda x: routes.linear_unpack_dot(x, w)}
            if m <= 8:
                variants["gemv"] = lambda x: gemv(x, w, cfg=CFG)
            mp = max(MIN_ROWS, 1 << (m - 1).bit_length())
            for tile in tiles if m >= 8 else tiles[:1]:
                tile = (tile[0], min(tile[1], mp), *tile[2:])   # the tile as it runs (plan clamps BM)
                c = CFG.replace(tiles=((f"QMM_{qtype}_{row_cap(mp)}", tile),))
                variants[f"qmm{tile}"] = lambda x, c=c: matmul_packed(x, w, cfg=c)
            for name, fn in variants.items():
                row = dict(qtype=qtype, n=n, k=k, m=m, variant=name)
                try:
                    with using(CFG):
                        got = np.asarray(jax.jit(fn)(xs[0]).astype(jnp.float32), np.float64)
                        row["rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                        row["us"] = timed(fn, xs) * 1e6
                    row["GBps"] = w.nbytes / row["us"] / 1e3
                    row["TFLOPs"] = 2 * m * n * k / row["us"] / 1e6
                    print(f"{qtype} {n}x{k} m={m:4d} {name:28s} {row['us']:9.1f} us {row['GBps']:6.0f} GB/s "
                          f"{row['TFLOPs']:6.1f} TFLOP/s err {row['rel_err']:.1e}", flush=True)
                except Exception as e:  # noqa: BLE001 -- a tile that does not build is a result too
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"{qtype} {n}x{k} m={m:4d} {name:28s} FAILED {row['error'][:200]}", flush=True)
                out.append(row)
                with open(path, "w") as fh:   # after every row: a run cut short keeps what it measured
                    json.dump(out, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
