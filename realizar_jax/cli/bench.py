"""`realizar-jax bench`: load / compile / prefill / decode speed on one device, in one process.

    realizar-jax bench --shape llama3-8b --quant q4_k_m [--batch 1[,4,16,...]] [--prompt-len 512] [--gen 128]
    realizar-jax bench --model PATH [...] [--json OUT]

With --shape, a random-weight GGUF of that real shape is synthesized first (realizar_jax.cli.synth:
llama3-8b, llama3.2-1b, qwen3-30b-a3b, gemma3-12b, gpt-oss-20b; cached under --dir), so the same file can be given to
llama.cpp's llama-bench. Decode speed is also expressed as effective bandwidth: the weight bytes one
decode step must read (every matrix, only B rows of an untied embedding table, of a mixture of experts
only the active experts) times steps per second, against the device's measured
read bandwidth (row sums over 4 GiB) and copy bandwidth (`a + 1`), and as the matmul rate it implies
(2 x rows x matrix weights per step). Several batch sizes (--batch 1,8,64) are measured on one
loaded model, one row each.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..kernels.tuning import KernelConfig, parse_variant as parse_kernel_variant
from ..weights import param_bytes


def _bandwidth(gib: float, op, bytes_per_element: int) -> float:
    """GB/s of the jitted `op` over `gib` GiB of bf16 (median of 10 runs after a warm-up), counting
    bytes_per_element bytes moved per element."""
    import jax
    import jax.numpy as jnp
    n = int(gib * (1 << 30)) // 2
    a = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(op)
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t)
    del a
    return bytes_per_element * n / float(np.median(ts)) / 1e9


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device copy bandwidth in GB/s (bytes read + written) of a large elementwise op."""
    return _bandwidth(gib, lambda a: a + 1, 4)


def read_bandwidth(gib: float = 4.0) -> float:
    """Device read bandwidth in GB/s: row sums over `gib` GiB viewed as uint32 (reads only, a small
    write) -- the ceiling a bandwidth-bound decode step is measured against. Of the reductions tried
    on the H200 this one reads fastest (3.9 TB/s; one float sum of everything 2.5-3.2); `a + 1`'s
    copy figure (copy_bandwidth) counts the writes too and reads well below it."""
    import jax
    import jax.numpy as jnp
    return _bandwidth(gib, lambda a: jax.lax.bitcast_convert_type(a.reshape(-1, 2048, 2), jnp.uint32)
                      .sum(axis=1, dtype=jnp.uint32).sum(), 2)


def active_experts(config, batch: int) -> int:
    """Expert slices of each MoE layer that one decode step of `batch` tokens reads: experts_per_token of
    num_experts for one token; for several, min(num_experts, batch * experts_per_token) -- an upper bound,
    reached only when no two tokens share an expert (uniform routing of 32 tokens over 128 experts x 8
    touches ~112 of them on average, not 128)."""
    return min(config.num_experts, batch * config.experts_per_token)


def _expert_stacks(params) -> list:
    return [w for lp in params.layers for w in (lp.experts_gate, lp.experts_up, lp.experts_down) if w is not None]


_EXPERT_BIASES = ("experts_gate_bias", "experts_up_bias", "experts_down_bias")   # gpt-oss's [experts, out]


def _expert_biases(params) -> list:
    return [getattr(lp, r) for lp in params.layers for r in _EXPERT_BIASES if getattr(lp, r) is not None]


def decode_read_bytes(params, config, batch: int) -> int:
    """Weight bytes one decode step reads: all matrices and norms; an untied embedding only B rows; of a
    mixture of experts' stacks only the active experts' slices (active_experts; the router whole). The
    memory estimate (memory.py) counts every expert: all are resident, few are read."""
    total = param_bytes(params)
    if not config.tie_embeddings:
        emb = param_bytes(params.embed)
        total -= emb - emb * batch // config.vocab_size
    if config.moe:   # the experts' biases (gpt-oss) are read per chosen expert too
        experts = sum(int(w.nbytes) for w in _expert_stacks(params) + _expert_biases(params))
        total -= experts - experts * active_experts(config, batch) // config.num_experts
    return total


def decode_matmul_flops(params, batch: int, config=None) -> int:
    """FLOPs of one decode step's matrix products (2 per weight per row; the embedding is a gather,
    the LM head a product even when tied); attention is not counted. An expert stack [experts, out, in]
    counts experts_per_token experts per row (config needed): exact, whatever the routing."""
    import dataclasses
    layers = [dataclasses.replace(lp, **dict.fromkeys(_EXPERT_BIASES)) for lp in params.layers]   # 2-D, not matrices
    matrices = [w for layer in layers for w in jax_leaves_2d(layer) if len(w.shape) == 2] + [params.lm_head]
    flops = 2 * batch * sum(int(w.shape[0]) * int(w.shape[1]) for w in matrices)
    stacks = _expert_stacks(params)
    if stacks:
        flops += 2 * batch * config.experts_per_token * sum(int(w.shape[1]) * int(w.shape[2]) for w in stacks)
    return flops


def jax_leaves_2d(tree) -> list:
    """The matrices of a pytree of weights: 2-D arrays and (GPU-)packed tensors, each once."""
    import jax
    is_matrix = lambda x: hasattr(x, "qtype") or getattr(x, "ndim", 0) == 2
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_matrix) if is_matrix(x)]


def run_bench(path, *, batch=1, prompt_len=512, gen=128, dtype="bfloat16", profile=None, variants=None,
              page_size=None, log=print) -> dict:
    """Load once; time prefill and decode at each batch size (an int or a sequence of them); then
    again under each variant's KernelConfig. The first batch's numbers are the result's top level;
    with several, res["batches"] holds one result per batch (the first included). page_size: keep the
    KV cache in pages of that many positions, scattered over the pool as a serving engine's are
    (default: contiguous rows)."""
    import jax
    import jax.numpy as jnp

    from .. import engine, models as M
    from ..cache import PagedKVCache, init_cache, init_paged_cache, pages_for
    from ..generate import DECODE_CHUNK

    batches = [batch] if isinstance(batch, int) else [int(b) for b in batch]
    batch = batches[0]
    res: dict = {"model": str(path), "batch": batch, "prompt_len": prompt_len, "gen": gen, "kv_page_size": page_size,
                 "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                 "jax": jax.__version__}
    on_gpu = jax.default_backend() == "gpu"
    res["copy_GBps"] = copy_bandwidth(1.0 if on_gpu else 1 / 16)
    res["read_GBps"] = read_bandwidth(4.0 if on_gpu else 1 / 16)
    log(f"copy bandwidth {res['copy_GBps']:.0f} GB/s, read bandwidth {res['read_GBps']:.0f} GB/s")
    chunk = DECODE_CHUNK
    calls = max(1, (gen - 1) // chunk)   # timed decode calls of `chunk` steps, after one warm-up call
    max_seq = 1 << (prompt_len + (calls + 1) * chunk).bit_length()
    t = time.perf_counter()
    m = engine.load(path, dtype=dtype, max_seq_len=max_seq, batch=max(batches))
    jax.block_until_ready(m.params)
    res["load_s"] = time.perf_counter() - t
    params, config = m.params, m.config
    res["weight_device_bytes"] = param_bytes(params)
    res["file_bytes"] = os.path.getsize(path)
    log(f"loaded in {res['load_s']:.1f}s; weights on device {res['weight_device_bytes']/1e9:.3f} GB "
        f"(file {res['file_bytes']/1e9:.3f} GB)")

    def new_cache(batch: int):
        kv = jnp.dtype(dtype)
        if page_size is None:
            return init_cache(config, batch, max_seq, kv)
        per = pages_for(max_seq, page_size)
        cache = init_paged_cache(config, 1 + batch * per, page_size, batch, max_seq, kv)
        order = np.random.default_rng(1).permutation(np.arange(1, cache.pages)).reshape(batch, per)
        return PagedKVCache(cache.k, cache.v, jnp.asarray(order, jnp.int32), cache.lengths)

    def measure(out: dict, kernels: KernelConfig, batch: int):
        """Compile and time prefill + decode of `batch` sequences under this KernelConfig (a static
        argument of the steps)."""
        read = out["decode_read_bytes"] = decode_read_bytes(params, config, batch)
        flops = out["decode_matmul_flops"] = decode_matmul_flops(params, batch, config)
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.integers(3, config.vocab_size, (batch, prompt_len)), jnp.int32)
        lengths = jnp.full((batch,), prompt_len, jnp.int32)

        prefill = jax.jit(lambda p, c, t, l: M.prefill(p, c, t, l, config=config, kernels=kernels), donate_argnums=1)

        def steps(p, c, tok):
            # greedy decode steps in one device call (lax.scan), as Model.generate runs them: the host
            # dispatches once per chunk, so what is timed is the GPU, not Python
            def body(c, _):
                tok, c = c
                logits, c = M.decode_logits(p, c, tok, config=config, kernels=kernels)
                nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                return (nxt, c), nxt
            (tok, c), out = jax.lax.scan(body, (tok, c), None, length=chunk)
            return tok, c, out
        decode = jax.jit(steps, donate_argnums=1)

        cache = new_cache(batch)
        t = time.perf_counter()
        prefill_c = prefill.lower(params, cache, tokens, lengths).compile()
        out["compile_prefill_s"] = time.perf_counter() - t
        times = []
        for _ in range(3):
            cache = new_cache(batch)
            jax.block_until_ready(cache)
            t = time.perf_counter()
            logits, cache = prefill_c(params, cache, tokens, lengths)
            jax.block_until_ready(logits)
            times.append(time.perf_counter() - t)
        out["prefill_s"] = float(np.median(times))
        out["prefill_tok_s"] = batch * prompt_len / out["prefill_s"]
        out["prefill_finite"] = bool(jnp.isfinite(logits).all())
        log(f"prefill {prompt_len} tok x {batch}: {out['prefill_s']*1e3:.1f} ms = {out['prefill_tok_s']:.0f} tok/s")

        tok = jnp.argmax(logits.reshape(batch, -1, logits.shape[-1])[:, -1], axis=-1).astype(jnp.int32)
        t = time.perf_counter()
        decode_c = decode.lower(params, cache, tok).compile()
        out["compile_decode_s"] = time.perf_counter() - t
        tok, cache, _ = decode_c(params, cache, tok)   # warm-up chunk (first call allocations)
        jax.block_until_ready(tok)
        n = calls * chunk
        t = time.perf_counter()
        chunks = []
        for _ in range(calls):
            tok, cache, toks = decode_c(params, cache, tok)
            chunks.append(toks)
        jax.block_until_ready(tok)
        dt = time.perf_counter() - t
        out["decode_steps_timed"] = n
        out["decode_s_per_step"] = dt / n
        out["decode_tok_s"] = batch * n / dt
        out["decode_steps_per_s"] = n / dt
        out["decode_GBps"] = read * n / dt / 1e9
        out["decode_pct_copy"] = 100 * out["decode_GBps"] / out["copy_GBps"]
        out["decode_pct_read"] = 100 * out["decode_GBps"] / res["read_GBps"]
        out["decode_TFLOPs"] = flops * n / dt / 1e12
        out["decode_floor_tok_s"] = batch * res["read_GBps"] * 1e9 / read
        out["compile_s"] = out["compile_prefill_s"] + out["compile_decode_s"]
        out["tokens_in_range"] = bool(all(0 <= int(x.min()) and int(x.max()) < config.vocab_size for x in chunks[-2:]))
        log(f"decode {n} steps x {batch}: {out['decode_s_per_step']*1e3:.2f} ms/step = "
            f"{out['decode_tok_s']:.0f} tok/s, {out['decode_GBps']:.0f} GB/s "
            f"({out['decode_pct_read']:.0f}% of read bw, {out['decode_pct_copy']:.0f}% of copy bw), "
            f"{out['decode_TFLOPs']:.1f} TFLOP/s")
        def prefill_once():
            fresh = new_cache(batch)
            return prefill_c(params, fresh, tokens, lengths)[0]
        return decode_c, cache, tok, logits, prefill_once

    res["kernels"] = repr(m.kernels)
    decode_c, cache, tok, base_logits, prefill_once = measure(res, m.kernels, batch)
    def trace_decode(out: dict, decode_c, cache, tok, batch: int):
        """One decode call under the profiler: where a step's time goes, per kernel."""
        where = Path(profile) / f"decode_b{batch}"
        jax.profiler.start_trace(str(where), create_perfetto_trace=True)
        tok, cache, _ = decode_c(params, cache, tok)
        jax.block_until_ready(tok)
        jax.profiler.stop_trace()
        out["profile"] = summarize_trace(where, steps=chunk)
        for row in out["profile"]["top"]:
            log("  {us_per_step:9.1f} us/step {calls_per_step:6.1f} calls  {name}".format(**row))
        log(f"  GPU busy {out['profile']['busy_us_per_step']:.0f} us/step in "
            f"{out['profile']['kernels_per_step']:.0f} kernels (decode step {out['decode_s_per_step']*1e6:.0f} us)")

    if profile:   # and one prefill of the first batch
        trace_decode(res, decode_c, cache, tok, batch)
        jax.profiler.start_trace(str(Path(profile) / "prefill"), create_perfetto_trace=True)
        jax.block_until_ready(prefill_once())
        jax.profiler.stop_trace()
        res["profile_prefill"] = summarize_trace(Path(profile) / "prefill", steps=1)
        for row in res["profile_prefill"]["top"][:15]:
            log("  {us_per_step:9.1f} us/prefill {calls_per_step:6.1f} calls  {name}".format(**row))
        log(f"  GPU busy {res['profile_prefill']['busy_us_per_step']:.0f} us in "
            f"{res['profile_prefill']['kernels_per_step']:.0f} kernels (prefill {res['prefill_s']*1e6:.0f} us)")
    res["variants"] = ab_variants(measure, m.kernels, base_logits, batch, variants, res["copy_GBps"], log)
    if len(batches) > 1:
        res["batches"] = [{k: v for k, v in res.items() if k != "profile_prefill"}]
        for b in batches[1:]:
            row: dict = {"batch": b, "copy_GBps": res["copy_GBps"], "kernels": res["kernels"]}
            log(f"batch {b}:")
            res["batches"].append(row)
            try:
                decode_b, cache_b, tok_b, logits, _ = measure(row, m.kernels, b)
            except Exception as e:  # noqa: BLE001 -- a batch that fails to build is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                log(f"  failed: {row['error']}")
                continue
            if profile:
                trace_decode(row, decode_b, cache_b, tok_b, b)
            del decode_b, cache_b, tok_b
            row["variants"] = ab_variants(measure, m.kernels, logits, b, variants, res["copy_GBps"], log)
            del logits
    return res


def ab_variants(measure, base_kernels, base_logits, batch, variants, copy_gbps, log) -> list:
    """The same measurement under each variant's KernelConfig, with its prefill logits' distance
    from the default's."""
    import jax.numpy as jnp
    out = []
    for spec in variants or ():
        kernels = parse_kernel_variant(spec, base_kernels)
        v: dict = {"variant": spec, "kernels": repr(kernels), "copy_GBps": copy_gbps, "batch": batch}
        try:
            log(f"variant {spec}:")
            logits = measure(v, kernels, batch)[3]
            v["prefill_logits_rel_diff"] = float(jnp.linalg.norm(logits - base_logits)
                                                 / jnp.linalg.norm(base_logits))
        except Exception as e:  # noqa: BLE001 -- a variant that fails to build is a result too
            v["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            log(f"  failed: {v['error']}")
        out.append(v)
    return out


def summarize_trace(trace_dir, steps: int, top: int = 30) -> dict:
    """Kernel time per decode step from a jax.profiler perfetto trace (the newest under trace_dir).

    GPU activity is taken from the processes whose name mentions a GPU; events are grouped by name.
    """
    import gzip
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {"error": f"no *.trace.json.gz under {trace_dir}", "top": [], "busy_us_per_step": 0.0,
                "kernels_per_step": 0.0}
    with gzip.open(files[-1], "rt") as fh:
        events = json.load(fh)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "gpu" in n.lower() or "/device:" in n.lower()}
    # a GPU process also has summary lines (XLA modules, XLA ops) over the same time: count only the
    # stream lines where the kernels run, when the trace names its threads
    threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu}
    streams = {k for k, n in threads.items() if "stream" in n.lower()}
    per: dict = {}
    busy, count = 0.0, 0
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu or "dur" not in e:
            continue
        if streams and (e.get("pid"), e.get("tid")) not in streams:
            continue
        name = e.get("name", "?")
        d = float(e["dur"])
        tot, n = per.get(name, (0.0, 0))
        per[name] = (tot + d, n + 1)
        busy += d
        count += 1
    rows = sorted(({"name": k[:120], "us_per_step": v[0] / steps, "calls_per_step": v[1] / steps}
                   for k, v in per.items()), key=lambda r: -r["us_per_step"])
    return {"trace": str(files[-1]), "processes": sorted(names.values()),
            "gpu_threads": sorted(set(threads.values())), "top": rows[:top],
            "busy_us_per_step": busy / steps, "kernels_per_step": count / steps}


def format_table(rows: list[dict]) -> str:
    cols = [("model", "model", "{}"), ("B", "batch", "{}"), ("load s", "load_s", "{:.1f}"),
            ("compile s", "compile_s", "{:.1f}"), ("weights GB", "weight_device_bytes", "{:.2f}"),
            ("prefill tok/s", "prefill_tok_s", "{:.0f}"), ("decode tok/s", "decode_tok_s", "{:.1f}"),
            ("ms/step", "decode_s_per_step", "{:.2f}"), ("GB/s", "decode_GBps", "{:.0f}"),
            ("% read", "decode_pct_read", "{:.0f}"), ("% copy", "decode_pct_copy", "{:.0f}"),
            ("TFLOP/s", "decode_TFLOPs", "{:.1f}")]
    lines = [" | ".join(c[0] for c in cols)]
    for r in rows:
        vals = []
        for _, k, f in cols:
            v = r.get(k, "")
            if k == "weight_device_bytes" and v != "":
                v = v / 1e9
            if k == "decode_s_per_step" and v != "":
                v = v * 1e3
            if k == "model":
                v = Path(str(v)).name
            vals.append(f.format(v) if v != "" else "-")
        lines.append(" | ".join(vals))
    return "\n".join(lines)


def batch_list(text: str) -> tuple:
    """'1,8,64' -> (1, 8, 64): positive batch sizes, each once, in the order given."""
    import argparse
    try:
        sizes = tuple(dict.fromkeys(int(t) for t in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def bench_main(argv=None) -> int:
    from .parser import Parser, fail
    from .synth import QUANTS, SHAPES, write_synthetic_gguf
    ap = Parser(prog="realizar-jax bench", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="a .gguf file or HF folder to benchmark")
    src.add_argument("--shape", choices=sorted(SHAPES), help="synthesize a random-weight GGUF of this shape")
    ap.add_argument("--quant", choices=QUANTS, default="q4_k_m")
    ap.add_argument("--batch", type=batch_list, default=(1,), metavar="B[,B...]",
                    help="sequences decoded together; several (1,8,64) are measured on one loaded model")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--dir", default=os.environ.get("REALIZAR_BENCH_DIR", "/tmp/realizar-bench"),
                    help="where synthesized GGUFs are cached")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--ab", action="append", metavar="FIELD=VAL[,FIELD=VAL]", default=[],
                    help="after the default run, time again under a KernelConfig with these fields changed "
                         "(int8_activations, pallas, tiles=JSON; same loaded weights; repeat for more variants)")
    ap.add_argument("--profile", metavar="DIR", help="also trace one decode call per batch and one prefill with "
                    "jax.profiler into DIR/decode_b<B> and DIR/prefill and print the kernels that take the time")
    ap.add_argument("--page-size", type=int, metavar="N", help="keep the KV cache in pages of N positions (a "
                    "power of two), scattered over a pool as the serving engine's are; default: contiguous rows")
    args = ap.parse_args(argv)
    if args.page_size is not None and (args.page_size < 1 or args.page_size & (args.page_size - 1)):
        return fail(ap.prog, f"--page-size must be a power of two, got {args.page_size}", 2)
    try:
        for spec in args.ab:
            parse_kernel_variant(spec, KernelConfig())
    except ValueError as e:
        return fail(ap.prog, e, 2)
    if args.prompt_len < 1 or args.gen < 2:
        return fail(ap.prog, "--prompt-len must be >= 1, --gen >= 2", 2)
    if args.model:
        path = Path(args.model)
        if not path.exists():
            return fail(ap.prog, f"{path}: no such file or directory")
        synth_s = None
    else:
        shape = args.shape or "llama3.2-1b"
        os.makedirs(args.dir, exist_ok=True)
        path = Path(args.dir) / f"{shape}-{args.quant}.gguf"
        t = time.perf_counter()
        if not path.exists():
            print(f"synthesizing {path} ...", flush=True)
            write_synthetic_gguf(path, shape, args.quant)
        synth_s = time.perf_counter() - t
    res = run_bench(path, batch=args.batch, prompt_len=args.prompt_len, gen=args.gen, dtype=args.dtype,
                    profile=args.profile, variants=args.ab, page_size=args.page_size)
    res["synth_s"] = synth_s
    if args.shape:
        res["shape"], res["quant"] = args.shape, args.quant
    rows = []
    for r in res.get("batches", [res]):
        rows += [{**r, "model": res["model"], "load_s": res["load_s"],
                  "weight_device_bytes": res["weight_device_bytes"]}]
        rows += [{**v, "model": f"{Path(res['model']).name} [{v['variant']}]"} for v in r.get("variants", [])]
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(bench_main())
