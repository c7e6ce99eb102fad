"""Engine-level speed on one GGUF (no HTTP): single-stream decode per decode_chunk, Model.generate(),
and continuous batching of N simultaneous requests per slot count. JSON to stdout's last line.
usage: python scripts/engine_bench.py FILE.gguf [--chunks 4,8,16] [--slots 8,32,64] [--prompt 128] [--gen 128]"""
import argparse
import json
import time

import numpy as np

import realizar_jax as rj

ap = argparse.ArgumentParser()
ap.add_argument("path")
ap.add_argument("--chunks", default="4,8,16")
ap.add_argument("--slots", default="8,32,64")
ap.add_argument("--prompt", type=int, default=128)
ap.add_argument("--gen", type=int, default=128)
ap.add_argument("--max-seq-len", type=int, default=1024)
a = ap.parse_args()
t0 = time.perf_counter()
m = rj.load(a.path, max_seq_len=a.max_seq_len)
print(f"load {time.perf_counter() - t0:.1f} s", flush=True)
rng = np.random.default_rng(0)


def prompt():
    return [int(t) for t in rng.integers(3, m.config.vocab_size, a.prompt)]


out = {}
for chunk in map(int, a.chunks.split(",")):
    e = m.engine(max_slots=1, decode_chunk=chunk)
    c = e.warmup([a.prompt], logprobs=False)
    runs = []
    for _ in range(3):
        h = e.submit(prompt(), max_tokens=256, ignore_eos=True)
        h.result()
        s = h.stats
        runs.append(((s.generated_tokens - 1) / (s.finished - s.first_token), s.first_token - s.submitted))
    out[f"single_chunk{chunk}"] = dict(decode_tok_s=max(r[0] for r in runs), ttft_s=min(r[1] for r in runs),
                                       compile_s=c)
    print(chunk, out[f"single_chunk{chunk}"], flush=True)
    e.close()
m.generate(prompt(), max_new_tokens=8)
for _ in range(2):
    g = m.generate(prompt(), max_new_tokens=256, stop_token_ids=[])
    print("Model.generate:", g.stats.summary(), flush=True)
out["model_generate_decode_tok_s"] = g.stats.decode_tok_s
for slots in map(int, a.slots.split(",")):
    e = m.engine(max_slots=slots, decode_chunk=8)
    c = e.warmup([a.prompt], logprobs=False)
    for rep in range(2):
        t = time.perf_counter()
        hs = [e.submit(prompt(), max_tokens=a.gen, ignore_eos=True) for _ in range(slots)]
        for h in hs:
            h.result()
        wall = max(h.stats.finished for h in hs) - t
        gen = sum(h.stats.generated_tokens for h in hs)
        ttft = sorted(h.stats.first_token - h.stats.submitted for h in hs)
    out[f"batch{slots}"] = dict(tok_s=gen / wall, ttft_p50_s=ttft[len(ttft) // 2], ttft_max_s=ttft[-1],
                                compile_s=c, per_stream_tok_s=float(np.median(
                                    [(h.stats.generated_tokens - 1) / (h.stats.finished - h.stats.first_token)
                                     for h in hs])))
    print(slots, out[f"batch{slots}"], flush=True)
    e.close()
print(json.dumps(out))
