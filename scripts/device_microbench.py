"""Device run: decode GEMV at its default tiles + a small Q4_K tile sweep, and the two prefill routes
(Pallas GEMM vs XLA dequantize + dot) at 512 tokens on Llama-3-8B shapes. Prints one line per timing;
writes microbench.json under $OUT; prints the faster prefill route last as `PREFILL_ROUTE=...`.
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
from realizar_jax.kernels.gemv import TILES, gemv  # noqa: E402
from realizar_jax.kernels.layout import GpuQTensor, repack_blocks  # noqa: E402
from realizar_jax.synth import random_blocks  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
res = {"gemv": [], "gemm": []}


def timed(f, *args, reps=15):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def packed_copies(qt, rows, cols, rng, total=250e6):
    data = random_blocks(qt, rows, cols, rng)
    w = GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(data, qt, (rows, cols))), qt, (rows, cols))
    n = max(2, int(np.ceil(total / w.nbytes)))
    return [w] + [jax.tree_util.tree_map(lambda a: a + 0, w) for _ in range(n - 1)]


def per_matrix(ws, x, fn):
    f = jax.jit(lambda ws, x: [fn(x, w) for w in ws])
    return timed(f, ws, x) / len(ws)


rng = np.random.default_rng(0)
a = jnp.ones((512 * 1024 * 1024,), jnp.bfloat16)
copy = 2 * a.nbytes / timed(jax.jit(lambda a: a + 1), a) / 1e9
del a
print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
res["copy_GBps"] = copy

# decode GEMV, gate/up shape 14336 x 4096
x1 = jnp.asarray(rng.standard_normal((1, 4096)), jnp.bfloat16)
for qt in ("Q4_K", "Q8_0", "Q6_K", "Q5_K", "Q4_0"):
    ws = packed_copies(qt, 14336, 4096, rng)
    cfgs = [TILES.get(qt, (16, 2, 4, 3))]
    if qt == "Q4_K":
        cfgs += [(16, 4, 4, 2), (32, 4, 4, 2), (32, 2, 8, 2), (64, 2, 4, 2)]
    for bn, bs, nw, ns in cfgs:
        try:
            t = per_matrix(ws, x1, lambda x, w: gemv(x, w, bn=bn, bs=bs, num_warps=nw, num_stages=ns))
        except Exception as e:  # noqa: BLE001
            print("gemv", qt, (bn, bs, nw, ns), "FAIL", type(e).__name__, str(e)[:300], flush=True)
            continue
        gbps = ws[0].nbytes / t / 1e9
        res["gemv"].append(dict(qt=qt, cfg=(bn, bs, nw, ns), us=t * 1e6, GBps=gbps))
        print(f"gemv {qt} {(bn, bs, nw, ns)} {t*1e6:.1f} us {gbps:.0f} GB/s {100*gbps/copy:.0f}% copy", flush=True)
    del ws

# prefill at 512 tokens: Pallas GEMM (a few tiles) vs XLA dequantize + dot
x512 = jnp.asarray(rng.standard_normal((512, 4096)), jnp.bfloat16)
best = {"pallas": 0.0, "xla": 0.0}
for qt, (rows, cols) in (("Q4_K", (14336, 4096)), ("Q6_K", (4096, 14336)), ("Q4_K", (4096, 4096))):
    ws = packed_copies(qt, rows, cols, rng, total=120e6)
    xx = x512 if cols == 4096 else jnp.asarray(rng.standard_normal((512, cols)), jnp.bfloat16)
    flop = 2 * 512 * rows * cols
    os.environ["REALIZAR_PREFILL_GEMM"] = "xla"
    t_x = per_matrix(ws, xx, kernel_matmul)
    print(f"prefill {qt} {rows}x{cols} xla {t_x*1e6:.0f} us {flop/t_x/1e12:.0f} TFLOP/s", flush=True)
    res["gemm"].append(dict(qt=qt, shape=(rows, cols), route="xla", us=t_x * 1e6))
    t_best = None
    for tiles in ((64, 64, 2, 4, 2), (128, 128, 2, 8, 2), (128, 64, 4, 4, 3)):
        try:
            t = per_matrix(ws, xx, lambda x, w: gemm(x, w, tiles=tiles))
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
print(f"PREFILL_ROUTE={'pallas' if best['pallas'] < best['xla'] else 'xla'}")
