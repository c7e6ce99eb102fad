"""Device probe run under Nsight Compute: one call each of the packed tensor-core matmul (8 and 64
rows) and the int8 GEMV (1 row) on the 14336x4096 Q4_K gate shape, so `ncu` reports what bounds
them; then, without ncu, read-bandwidth candidates for bench's ceiling and a qmatmul tile sweep
for 8-16 rows with more warps / fewer stages.

    ncu --kernel-name regex:"qmatmul|gemv" --launch-skip 0 --launch-count 3 python scripts/qmm_ncu_probe.py ncu
    python scripts/qmm_ncu_probe.py sweep
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qmatmul_probe import CFG, REPEATS, timed
from realizar_jax.cli.bench import _bandwidth
from realizar_jax.cli.synth import random_blocks
from realizar_jax.kernels import GpuQTensor, repack_blocks
from realizar_jax.kernels.gemv import gemv
from realizar_jax.kernels.qmatmul import matmul_packed, row_cap


def weight(qtype="Q4_K", n=14336, k=4096):
    rng = np.random.default_rng(0)
    return GpuQTensor(tuple(jnp.asarray(p) for p in repack_blocks(random_blocks(qtype, n, k, rng), qtype, (n, k))),
                      qtype, (n, k))


def ncu_calls():
    w = weight()
    rng = np.random.default_rng(1)
    for m, fn in ((8, lambda x: matmul_packed(x, w, cfg=CFG)), (64, lambda x: matmul_packed(x, w, cfg=CFG)),
                  (1, lambda x: gemv(x, w, cfg=CFG))):
        x = jnp.asarray(rng.standard_normal((m, w.shape[1])), jnp.bfloat16)
        jax.block_until_ready(jax.jit(fn)(x))


def _sum_kernel(x_ref, o_ref, *, rows):
    def body(r, acc):
        return acc + x_ref[0, r, :].astype(jnp.float32)
    acc = jax.lax.fori_loop(0, rows, body, jnp.zeros((x_ref.shape[-1],), jnp.float32))
    o_ref[0] = jnp.sum(acc)


def pallas_sum(a, programs=1056, cols=2048):
    rows = a.size // programs // cols
    x = a[:programs * rows * cols].reshape(programs, rows, cols)
    return pl.pallas_call(functools.partial(_sum_kernel, rows=rows), grid=(programs,),
                          in_specs=[pl.BlockSpec((1, rows, cols), lambda i: (i, 0, 0))],
                          out_specs=pl.BlockSpec((1,), lambda i: (i,)),
                          out_shape=jax.ShapeDtypeStruct((programs,), jnp.float32),
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=4))(x).sum()


def bandwidths():
    """Read-bandwidth candidates over 4 GiB of bf16, timed as bench times its ceilings."""
    cands = {
        "sum_all": (lambda a: jnp.sum(a, dtype=jnp.float32), 2),
        "sum_rows4096": (lambda a: a.reshape(-1, 4096).astype(jnp.float32).sum(axis=1).sum(), 2),
        "max_rows8192": (lambda a: a.reshape(-1, 8192).max(axis=1).astype(jnp.float32).sum(), 2),
        "sum_u32_rows": (lambda a: jax.lax.bitcast_convert_type(a.reshape(-1, 2048, 2), jnp.uint32)
                         .sum(axis=1, dtype=jnp.uint32).sum(), 2),
        "copy_a+1(rw)": (lambda a: a + 1, 4),
        **{f"pallas_sum({p},{c})": (functools.partial(pallas_sum, programs=p, cols=c), 2)
           for p, c in ((1056, 2048), (528, 4096), (2112, 1024))},
    }
    for name, (op, bytes_per_element) in cands.items():
        print(f"bandwidth {name:22s} {_bandwidth(4.0, op, bytes_per_element):7.0f} GB/s", flush=True)


def sweep():
    rng = np.random.default_rng(2)
    for qtype, n, k in (("Q4_K", 14336, 4096), ("Q6_K", 4096, 14336)):
        w = weight(qtype, n, k)
        for m in (8, 16, 64):
            xs = jnp.asarray(rng.standard_normal((REPEATS, m, k)), jnp.bfloat16)
            tiles = [(64, 16, 2, 4, 3), (64, 16, 2, 8, 3), (64, 16, 2, 4, 2), (64, 16, 1, 4, 4), (128, 16, 1, 8, 3),
                     (32, 16, 2, 4, 3), (64, 16, 4, 4, 2), (128, 16, 2, 8, 2)] if m <= 16 else \
                    [(64, 64, 1, 4, 4), (64, 64, 1, 8, 3), (128, 64, 1, 8, 2), (64, 32, 1, 4, 4), (32, 64, 1, 4, 4)]
            mp = max(16, 1 << (m - 1).bit_length())
            for tile in tiles:
                c = CFG.replace(tiles=((f"QMM_{qtype}_{row_cap(mp)}", tile),))
                try:
                    us = timed(lambda x, c=c: matmul_packed(x, w, cfg=c), xs) * 1e6
                    print(f"sweep {qtype} {n}x{k} m={m:3d} {tile} {us:8.1f} us {w.nbytes / us / 1e3:6.0f} GB/s", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"sweep {qtype} m={m} {tile} FAILED {type(e).__name__}: {str(e)[:150]}", flush=True)


if __name__ == "__main__":
    {"ncu": ncu_calls, "bandwidth": bandwidths, "sweep": sweep}[sys.argv[1]]()
