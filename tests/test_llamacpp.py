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

from fixtures import YARN_ROPE
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


# llama.cpp fixes gpt-oss's SwiGLU limit at 7 and always truncates YaRN's ramp: the fixture as llama.cpp runs it
GPTOSS_AS_LLAMACPP = dict(extra=dict(num_local_experts=6, num_experts_per_tok=3, sliding_window=5, swiglu_limit=7.0),
                          rope_scaling={**YARN_ROPE, "truncate": True})


@pytest.mark.parametrize("variant", ["mixtral", "qwen3moe", "gptoss"])
def test_our_moe_conversion_loads_in_llama_cpp(model_files, variant):
    """Our convert of a mixture of experts (Mixtral as 'llama' with expert_count and stacked ffn_*_exps,
    Qwen3-MoE as 'qwen3moe', gpt-oss as 'gpt-oss' with its sinks, biases and YaRN keys) loads in
    llama.cpp, whose logits are close to ours (a near-tie between two experts may resolve differently, so
    the bound is loose and the greedy tokens must mostly agree)."""
    quant = "f32"
    path = model_files.gguf(variant, quant, **(GPTOSS_AS_LLAMACPP if variant == "gptoss" else {}))
    m = rj.load(path, dtype="float32")
    ids = [int(i) for i in np.random.default_rng(9).integers(3, m.config.vocab_size, 21)]
    ours = np.asarray(m.logits(ids), np.float64)
    theirs = _llama_cpp_logits(path, ids)
    rel = np.abs(ours - theirs).max() / np.abs(ours).max()
    print(f"{variant} {quant}: llama.cpp vs ours {rel:.2e}")
    assert rel <= 5e-2 and np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= 0.9


def test_gpt_oss_mxfp4_file_beats_llama_cpp(model_files):
    """Our mxfp4_moe gpt-oss file (MXFP4 experts, Q8_0 matrices, as ggml-org's gpt-oss GGUFs) loads in
    llama.cpp; against the dequantize-then-float32 reference (gguf-py's dequantization in transformers)
    our logits are within 2e-3 and closer than llama.cpp's, which quantizes activations."""
    from test_gpt_oss import _reference_from_gguf as gpt_oss_reference
    from model_helpers import hf_logits
    path = model_files.gguf("gptoss", "mxfp4_moe", **GPTOSS_AS_LLAMACPP)
    m = rj.load(path, dtype="float32")
    ids = [int(i) for i in np.random.default_rng(10).integers(3, m.config.vocab_size, 21)]
    ref = hf_logits(gpt_oss_reference(path, model_files.hf("gptoss", **GPTOSS_AS_LLAMACPP)), ids)
    ours, theirs = np.asarray(m.logits(ids), np.float64), _llama_cpp_logits(path, ids)
    scale = np.abs(ref).max()
    ours_err, theirs_err = np.abs(ours - ref).max() / scale, np.abs(theirs - ref).max() / scale
    print(f"gpt-oss mxfp4_moe: ours {ours_err:.2e}, llama.cpp {theirs_err:.2e}")
    assert ours_err <= 2e-3 and ours_err < theirs_err
