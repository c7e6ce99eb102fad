"""Device run: decode GEMV (the dequantize-then-multiply kernel vs the factored kernel over a tile
sweep, dense bf16 vs XLA's dot) and the two prefill routes (Pallas GEMM vs XLA dequantize + dot) at
512 tokens on Llama-3-8B shapes. Prints one line per timing; writes microbench.json under $OUT; prints
the best tiles as `GEMV_TILES=<json>` and the faster prefill route last as `PREFILL_ROUTE=...`.
Weights rotate among copies totalling > 4x L2 so timings measure HBM, not cache.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from realizar_jax.kernels.dispatch import kernel_matmul  # noqa: E402
from realizar_jax.kernels.gemm import gemm  # noqa: E402
from realizar_jax.kernels.gemv import gemv, interpret_mode  # noqa: E402
IN = interpret_mode()
from realizar_jax.kernels.layout import GpuQTensor, dequantize_gpu_part_order, repack_blocks  # noqa: E402
from realizar_jax.kernels.unpack import unpack  # noqa: E402
from realizar_jax.cli.synth import random_blocks  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
# MICROBENCH_SMOKE=1: tiny shapes, one repetition, interpret mode on CPU (checks the script, not speed)
SMOKE = os.environ.get("MICROBENCH_SMOKE") == "1"
R, C, T = (64, 512, 16) if SMOKE else (14336, 4096, 512)   # big matrix rows, cols; prefill tokens
ROT = 1e5 if SMOKE else 1.0   # divides the rotation totals
res = {"gemv": [], "gemm": []}


def timed(f, *args, reps=1 if SMOKE else 20):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.min(ts))   # least disturbed run: launch gaps and clocks vary between runs


def packed_copies(qt, rows, cols, rng, total=250e6):
    total /= ROT
    data = random_blocks(qt, rows, cols, rng)
    w = GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(data, qt, (rows, cols))), qt, (rows, cols))
    n = max(2, int(np.ceil(total / w.nbytes)))
    return [w] + [jax.tree_util.tree_map(lambda a: a + 0, w) for _ in range(n - 1)]


def per_matrix(ws, x, fn):
    f = jax.jit(lambda ws, x: [fn(x, w) for w in ws])
    return timed(f, ws, x) / len(ws)


rng = np.random.default_rng(0)
a = jnp.ones((1024 if SMOKE else 512 * 1024 * 1024,), jnp.bfloat16)
copy = 2 * a.nbytes / timed(jax.jit(lambda a: a + 1), a) / 1e9
del a
print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
res["copy_GBps"] = copy

# decode GEMV, gate/up shape 14336 x 4096: the dequantize-then-multiply kernel at its old default
# tiles against the factored kernel (qdot.py) over a tile sweep; dense bf16 also against XLA's dot
x1 = jnp.asarray(rng.standard_normal((1, C)), jnp.bfloat16)
FLOAT_TILES = {"Q4_K": (16, 4, 4, 3), "Q8_0": (8, 4, 2, 4), "Q6_K": (16, 4, 4, 2)}
INT8_SWEEP = {
    "Q4_K": [(16, 4, 4, 3), (8, 4, 2, 3), (16, 2, 4, 3), (32, 4, 4, 3), (16, 8, 4, 3), (32, 2, 4, 2)],
    "Q8_0": [(8, 4, 2, 4), (16, 2, 2, 4), (16, 4, 4, 3), (32, 2, 4, 3), (8, 8, 2, 3)],
    "Q6_K": [(16, 4, 4, 2), (8, 4, 4, 3), (16, 2, 4, 3), (32, 4, 4, 2), (16, 8, 4, 2)],
}
DENSE_TILES = (4, 8, 4, 2)
best_tiles = {}


def gemv_row(qt, ws, label, fn, shape=f"{R}x{C}"):
    try:
        t = per_matrix(ws, x1, fn)
    except Exception as e:  # noqa: BLE001
        print("gemv", qt, shape, label, "FAIL", type(e).__name__, str(e)[:300], flush=True)
        return None
    nbytes = ws[0].nbytes
    gbps = nbytes / t / 1e9
    res["gemv"].append(dict(qt=qt, shape=shape, cfg=label, us=t * 1e6, GBps=gbps))
    print(f"gemv {qt} {shape} {label} {t*1e6:.1f} us {gbps:.0f} GB/s {100*gbps/copy:.0f}% copy", flush=True)
    return t


def tiled(cfg, act):
    bn, bs, nw, ns = cfg
    return lambda x, w: gemv(x, w, bn=bn, bs=bs, num_warps=nw, num_stages=ns, act=act, interpret=IN)


for qt in ("Q4_K", "Q8_0", "Q6_K"):
    ws = packed_copies(qt, R, C, rng)
    gemv_row(qt, ws, f"float{FLOAT_TILES[qt]}", tiled(FLOAT_TILES[qt], "float"))
    timings = []
    for cfg in INT8_SWEEP[qt]:
        t = gemv_row(qt, ws, f"int8{cfg}", tiled(cfg, "int8"))
        if t is not None:
            timings.append((t, cfg))
    if timings:
        timings.sort()
        best_tiles[qt] = list(timings[0][1])
    del ws
w0 = jnp.asarray(rng.standard_normal((R, C)), jnp.bfloat16)
ws = [w0] + [w0 + 0 for _ in range(int(np.ceil(400e6 / ROT / w0.nbytes)) - 1)]
gemv_row("DENSE", ws, "xla-dot", lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32))
gemv_row("DENSE", ws, f"pallas{DENSE_TILES}", tiled(DENSE_TILES, "float"))
best_tiles["DENSE"] = list(DENSE_TILES)
del ws, w0
res["best_tiles"] = best_tiles
print("GEMV_TILES=" + json.dumps(best_tiles, separators=(",", ":")), flush=True)

# prefill at 512 tokens: Pallas GEMM vs XLA dequantize + dot, and the XLA route's two halves alone
x512 = jnp.asarray(rng.standard_normal((T, C)), jnp.bfloat16)
best = {"pallas": 0.0, "xla": 0.0, "unpack": 0.0}
for qt, (rows, cols) in (("Q4_K", (R, C)), ("Q6_K", (C, R // 14 * 14 if not SMOKE else 1024))):
    ws = packed_copies(qt, rows, cols, rng, total=120e6)
    xx = x512 if cols == C else jnp.asarray(rng.standard_normal((T, cols)), jnp.bfloat16)
    flop = 2 * T * rows * cols
    os.environ["REALIZAR_PREFILL_GEMM"] = "xla"
    t_x = per_matrix(ws, xx, kernel_matmul)
    t_deq = per_matrix(ws, xx, lambda x, w: dequantize_gpu_part_order(w, jnp.bfloat16))
    t_unp = per_matrix(ws, xx, lambda x, w: unpack(w, jnp.bfloat16, interpret=IN))
    os.environ["REALIZAR_PREFILL_GEMM"] = "unpack"
    t_u = per_matrix(ws, xx, kernel_matmul)
    dense = [dequantize_gpu_part_order(w, jnp.bfloat16) for w in ws]
    t_dot = per_matrix(dense, xx, lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32))
    del dense
    print(f"prefill {qt} {rows}x{cols} xla {t_x*1e6:.0f} us {flop/t_x/1e12:.0f} TFLOP/s "
          f"(dequant alone {t_deq*1e6:.0f} us, bf16 dot alone {t_dot*1e6:.0f} us)", flush=True)
    print(f"prefill {qt} {rows}x{cols} unpack {t_u*1e6:.0f} us {flop/t_u/1e12:.0f} TFLOP/s "
          f"(Pallas unpack alone {t_unp*1e6:.0f} us)", flush=True)
    res["gemm"].append(dict(qt=qt, shape=(rows, cols), route="xla", us=t_x * 1e6, dequant_us=t_deq * 1e6,
                            dot_us=t_dot * 1e6))
    res["gemm"].append(dict(qt=qt, shape=(rows, cols), route="unpack", us=t_u * 1e6, unpack_us=t_unp * 1e6))
    best["unpack"] += t_u
    t_best = None
    for tiles in ():   # the Pallas GEMM lost by 2x to the unpack route in every earlier run
        try:
            t = per_matrix(ws, xx, lambda x, w: gemm(x, w, tiles=tiles, interpret=IN))
        except Exception as e:  # noqa: BLE001
            print("gemm", qt, tiles, "FAIL", type(e).__name__, str(e)[:300], flush=True)
            continue
        res["gemm"].append(dict(qt=qt, shape=(rows, cols), route="pallas", tiles=tiles, us=t * 1e6))
        print(f"prefill {qt} {rows}x{cols} pallas {tiles} {t*1e6:.0f} us {flop/t/1e12:.0f} TFLOP/s", flush=True)
        if t_best is None or t < t_best[0]:
            t_best = (t, tiles)
    if t_best:
        best["pallas"] += t_best[0]
        res.setdefault("gemm_best", []).append((qt, (rows, cols), t_best[1]))
    else:
        best["pallas"] += 1e9
    best["xla"] += t_x
    del ws

res["prefill_sum_us"] = {k: v * 1e6 for k, v in best.items()}
with open(os.path.join(OUT, "microbench.json"), "w") as fh:
    json.dump(res, fh, indent=1)
print("gemm best tiles", res.get("gemm_best"))
print(f"PREFILL_ROUTE={min(best, key=best.get)}")
