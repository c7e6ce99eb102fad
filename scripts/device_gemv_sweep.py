"""Device run: the int8-activation decode GEMVs exactly as an 8B Q4_K_M decode step launches them
(Q/K/V and gate/up as one gemv_multi launch with the RMSNorm prep, o alone, down with the SwiGLU
prep, the lm head), each timed under several REALIZAR_GEMV_TILES settings. The tiles are read when
a call is traced, so every setting clears JAX's caches first.

usage: python scripts/device_gemv_sweep.py [Q4_K|Q6_K ...]   (MICROBENCH_SMOKE=1: tiny shapes on CPU)
Prints one line per (setting, launch): the GEMV kernel's µs per launch as the profiler's trace
gives it (wall time would measure the host: a launch of these kernels outside a CUDA graph takes
longer to issue than to run), the GB/s of packed weight bytes, and the activation prep's µs; writes
gemv_sweep.json under $OUT. Weights rotate among copies totalling > 4x L2 so timings measure HBM.
"""
from __future__ import annotations

import json
import os
import sys
import shutil
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from realizar_jax.cli.bench import summarize_trace  # noqa: E402
from realizar_jax.kernels.gemv import gemv, gemv_multi, interpret_mode  # noqa: E402
from realizar_jax.kernels.layout import GpuQTensor, repack_blocks  # noqa: E402
from realizar_jax.cli.synth import random_blocks  # noqa: E402

SMOKE = os.environ.get("MICROBENCH_SMOKE") == "1"
IN = interpret_mode()
OUT = os.environ.get("OUT", "/tmp")
H, F, V = (256, 512, 1024) if SMOKE else (4096, 14336, 128256)   # hidden, ffn, vocab
KV = H // 4
ROTATE = 2e5 if SMOKE else 220e6   # bytes of weights each launch kind rotates through
SWEEP = {
    "Q4_K": [(16, 4, 4, 3), (8, 4, 2, 3), (8, 4, 4, 3), (16, 2, 4, 3), (16, 4, 2, 3), (16, 8, 4, 2),
             (32, 4, 4, 3), (32, 2, 4, 3), (16, 4, 8, 3), (16, 4, 4, 2), (16, 4, 4, 4), (32, 4, 8, 2),
             (8, 8, 4, 2), (8, 4, 4, 4), (8, 2, 4, 4), (4, 4, 2, 3)],
    "Q6_K": [(16, 4, 4, 2), (8, 4, 2, 2), (8, 4, 4, 3), (16, 2, 4, 3), (32, 4, 4, 2), (16, 4, 8, 2),
             (16, 8, 4, 2), (16, 4, 2, 3), (8, 8, 4, 2), (16, 8, 8, 2), (8, 4, 4, 2)],
}


def packed(qt, rows, cols, rng):
    data = random_blocks(qt, rows, cols, rng)
    return GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(data, qt, (rows, cols))), qt, (rows, cols))


def copies(ws, rng):
    """ws (a tuple of matrices launched together) plus fresh copies, > ROTATE bytes in all."""
    nbytes = sum(w.nbytes for w in ws)
    n = max(2, int(np.ceil(ROTATE / nbytes)))
    return [ws] + [tuple(jax.tree_util.tree_map(lambda a: a + 0, w) for w in ws) for _ in range(n - 1)], nbytes


def kernel_us(f, arg, launches: int, reps: int = 1 if SMOKE else 3):
    """(GEMV µs, prep µs) per launch: device time of the kernels named gemv* / quantize_x* in a
    profiler trace of `reps` calls of f (after a warm-up call)."""
    jax.block_until_ready(f(arg))
    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for _ in range(reps):
        jax.block_until_ready(f(arg))
    jax.profiler.stop_trace()
    rows = summarize_trace(d, steps=reps * launches, top=1000)["top"]
    shutil.rmtree(d, ignore_errors=True)
    gemv_us = sum(r["us_per_step"] for r in rows if r["name"].startswith("gemv"))
    prep_us = sum(r["us_per_step"] for r in rows if r["name"].startswith("quantize_x"))
    return gemv_us, prep_us


rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((1, H)), jnp.bfloat16)
xf = jnp.asarray(rng.standard_normal((1, F)), jnp.bfloat16)
up = jnp.asarray(rng.standard_normal((1, F)), jnp.bfloat16)
norm = jnp.asarray(1 + 0.1 * rng.standard_normal(H), jnp.bfloat16)
# the launches of one 8B Q4_K_M layer (Q6_K where llama-quantize puts it) and the lm head
LAUNCHES = {
    "qkv": ((("Q4_K", H, H), ("Q4_K", KV, H), ("Q4_K", KV, H)),
            lambda ws: gemv_multi(x, ws, interpret=IN, pre="norm", other=norm, eps=1e-5, out_dtype=x.dtype)),
    "qkv6": ((("Q4_K", H, H), ("Q4_K", KV, H), ("Q6_K", KV, H)),
             lambda ws: gemv_multi(x, ws, interpret=IN, pre="norm", other=norm, eps=1e-5, out_dtype=x.dtype)),
    "o": ((("Q4_K", H, H),), lambda ws: gemv(x, ws[0], interpret=IN)),
    "gate_up": ((("Q4_K", F, H), ("Q4_K", F, H)),
                lambda ws: gemv_multi(x, ws, interpret=IN, pre="norm", other=norm, eps=1e-5, out_dtype=x.dtype)),
    "down4": ((("Q4_K", H, F),), lambda ws: gemv(xf, ws[0], interpret=IN, pre="swiglu", other=up)),
    "down6": ((("Q6_K", H, F),), lambda ws: gemv(xf, ws[0], interpret=IN, pre="swiglu", other=up)),
    "lm_head": ((("Q6_K", V, H),), lambda ws: gemv(x, ws[0], interpret=IN)),
}
res = []
kinds = sys.argv[1:] or list(SWEEP)
for name, (shapes, fn) in LAUNCHES.items():
    qtypes = {qt for qt, _, _ in shapes}
    swept = [qt for qt in kinds if qt in qtypes and (qt == shapes[0][0] or len(shapes) == 1)]
    if not swept:
        continue
    sets, nbytes = copies(tuple(packed(*s, rng) for s in shapes), rng)
    f = jax.jit(lambda sets: [fn(ws) for ws in sets])
    for qt in swept:
        for tile in SWEEP[qt]:
            os.environ["REALIZAR_GEMV_TILES"] = json.dumps({qt: tile})
            jax.clear_caches()
            try:
                us, prep = kernel_us(f, sets, len(sets))
                us = us or float("nan")   # no GPU kernels in the trace (the CPU smoke run)
            except Exception as e:  # noqa: BLE001
                print(f"{name} {qt}{list(tile)} FAIL {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            res.append(dict(launch=name, qtype=qt, tile=tile, us=us, GBps=nbytes / us / 1e3, prep_us=prep))
            print(f"{name:8s} {qt}{list(tile)} {us:8.1f} us {nbytes/us/1e3:6.0f} GB/s  (prep {prep:.1f} us)",
                  flush=True)
    del sets
    os.environ.pop("REALIZAR_GEMV_TILES", None)
with open(os.path.join(OUT, "gemv_sweep.json"), "w") as fh:
    json.dump(res, fh, indent=1)
for name in LAUNCHES:
    rows = sorted((r for r in res if r["launch"] == name), key=lambda r: r["us"])
    if rows:
        print("best", name, ", ".join(f"{r['qtype']}{list(r['tile'])} {r['us']:.1f}" for r in rows[:3]))
