"""Synthetic GGUFs (real llama / qwen3moe / gemma3 layouts, Q4_K_M type mix) and the bench harness end to end
on CPU."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realizar_jax.cli.bench import bench_main
from realizar_jax.cli.synth import SHAPES, plan_bytes, random_blocks, tensor_plan, write_synthetic_gguf


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4", "BF16", "F16"])
@settings(max_examples=3, deadline=None)
@given(rows=st.integers(1, 4), nsb=st.integers(1, 3), seed=st.integers(0, 2**31))
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
    assert r.fields["llama.block_count"].contents() == shape.num_layers
    assert r.fields["llama.attention.head_count_kv"].contents() == shape.num_kv_heads
    assert len(r.fields["tokenizer.ggml.tokens"].data) == shape.vocab_size
    plan = tensor_plan(shape, "q4_k_m")
    assert [t.name for t in r.tensors] == [p[0] for p in plan]
    for t, (_, shp, qt) in zip(r.tensors, plan):
        assert t.tensor_type.name == qt
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        assert w.shape == shp and np.isfinite(w).all()


# llama-quantize's use_more_bits for 48 layers: i < 6, i >= 42, or (i - 6) % 3 == 2
_MORE_BITS_48 = [*range(6), *range(8, 42, 3), *range(42, 48)]
_BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}   # per 256 values


def _nbytes(qtype: str, n: int) -> int:
    return 4 * n if qtype == "F32" else n // 256 * _BLOCK_BYTES[qtype]


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "gemma3-12b"])
def test_big_shape_plans(name):
    """The real shapes' q4_k_m plans: tensor count, every type, and the total bytes worked out here from
    the published dimensions (Qwen3-30B-A3B Q4_K_M GGUFs are ~18.6 GB, Gemma 3 12B's ~7.3 GB)."""
    plan = tensor_plan(SHAPES[name], "q4_k_m")
    types = {n: qt for n, _, qt in plan}
    assert len(types) == len(plan)
    more = lambda i: "Q6_K" if i in _MORE_BITS_48 else "Q4_K"
    if name == "qwen3-30b-a3b":
        D, q, kv, E, F, V = 2048, 32 * 128, 4 * 128, 128, 768, 151936
        layer = {"attn_norm": ("F32", D), "attn_q": ("Q4_K", q * D), "attn_k": ("Q4_K", kv * D),
                 "attn_v": (None, kv * D), "attn_output": ("Q4_K", D * q), "attn_q_norm": ("F32", 128),
                 "attn_k_norm": ("F32", 128), "ffn_norm": ("F32", D), "ffn_gate_inp": ("F32", E * D),
                 "ffn_gate_exps": ("Q4_K", E * F * D), "ffn_up_exps": ("Q4_K", E * F * D),
                 "ffn_down_exps": (None, E * D * F)}
        top = {"token_embd": ("Q4_K", V * D), "output_norm": ("F32", D), "output": ("Q6_K", V * D)}
        more_bits = ("attn_v", "ffn_down_exps")
        assert [s for n, s, _ in plan if n == "blk.0.ffn_down_exps.weight"] == [(E, D, F)]
    else:
        D, q, kv, F, V = 3840, 16 * 256, 8 * 256, 15360, 262144
        layer = {"attn_norm": ("F32", D), "attn_q": ("Q4_K", q * D), "attn_k": ("Q4_K", kv * D),
                 "attn_v": (None, kv * D), "attn_output": ("Q4_K", D * q), "attn_q_norm": ("F32", 256),
                 "attn_k_norm": ("F32", 256), "post_attention_norm": ("F32", D), "ffn_norm": ("F32", D),
                 "post_ffw_norm": ("F32", D), "ffn_gate": ("Q4_K", F * D), "ffn_up": ("Q4_K", F * D),
                 "ffn_down": (None, D * F)}
        top = {"token_embd": ("Q6_K", V * D), "output_norm": ("F32", D)}   # tied: the embedding gets Q6_K
        more_bits = ("attn_v", "ffn_down")
    want, total = {}, 0
    for t, (qt, n) in top.items():
        want[f"{t}.weight"] = qt
        total += _nbytes(qt, n)
    for i in range(48):
        for t, (qt, n) in layer.items():
            qt = more(i) if t in more_bits else qt
            want[f"blk.{i}.{t}.weight"] = qt
            total += _nbytes(qt, n)
    assert types == want and len(plan) == len(top) + 48 * len(layer)
    assert plan_bytes(plan) == total


def _greedy(m, ids, steps):
    """Prefill `ids`, then `steps` greedy decode steps, as bench runs them (one jitted prefill and one
    decode step: cheaper to compile than generate()'s serving engine) -> (logits [1 + steps, V], tokens)."""
    import jax
    import jax.numpy as jnp
    from realizar_jax import models as M
    from realizar_jax.cache import init_cache
    c, k = m.config, m.kernels
    prefill = jax.jit(lambda p, cache, t, n: M.prefill(p, cache, t, n, config=c, kernels=k))
    decode = jax.jit(lambda p, cache, t: M.decode_logits(p, cache, t, config=c, kernels=k))
    cache = init_cache(c, 1, 32, jnp.float32)
    logits, cache = prefill(m.params, cache, jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32))
    rows, tokens = [logits], []
    for _ in range(steps):
        tokens.append(int(jnp.argmax(rows[-1][0])))
        logits, cache = decode(m.params, cache, jnp.asarray(tokens[-1:], jnp.int32))
        rows.append(logits)
    tokens.append(int(jnp.argmax(rows[-1][0])))
    return np.concatenate([np.asarray(r) for r in rows]), tokens


@pytest.mark.parametrize("tiny,big", [("tiny-moe", "qwen3-30b-a3b"), ("tiny-gemma3", "gemma3-12b")])
def test_tiny_shapes_load_inspect_and_generate(tmp_path, tiny, big, capsys):
    """The tiny shapes have their big shape's structure (tensors of a layer, types, features); written,
    they read back as their ModelConfig, `inspect` reads them, and load() + a greedy prefill/decode run them."""
    import realizar_jax as rj
    from realizar_jax.cli.inspect import inspect_main
    from realizar_jax.formats import open_model
    small, large = SHAPES[tiny], SHAPES[big]
    for field in ("architecture", "tie_embeddings", "qk_norm", "norm_topk_prob", "rope_scaling"):
        assert getattr(small, field) == getattr(large, field), field
    assert small.q_size != small.hidden_size and large.q_size != large.hidden_size
    last = lambda c: [(n.split(".", 2)[2], s[-1] % 256, qt) for n, s, qt in tensor_plan(c, "q4_k_m")
                      if n.startswith(f"blk.{c.num_layers - 1}.")]   # a use_more_bits layer in both
    assert last(small) == last(large)
    if small.layer_types:   # 5 local : 1 global
        assert small.layer_types == large.layer_types[:6] and small.sliding_window < 12

    path = write_synthetic_gguf(tmp_path / f"{tiny}.gguf", tiny, "q4_k_m", seed=1)
    assert open_model(path).config == small
    assert inspect_main([str(path), "--json", "--max-seq-len", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == small.architecture
    assert len(report["tensors"]) == len(tensor_plan(small, "q4_k_m"))

    m = rj.load(path, max_seq_len=64)
    logits, tokens = _greedy(m, list(range(3, 15)), steps=3)   # 12 > tiny-gemma3's window of 4
    assert logits.shape == (4, small.vocab_size) and np.isfinite(logits).all()
    assert 0.05 < logits.std() < 20   # O(1) activations: neither vanishing nor blown up
    assert all(0 <= t < small.vocab_size for t in tokens)
    if small.moe:   # the bench's bandwidth figure reads only the active experts; the rest all of it
        from realizar_jax.cli.bench import decode_matmul_flops, decode_read_bytes
        from realizar_jax.weights import param_bytes
        p = m.params
        experts = sum(int(getattr(lp, r).nbytes) for lp in p.layers
                      for r in ("experts_gate", "experts_up", "experts_down"))
        rest = param_bytes(p) - experts
        emb = lambda b: param_bytes(p.embed) - param_bytes(p.embed) * b // small.vocab_size
        for b, active in ((1, 4), (3, 12), (4, 16), (32, 16)):   # 4 of 16 experts per token, at most all
            assert decode_read_bytes(p, small, b) == rest - emb(b) + experts * active // 16, b
        E, F, D = 16, 256, 256
        dense = sum(2 * n * k for n, k in ((512, D), (256, D), (256, D), (D, 512), (E, D))) * small.num_layers
        dense += 2 * small.vocab_size * D
        assert decode_matmul_flops(p, 2, small) == 2 * (dense + 4 * 3 * 2 * F * D * small.num_layers)


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
                     "--batch", "1,2",
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
    assert "decode_b2" in res["batches"][1]["profile"]["trace"]   # every batch's decode is traced
    assert "pallas=true,int8_activations=false" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["FOO=1", "REALIZAR_GEMV_ACT=int8", "", "int8_activations=maybe",
                                  'tiles={"Q4_K": [1, 2'])
def test_bench_ab_rejects_bad_variant(spec, capsys):
    assert bench_main(["--shape", "tiny", "--ab", spec]) == 2
    assert "--ab" in capsys.readouterr().err
