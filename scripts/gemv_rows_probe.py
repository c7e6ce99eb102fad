"""Device probe: how the int8 GEMV (kernels/gemv.py, dp4a on int8 activations) scales with rows of x
against the packed tensor-core matmul (kernels/qmatmul.py), per 8B layer shape, for 1..16 rows and a
few GEMV tiles. Each result is checked against x times the dequantized weight. Writes JSON to
$OUT/gemv_rows_probe.json.

    python scripts/gemv_rows_probe.py
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from qmatmul_probe import CFG, REPEATS, timed
from realizar_jax.cli.synth import random_blocks
from realizar_jax.kernels import GpuQTensor, repack_blocks
from realizar_jax.kernels.gemv import gemv
from realizar_jax.kernels.layout import dequantize_gpu
from realizar_jax.kernels.qmatmul import matmul_packed

SHAPES = [("Q4_K", 14336, 4096), ("Q6_K", 4096, 14336), ("Q4_K", 4096, 4096), ("Q4_K", 1024, 4096)]
# (rows per program, superblocks per K step, warps, stages); the first is the Q4_K/Q6_K default
GEMV_TILES = [None, (8, 4, 4, 3), (16, 2, 4, 3), (32, 4, 8, 3), (8, 2, 2, 3)]
ROWS = [1, 2, 4, 8, 16]


def main() -> int:
    path = os.path.join(os.environ.get("OUT", "/tmp"), "gemv_rows_probe.json")
    rng = np.random.default_rng(0)
    out = []
    for qtype, n, k in SHAPES:
        w = GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(random_blocks(qtype, n, k, rng), qtype, (n, k))),
                       qtype, (n, k))
        wf = dequantize_gpu(w, jnp.float32)
        for m in ROWS:
            xs = jnp.asarray(rng.standard_normal((REPEATS, m, k)), jnp.bfloat16)
            want = np.asarray(jax.lax.dot_general(xs[0].astype(jnp.float32), wf, (((1,), (1,)), ((), ())),
                                                  precision="highest"), np.float64)
            variants = {}
            for tile in GEMV_TILES if m >= 4 else GEMV_TILES[:1]:
                c = CFG if tile is None else CFG.replace(tiles=((qtype, tile),))
                variants[f"gemv{tile or ''}"] = lambda x, c=c: gemv(x, w, cfg=c)
            if m >= 4:
                variants["qmm"] = lambda x: matmul_packed(x, w, cfg=CFG)
            for name, fn in variants.items():
                row = dict(qtype=qtype, n=n, k=k, m=m, variant=name)
                try:
                    got = np.asarray(jax.jit(fn)(xs[0]).astype(jnp.float32), np.float64)
                    row["rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    row["us"] = timed(fn, xs) * 1e6
                    row["GBps"] = w.nbytes / row["us"] / 1e3
                    print(f"{qtype} {n}x{k} m={m:3d} {name:22s} {row['us']:8.1f} us {row['GBps']:6.0f} GB/s "
                          f"err {row['rel_err']:.1e}", flush=True)
                except Exception as e:  # noqa: BLE001 -- a tile that does not build is a result too
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"{qtype} {n}x{k} m={m:3d} {name:22s} FAILED {row['error'][:200]}", flush=True)
                out.append(row)
                with open(path, "w") as fh:
                    json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
