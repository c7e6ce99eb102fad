"""Whole models on the GPU (Pallas GEMV/GEMM/attention, packed weights) vs the CPU float32 path.

Run on a machine with a GPU: `pytest -m gpu`. The CPU reference runs in a subprocess with
JAX_PLATFORMS=cpu, so it takes the jnp dequantize + dot path with float32 everywhere.
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realizar_jax as rj
from realizar_jax import model as M
from realizar_jax.kernels import GpuQTensor

pytestmark = pytest.mark.gpu

CPU_LOGITS = """
import sys, numpy as np, realizar_jax as rj
m = rj.load(sys.argv[1], dtype="float32", max_seq_len=128)
np.save(sys.argv[2], m.logits([int(t) for t in sys.argv[3].split(",")]))
"""


def _cpu_logits(path, ids, out):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", CPU_LOGITS, str(path), str(out), ",".join(map(str, ids))],
                   env=env, check=True, timeout=600)
    return np.load(out)


@pytest.mark.parametrize("variant,quant,route", [
    ("llama", "q4_k_m", "pallas"), ("llama", "q4_k_m", "xla"), ("qwen3", "q8_0", "pallas"),
    ("llama3", "q6_k", "pallas"), ("mistral", "f16", "pallas")])
def test_gpu_logits_match_cpu_float32(model_files, tmp_path, monkeypatch, variant, quant, route):
    assert jax.default_backend() == "gpu"
    monkeypatch.setenv("REALIZAR_PREFILL_GEMM", route)
    path = model_files.gguf(variant, quant)
    m = rj.load(path, dtype="bfloat16", max_seq_len=128)
    packed = [x for x in jax.tree_util.tree_leaves(m.params, is_leaf=lambda x: isinstance(x, GpuQTensor))
              if isinstance(x, GpuQTensor)]
    assert (len(packed) > 0) == (quant != "f16"), "quantized weights stay packed on the GPU"
    rng = np.random.default_rng(11)
    ids = [int(t) for t in rng.integers(3, m.config.vocab_size, 40)]
    ref = _cpu_logits(path, ids, tmp_path / "ref.npy")
    got = m.logits(ids)   # 40 tokens: the prefill route (GEMM)
    assert got.shape == ref.shape
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 4e-2, rel   # bf16 activations and weights vs float32 (CPU bf16 path: ~0.019)
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.85
    # decode route (GEMV + decode attention kernel): greedy tokens agree with the prefill's logits
    out = m.generate(ids, max_new_tokens=8)
    full = _cpu_logits(path, ids + out.tokens, tmp_path / "full.npy")
    for j, tok in enumerate(out.tokens):
        row = full[len(ids) - 1 + j]
        assert row[tok] >= row.max() - 0.15 * row.std(), (j, tok)   # a near-tie at most


# every value other than the default (switches.py), with how far its decode logits may move, on the
# fixture whose path it changes (packed Q4_K_M, or dense f16 weights taken as bf16)
SWITCHES = [("REALIZAR_GEMV_XPREP", "kernel", 1e-3, "q4_k_m"), ("REALIZAR_GEMV_XPREP", "xla", 1e-3, "q4_k_m"),
            ("REALIZAR_GEMV_XPREP", "xla", 1e-3, "f16"),
            ("REALIZAR_ATTN_INPLACE", "0", 3e-2, "q4_k_m"), ("REALIZAR_ATTN_UPDATE", "xla", 3e-2, "q4_k_m"),
            ("REALIZAR_ATTN_MERGE", "xla", 3e-2, "q4_k_m"), ("REALIZAR_ATTN_MERGE", "kernel", 1e-3, "q4_k_m"),
            ("REALIZAR_ATTN_MERGE", "kernel", 1e-2, "f16"), ("REALIZAR_RESIDUAL_ADD", "xla", 1e-3, "q4_k_m"),
            ("REALIZAR_RESIDUAL_ADD", "xla", 1e-3, "f16"), ("REALIZAR_SWIGLU", "prep", 1e-3, "q4_k_m"),
            ("REALIZAR_SWIGLU", "prep", 1e-3, "f16"), ("REALIZAR_GEMV_FUSE", "0", 1e-4, "q4_k_m"),
            # dense Q/K/V and gate/up in one launch round each output once, as separate launches do
            ("REALIZAR_GEMV_FUSE", "0", 2e-2, "f16"),
            ("REALIZAR_DENSE_GEMV", "xla", 2e-2, "f16"), ("REALIZAR_GEMV_ACT", "float", 4e-2, "q4_k_m"),
            ("REALIZAR_PREFILL_GEMM", "xla", 2e-2, "q4_k_m"), ("REALIZAR_PREFILL_GEMM", "pallas", 2e-2, "q4_k_m")]


@pytest.mark.parametrize("env,value,tol,quant", SWITCHES)
def test_gpu_switches_keep_decode_logits(model_files, monkeypatch, env, value, tol, quant):
    """Each non-default GPU path (README, "GPU switches") gives the default path's decode logits: exactly
    up to float32 summation order where only data movement changes, within rounding otherwise."""
    assert jax.default_backend() == "gpu"
    ids = [5, 17, 99, 3, 42, 7, 64, 23]   # below every fixture's vocab size
    path = model_files.gguf("mistral", "f16") if quant == "f16" else model_files.gguf("llama", quant)

    def decode_logits():
        jax.clear_caches()   # the switches are read when a function is traced
        m = rj.load(path, dtype="bfloat16", max_seq_len=128)
        cache = m.new_cache(1)
        tokens = jnp.asarray([ids[:4]], jnp.int32)   # 4 rows: the prefill also takes the GEMV
        logits, cache = M.prefill(m.params, cache, tokens, jnp.asarray([4], jnp.int32), config=m.config)
        rows = [np.asarray(logits[0])]
        for t in ids[4:]:   # decode steps: GEMV at batch 1 and the decode attention kernel
            logits, cache = M.decode_logits(m.params, cache, jnp.asarray([t], jnp.int32), config=m.config)
            rows.append(np.asarray(logits[0]))
        return np.stack(rows)

    monkeypatch.delenv(env, raising=False)
    base = decode_logits()
    monkeypatch.setenv(env, value)
    got = decode_logits()
    rel = np.linalg.norm(got - base) / np.linalg.norm(base)
    assert rel < tol, (env, value, rel)
