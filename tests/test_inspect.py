"""`realizar-jax inspect`: the --json report, the tables, and one-line errors for damaged files."""
from __future__ import annotations

import json
import subprocess
import sys

import gguf
import pytest

from realizar_jax.formats import open_model
from realizar_jax.cli.inspect import inspect_main
from realizar_jax.memory import estimate_memory, weight_bytes_of


@pytest.mark.parametrize("variant,quant", [("qwen3", "q4_k_m"), ("qwen2_tied", None)])
def test_json_report(model_files, capsys, variant, quant):
    path = model_files.gguf(variant, quant) if quant else model_files.hf(variant)
    assert inspect_main([str(path), "--json", "--max-seq-len", "256"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # exactly one JSON object
    src = open_model(path)
    c = src.config
    assert report["architecture"] == variant.split("_")[0]
    assert (report["num_layers"], report["num_heads"], report["num_kv_heads"], report["head_dim"],
            report["hidden_size"], report["vocab_size"]) == (2, 4, 2, c.head_dim, 256, c.vocab_size)
    assert report["config"]["tie_embeddings"] == c.tie_embeddings
    est = estimate_memory(c, 256, 1, "bfloat16", weight_bytes=weight_bytes_of(src, "bfloat16"))
    assert report["memory"]["total"] == est.total and report["memory"]["kv_cache"] == 2 * 2 * 256 * 2 * c.head_dim * 2
    if quant:   # what load() holds on a CPU: the matrices dequantized
        dense = weight_bytes_of(src, "bfloat16", dequantized=True)
        assert report["memory"]["dequantized"] == {"weights": dense, "total": est.total - est.weights + dense,
                                                   "within_limit": True}
    else:
        assert "dequantized" not in report["memory"]
    tensors = {t["name"]: t for t in report["tensors"]}
    if quant:  # compare with gguf-py's own reading of the file
        for rt in gguf.GGUFReader(path).tensors:
            t = tensors.pop(rt.name)
            assert t["qtype"] == rt.tensor_type.name and t["nbytes"] == rt.n_bytes
            assert t["shape"] == [int(d) for d in reversed(rt.shape.tolist())]
        assert not tensors
        assert report["tensors"][0]["name"] == "token_embd.weight"
        v = next(t for t in report["tensors"] if t["name"] == "blk.1.attn_v.weight")
        assert (v["role"], v["layer"], v["qtype"]) == ("wv", 1, "Q6_K")
    else:
        assert tensors["model.layers.0.self_attn.q_proj.bias"]["role"] == "bq"
        assert tensors["model.embed_tokens.weight"]["layer"] is None
        assert "lm_head.weight" not in tensors


def test_mxfp4_sizes(model_files, capsys):
    """17 bytes per 32 values, as gguf-py reads the file, in the report and in the memory estimate."""
    path = model_files.gguf("llama", "mxfp4")
    assert inspect_main([str(path), "--json", "--max-seq-len", "128"]) == 0
    report = json.loads(capsys.readouterr().out)
    tensors = {t["name"]: t for t in report["tensors"]}
    n_mxfp4 = 0
    for rt in gguf.GGUFReader(path).tensors:
        t = tensors[rt.name]
        assert t["qtype"] == rt.tensor_type.name and t["nbytes"] == rt.n_bytes
        if t["qtype"] == "MXFP4":
            n_mxfp4 += 1
            assert t["nbytes"] == t["shape"][0] * t["shape"][1] // 32 * 17
    assert n_mxfp4 == 2 + 7 * 2   # token_embd, output and the 7 matrices of each of 2 layers
    src = open_model(path)
    assert report["memory"]["weights"] == weight_bytes_of(src, "bfloat16") == sum(
        t["nbytes"] if t["qtype"] == "MXFP4" else t["shape"][0] * (t["shape"][1:] or [1])[0] * 2
        for t in report["tensors"])
    assert report["memory"]["dequantized"]["weights"] == 2 * sum(
        t["shape"][0] * (t["shape"][1:] or [1])[0] for t in report["tensors"])


def test_table_output(model_files, capsys):
    assert inspect_main([str(model_files.gguf("llama", "q4_k_m"))]) == 0
    out = capsys.readouterr().out
    assert "tensors by role" in out and "blk.{i}.attn_v.weight" in out and "Q4_K,Q6_K" in out
    assert "memory for max_seq_len=512" in out and "load() dequantizes the quantized matrices" in out


def test_damaged_input_one_line_error(model_files, tmp_path, capsys):
    good = model_files.gguf("llama", "q8_0").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[: len(good) // 2])
    for path in (bad, tmp_path / "missing.gguf"):
        assert inspect_main([str(path), "--json"]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and str(path) in captured.err
        assert "Traceback" not in captured.err


def test_module_entry_point(model_files, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    ok = subprocess.run([sys.executable, "-m", "realizar_jax.cli.inspect", str(model_files.hf("mqa")), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["num_kv_heads"] == 1
    r = subprocess.run([sys.executable, "-m", "realizar_jax.cli.inspect", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "more than" in r.stderr
