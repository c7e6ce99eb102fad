"""Synthetic GGUFs (real llama layout, Q4_K_M type mix) and the bench harness end to end on CPU."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realizar_jax.cli.bench import bench_main
from realizar_jax.cli.synth import SHAPES, random_blocks, tensor_plan, write_synthetic_gguf


@settings(max_examples=10, deadline=None)
@given(qtype=st.sampled_from(["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "BF16", "F16"]),
       rows=st.integers(1, 4), nsb=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_random_blocks_dequantize_finite(qtype, rows, nsb, seed):
    data = random_blocks(qtype, rows, nsb * 256, np.random.default_rng(seed))
    w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
    assert w.shape == (rows, nsb * 256) and np.isfinite(w).all()
    assert 1e-3 < np.abs(w).mean() < 0.2 and np.unique(w).size > 16   # not degenerate


def test_q4_k_m_mix_follows_llama_quantize():
    plan = {name: qt for name, _, qt in tensor_plan(SHAPES["llama3-8b"], "q4_k_m")}
    assert plan["token_embd.weight"] == "Q4_K" and plan["output.weight"] == "Q6_K"
    # llama-quantize use_more_bits for 32 layers: i < 4, i >= 28, or (i - 4) % 3 == 2
    more = [i for i in range(32) if plan[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if plan[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == more
    assert all(plan[f"blk.{i}.ffn_up.weight"] == "Q4_K" for i in range(32))
    tied = {name: qt for name, _, qt in tensor_plan(SHAPES["llama3.2-1b"], "q4_k_m")}
    assert tied["token_embd.weight"] == "Q6_K" and "output.weight" not in tied


def test_synthetic_gguf_reads_back(tmp_path):
    path = write_synthetic_gguf(tmp_path / "t.gguf", "tiny", "q4_k_m", seed=3)
    r = gguf.GGUFReader(path)
    shape = SHAPES["tiny"]
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.block_count"].contents() == shape.n_layer
    assert r.fields["llama.attention.head_count_kv"].contents() == shape.n_kv
    assert len(r.fields["tokenizer.ggml.tokens"].data) == shape.vocab
    plan = tensor_plan(shape, "q4_k_m")
    assert [t.name for t in r.tensors] == [p[0] for p in plan]
    for t, (_, shp, qt) in zip(r.tensors, plan):
        assert t.tensor_type.name == qt
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        assert w.shape == shp and np.isfinite(w).all()


@pytest.mark.parametrize("quant", ["q4_k_m", "bf16"])
def test_bench_end_to_end_on_tiny(tmp_path, quant, capsys):
    out = tmp_path / "r.json"
    rc = bench_main(["--shape", "tiny", "--quant", quant, "--prompt-len", "8", "--gen", "3",
                     "--dir", str(tmp_path), "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["prefill_finite"] and res["tokens_in_range"]
    for k in ("copy_GBps", "read_GBps", "load_s", "compile_s", "prefill_tok_s", "decode_tok_s", "decode_GBps",
              "decode_pct_read", "decode_floor_tok_s"):
        assert res[k] > 0, k
    assert 0.9 * res["file_bytes"] < res["weight_device_bytes"] < 1.1 * res["file_bytes"] + 3e6
    assert "decode tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("pages", [[], ["--page-size", "8"]], ids=["contiguous", "paged"])
def test_bench_several_batches_in_one_process(tmp_path, capsys, pages):
    """--batch 1,3 measures both on one load: one JSON result per batch (the first also at the top
    level), the matmul FLOPs per step proportional to the batch, one table row each; with --page-size
    the KV cache is paged."""
    out = tmp_path / "r.json"
    rc = bench_main(["--shape", "tiny", "--quant", "q8_0", "--prompt-len", "8", "--gen", "3", "--batch", "1,3",
                     "--dir", str(tmp_path), "--json", str(out), *pages])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["kv_page_size"] == (8 if pages else None)
    one, three = res["batches"]
    assert (one["batch"], three["batch"], res["batch"]) == (1, 3, 1)
    assert res["decode_tok_s"] == one["decode_tok_s"]
    assert three["decode_matmul_flops"] == 3 * one["decode_matmul_flops"] > 0
    for r in (one, three):
        assert r["decode_TFLOPs"] > 0 and r["tokens_in_range"] and r["prefill_finite"]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny-q8_0.gguf |")]
    assert [line.split(" | ")[1] for line in table] == ["1", "3"]


@pytest.mark.parametrize("batch", ["0", "1,x", "", "-2"])
def test_bench_rejects_bad_batch(batch, capsys):
    with pytest.raises(SystemExit):
        bench_main(["--shape", "tiny", "--batch", batch])
    assert "--batch" in capsys.readouterr().err


def test_bench_rejects_missing_model(tmp_path, capsys):
    assert bench_main(["--model", str(tmp_path / "nope.gguf")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_bench_ab_variants_and_profile(tmp_path, capsys):
    """--ab re-times the loaded model under another KernelConfig; --profile summarizes a trace. On a
    CPU pallas=true runs the decode attention kernel in interpret mode: the prefill (jnp on these
    unrepacked weights) gives the same logits, and decode still makes tokens in range."""
    out = tmp_path / "r.json"
    rc = bench_main(["--shape", "tiny", "--quant", "q4_k_m", "--prompt-len", "8", "--gen", "9",
                     "--dir", str(tmp_path), "--json", str(out), "--profile", str(tmp_path / "prof"),
                     "--ab", "pallas=true,int8_activations=false"])
    assert rc == 0
    res = json.loads(out.read_text())
    (v,) = res["variants"]
    assert "pallas=True" in v["kernels"] and "int8_activations=False" in v["kernels"]
    assert "error" not in v and v["decode_tok_s"] > 0 and v["tokens_in_range"]
    assert v["prefill_logits_rel_diff"] == 0.0
    for key in ("profile", "profile_prefill"):   # no GPU lines on CPU: the traces exist, top is empty
        assert res[key]["trace"].endswith(".trace.json.gz") and res[key]["busy_us_per_step"] == 0.0
    assert "pallas=true,int8_activations=false" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["FOO=1", "REALIZAR_GEMV_ACT=int8", "", "int8_activations=maybe",
                                  'tiles={"Q4_K": [1, 2'])
def test_bench_ab_rejects_bad_variant(spec, capsys):
    assert bench_main(["--shape", "tiny", "--ab", spec]) == 2
    assert "--ab" in capsys.readouterr().err
