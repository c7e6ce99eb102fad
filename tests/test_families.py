"""The families beyond llama: OLMo 2, Phi-3 (Phi-3.5 longrope, Phi-4-mini partial RoPE), Gemma 2, Gemma 3 (text)
and Mistral's sliding window. Tiny random transformers models (tests/fixtures.py FAMILY_VARIANTS) with the
family's features switched on where they bite: windows of 5 under 21-token prompts, soft-capping caps below
the logits' size, alternating and local:global layers, longrope factors beyond an original context of 16.

Against transformers in float32: every position's logits from the HF folder, prefill + extend + step-by-step
decode, and the serving engine's greedy tokens (batched prefill, chunked prefill, decode) against
`generate`. The GGUF side: config and tensors read back from our converter's file, llama.cpp's metadata keys
and tensor names (gguf-py's tables), llama.cpp's defaults where its files say less than ours."""
from __future__ import annotations

import io
import json
import math
import shutil
from contextlib import redirect_stdout
from functools import partial

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import realizar_jax as rj
from realizar_jax import models
from realizar_jax.cache import init_cache
from realizar_jax.formats import open_model
from realizar_jax.formats.gguf_writer import permute_qk, plan_qtype
from realizar_jax.formats.roles import NORM_ROLES, NORM_SHIFT, roles_of, tensor_name
from realizar_jax.formats.validate import validate_roles
from realizar_jax.memory import estimate_memory, parameter_count
from realizar_jax.ops import routes
from realizar_jax.ops.attention import decode_attention_ref, extend_attention, prefill_attention
from realizar_jax.quant.quantize import quantize
from realizar_jax.weights import build_params

from fixtures import FAMILY_VARIANTS, VARIANTS
from model_helpers import hf_logits, max_rel, random_ids, rewrite_gguf

LONG = {"phi3_longrope", "phi4_mini"}   # loaded for a context of 64 > their original 16: long factors
PROMPT = 21
GGUF_ARCHS = {"olmo2": gguf.MODEL_ARCH.OLMO2, "phi3": gguf.MODEL_ARCH.PHI3, "gemma2": gguf.MODEL_ARCH.GEMMA2,
              "gemma3": gguf.MODEL_ARCH.GEMMA3, "mistral": gguf.MODEL_ARCH.LLAMA}


def _arch(variant):
    return VARIANTS[variant]["arch"]


def _hf_model(folder, **config_changes):
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(folder)
    for k, v in config_changes.items():
        setattr(cfg, k, v)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, config=cfg, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _load(folder, variant, **kw):
    return rj.load(folder, dtype="float32", max_seq_len=64 if variant in LONG else None, **kw)


# ---- the HF folder against transformers ---------------------------------------------------------------

@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_logits_equal_transformers(model_files, variant):
    """Every position of a 21-token prompt (Model.logits, the jitted prefill) against transformers."""
    folder = model_files.hf(variant)
    m = _load(folder, variant)
    ids = random_ids(PROMPT, m.config.vocab_size, 1)
    assert max_rel(m.logits(ids), hf_logits(_hf_model(folder), ids)) <= 1e-4


# gemma3: windows, the local RoPE table and q/k norms in extend and decode (the others: -m slow)
DECODE_DEFAULT = ("gemma3",)


@pytest.mark.parametrize("variant", [v if v in DECODE_DEFAULT else pytest.param(v, marks=pytest.mark.slow)
                                     for v in FAMILY_VARIANTS])
def test_prefill_extend_decode_equal_transformers(model_files, variant):
    """An 8-token prefill, an 8-token extend chunk and five one-token decode steps (all past the window of 5),
    each step's logits against transformers' at that position."""
    folder = model_files.hf(variant)
    m = _load(folder, variant)
    ids = random_ids(PROMPT, m.config.vocab_size, 1)
    ref = hf_logits(_hf_model(folder), ids)
    static = dict(config=m.config, dtype=jnp.float32)
    tokens = jnp.asarray([ids], jnp.int32)
    cache = init_cache(m.config, 1, 32, jnp.float32)
    _, cache = jax.jit(partial(models.prefill, **static))(m.params, cache, tokens[:, :8], jnp.asarray([8]))
    logits, cache = jax.jit(partial(models.extend, **static))(m.params, cache, tokens[:, 8:16], jnp.asarray([8]),
                                                              jnp.asarray([8]))
    assert max_rel(logits[0], ref[15]) <= 1e-4
    decode = jax.jit(partial(models.decode_logits, **static))
    for pos in range(16, PROMPT):
        logits, cache = decode(m.params, cache, tokens[:, pos])
        assert max_rel(logits[0], ref[pos]) <= 1e-4, pos
    assert int(cache.lengths[0]) == PROMPT


def test_longrope_short_factors_within_the_original_context(model_files):
    """Loaded for a context within the original 16, a Phi-3.5-style model uses the short factors (as transformers
    does for sequences that fit; loaded for 64 it uses the long ones, as test_logits_equal_transformers checks
    on a 21-token prompt, and as llama.cpp picks them by the context size)."""
    folder = model_files.hf("phi3_longrope")
    ids = random_ids(11, 700, 2)
    assert max_rel(rj.load(folder, dtype="float32", max_seq_len=16).logits(ids), hf_logits(_hf_model(folder), ids)) <= 1e-4


def test_bf16_checkpoint_equals_transformers(model_files):
    """A bfloat16 Gemma 2 checkpoint (norms stored as w of 1 + w) loaded in float32, against transformers'
    float32 reading of the same file."""
    folder = model_files.hf("gemma2", dtype="bfloat16")
    ids = random_ids(PROMPT, 700, 3)
    assert max_rel(rj.load(folder, dtype="float32").logits(ids), hf_logits(_hf_model(folder), ids)) <= 1e-4


ENGINE_SLOW = [pytest.param(v, True, marks=pytest.mark.slow) for v in FAMILY_VARIANTS]


@pytest.mark.parametrize("variant,batched", [("gemma3", False)] + ENGINE_SLOW)
def test_engine_greedy_tokens_equal_transformers_generate(model_files, variant, batched):
    """On the serving engine, a prompt longer than prefill_chunk 16 (extend in two chunks, past the window)
    then decode; batched (-m slow): with a 12-token one beside it, through the batched prefill and insert. The
    tokens of transformers' greedy generate. (The longrope models, loaded for 64, use their long factors: their
    prompts are all past the original 16.)"""
    folder = model_files.hf(variant)
    m = _load(folder, variant)
    hf = _hf_model(folder)
    hf.generation_config.eos_token_id = None   # ours ignore EOS: both run the full length
    prompts = [random_ids(PROMPT, m.config.vocab_size, 5)]
    if batched:
        prompts.append(random_ids(17 if variant in LONG else 12, m.config.vocab_size, 4))
    with m.engine(max_slots=len(prompts), prefill_chunk=16 if variant not in LONG else 32, decode_chunk=2) as e:
        handles = [e.submit(p, max_tokens=6, ignore_eos=True) for p in prompts]
        got = [list(h.result(timeout=600).choices[0].token_ids) for h in handles]
    for p, tokens in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(p):]
        assert tokens == ref.tolist()


# Config changes that switch one feature off in transformers: each must change the logits, or the test
# prompts would not exercise it.
FEATURES_OFF = {
    "gemma2": {"sliding window": dict(sliding_window=1000), "attention soft-capping": dict(attn_logit_softcapping=None),
               "final soft-capping": dict(final_logit_softcapping=None), "query_pre_attn_scalar": dict(
                   query_pre_attn_scalar=32)},
    "gemma3": {"sliding window": dict(sliding_window=1000), "final soft-capping": dict(final_logit_softcapping=None),
               "global layer": dict(layer_types=["sliding_attention"] * 3)},
    "phi3_swa": {"sliding window": dict(sliding_window=1000)},
    "mistral_swa": {"sliding window": dict(sliding_window=1000)},
}


@pytest.mark.parametrize("variant", sorted(FEATURES_OFF))
def test_fixture_features_bite(model_files, variant):
    folder = model_files.hf(variant)
    ids = random_ids(PROMPT, 700, 1)
    on = hf_logits(_hf_model(folder), ids)
    for what, change in FEATURES_OFF[variant].items():
        assert max_rel(hf_logits(_hf_model(folder, **change), ids), on) > 1e-3, what


def test_configs_from_config_json(model_files):
    c = {v: open_model(model_files.hf(v)).config for v in FAMILY_VARIANTS}
    assert c["olmo2"].qk_norm and c["olmo2"].sliding_window is None
    assert c["phi3"].sliding_window is None and c["phi3"].rope_scaling is None
    assert c["phi3_swa"].sliding_window == 5 and c["phi3_swa"].layer_types is None and c["phi3_swa"].window(2) == 5
    s = c["phi3_longrope"].rope_scaling
    assert s.kind == "longrope" and s.original_context_length == 16 and s.factor == 4.0
    assert s.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)), rel=1e-7)
    assert c["phi4_mini"].rope_dim == 12 and c["phi4_mini"].rotary_dim == 12 and c["phi4_mini"].tie_embeddings
    g2 = c["gemma2"]
    assert (g2.attn_softcap, g2.final_softcap, g2.query_pre_attn_scalar, g2.tie_embeddings) == (3.0, 3.0, 24.0, True)
    assert [g2.window(i) for i in range(2)] == [5, None] and g2.attn_scale == 24 ** -0.5
    g3 = c["gemma3"]
    assert [g3.window(i) for i in range(3)] == [5, 5, None] and g3.qk_norm and g3.attn_softcap is None
    assert g3.rope_local_theta == 1000.0 and g3.rope_theta == 50000.0 and g3.rope_scaling.factor == 4.0
    assert c["mistral_swa"].sliding_window == 5 and c["mistral_swa"].layer_types is None


# ---- GGUF: our converter's file, llama.cpp's names and keys ----------------------------------------------

def _expected_keys(config) -> dict:
    """The `{arch}.` keys beyond the llama block that llama.cpp's convert_hf_to_gguf.py writes (and ours)."""
    c, a = config, config.architecture
    keys = {}
    if a == "phi3":
        keys["attention.sliding_window"] = c.sliding_window or 0
        s = c.rope_scaling
        keys["rope.scaling.original_context_length"] = s.original_context_length if s else c.context_length
        if s is not None:
            keys["rope.scaling.attn_factor"] = pytest.approx(s.attention_factor, rel=1e-7)
    elif c.sliding_window is not None:
        keys["attention.sliding_window"] = c.sliding_window
    if a == "gemma2":
        keys.update({"attn_logit_softcapping": c.attn_softcap, "final_logit_softcapping": c.final_softcap})
    if a == "gemma3":
        keys.update({"final_logit_softcapping": c.final_softcap, "rope.freq_base_swa": c.rope_local_theta,
                     "rope.scaling.type": "linear", "rope.scaling.factor": c.rope_scaling.factor})
    keys["rope.dimension_count"] = c.rotary_dim
    return keys


def _hf_tensor(hf_source, role, layer):
    """The values the converter starts from: the HF tensor, plus Gemma's norm shift (Mistral's q/k rows in
    llama.cpp's order)."""
    c = hf_source.config
    x = np.asarray(hf_source.tensors[tensor_name(role, "hf", layer, c.architecture)].data, np.float32)
    if role in NORM_ROLES and c.architecture in NORM_SHIFT:
        x = x + np.float32(NORM_SHIFT[c.architecture])
    if c.architecture == "mistral" and role in ("wq", "wk"):
        x = permute_qk(x, c.num_heads if role == "wq" else c.num_kv_heads)
    return x


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_gguf_conversion_reads_back(model_files, variant):
    """convert f32: the same config, llama.cpp's architecture name, tensor names (each one of gguf-py's
    MODEL_TENSORS for the architecture) and metadata keys, every tensor equal to the HF one it came from, and
    the same weights pytree as the HF folder's."""
    hf_path, path = model_files.hf(variant), model_files.gguf(variant, "f32")
    hf, g = open_model(hf_path), open_model(path)
    want = hf.config.replace(architecture="llama") if hf.config.architecture == "mistral" else hf.config
    assert g.config == want
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    assert arch == gguf.MODEL_ARCH_NAMES[GGUF_ARCHS[_arch(variant)]]
    names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[GGUF_ARCHS[_arch(variant)]]}
    for t in reader.tensors:
        base = t.name.rsplit(".", 1)[0]
        parts = base.split(".")
        assert (".".join(["blk", "{bid}"] + parts[2:]) if parts[0] == "blk" else base) in names, t.name
    for key, value in _expected_keys(g.config).items():
        assert reader.fields[f"{arch}.{key}"].contents() == value, key
    for (role, layer), name in validate_roles(g).items():
        data = np.asarray(g.tensors[name].data, np.float32)
        if role in ("rope_factors_long", "rope_factors_short"):
            np.testing.assert_array_equal(data, np.float32(hf.config.rope_scaling.factors(role.endswith("long"))))
            continue
        np.testing.assert_array_equal(data, _hf_tensor(hf, role, layer))
    # and the model built from each is the same: every weight, the RoPE frequencies
    a, b = build_params(hf, jnp.float32), build_params(g, jnp.float32)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path_, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path_))


@pytest.mark.parametrize("variant", ["phi3", "gemma3"])
def test_quantized_gguf_tensors(model_files, variant):
    """q8_0: the fused Phi-3 tensors and Gemma's shifted norms, quantized from the values llama.cpp's converter
    starts from (1-D tensors stay F32)."""
    hf, path = open_model(model_files.hf(variant)), model_files.gguf(variant, "q8_0")
    g = open_model(path)
    qtypes = set()
    for (role, layer), name in validate_roles(g).items():
        t = g.tensors[name]
        qtypes.add(t.qtype)
        if t.qtype == "Q8_0":
            assert np.array_equal(t.data, quantize(_hf_tensor(hf, role, layer), "Q8_0")), name
        else:
            assert t.qtype == "F32" and len(t.shape) == 1, name
    assert qtypes == {"Q8_0", "F32"} and g.config == hf.config


def test_q4_k_m_plan_gives_fused_qkv_q5_k():
    """llama-quantize's Q4_K_M: attn_qkv gets Q5_K, the tied embedding (Phi-4-mini, Gemma) Q6_K."""
    assert plan_qtype("wqkv", 3, (768, 256), "q4_k_m", 8, has_output=True) == "Q5_K"
    assert plan_qtype("embed", None, (1000, 256), "q4_k_m", 8, has_output=False) == "Q6_K"
    assert plan_qtype("w_gate_up", 3, (1024, 256), "q4_k_m", 8, has_output=True) == "Q4_K"


@pytest.mark.parametrize("arch", ["olmo2", "phi3", "gemma2", "gemma3"])
def test_role_names_match_gguf_tensor_map(arch):
    """Each role's HF name maps, through gguf-py's TensorNameMap of the architecture (llama.cpp's converter
    table), to our GGUF name for it; each GGUF name is one of the architecture's MODEL_TENSORS."""
    tmap = gguf.get_tensor_name_map(GGUF_ARCHS[arch], 2)
    names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[GGUF_ARCHS[arch]]}
    for role, r in roles_of(arch).items():
        layer = 1 if r.per_layer else None
        g = tensor_name(role, "gguf", layer, arch)
        if g is not None:
            assert (r.gguf.rsplit(".", 1)[0].replace("{i}", "{bid}")) in names, role
        h = tensor_name(role, "hf", layer, arch)
        if h is not None and g is not None:
            assert tmap.get_name(h, try_suffixes=(".weight", ".bias")) == g, role


def test_gguf_without_our_keys_gets_llamacpp_defaults(model_files, tmp_path):
    """A Gemma file as llama.cpp's converter writes it (no sliding_window_pattern, no freq_base_swa, no
    realizar key) reads as llama.cpp runs it: every 2nd (Gemma 2) / 6th (Gemma 3) layer global, the local base
    10000, query_pre_attn_scalar = head_dim below the 27B sizes. A Phi-3 file without attn_factor: transformers'
    factor from the two contexts."""
    drop = {f"{a}.{k}" for a in ("gemma2", "gemma3", "phi3") for k in
            ("attention.sliding_window_pattern", "rope.freq_base_swa", "rope.scaling.attn_factor")}
    drop.add("realizar.attention.query_pre_attn_scalar")
    g2 = open_model(rewrite_gguf(model_files.gguf("gemma2", "f32"), tmp_path / "g2.gguf", drop=drop)).config
    assert [g2.window(i) for i in range(2)] == [5, None] and g2.query_pre_attn_scalar == 32.0
    g3 = open_model(rewrite_gguf(model_files.gguf("gemma3", "f32"), tmp_path / "g3.gguf", drop=drop)).config
    assert [g3.window(i) for i in range(3)] == [5] * 3 and g3.rope_local_theta == 10000.0
    p = open_model(rewrite_gguf(model_files.gguf("phi3_longrope", "f32"), tmp_path / "p.gguf", drop=drop)).config
    assert p.rope_scaling == open_model(model_files.hf("phi3_longrope")).config.rope_scaling


# ---- inspect, memory, chat ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["olmo2", "phi4_mini", "gemma2", "gemma3"])
def test_inspect_and_memory_estimate(model_files, variant):
    """`inspect --json` names every tensor's role (HF folder and GGUF); the estimate counts every weight."""
    from realizar_jax.cli.inspect import inspect_main
    for path in (model_files.hf(variant), model_files.gguf(variant, "f32")):
        out = io.StringIO()
        with redirect_stdout(out):
            assert inspect_main([str(path), "--json"]) == 0
        report = json.loads(out.getvalue())
        assert report["architecture"] == _arch(variant) and all(t["role"] for t in report["tensors"])
        src = open_model(path)
        weights = sum(math.prod(t.shape) for t in src.tensors.values() if not t.name.startswith("rope_factors"))
        assert parameter_count(src.config) == weights == report["memory"]["parameters"]
        c = src.config
        assert estimate_memory(c, 64).kv_cache == 2 * c.num_layers * 64 * c.num_kv_heads * c.head_dim * 2


# transformers model cards' chat templates (abridged where they only add tool handling)
TEMPLATES = {
    "gemma2": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
              "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
              "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
    "gemma3": "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}"
              "\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        "
              "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    "
              "{%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    "
              "{%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    "
              "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception("
              "\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    "
              "{%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n"
              "        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' "
              "+ (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        "
              "{{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        "
              "{%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n"
              "                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n"
              "                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    "
              "{%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    "
              "{{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    "
              "{{'<start_of_turn>model\n'}}\n{%- endif -%}\n",
    "phi3": "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
            "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
            "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
            "{% endif %}",
    "phi4_mini": "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
                 "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
                 "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
                 "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}",
    "olmo2": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + "
             "message['content'] + '\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + "
             "'\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n'  + "
             "message['content'] + eos_token + '\n' }}{% else %}{{ '<|assistant|>\n'  + message['content'] + "
             "eos_token }}{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}"
             "{% endif %}{% endfor %}",
}


@pytest.mark.parametrize("variant", sorted(TEMPLATES))
def test_chat_template_from_tokenizer_config(model_files, variant, tmp_path):
    """The family's chat template in tokenizer_config.json renders as transformers' apply_chat_template
    renders it, from the folder and from our GGUF of it."""
    import transformers
    folder = tmp_path / variant
    shutil.copytree(model_files.hf(variant), folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATES[variant]
    cfg_path.write_text(json.dumps(cfg))
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": " Hi! "},
                {"role": "user", "content": "Count to 3."}]
    if variant.startswith("gemma3") or variant.startswith("phi") or variant == "olmo2":
        messages = [{"role": "system", "content": "Be brief."}] + messages
    want = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    from realizar_jax.formats.gguf_writer import write_gguf
    gguf_path = write_gguf(folder, tmp_path / f"{variant}.gguf", "f32", progress=False)
    for path in (folder, gguf_path):
        assert _load(path, variant).apply_chat_template(messages) == want, path


@pytest.mark.slow
def test_chat_generates(model_files):
    m = _load(model_files.hf("gemma2"), "gemma2")
    m.tokenizer.chat_template = TEMPLATES["gemma2"]
    reply = m.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=3)
    assert isinstance(reply.text, str) and len(reply.tokens) <= 3


# ---- the attention references and the kernel route ----------------------------------------------------------

def _numpy_attention(q, k, v, scale, window, softcap):
    """Causal GQA attention over one prompt in float64: q [T, Hq, D], k/v [T, Hkv, D]."""
    t, hq, _ = q.shape
    rep = hq // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("thd,shd->hts", q, k) * scale
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    visible = (j <= i) & ((i - j < window) if window is not None else True)
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v)


T_MAX = 12


@partial(jax.jit, static_argnames=("windowed", "capped"))
def _three_ways(q, k, v, t, c, window, softcap, *, windowed, capped):
    """prefill over positions < t; extend of the chunk from position c over the cache; decode at position c."""
    w, cap = (window if windowed else None), (softcap if capped else None)
    pre = prefill_attention(q[None, :T_MAX], k[None], v[None], t[None], 0.3, w, cap)[0]
    kc, vc = k[None].swapaxes(1, 2), v[None].swapaxes(1, 2)   # the cache [1, Hkv, S, D]
    chunk = jax.lax.dynamic_slice_in_dim(q, c, T_MAX)[None]
    ext = extend_attention(chunk, kc, vc, c[None], (t - c)[None], 0.3, w, cap)[0]
    dec = decode_attention_ref(q[c][None], kc, vc, (c + 1)[None], 0.3, w, cap)[0]
    return pre, ext, dec


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31), t=st.integers(2, T_MAX), window=st.one_of(st.none(), st.integers(1, T_MAX + 2)),
       softcap=st.one_of(st.none(), st.floats(0.5, 8.0)), chunk=st.integers(1, T_MAX - 1))
def test_windowed_softcapped_attention_prefill_extend_decode(seed, t, window, softcap, chunk):
    """prefill, extend (the rest of the prompt as a chunk over the cache) and one-token decode agree with a
    float64 numpy reference, for windows shorter and longer than the prompt and caps that bite or not."""
    rng = np.random.default_rng(seed)
    hkv, hq, d = 2, 4, 8
    q = rng.standard_normal((2 * T_MAX, hq, d)) * 2
    k, v = rng.standard_normal((T_MAX, hkv, d)) * 2, rng.standard_normal((T_MAX, hkv, d))
    want = _numpy_attention(q[:t], k[:t], v[:t], 0.3, window, softcap)
    c = min(chunk, t - 1)
    f = partial(jnp.asarray, dtype=jnp.float32)
    pre, ext, dec = _three_ways(f(q), f(k), f(v), jnp.int32(t), jnp.int32(c), jnp.int32(window or 1),
                                jnp.float32(softcap or 1.0), windowed=window is not None, capped=softcap is not None)
    np.testing.assert_allclose(np.asarray(pre)[:t], want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ext)[:t - c], want[c:], atol=2e-5)
    np.testing.assert_allclose(np.asarray(dec), want[c], atol=2e-5)


def test_decode_kernel_route_declines_new_features():
    """The fused decode-attention kernel has no window, soft-cap or partial RoPE: its route hands those
    calls back to the reference (before touching the kernel)."""
    q = jnp.zeros((1, 4, 16), jnp.bfloat16)
    kv = jnp.zeros((1, 2, 16), jnp.bfloat16)
    cache = jnp.zeros((1, 1, 2, 8, 16), jnp.bfloat16)
    full, part = jnp.zeros((1, 16)), jnp.zeros((1, 12))
    args = lambda cs: (q, kv, kv, cache, cache, jnp.zeros((1,), jnp.int32), cs, cs, 0.25, 0)   # noqa: E731
    wo = jnp.zeros((64, 64), jnp.bfloat16)
    with routes.using(routes.KernelConfig(pallas=True, interpret=True)):
        assert routes.decode_attention_kernel(*args(full), wo, None, window=4) is None
        assert routes.decode_attention_kernel(*args(full), wo, None, softcap=50.0) is None
        assert routes.decode_attention_kernel(*args(part), wo, None) is None


def test_a_window_the_cache_cannot_exceed_goes_to_the_kernel(monkeypatch):
    """A window at least the cache's length never masks anything (Phi-3-mini's 2047 under a 2048 cache, Mistral's
    4096 under 4096): the decode-attention route is then asked without it, so the kernel can take the call;
    a shorter one is passed on (and declined there)."""
    import realizar_jax.ops.attention as attention
    from realizar_jax.ops.attention import DecodeAttention, Rope
    seen = []
    monkeypatch.setattr(attention, "route", lambda *a: lambda *args, window, softcap, sinks: seen.append(window))
    cache = init_cache(rj.ModelConfig("llama", 8, 8, 1, 2, 1, 4, 8), 1, 8, jnp.float32)
    att = DecodeAttention.start(cache, Rope(jnp.ones((2,))), 0.5)
    q, kv = jnp.ones((1, 2, 4)), jnp.ones((1, 1, 4))
    for window in (8, 100, 7, None):
        att(q, kv, kv, jnp.ones((8, 8)), window=window)   # the fake route returns None: the reference runs
    assert seen == [None, None, 7, None]


# config.json files as published (transformers 4 forms: rope_scaling, rope_local_base_freq, sliding_window_pattern;
# and transformers 5's nested rope_parameters), at real sizes
PUBLISHED = {
    "phi3-128k": dict(model_type="phi3", hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, intermediate_size=8192, vocab_size=32064, max_position_embeddings=131072,
                      original_max_position_embeddings=4096, rope_theta=10000.0, sliding_window=262144,
                      rope_scaling={"type": "longrope", "short_factor": [1.0 + i / 50 for i in range(48)],
                                    "long_factor": [1.0 + i for i in range(48)]}),
    "phi4-mini": dict(model_type="phi3", hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
                      num_hidden_layers=32, intermediate_size=8192, vocab_size=200064, max_position_embeddings=131072,
                      original_max_position_embeddings=4096, rope_theta=10000.0, partial_rotary_factor=0.75,
                      tie_word_embeddings=True, sliding_window=262144,
                      rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                    "long_factor": [1.0 + i / 3 for i in range(48)]}),
    "gemma2-2b": dict(model_type="gemma2", hidden_size=2304, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=256, num_hidden_layers=26, intermediate_size=9216, vocab_size=256000,
                      max_position_embeddings=8192, rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh",
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
                      sliding_window=4096),
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=256, num_hidden_layers=26, intermediate_size=6912, vocab_size=262144,
                      max_position_embeddings=32768, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                      sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256, rope_scaling=None,
                      final_logit_softcapping=None, attn_logit_softcapping=None),
    "gemma3-4b-text": dict(model_type="gemma3_text", hidden_size=2560, num_attention_heads=8, num_key_value_heads=4,
                           head_dim=256, num_hidden_layers=34, intermediate_size=10240, vocab_size=262208,
                           max_position_embeddings=131072, sliding_window=1024, query_pre_attn_scalar=256,
                           rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                               "rope_theta": 1000000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_json_forms_read_as_transformers_reads_them(name, tmp_path):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from realizar_jax.formats.hf_dir import config_from_hf
    from realizar_jax.weights import rope_inv_freq
    raw = PUBLISHED[name]
    c = config_from_hf(json.loads(json.dumps(raw)), tmp_path, {})
    ref = transformers.AutoConfig.for_model(**json.loads(json.dumps(raw)))
    layer_types = getattr(ref, "layer_types", None)
    if c.sliding_window is not None and layer_types is not None:
        assert [c.layer_type(i) for i in range(c.num_layers)] == list(layer_types)
    assert c.sliding_window == ref.sliding_window
    params = ref.rope_parameters.get("full_attention", ref.rope_parameters)
    kind = params["rope_type"]
    if kind == "default":
        assert c.rope_scaling is None
    else:   # transformers' inverse frequencies and attention factor (longrope: for a long sequence)
        kw = dict(layer_type="full_attention") if "full_attention" in ref.rope_parameters else {}
        inv, factor = ROPE_INIT_FUNCTIONS[kind](ref, "cpu", **({"seq_len": 10**6} if kind == "longrope" else {}), **kw)
        np.testing.assert_allclose(rope_inv_freq(c, long=True), inv.numpy(), rtol=1e-6)
        s = c.rope_scaling
        assert (s.attention_factor if s.kind == "longrope" else 1.0) == pytest.approx(factor, rel=1e-7)
    if c.rope_local_theta is not None:
        assert c.rope_local_theta == ref.rope_parameters["sliding_attention"]["rope_theta"]
    assert c.rotary_dim == int(c.head_dim * params.get("partial_rotary_factor", 1.0))
    assert c.attn_scale == pytest.approx(getattr(ref, "query_pre_attn_scalar", c.head_dim) ** -0.5)
    assert c.tie_embeddings == ref.tie_word_embeddings
    assert (c.attn_softcap, c.final_softcap) == (getattr(ref, "attn_logit_softcapping", None),
                                                 getattr(ref, "final_logit_softcapping", None))
    if name == "phi3-128k":   # Phi-3's older name of longrope (transformers 5.24 itself no longer reads it)
        su = json.loads(json.dumps(raw))
        su["rope_scaling"]["type"] = "su"
        assert config_from_hf(su, tmp_path, {}) == c
