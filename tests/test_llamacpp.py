"""Against llama.cpp itself (marked `llamacpp`: needs `pip install ".[llamacpp]"`, which builds llama.cpp).

- GGUFs quantized by llama.cpp's own llama-quantize load, inspect and compute the dequantize-then-f32
  reference logits (gguf-py dequantization loaded into HF transformers).
- Our logits are closer to that exact reference than llama.cpp's own logits are (it quantizes activations).
"""
from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest

import realizar_jax as rj
from realizar_jax.cli.inspect import inspect_main

from test_load_parity import _hf_logits, _reference_from_gguf

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def _llama_quantize(src, dst, kind):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"
    return dst


def _llama_cpp_logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_gpu_layers=0, verbose=False, seed=0)
    llm.eval(ids)
    return np.asarray(llm.scores[:len(ids)], dtype=np.float64)


@pytest.mark.parametrize("kind", list(FTYPES))
def test_llama_cpp_quantized_file_loads_and_beats_llama_cpp(model_files, tmp_path, kind, capsys):
    src = model_files.gguf("llama", "f32")
    path = _llama_quantize(src, tmp_path / f"llamacpp-{kind}.gguf", kind)

    assert inspect_main([str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["num_layers"] == 2
    qtypes = {t["qtype"] for t in info["tensors"]}
    assert kind.upper().removesuffix("_M") in qtypes, qtypes  # llama-quantize really wrote the requested type

    m = rj.load(path, dtype="float32")
    ids = [int(i) for i in np.random.default_rng(8).integers(3, m.config.vocab_size, 24)]
    ref = _hf_logits(_reference_from_gguf(path, model_files.hf("llama"), "llama"), ids)
    ours = m.logits(ids)
    theirs = _llama_cpp_logits(path, ids)
    scale = np.abs(ref).max()
    ours_err, theirs_err = np.abs(ours - ref).max() / scale, np.abs(theirs - ref).max() / scale
    print(f"{kind} ({','.join(sorted(qtypes))}): ours {ours_err:.2e}, llama.cpp {theirs_err:.2e}")
    assert ours_err <= 2e-3
    assert ours_err < theirs_err


@pytest.mark.parametrize("variant, quant", [("mixtral", "f32"), ("qwen3moe", "f32"), ("gptoss", "f32"),
                                            ("gptoss", "mxfp4_moe")])
def test_our_moe_conversion_loads_in_llama_cpp(model_files, variant, quant):
    """Our convert of a mixture of experts (Mixtral as 'llama' with expert_count and stacked ffn_*_exps,
    Qwen3-MoE as 'qwen3moe', gpt-oss as 'gpt-oss', its experts MXFP4 as llama-quantize writes them)
    loads in llama.cpp, whose logits are close to ours (a near-tie between two experts may resolve
    differently, so the bound is loose and the greedy tokens must mostly agree)."""
    path = model_files.gguf(variant, quant)
    m = rj.load(path, dtype="float32")
    ids = [int(i) for i in np.random.default_rng(9).integers(3, m.config.vocab_size, 21)]
    ours = np.asarray(m.logits(ids), np.float64)
    theirs = _llama_cpp_logits(path, ids)
    rel = np.abs(ours - theirs).max() / np.abs(ours).max()
    print(f"{variant} {quant}: llama.cpp vs ours {rel:.2e}")
    assert rel <= 5e-2 and np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= 0.9
