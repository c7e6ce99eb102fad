"""The converter: llama.cpp's metadata keys and tensor types, the llama-quantize Q4_K_M mix and
fallbacks, the tokenizer, atomic output, and the `convert` command."""
from __future__ import annotations

import importlib
import json

import gguf
import numpy as np
import pytest

from realizar_jax.cli.convert import convert_main
from realizar_jax.errors import ModelFormatError
from realizar_jax.formats import open_model
from realizar_jax.formats.gguf_writer import fit_qtype, plan_qtype, use_more_bits, write_gguf


def _fields(path):
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}, r


def test_llama_cpp_metadata(model_files):
    hf = model_files.hf("llama3")
    meta, reader = _fields(model_files.gguf("llama3", "q8_0"))
    cfg = json.loads((hf / "config.json").read_text())
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    expect = {"llama.block_count": cfg["num_hidden_layers"], "llama.context_length": cfg["max_position_embeddings"],
              "llama.embedding_length": cfg["hidden_size"], "llama.feed_forward_length": cfg["intermediate_size"],
              "llama.attention.head_count": cfg["num_attention_heads"],
              "llama.attention.head_count_kv": cfg["num_key_value_heads"],
              "llama.rope.dimension_count": cfg["head_dim"], "llama.vocab_size": cfg["vocab_size"]}
    for key, value in expect.items():
        assert meta[key] == value, key
    assert meta["llama.rope.freq_base"] == cfg["rope_parameters"]["rope_theta"]
    assert np.isclose(meta["llama.attention.layer_norm_rms_epsilon"], cfg["rms_norm_eps"])
    assert "llama.rope.scaling.type" not in meta  # llama.cpp asserts on unknown types; llama3 is the tensor
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(meta["tokenizer.ggml.merges"]) > 100
    assert meta["tokenizer.ggml.bos_token_id"] == vocab["<|begin_of_text|>"]
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert "{% for m in messages %}" in meta["tokenizer.chat_template"]


def test_qwen_metadata_and_no_rope_freqs(model_files):
    meta, reader = _fields(model_files.gguf("qwen3", "f16"))
    assert meta["general.architecture"] == "qwen3" and meta["qwen3.attention.key_length"] == 128
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert "general.quantization_version" not in meta
    assert meta["tokenizer.ggml.pre"] == "qwen2"
    names = {t.name for t in reader.tensors}
    assert "rope_freqs.weight" not in names and "blk.0.attn_q_norm.weight" in names


def test_mistral_is_written_as_llama(model_files):
    meta, _ = _fields(model_files.gguf("mistral", "f16"))
    assert meta["general.architecture"] == "llama" and "llama.block_count" in meta


def test_use_more_bits_matches_llama_cpp_7b():
    # Q4_K_M Llama-2-7B (32 layers): attn_v / ffn_down in Q6_K for these layers (llama-quantize output)
    q6 = {i for i in range(32) if use_more_bits(i, 32)}
    assert q6 == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    assert {i for i in range(2) if use_more_bits(i, 2)} == {1}


def test_q4_k_m_mix(model_files):
    g = open_model(model_files.gguf("llama", "q4_k_m"))
    q = {n: t.qtype for n, t in g.tensors.items()}
    assert q["output.weight"] == "Q6_K" and q["token_embd.weight"] == "Q4_K"
    assert q["blk.0.attn_v.weight"] == "Q4_K" and q["blk.1.attn_v.weight"] == "Q6_K"
    assert q["blk.0.ffn_down.weight"] == "Q4_K" and q["blk.1.ffn_down.weight"] == "Q6_K"
    assert {q[f"blk.{i}.{r}.weight"] for i in range(2) for r in ("attn_q", "attn_k", "attn_output", "ffn_gate",
                                                                   "ffn_up")} == {"Q4_K"}
    assert {t.qtype for t in g.tensors.values() if len(t.shape) == 1} == {"F32"}
    assert _fields(model_files.gguf("llama", "q4_k_m"))[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    # tied embeddings: token_embd is also the output, so it gets the output's Q6_K
    tied = open_model(model_files.gguf("qwen2_tied", "q4_k_m"))
    assert tied.tensors["token_embd.weight"].qtype == "Q6_K" and "output.weight" not in tied.tensors


def test_fallback_types():
    assert fit_qtype("Q4_K", 256) == "Q4_K" and fit_qtype("Q4_K", 64) == "Q5_0"
    assert fit_qtype("Q6_K", 160) == "Q8_0" and fit_qtype("Q8_0", 48) == "F16" and fit_qtype("Q4_K", 40) == "F16"
    assert plan_qtype("lm_head", None, (700, 64), "q4_k_m", 2, True) == "Q8_0"  # llama-quantize: nx % 256 -> Q8_0
    assert plan_qtype("attn_norm", 0, (64,), "q4_0", 2, True) == "F32"
    assert plan_qtype("wq", 0, (64, 64), "f32", 2, True) == "F32"
    with pytest.raises(ValueError):
        plan_qtype("wq", 0, (64, 64), "q3_k", 2, True)


def test_small_model_falls_back(model_files):
    g = open_model(model_files.gguf("small", "q4_k_m"))
    q = {n: t.qtype for n, t in g.tensors.items()}
    assert q["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K, 64-long rows
    assert q["blk.1.ffn_down.weight"] == "Q8_0"  # Q6_K, 160-long rows
    assert q["output.weight"] == "Q8_0"


@pytest.mark.parametrize("quant", ["q4_k", "q5_k", "q6_k", "q4_k_m"])
def test_k_quant_fallback_is_warned_once_per_tensor(model_files, tmp_path, caplog, quant):
    """Rows that are not whole 256-value super-blocks fall back to another type, as llama-quantize does, and
    each such tensor is named once with the type the file then holds (read back with gguf-py)."""
    caplog.set_level("WARNING", logger="realizar_jax.formats.gguf_writer")
    write_gguf(model_files.hf("small"), tmp_path / "small.gguf", quant, progress=False)
    held = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "small.gguf").tensors
            if len(t.shape) == 2}
    warned = [r.getMessage() for r in caplog.records if r.name == "realizar_jax.formats.gguf_writer"]
    assert len(warned) == len(held) == len({m.split(":")[0] for m in warned})
    for message in warned:
        name = message.split(":")[0]
        assert held[name] not in ("Q4_K", "Q5_K", "Q6_K") and message.endswith(f"writing it as {held[name]}")
    caplog.clear()
    write_gguf(model_files.hf("llama"), tmp_path / "fits.gguf", quant, progress=False)  # rows of 256 and 512
    assert [r for r in caplog.records if r.name == "realizar_jax.formats.gguf_writer"] == []


def test_mxfp4_through_the_cli(model_files, tmp_path):
    """--quant mxfp4: every matrix MXFP4 (rows that are not whole 32-value blocks fall back to F16), the
    file type llama.cpp gives MXFP4 files, and the bytes are our quantizer's (= gguf-py's) of the weights."""
    from realizar_jax.cli.main import main
    from realizar_jax.quant import quantize
    out = tmp_path / "m.gguf"
    assert main(["convert", "--quant", "MXFP4", "--no-progress", str(model_files.hf("llama")), str(out)]) == 0
    meta, reader = _fields(out)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    types = {t.name: (t.tensor_type.name, len(t.shape)) for t in reader.tensors}
    assert {q for q, ndim in types.values() if ndim == 2} == {"MXFP4"}
    assert {q for q, ndim in types.values() if ndim == 1} == {"F32"}
    up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    src = open_model(model_files.hf("llama"))
    w = np.asarray(src.tensors["model.layers.0.mlp.up_proj.weight"].data, np.float32)
    np.testing.assert_array_equal(np.asarray(up.data).reshape(w.shape[0], -1), quantize(w, "MXFP4"))
    np.testing.assert_array_equal(gq_dequantize(up), gguf.quants.dequantize(quantize(w, "MXFP4"), up.tensor_type))
    assert fit_qtype("MXFP4", 48) == "F16" and plan_qtype("wq", 0, (64, 64), "mxfp4", 2, True) == "MXFP4"
    # llama-quantize's MXFP4_MOE: expert stacks MXFP4, other matrices Q8_0, the router F32
    assert [plan_qtype(r, 0, shape, "mxfp4_moe", 2, True) for r, shape in
            [("experts_up", (4, 64, 256)), ("wq", (64, 64)), ("lm_head", (97, 64)), ("router", (4, 64))]] == \
        ["MXFP4", "Q8_0", "Q8_0", "F32"]


def gq_dequantize(t):
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)


def test_convert_is_atomic(model_files, tmp_path, monkeypatch):
    hf = model_files.hf("llama")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous contents")
    qmod = importlib.import_module("realizar_jax.quant.quantize")  # the package re-exports a function of that name
    real, calls = qmod.quantize, []

    def failing(x, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(x, qtype)

    monkeypatch.setattr(qmod, "quantize", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_gguf(hf, out, "q8_0", progress=False)
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temp file left behind
    monkeypatch.setattr(qmod, "quantize", real)
    write_gguf(hf, out, "q8_0", progress=False)
    assert open_model(out).tensors["blk.0.attn_q.weight"].qtype == "Q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_convert_main(model_files, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert convert_main([str(model_files.hf("qwen2")), str(out), "--quant", "Q4_0", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert open_model(out).tensors["blk.0.ffn_up.weight"].qtype == "Q4_0"
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "y.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err
    assert not (tmp_path / "y.gguf").exists()
    with pytest.raises(SystemExit):
        convert_main([str(model_files.hf("qwen2")), str(out), "--quant", "q2_k"])


def test_convert_refuses_invalid_folder(model_files, tmp_path):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(model_files.hf("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="missing"):
        write_gguf(folder, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_q5_k_through_the_cli(model_files, tmp_path, capsys):
    from realizar_jax.cli.main import main
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--help"])  # options before the positionals reach convert's own parser
    assert exit_.value.code == 0 and "q5_k" in capsys.readouterr().out
    out = tmp_path / "q5.gguf"
    assert main(["convert", "--quant", "q5_k", "--no-progress", str(model_files.hf("llama")), str(out)]) == 0
    meta, reader = _fields(out)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q5_K_S
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {types[f"blk.{i}.{r}.weight"] for i in range(2) for r in ("attn_q", "attn_v", "ffn_down")} == {"Q5_K"}
    assert {types["token_embd.weight"], types["output.weight"]} == {"Q5_K"}
