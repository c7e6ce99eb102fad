"""A ~2 GB synthetic GGUF opens without reading its tensors into RAM, and builds its params without
holding a second copy of the file (slow: writes 2 GB)."""
from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from realizar_jax.formats.roles import ROLES, tensor_name

PROBE = r"""
import json, sys, time
import numpy as np
import realizar_jax.formats.gguf_file, realizar_jax.formats.validate, realizar_jax.weights  # imports are not the load

def status_mb(key):  # /proc: unlike getrusage's ru_maxrss, VmHWM is not inherited from the forking parent
    return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1]) / 1024

base = status_mb("VmRSS")
t0 = time.perf_counter()
src = realizar_jax.formats.open_model(sys.argv[1])
t1 = time.perf_counter()
after_open, peak_open = status_mb("VmRSS"), status_mb("VmHWM")
row = np.asarray(src.tensors["blk.3.ffn_down.weight"].data[17], np.float32)  # touch one row only
t2 = time.perf_counter()
params = realizar_jax.weights.build_params(src, "bfloat16", progress=False)
params.lm_head.block_until_ready()
t3 = time.perf_counter()
print(json.dumps({"open_s": t1 - t0, "build_s": t3 - t2, "rss_before_mb": base, "rss_after_open_mb": after_open,
                  "peak_open_mb": peak_open, "rss_after_build_mb": status_mb("VmRSS"),
                  "anon_after_build_mb": status_mb("RssAnon"), "file_after_build_mb": status_mb("RssFile"),
                  "peak_build_mb": status_mb("VmHWM"), "row_sum": float(row.sum()),
                  "param_mb": realizar_jax.weights.param_bytes(params) / 2**20,
                  "file_bytes": sum(t.nbytes for t in src.tensors.values())}))
"""


def write_synthetic_gguf(path, layers=4, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=32000):
    """A llama GGUF of random F16 weights (~2 GB with the defaults), streamed to disk chunk by chunk."""
    rng = np.random.default_rng(0)
    hd = hidden // heads
    shapes = {"embed": (vocab, hidden), "final_norm": (hidden,), "lm_head": (vocab, hidden),
              "attn_norm": (hidden,), "ffn_norm": (hidden,), "wq": (hidden, hidden), "wk": (kv_heads * hd, hidden),
              "wv": (kv_heads * hd, hidden), "wo": (hidden, hidden), "w_gate": (ffn, hidden), "w_up": (ffn, hidden),
              "w_down": (hidden, ffn)}
    plan = [(tensor_name(r, "gguf"), shapes[r]) for r in ("embed", "final_norm", "lm_head")]
    plan += [(tensor_name(r, "gguf", i), shapes[r]) for i in range(layers) for r in shapes if ROLES[r].per_layer]
    w = gguf.GGUFWriter(path, arch="llama")
    for key, value in [("block_count", layers), ("context_length", 4096), ("embedding_length", hidden),
                       ("feed_forward_length", ffn), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv_heads)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for name, shape in plan:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    chunk = rng.standard_normal(1 << 22).astype(np.float16)
    for name, shape in plan:
        if len(shape) == 1:
            w.write_tensor_data(1 + 0.1 * rng.standard_normal(shape).astype(np.float32))
        else:
            n = int(np.prod(shape))
            reps = -(-n // chunk.size)
            data = np.tile(np.roll(chunk, rng.integers(chunk.size)), reps)[:n].reshape(shape)
            w.write_tensor_data(data)
    w.close()
    return path


@pytest.mark.slow
def test_open_2gb_gguf_time_and_rss(tmp_path):
    path = write_synthetic_gguf(tmp_path / "big.gguf")
    size = path.stat().st_size
    assert size > 2.0e9
    r = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    growth_mb = m["rss_after_open_mb"] - m["rss_before_mb"]
    print(f"\n{size / 1e9:.2f} GB GGUF (F16): open_model {m['open_s']:.3f} s, RSS {m['rss_before_mb']:.0f} -> "
          f"{m['rss_after_open_mb']:.0f} MB (+{growth_mb:.0f} MB, peak {m['peak_open_mb']:.0f} MB); "
          f"build_params to bf16 {m['build_s']:.1f} s ({m['param_mb']:.0f} MB of params): RSS "
          f"{m['rss_after_build_mb']:.0f} MB (anon {m['anon_after_build_mb']:.0f}, file-backed page cache "
          f"{m['file_after_build_mb']:.0f}), peak {m['peak_build_mb']:.0f} MB")
    assert m["file_bytes"] <= size and np.isfinite(m["row_sum"])
    assert m["open_s"] < 10 and growth_mb < 200  # opening did not read the 2 GB of tensors into RAM
    # building holds the params once (anonymous memory) plus a tensor's temporaries, not a copy of the file
    assert m["anon_after_build_mb"] < m["rss_before_mb"] + 1.2 * m["param_mb"]


def test_dense_load_peak_rss_is_the_params_and_a_chunk(tmp_path):
    """Issue 22: a large F16 table loaded as bf16 used to peak at ~4x itself (ml_dtypes' f16 -> bf16 via
    float32, jnp.asarray copying the result twice). Now the anonymous memory above the params stays within
    a few 64 MiB upload chunks; the file's own pages (mapped, RssFile) are page cache."""
    path = write_synthetic_gguf(tmp_path / "embed.gguf", layers=1, hidden=1024, heads=8, kv_heads=4, ffn=256,
                                vocab=131072)   # token_embd and output: 256 MiB of F16 each
    r = subprocess.run([sys.executable, "-c", PROBE.replace("blk.3.", "blk.0."), str(path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    peak_anon = m["peak_build_mb"] - m["file_after_build_mb"]   # VmHWM counts the mapped pages read so far
    assert m["anon_after_build_mb"] < m["rss_before_mb"] + 1.1 * m["param_mb"]
    assert peak_anon < m["rss_before_mb"] + m["param_mb"] + 3 * 64 + 64, m
