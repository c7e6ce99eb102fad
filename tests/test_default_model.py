"""The embedded default model (realizar_jax/data/default.gguf) and the script that trains it.

- the shipped GGUF is a small, complete llama GGUF with its tokenizer (checked with gguf-py);
- default_model.json records the recipe and the measured numbers;
- the engine continues `def fibonacci(n):` with Python-looking text;
- scripts/train_default_model.py's JAX forward equals transformers' LlamaForCausalLM on its own
  HF export, and its tokenizer round-trips through transformers: this is what makes the export
  (and so the shipped model) trustworthy.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "realizar_jax" / "data"
GGUF_PATH = DATA / "default.gguf"
RECIPE_PATH = DATA / "default_model.json"


def _load_script():
    path = ROOT / "scripts" / "train_default_model.py"
    spec = importlib.util.spec_from_file_location("train_default_model", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reader():
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(str(GGUF_PATH))


@pytest.fixture(scope="module")
def recipe():
    return json.loads(RECIPE_PATH.read_text())


def _field(reader, key):
    f = reader.fields.get(key)
    assert f is not None, f"default.gguf lacks metadata key {key}"
    return f.contents()


def test_shipped_gguf_is_small_llama_with_tokenizer(reader, recipe):
    assert GGUF_PATH.stat().st_size < 16 * 10**6
    assert _field(reader, "general.architecture") == "llama"
    m = recipe["model"]
    assert _field(reader, "llama.block_count") == m["layers"]
    assert _field(reader, "llama.embedding_length") == m["dim"]
    assert _field(reader, "llama.feed_forward_length") == m["ffn"]
    assert _field(reader, "llama.attention.head_count") == m["heads"]
    assert _field(reader, "llama.attention.head_count_kv") == m["kv_heads"]
    assert _field(reader, "llama.context_length") == m["ctx"]
    # tokenizer: byte-level BPE with merges, bos/eos present and named as in the recipe
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == m["vocab"]
    assert len(_field(reader, "tokenizer.ggml.merges")) > m["vocab"] // 2
    assert tokens[_field(reader, "tokenizer.ggml.bos_token_id")] == "<|bos|>"
    assert tokens[_field(reader, "tokenizer.ggml.eos_token_id")] == "<|eos|>"
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert "messages" in _field(reader, "tokenizer.chat_template")


def test_shipped_gguf_tensors_are_q8_0_and_complete(reader, recipe):
    m = recipe["model"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down"]
    want = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(m["layers"]) for n in per_layer}
    assert set(types) == want  # tied embeddings: no output.weight
    for name, qt in types.items():
        assert qt == ("F32" if name.endswith("norm.weight") else "Q8_0"), name
    n_params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert n_params == recipe["params"]


def test_recipe_records_training_and_heldout_numbers(recipe):
    for key in ("data", "tokenizer", "model", "params", "steps", "seed", "device", "train_time_s",
                "final_train_loss", "heldout_loss", "heldout_ppl", "gguf_bytes", "gguf_sha256"):
        assert key in recipe, key
    assert 5e6 <= recipe["params"] <= 30e6
    assert recipe["heldout_ppl"] == pytest.approx(np.exp(recipe["heldout_loss"]), rel=1e-6)
    assert recipe["gguf_bytes"] == GGUF_PATH.stat().st_size
    # better than a unigram model of code by a wide margin (uniform would be ln 4096 = 8.3)
    assert recipe["heldout_loss"] < 3.0


def _engine():
    try:
        import realizar_jax as rj
        from realizar_jax import engine  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the engine is not ready
        pytest.skip(f"realizar_jax.engine is not importable yet: {e}")
    return rj


def test_default_model_writes_python():
    rj = _engine()
    m = rj.load(str(GGUF_PATH), dtype="float32")
    text = m.generate("def fibonacci(n):", max_new_tokens=40, temperature=0).text
    body = text.split("def fibonacci(n):", 1)[-1]
    assert re.search(r"\n(    |\t)\S", body) or "return" in body, repr(text)


# ------------------------------------------------- the training script's export vs transformers
@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    pytest.importorskip("optax")
    tdm = _load_script()
    out = tmp_path_factory.mktemp("tiny_hf")
    args = tdm.parse_args(["--out", str(out), "--max-files", "12", "--vocab", "384", "--dim", "64",
                           "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "96",
                           "--ctx", "32", "--batch", "4", "--steps", "3", "--warmup", "2",
                           "--eval-every", "1000", "--dtype", "float32"])
    log = tdm.run(args)
    return tdm, out, log


def _params_from_export(out: Path, layers: int) -> dict:
    from safetensors.numpy import load_file

    t = load_file(str(out / "model.safetensors"))
    params = {"embed": t["model.embed_tokens.weight"], "norm": t["model.norm.weight"], "layers": []}
    for i in range(layers):
        p = f"model.layers.{i}."
        layer = {n: t[p + f"self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        layer.update({n: t[p + f"mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")})
        layer["input_layernorm"] = t[p + "input_layernorm.weight"]
        layer["post_attention_layernorm"] = t[p + "post_attention_layernorm.weight"]
        params["layers"].append(layer)
    return params


_FORWARD = {}


def _jitted_forward(tdm):
    import jax
    return _FORWARD.setdefault(id(tdm), jax.jit(tdm.forward, static_argnums=(2,)))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_script_forward_matches_transformers(tiny_export, data):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tdm, out, log = tiny_export
    cfg = tdm.ModelCfg(**log["recipe"]["model"])
    assert log["recipe"]["steps"] == 3 and np.isfinite(log["final_train_loss"])
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    assert not hasattr(hf.config, "tie_word_embeddings") or hf.config.tie_word_embeddings
    length = data.draw(st.sampled_from([9, cfg.ctx]), label="length")  # two shapes: two compiles
    ids = np.array(data.draw(st.lists(st.integers(0, cfg.vocab - 1), min_size=2 * length,
                                      max_size=2 * length), label="ids")).reshape(2, length)
    ours = np.asarray(_jitted_forward(tdm)(_params_from_export(out, cfg.layers), ids, cfg))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=80))
def test_script_tokenizer_roundtrips_through_transformers(tiny_export, text):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    _, out, _ = tiny_export
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = hf_tok(text).input_ids
    assert ids == raw.encode(text).ids
    assert ids[0] == hf_tok.bos_token_id == raw.token_to_id("<|bos|>")
    assert raw.decode(ids, skip_special_tokens=True) == text  # byte-level BPE is lossless
