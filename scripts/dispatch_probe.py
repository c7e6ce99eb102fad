"""Where the engine's per-chunk time goes on a GPU: decode chunks back to back, pipelined with reads,
with and without a per-call host->device input, AOT executable vs jax.jit, and prefill at batch B."""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import realizar_jax as rj
from realizar_jax.serving import state as S

m = rj.load(sys.argv[1], max_seq_len=1024)
K = 4
st = S.new_state(m.config, 1, m.max_seq_len, m.kv_dtype)
steps = m.slot_steps
rel_np = np.zeros((1,), bool)
rel_dev = jnp.asarray(rel_np)
pre = steps.prefill(m.params, jnp.ones((1, 128), jnp.int32), jnp.full((1,), 128, jnp.int32))
st, _ = steps.insert(None, st, pre, jnp.int32(0), jnp.int32(0), S.settings(max_tokens=10**6, seed=1))
N = 40
V = dict(steps=K, logprobs=False, sample=False, penalize=False, rows=1)   # the greedy single-slot chunk


def timed(name, fn):
    global st
    st, o = fn(st)
    jax.block_until_ready(o)
    t = time.perf_counter()
    host = 0.0
    prev = None
    for _ in range(N):
        h0 = time.perf_counter()
        st, o = fn(st)
        host += time.perf_counter() - h0
        if "pipelined" in name and prev is not None:
            np.asarray(prev)
        prev = o
    jax.block_until_ready(o)
    dt = (time.perf_counter() - t) / N
    print(f"{name:45s} {dt * 1e3:7.2f} ms/chunk  {K / dt:7.1f} tok/s  host dispatch {host / N * 1e3:6.2f} ms", flush=True)


aot = lambda s: (lambda r: (r[0], r[1].tokens))(steps.decode(m.params, s, rel_dev, **V))  # noqa
aot_h2d = lambda s: (lambda r: (r[0], r[1].tokens))(steps.decode(m.params, s, jnp.asarray(rel_np),  # noqa
                                                                   **V))
jitted = jax.jit(lambda p, s, r: S.decode(p, s, r, **V, config=m.config, dtype=m.dtype,
                                          kernels=m.kernels), donate_argnums=1)
jit_fn = lambda s: (lambda r: (r[0], r[1].tokens))(jitted(m.params, s, rel_dev))  # noqa
timed("AOT back-to-back", aot)
timed("AOT pipelined read", aot)
timed("AOT pipelined read + H2D release", aot_h2d)
timed("jit back-to-back", jit_fn)
timed("jit pipelined read", jit_fn)
for b in (1, 4, 16):
    toks = jnp.ones((b, 128), jnp.int32)
    lens = jnp.full((b,), 128, jnp.int32)
    p = steps.prefill(m.params, toks, lens)
    jax.block_until_ready(p.logits)
    t = time.perf_counter()
    for _ in range(5):
        p = steps.prefill(m.params, toks, lens)
    jax.block_until_ready(p.logits)
    dt = (time.perf_counter() - t) / 5
    print(f"prefill B={b:2d} T=128: {dt * 1e3:7.1f} ms = {b * 128 / dt:7.0f} tok/s", flush=True)
