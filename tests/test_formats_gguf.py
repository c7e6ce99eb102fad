"""GGUF files written by our converter read back as what went in: config parity with the HF folder,
every tensor equal to its source (dense) or to gguf-py's dequantization (quantized)."""
from __future__ import annotations

import functools

import gguf
import jax
import numpy as np
import pytest
import torch

from fixtures import ALL_VARIANTS, GGUF_QUANTS
from realizar_jax.formats import open_model
from realizar_jax.formats.validate import parse_tensor_name, validate_roles
from realizar_jax.quant.dequant import dequantize_blocks
from realizar_jax.quant.quantize import quantize
from realizar_jax.formats.roles import tensor_name

# Every quant for a few variants that between them cover MHA/GQA/MQA, explicit head_dim, tied
# embeddings and rows that are not whole K-quant blocks; f16 for all variants (see test_config_parity).
QUANT_VARIANTS = ("llama", "qwen3", "qwen2_tied", "small")
# Relative RMS error of a dequantized tensor vs its source: catches wrong orientation or permutation.
MAX_REL_ERR = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.06, "Q5_0": 0.06, "Q5_1": 0.06, "Q4_0": 0.15, "Q4_K": 0.12,
               "F16": 1e-3}


_ROWS = 256  # dequantize in fixed-size row chunks so jit compiles once per (qtype, row bytes)


@functools.cache
def _jit_dequant(qtype):
    return jax.jit(functools.partial(dequantize_blocks, qtype=qtype))


def our_dequant(data: np.ndarray, qtype: str) -> np.ndarray:
    rows = data.shape[0]
    padded = np.concatenate([data] + [data[: _ROWS]] * ((-rows) % _ROWS > 0))[: -(-rows // _ROWS) * _ROWS]
    out = [np.asarray(_jit_dequant(qtype)(padded[i:i + _ROWS])) for i in range(0, len(padded), _ROWS)]
    return np.concatenate(out)[:rows]


def _expected_config(hf_config):
    # Mistral is written as general.architecture 'llama', as llama.cpp's converter does (same math).
    return hf_config.replace(architecture="llama") if hf_config.architecture == "mistral" else hf_config


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_config_parity(model_files, variant):
    hf = open_model(model_files.hf(variant))
    g = open_model(model_files.gguf(variant, "f16"))
    assert g.format == "gguf" and hf.format == "hf"
    assert g.config == _expected_config(hf.config)
    # and the HF folder's config agrees with transformers' own reading of config.json
    import transformers
    ref = transformers.AutoConfig.from_pretrained(model_files.hf(variant))
    c = hf.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) == (
        ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads,
        ref.intermediate_size, ref.vocab_size)
    assert c.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert c.tie_embeddings == ref.tie_word_embeddings and c.norm_eps == ref.rms_norm_eps
    assert c.rope_theta == ref.rope_parameters["rope_theta"]


def test_fixture_configs_cover_the_cases(model_files):
    configs = {v: open_model(model_files.hf(v)).config for v in ALL_VARIANTS}
    assert configs["qwen2"].qkv_bias and not configs["llama"].qkv_bias
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim * configs["qwen3"].num_heads != 256
    assert configs["qwen2_tied"].tie_embeddings
    assert configs["mqa"].num_kv_heads == 1 and configs["mistral"].num_kv_heads == 2
    assert configs["llama3"].rope_scaling.kind == "llama3" and configs["llama3"].rope_scaling.factor == 8.0
    assert configs["llama"].add_bos and not configs["qwen2"].add_bos


def _hf_reference(hf_source, gguf_name, config):
    """The float32 values the converter started from for a GGUF tensor (llama Q/K rows permuted)."""
    role, layer = parse_tensor_name(gguf_name, "gguf")
    if role == "rope_freqs":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        import transformers
        ref = transformers.AutoConfig.from_pretrained(hf_source.path)
        inv_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](ref, "cpu")
        base = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
        return (base / inv_scaled).numpy()
    x = np.asarray(hf_source.tensors[tensor_name(role, "hf", layer)].data, np.float32)
    if config.architecture in ("llama", "mistral") and role in ("wq", "wk"):
        n = config.num_heads if role == "wq" else config.num_kv_heads
        # llama.cpp's convert_hf_to_gguf.py `permute`, written out: rows (head, half, j) -> (head, j, half)
        x = x.reshape(n, 2, x.shape[0] // n // 2, x.shape[1]).transpose(0, 2, 1, 3).reshape(x.shape)
    return x


def _check_file(hf_path, gguf_path):
    hf = open_model(hf_path)
    g = open_model(gguf_path)
    reader = gguf.GGUFReader(gguf_path)  # independent view of the same bytes
    raw = {t.name: t for t in reader.tensors}
    assert set(raw) == set(g.tensors)
    role_map = validate_roles(g)
    assert set(role_map.values()) == set(g.tensors)
    for name, t in g.tensors.items():
        r = raw[name]
        assert t.qtype == r.tensor_type.name
        assert t.shape == tuple(int(d) for d in reversed(r.shape.tolist()))
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), np.asarray(r.data).reshape(-1).view(np.uint8))
        src = _hf_reference(hf, name, g.config)
        if name == "rope_freqs.weight":  # computed twice in float32: allow an ulp
            np.testing.assert_allclose(t.data, src, rtol=1e-6)
        elif t.qtype == "F32":
            np.testing.assert_array_equal(t.data, src)
        elif t.qtype == "F16":
            np.testing.assert_array_equal(t.data, src.astype(np.float16))
        else:
            assert t.data.dtype == np.uint8 and t.data.ndim == 2 and t.data.shape[0] == t.shape[0]
            assert np.array_equal(t.data, quantize(src, t.qtype)), f"{name}: bytes differ from quantize()"
            ref = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType[t.qtype])
            ours = our_dequant(np.asarray(t.data), t.qtype)
            assert ours.shape == t.shape
            np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
            rel = np.sqrt(np.mean((ref - src) ** 2) / np.mean(src ** 2))
            assert rel < MAX_REL_ERR[t.qtype], f"{name} {t.qtype}: relative error {rel:.3g}"
    return g


@pytest.mark.parametrize("quant", GGUF_QUANTS + ("q5_k",))
@pytest.mark.parametrize("variant", QUANT_VARIANTS)
def test_every_tensor_reads_back(model_files, variant, quant):
    g = _check_file(model_files.hf(variant), model_files.gguf(variant, quant))
    qtypes = {t.qtype for t in g.tensors.values()}
    if quant == "q4_k_m" and variant != "small":
        assert {"Q4_K", "Q6_K", "F32"} <= qtypes  # the llama-quantize mix, see test_convert
    if quant in ("q4_k", "q5_k", "q6_k") and variant == "small":
        assert qtypes <= {"Q5_0", "Q5_1", "Q8_0", "F32"}  # hidden 64: no whole 256-blocks, fallback types


@pytest.mark.parametrize("variant", [v for v in ALL_VARIANTS if v not in QUANT_VARIANTS])
def test_every_tensor_reads_back_f16(model_files, variant):
    _check_file(model_files.hf(variant), model_files.gguf(variant, "f16"))


def test_bf16_gguf_reads_as_bfloat16(model_files):
    import ml_dtypes
    g = open_model(model_files.gguf("qwen2", "bf16"))
    hf = open_model(model_files.hf("qwen2"))
    t = g.tensors["blk.1.ffn_down.weight"]
    assert t.qtype == "BF16" and t.data.dtype == ml_dtypes.bfloat16 and t.shape == (256, 512)
    src = torch.from_numpy(np.array(hf.tensors["model.layers.1.mlp.down_proj.weight"].data)).to(torch.bfloat16)
    np.testing.assert_array_equal(np.asarray(t.data, np.float32), src.float().numpy())


def test_rope_permutation_matches_ggml_rope(model_files):
    """Attention scores from HF weights with HF's rotate-half RoPE equal those from the GGUF's permuted
    weights with ggml's adjacent-pair RoPE: the permutation is the one llama.cpp expects."""
    hf = open_model(model_files.hf("llama3"))
    g = open_model(model_files.gguf("llama3", "f32"))
    c = g.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, c.hidden_size)).astype(np.float32)
    pos = np.array([3, 11])
    d = c.head_dim
    inv = 1.0 / (c.rope_theta ** (np.arange(0, d, 2) / d))
    ang = pos[:, None] * inv[None, :]  # [2, d/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope_halves(v):  # v [2, heads, d]
        a, b = v[..., : d // 2], v[..., d // 2:]
        return np.concatenate([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def rope_pairs(v):
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = b * cos[:, None] + a * sin[:, None]
        return out

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(2, c.num_heads, d))
        k = rope((x @ wk.T).reshape(2, c.num_kv_heads, d))
        k = np.repeat(k, c.num_heads // c.num_kv_heads, axis=1)
        return np.einsum("qhd,khd->hqk", q, k)

    for layer in range(c.num_layers):
        s_hf = scores(np.asarray(hf.tensors[f"model.layers.{layer}.self_attn.q_proj.weight"].data),
                      np.asarray(hf.tensors[f"model.layers.{layer}.self_attn.k_proj.weight"].data), rope_halves)
        s_gg = scores(np.asarray(g.tensors[f"blk.{layer}.attn_q.weight"].data),
                      np.asarray(g.tensors[f"blk.{layer}.attn_k.weight"].data), rope_pairs)
        np.testing.assert_allclose(s_gg, s_hf, rtol=1e-4, atol=1e-4)
        assert not np.allclose(np.asarray(g.tensors[f"blk.{layer}.attn_q.weight"].data),
                               np.asarray(hf.tensors[f"model.layers.{layer}.self_attn.q_proj.weight"].data))


def test_qwen_is_not_permuted(model_files):
    hf = open_model(model_files.hf("qwen3"))
    g = open_model(model_files.gguf("qwen3", "f32"))
    np.testing.assert_array_equal(g.tensors["blk.0.attn_q.weight"].data,
                                  hf.tensors["model.layers.0.self_attn.q_proj.weight"].data)


def test_tensors_are_memory_mapped_read_only(model_files):
    g = open_model(model_files.gguf("llama", "q4_k_m"))
    for t in g.tensors.values():
        base = t.data
        while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
            base = base.base
        assert isinstance(base, np.memmap) or isinstance(t.data, np.memmap), t.name
        assert not t.data.flags.writeable


@pytest.mark.parametrize("progress", [None, False, True])
def test_load_progress_bar_only_when_large_or_asked(model_files, capsys, monkeypatch, progress):
    import realizar_jax.weights as weights
    src = open_model(model_files.gguf("qwen2_tied", "q8_0"))
    total = sum(t.nbytes for t in src.tensors.values())
    assert total < weights.PROGRESS_MIN_BYTES
    weights.build_params(src, "float32", progress=progress)
    err = capsys.readouterr().err
    assert (f"loading {src.path.name}" in err and "100%" in err) == bool(progress)
    assert err == "" or progress
    monkeypatch.setattr(weights, "PROGRESS_MIN_BYTES", total)  # a "large" file: shown unless refused
    weights.build_params(src, "float32", progress=progress)
    assert ("100%" in capsys.readouterr().err) == (progress is not False)
