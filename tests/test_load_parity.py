"""Whole-model logits through rj.load(), from files, against HF transformers in float32.

- HF folders (f32, bf16, sharded): equal to transformers on the same checkpoint.
- Our converted GGUF f32/f16: equal to transformers on the same (f16-rounded) weights.
- Quantized GGUF: equal to the dequantize-then-float32 reference: gguf-py's dequantization of every
  tensor of the file, loaded back into the HF model (llama Q/K permutation undone independently here),
  with the matrices packed (dequantized in each step); and dense_weights (dequantized once at load,
  the CPU default) equal to packed.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import realizar_jax as rj
from realizar_jax.formats.roles import GGUF_QK_PERMUTED_ARCHS, name_to_role, tensor_name

from fixtures import VARIANTS

ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen2_tied", "qwen3", "mqa")


def _hf_model(folder, dtype=torch.float32):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype,
                                                              attn_implementation="eager")
    return model.float().eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _ids(n, vocab, seed):
    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_folder_logits_equal_transformers(model_files, arch):
    folder = model_files.hf(arch)
    m = rj.load(folder, dtype="float32")
    ids = _ids(21, m.config.vocab_size, 1)
    assert _rel(m.logits(ids), _hf_logits(_hf_model(folder), ids)) <= 1e-4


@pytest.mark.parametrize("variant", [dict(dtype="bfloat16"), dict(shard_size="300KB")])
def test_bf16_and_sharded_checkpoints(model_files, variant):
    folder = model_files.hf("llama", **variant)
    m = rj.load(folder, dtype="float32")
    ids = _ids(17, m.config.vocab_size, 2)
    assert _rel(m.logits(ids), _hf_logits(_hf_model(folder), ids)) <= 1e-4


def _unpermute(w, n_head):
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reference_from_gguf(path, folder, arch):
    """HF model whose weights are gguf-py's dequantization of the GGUF's tensors (independent of our code)."""
    model = _hf_model(folder)
    cfg = model.config
    reader = gguf.GGUFReader(path)
    names = name_to_role("gguf", cfg.num_hidden_layers)
    state = {}
    for t in reader.tensors:
        role, layer = names[t.name]
        if role == "rope_freqs":  # HF derives llama3 scaling from config.json
            continue
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        if VARIANTS[arch]["arch"] in GGUF_QK_PERMUTED_ARCHS and role in ("wq", "wk"):
            w = _unpermute(w, cfg.num_attention_heads if role == "wq" else cfg.num_key_value_heads)
        state[tensor_name(role, "hf", layer)] = torch.from_numpy(w.reshape(-1) if w.ndim == 1 else w)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_converted_gguf_logits_equal_transformers(model_files, arch, quant):
    path = model_files.gguf(arch, quant)
    m = rj.load(path, dtype="float32")
    ids = _ids(19, m.config.vocab_size, 3)
    ref = _reference_from_gguf(path, model_files.hf(arch), arch)
    assert _rel(m.logits(ids), _hf_logits(ref, ids)) <= 1e-4


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "q4_k_m", "mxfp4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_gguf_equals_dequantized_reference(model_files, arch, quant):
    path = model_files.gguf(arch, quant)
    m = rj.load(path, dtype="float32", dense_weights=False)   # the packed path (a CPU would expand them)
    ids = _ids(19, m.config.vocab_size, 4)
    ref = _reference_from_gguf(path, model_files.hf(arch), arch)
    assert _rel(m.logits(ids), _hf_logits(ref, ids)) <= 2e-3


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m", "q5_k", "mxfp4"])
def test_dense_weights_equal_packed(model_files, quant):
    import jax
    from realizar_jax.quant.qtensor import QTensor
    path = model_files.gguf("qwen2_tied", quant)
    packed = rj.load(path, dtype="float32", dense_weights=False)
    dense = rj.load(path, dtype="float32")   # the CPU default: dequantized once, as the model is small
    assert dense.dense_weights and not packed.dense_weights
    is_q = lambda x: isinstance(x, QTensor)
    assert not any(map(is_q, jax.tree_util.tree_leaves(dense.params, is_leaf=is_q)))
    assert any(map(is_q, jax.tree_util.tree_leaves(packed.params, is_leaf=is_q)))
    assert dense.params.lm_head is dense.params.embed   # tied: one array
    ids = _ids(19, packed.config.vocab_size, 5)
    # the same weights either way; XLA may order the dot's sums differently for a fused dequantization
    assert _rel(dense.logits(ids), packed.logits(ids)) <= 1e-6
