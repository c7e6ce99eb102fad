"""Memory estimate arithmetic on known configs, and check_fits' advice."""
from __future__ import annotations

import pytest

from realizar_jax.config import ModelConfig
from realizar_jax.errors import InsufficientMemoryError
from realizar_jax.formats import open_model
from realizar_jax.memory import check_fits, estimate_memory, parameter_count, weight_bytes_of

LLAMA3_8B = ModelConfig("llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        head_dim=128, intermediate_size=14336, context_length=8192)
QWEN3_0_6B = ModelConfig("qwen3", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                         head_dim=128, intermediate_size=3072, tie_embeddings=True, qk_norm=True)


def test_parameter_counts_of_published_models():
    assert parameter_count(LLAMA3_8B) == 8_030_261_248  # Meta-Llama-3-8B safetensors total
    assert parameter_count(QWEN3_0_6B) == 596_049_920  # Qwen3-0.6B safetensors total


def test_kv_cache_and_weights():
    e = estimate_memory(LLAMA3_8B, 8192)
    assert e.kv_cache == 2**30  # 2 * 32 layers * 8192 * 8 heads * 128 * 2 bytes = 1 GiB
    assert e.weights == 2 * 8_030_261_248
    assert estimate_memory(LLAMA3_8B, 8192, batch=4, kv_dtype="float32").kv_cache == 8 * 2**30
    assert estimate_memory(LLAMA3_8B, 8192, weight_bytes=123).weights == 123
    assert e.total == e.weights + e.kv_cache + e.workspace
    # workspace: f32 activations, scores of one 512-token chunk against the cache, the chunk's logits
    c = LLAMA3_8B
    act = 512 * (2 * 4096 + 4096 + 2 * 1024 + 2 * 14336) * 4
    assert e.workspace == act + 32 * 512 * 8192 * 4 + 512 * 128256 * 4
    with pytest.raises(ValueError):
        estimate_memory(c, 0)


def test_weight_bytes_of_source(model_files):
    src = open_model(model_files.gguf("llama", "q4_k_m"))
    packed = weight_bytes_of(src)
    assert packed == sum(t.nbytes for t in src.tensors.values())
    dense = sum(t.data.size for t in src.tensors.values() if t.qtype == "F32")
    assert weight_bytes_of(src, "bfloat16") == packed - dense * 4 + dense * 2
    hf = open_model(model_files.hf("llama"))
    assert weight_bytes_of(hf) == 4 * parameter_count(hf.config)  # float32 checkpoint, every parameter counted


def test_check_fits_advice():
    e = estimate_memory(LLAMA3_8B, 8192, batch=4)
    check_fits(e, e.total)  # exactly enough: fine
    free = e.weights + e.workspace + e.kv_cache // 3
    with pytest.raises(InsufficientMemoryError) as err:
        check_fits(e, free, path="/models/llama.gguf")
    msg = str(err.value)
    assert msg.startswith("/models/llama.gguf: model needs ") and "max_seq_len=8192 batch=4" in msg
    seq = int(msg.split("a shorter context (max_seq_len=")[1].split(" ")[0])
    assert 0 < seq < 8192 and seq % 256 == 0
    assert estimate_memory(LLAMA3_8B, seq, batch=4).total <= free  # the advice is true
    assert "a smaller batch (batch=1 would fit)" in msg
    assert "a quantized file (Q8_0" in msg and "Q4_K_M" in msg
    with pytest.raises(InsufficientMemoryError, match="quantized file") as err:
        check_fits(e, e.weights // 2)
    assert "shorter context" not in str(err.value)


def test_the_quantized_file_hint_names_only_smaller_types():
    """A Q8_0 file that does not fit is not told to try Q8_0 (the norms make it a little larger than
    parameters x 8.5 bits); Q6_K and Q4_K_M are still smaller."""
    from realizar_jax.memory import parameter_count
    q8_bytes = int(parameter_count(LLAMA3_8B) * 8.5 / 8 * 1.01)
    e = estimate_memory(LLAMA3_8B, 1024, weight_bytes=q8_bytes)
    with pytest.raises(InsufficientMemoryError) as err:
        check_fits(e, e.weights // 2)
    msg = str(err.value)
    assert "Q8_0" not in msg and "Q6_K" in msg and "Q4_K_M" in msg
