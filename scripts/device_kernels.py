"""Device run: correctness of the Pallas kernels on the GPU and a tile sweep with timings.

python scripts/device_kernels.py [--quick] [--out DIR]; prints a table last, writes kernels.json.
Weights rotate among copies totalling > 4x L2 so timings measure HBM, not cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from realizar_jax.kernels import decode_attention, decode_attention_ref, gemv  # noqa: E402
from realizar_jax.kernels.layout import GpuQTensor, repack_blocks  # noqa: E402
from realizar_jax.cli.synth import random_blocks  # noqa: E402

ROT_BYTES = 400e6


def timeit(fn, *args, reps=20):
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def copy_bw():
    a = jnp.ones((512 * 1024 * 1024,), jnp.bfloat16)  # 1 GiB
    f = jax.jit(lambda a: a + 1)
    t = timeit(f, a, reps=10)
    return 2 * a.nbytes / t / 1e9


def make_w(qt, rows, cols, rng):
    if qt == "BF16":
        return jnp.asarray(rng.standard_normal((rows, cols)) * 0.02, jnp.bfloat16)
    data = random_blocks(qt, rows, cols, rng)
    return GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(data, qt, (rows, cols))), qt,
                      (rows, cols)), data


def nbytes(w):
    return w.nbytes if isinstance(w, GpuQTensor) else w.size * w.dtype.itemsize


def time_gemv(ws, x, fn):
    f = jax.jit(lambda ws, x: [fn(x, w) for w in ws])
    t = timeit(f, ws, x)
    return t / len(ws)


def rotation(qt, rows, cols, rng):
    w0 = make_w(qt, rows, cols, rng)
    w0 = w0[0] if isinstance(w0, tuple) else w0
    n = max(2, int(np.ceil(ROT_BYTES / nbytes(w0))))
    ws = [w0] + [jax.tree_util.tree_map(lambda a: a + 0 if a.dtype != jnp.int8 else a ^ 1, w0)
                 for _ in range(n - 1)]
    return ws


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows_out = []
    print("jax", jax.__version__, jax.devices())
    bw = copy_bw()
    print(f"copy bandwidth {bw:.0f} GB/s")
    res = {"copy_GBps": bw, "gemv": [], "check": [], "attn": []}

    # 1) correctness on GPU vs gguf-py dequantize + numpy
    from gguf import GGMLQuantizationType as T
    from gguf import quants
    for qt in ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]:
        for B in (1, 3, 8):
            try:
                w, data = make_w(qt, 256, 1024, rng)
                ref = quants.dequantize(data, T[qt]).reshape(256, 1024).astype(np.float64)
                x = rng.standard_normal((B, 1024)).astype(np.float32)
                y = np.asarray(gemv(jnp.asarray(x, jnp.bfloat16), w))
                xr = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
                yr = xr @ ref.T
                e = float(np.linalg.norm(y - yr) / np.linalg.norm(yr))
            except Exception as ex:  # noqa: BLE001
                e = f"FAIL {type(ex).__name__}: {str(ex)[:300]}"
                traceback.print_exc()
            res["check"].append((qt, B, e))
            print("check", qt, B, e)

    # 2) sweep tiles on the 8B gate/up shape, then time the best on all 8B shapes
    shapes = {"qkv_o": (4096, 4096), "gate_up": (14336, 4096), "down": (4096, 14336),
              "kv": (1024, 4096)}
    qts = os.environ.get("QTS", "Q4_K,Q8_0,Q6_K,BF16").split(",")
    if args.quick:
        qts = ["Q4_K", "BF16"]
    for qt in qts:
        ws = rotation(qt, 14336, 4096, rng)
        x = jnp.asarray(rng.standard_normal((1, 4096)), jnp.bfloat16)
        b = nbytes(ws[0])
        if qt == "BF16":
            t = time_gemv(ws, x, lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32))
            res["gemv"].append(dict(qt=qt, impl="xla", shape="gate_up", B=1, t=t, GBps=b / t / 1e9))
            print(f"{qt} xla gate_up B1 {t*1e6:.1f}us {b/t/1e9:.0f} GB/s")
        best = None
        cfgs = [(bn, bs, 4, 3, 264) for bn in (8, 16, 32) for bs in (2, 4, 8)]
        if args.quick:
            cfgs = cfgs[:4]
        for cfg in cfgs:
            bn, bs, nw, ns, tp = cfg
            try:
                t = time_gemv(ws, x, lambda x, w: gemv(x, w, bn=bn, bs=bs, num_warps=nw,
                                                       num_stages=ns, target_programs=tp))
            except Exception as ex:  # noqa: BLE001
                print(qt, cfg, "FAIL", type(ex).__name__, str(ex)[:400])
                continue
            print(f"{qt} pallas {cfg} gate_up B1 {t*1e6:.1f}us {b/t/1e9:.0f} GB/s", flush=True)
            res["gemv"].append(dict(qt=qt, impl="pallas", cfg=cfg, shape="gate_up", B=1, t=t,
                                    GBps=b / t / 1e9))
            if best is None or t < best[0]:
                best = (t, cfg)
        if best is None:
            continue
        bn, bs, _, _, _ = best[1]
        for cfg in [(bn, bs, 8, 3, 264), (bn, bs, 2, 3, 264), (bn, bs, 1, 3, 264), (bn, bs, 4, 4, 264),
                    (bn, bs, 4, 2, 264), (bn, bs, 4, 3, 528)]:
            if args.quick:
                break
            try:
                t = time_gemv(ws, x, lambda x, w: gemv(x, w, bn=cfg[0], bs=cfg[1], num_warps=cfg[2],
                                                       num_stages=cfg[3], target_programs=cfg[4]))
            except Exception as ex:  # noqa: BLE001
                print(qt, cfg, "FAIL", type(ex).__name__, str(ex)[:400])
                continue
            print(f"{qt} pallas {cfg} gate_up B1 {t*1e6:.1f}us {b/t/1e9:.0f} GB/s", flush=True)
            res["gemv"].append(dict(qt=qt, impl="pallas", cfg=cfg, shape="gate_up", B=1, t=t,
                                    GBps=b / t / 1e9))
            if t < best[0]:
                best = (t, cfg)
        res.setdefault("best", {})[qt] = best[1]
        bn, bs, nw, ns, tp = best[1]
        del ws
        for name, (r, c) in shapes.items():
            wsr = rotation(qt, r, c, rng)
            b = nbytes(wsr[0])
            for B in ((1, 4, 8) if name == "qkv_o" or name == "gate_up" else (1,)):
                xb = jnp.asarray(rng.standard_normal((B, c)), jnp.bfloat16)
                t = time_gemv(wsr, xb, lambda x, w: gemv(x, w, bn=bn, bs=bs, num_warps=nw,
                                                         num_stages=ns, target_programs=tp))
                rows_out.append((qt, "pallas", name, B, t * 1e6, b / t / 1e9))
                if qt == "BF16":
                    t2 = time_gemv(wsr, xb, lambda x, w: jnp.dot(x, w.T,
                                                                 preferred_element_type=jnp.float32))
                    rows_out.append((qt, "xla", name, B, t2 * 1e6, b / t2 / 1e9))
            del wsr

    # 3) attention
    for (B, S, L) in [(1, 1024, 640), (1, 4096, 4000), (8, 1024, 700)]:
        Hq, Hkv, D = 32, 8, 128
        q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), jnp.bfloat16)
        lens = jnp.asarray(rng.integers(L // 2, L + 1, B), jnp.int32)
        try:
            a = decode_attention(q, k, v, lens, D ** -0.5)
            r = decode_attention_ref(q.astype(jnp.float32), k.astype(jnp.float32),
                                     v.astype(jnp.float32), lens, D ** -0.5)
            err = float(jnp.linalg.norm(a.astype(jnp.float32) - r) / jnp.linalg.norm(r))
            nk = 8
            ks = [(k + i).astype(jnp.bfloat16) for i in range(nk)]
            f = jax.jit(lambda ks, q, v, lens: [decode_attention(q, kk, v, lens, D ** -0.5) for kk in ks])
            t = timeit(f, ks, q, v, lens) / nk
            fr = jax.jit(lambda ks, q, v, lens: [decode_attention_ref(q, kk, v, lens, D ** -0.5) for kk in ks])
            tr = timeit(fr, ks, q, v, lens) / nk
            valid_bytes = float(jnp.sum(lens)) * Hkv * D * 2 * 2
            res["attn"].append(dict(B=B, S=S, err=err, t=t, t_xla=tr, bytes=valid_bytes))
            rows_out.append(("attn", f"S{S}", f"L<={L}", B, t * 1e6, valid_bytes / t / 1e9))
            rows_out.append(("attn", "xla-ref", f"S{S}", B, tr * 1e6, valid_bytes / tr / 1e9))
            print("attn", B, S, "err", err)
        except Exception as ex:  # noqa: BLE001
            traceback.print_exc()
            print("attn FAIL", type(ex).__name__, str(ex)[:400])

    res["table"] = rows_out
    with open(os.path.join(args.out, "kernels.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    print(f"\ncopy {bw:.0f} GB/s; best cfgs {res.get('best')}")
    print(f"{'type':6} {'impl':8} {'shape':10} {'B':>2} {'us':>8} {'GB/s':>6} {'%copy':>5}")
    for r in rows_out:
        print(f"{r[0]:6} {r[1]:8} {r[2]:10} {r[3]:>2} {r[4]:8.1f} {r[5]:6.0f} {100*r[5]/bw:5.0f}")


if __name__ == "__main__":
    main()
