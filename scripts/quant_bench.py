"""Values per second of the quantizers: numpy on the host (quant.quantize) and the jitted encoders on
JAX's default device (quant.device_quant), on one random float32 matrix; compile time apart.

    PYTHONPATH=. python scripts/quant_bench.py --rows 4096 --cols 4096 Q8_0 Q4_K Q6_K
    PYTHONPATH=. python scripts/quant_bench.py --skip-host        # the device only (e.g. a GPU)
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from realizar_jax.quant import QUANTIZABLE_QTYPES, quantize
from realizar_jax.quant.device_quant import quantize_on_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("qtypes", nargs="*", default=[q for q in QUANTIZABLE_QTYPES if q not in ("F32", "F16", "BF16")])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3, help="device runs per type (the best is reported)")
    ap.add_argument("--skip-host", action="store_true", help="time only the device encoders")
    args = ap.parse_args()
    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    n = x.size
    print(f"{args.rows}x{args.cols} float32 on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{'type':6} {'host M/s':>9} {'device M/s':>11} {'compile s':>10} {'same bytes':>10}")
    for qtype in args.qtypes:
        t = time.perf_counter()
        dev = np.asarray(quantize_on_device(x[:1], qtype))        # compiles the small bucket only
        big = quantize_on_device(x, qtype)                        # compiles the full chunk
        big.block_until_ready()
        compile_s = time.perf_counter() - t
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            quantize_on_device(x, qtype).block_until_ready()
            best = min(best, time.perf_counter() - t)
        host_rate, same = "-", "-"
        if not args.skip_host:
            t = time.perf_counter()
            ref = quantize(x, qtype)
            host_rate = f"{n / (time.perf_counter() - t) / 1e6:.2f}"
            same = str(bool(np.array_equal(ref, np.asarray(big))))
        del dev
        print(f"{qtype:6} {host_rate:>9} {n / best / 1e6:>11.2f} {compile_s:>10.1f} {same:>10}", flush=True)


if __name__ == "__main__":
    main()
