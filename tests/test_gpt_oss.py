"""gpt-oss: a tiny random transformers GptOssForCausalLM (tests/fixtures.py "gptoss": 3 layers sliding / full /
sliding with a window of 5 under 21-token prompts, YaRN over an original context of 64 (factor 4, not
truncated), attention biases and sinks, 6 experts top-3 with biases, the clamped SwiGLU at a limit of 1.5
so that it bites).

Against transformers in float32 from f32 and bf16 safetensors; prefill + decode against the whole prompt;
greedy generation against transformers' generate; our GGUF (f32 reads back to the same weights; mxfp4_moe
against gguf-py's dequantization of the same file loaded into transformers); the ops' new features (the
router's top-k-then-softmax order, sinks in the decode kernel route, YaRN's frequencies); the bench shapes."""
from __future__ import annotations

import io
import json
import math
import shutil
from contextlib import redirect_stdout

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import realizar_jax as rj
from realizar_jax.config import RopeScaling
from realizar_jax.formats import open_model
from realizar_jax.formats.roles import roles_of, tensor_name
from realizar_jax.memory import parameter_count
from realizar_jax.ops import moe as moe_ops, routes
from realizar_jax.quant.qtensor import QTensor
from realizar_jax.weights import build_params

from model_helpers import hf_logits, max_rel, random_ids, rewrite_gguf

PROMPT = 21
VARIANT = "gptoss"


def _hf_model(folder, dtype=torch.float32, **config_changes):
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(folder)
    for k, v in config_changes.items():
        setattr(cfg, k, v)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, config=cfg, dtype=dtype,
                                                             attn_implementation="eager").eval()


# ---- against transformers -------------------------------------------------------------------------------

def test_logits_equal_transformers_and_the_features_bite(model_files):
    """Every position of a 21-token prompt against transformers float32. The fixture exercises what it should:
    layers alternate sliding / full with a window shorter than the prompt, the tokens choose different
    expert sets in every layer, the SwiGLU clamps cut some gate and up values, sinks are nonzero; turning
    the window, the sinks or YaRN's truncation off in transformers changes the logits."""
    folder = model_files.hf(VARIANT)
    m = rj.load(folder, dtype="float32")
    c = m.config
    assert c.architecture == "gptoss" and c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert c.sliding_window < PROMPT and c.rope_scaling.kind == "yarn" and not c.rope_scaling.truncate
    assert c.qkv_bias and c.attn_out_bias and c.attn_sinks and c.moe_bias and c.moe_router == "topk_softmax"
    ids = random_ids(PROMPT, c.vocab_size, 1)
    hf = _hf_model(folder)
    inputs, seen = {}, []
    hooks = [layer.mlp.experts.register_forward_pre_hook(lambda mod, args, i=i: inputs.update({i: args[0]}))
             for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_router_logits=True)
    for h in hooks:
        h.remove()
    ref = out.logits[0].double().numpy()
    assert max_rel(m.logits(ids), ref) <= 1e-4
    k, limit = c.experts_per_token, c.swiglu_limit
    for i, layer in enumerate(out.router_logits):
        chosen = torch.topk(layer.float(), k, dim=-1).indices
        assert len({tuple(sorted(row.tolist())) for row in chosen}) > 1
        assert 2 * len(set(chosen.flatten().tolist())) >= c.num_experts
        experts = hf.model.layers[i].mlp.experts
        gate_up = torch.einsum("nh,ehf->enf", inputs[i], experts.gate_up_proj) + experts.gate_up_proj_bias[:, None]
        seen.append(((gate_up[..., ::2] > limit).any() and (gate_up[..., 1::2].abs() > limit).any()).item())
    assert all(seen)
    assert all((layer.self_attn.sinks.abs() > 0.05).any() for layer in hf.model.layers)
    rope = dict(hf.config.rope_parameters)
    for change in (dict(sliding_window=1000), dict(rope_parameters={**rope, "truncate": True})):
        assert max_rel(hf_logits(_hf_model(folder, **change), ids), ref) > 1e-4, change
    no_sinks = _hf_model(folder)
    with torch.no_grad():
        for layer in no_sinks.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert max_rel(hf_logits(no_sinks, ids), ref) > 1e-3


def test_bf16_checkpoint(model_files):
    """A bfloat16 checkpoint: computed in float32 within 1e-4 of transformers float32 on the same file; computed
    in bfloat16 no further from that than transformers' own bfloat16 run is (near-tied experts may swap)."""
    folder = model_files.hf(VARIANT, dtype="bfloat16")
    ids = random_ids(PROMPT, 700, 3)
    ref = hf_logits(_hf_model(folder), ids)
    assert max_rel(rj.load(folder, dtype="float32").logits(ids), ref) <= 1e-4
    err = lambda x: np.linalg.norm(x - ref) / np.linalg.norm(ref)   # noqa: E731
    ours = err(np.asarray(rj.load(folder, dtype="bfloat16").logits(ids), np.float64))
    theirs = err(hf_logits(_hf_model(folder, torch.bfloat16), ids))
    assert ours <= max(1.5 * theirs, 2e-2), (ours, theirs)


def test_engine_greedy_equals_prefill_argmax_and_transformers(model_files):
    """On the serving engine, a 21-token prompt over prefill_chunk 16 (prefill, then extend past the window)
    then decode steps: each token is the argmax of the whole sequence's prefill logits at its position, and
    the tokens are transformers' greedy ones."""
    folder = model_files.hf(VARIANT)
    m = rj.load(folder, dtype="float32")
    ids = random_ids(PROMPT, m.config.vocab_size, 5)
    with m.engine(max_slots=1, prefill_chunk=16, decode_chunk=2) as e:
        got = list(e.submit(ids, max_tokens=6, ignore_eos=True).result(timeout=600).choices[0].token_ids)
    assert len(got) == 6
    full = np.asarray(m.logits(ids + got[:-1]))
    assert [int(full[len(ids) - 1 + j].argmax()) for j in range(6)] == got
    hf = _hf_model(folder)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert got == want.tolist()


# ---- GGUF ---------------------------------------------------------------------------------------------------

def test_gguf_f32_reads_back(model_files):
    """convert f32: llama.cpp's architecture name, keys and tensor names (each one of gguf-py's MODEL_TENSORS
    for gpt-oss), the experts split from HF's interleaved gate_up_proj into [experts, out, in] stacks, and
    the same config and weights pytree as the HF folder's."""
    hf, g = open_model(model_files.hf(VARIANT)), open_model(model_files.gguf(VARIANT, "f32"))
    assert g.config == hf.config
    c = hf.config
    reader = gguf.GGUFReader(model_files.gguf(VARIANT, "f32"))
    field = lambda k: reader.fields[k].contents()   # noqa: E731
    assert field("general.architecture") == "gpt-oss"
    assert (field("gpt-oss.expert_count"), field("gpt-oss.expert_used_count"),
            field("gpt-oss.expert_feed_forward_length"), field("gpt-oss.attention.sliding_window")) == (6, 3, 32, 5)
    assert field("gpt-oss.rope.scaling.type") == "yarn" and field("gpt-oss.rope.scaling.factor") == 4.0
    assert field("gpt-oss.rope.scaling.original_context_length") == 64
    names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT_OSS]}
    for t in reader.tensors:
        parts = t.name.rsplit(".", 1)[0].split(".")
        assert (".".join(["blk", "{bid}"] + parts[2:]) if parts[0] == "blk" else ".".join(parts)) in names, t.name
    shapes = {t.name: [int(d) for d in reversed(t.shape)] for t in reader.tensors}
    E, F, H = c.num_experts, c.expert_ffn, c.hidden_size
    assert shapes["blk.0.ffn_gate_exps.weight"] == [E, F, H] and shapes["blk.0.ffn_down_exps.weight"] == [E, H, F]
    assert shapes["blk.0.ffn_up_exps.bias"] == [E, F] and shapes["blk.2.attn_sinks.weight"] == [c.num_heads]
    st = hf.tensors   # our split against transformers' own reading of the fused tensor
    import safetensors.numpy
    raw = safetensors.numpy.load_file(str(model_files.hf(VARIANT) / "model.safetensors"))
    gate_up = raw["model.layers.1.mlp.experts.gate_up_proj"]
    np.testing.assert_array_equal(np.asarray(st["model.layers.1.mlp.experts.up_proj.weight"].data),
                                  gate_up[..., 1::2].swapaxes(1, 2))
    np.testing.assert_array_equal(np.asarray(g.tensors["blk.1.ffn_gate_exps.bias"].data),
                                  raw["model.layers.1.mlp.experts.gate_up_proj_bias"][:, ::2])
    a, b = build_params(hf, jnp.float32), build_params(g, jnp.float32)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


def _reference_from_gguf(path, folder):
    """transformers' GptOssForCausalLM whose weights are gguf-py's dequantization of the GGUF's tensors, the
    experts put back into HF's layout (gate and up interleaved and transposed): independent of our loader."""
    import safetensors.torch
    cfg = open_model(folder).config
    names = {tensor_name(r, "gguf", i, "gptoss"): (r, i) for r, role in roles_of("gptoss").items()
             for i in (range(cfg.num_layers) if role.per_layer else [None])}
    deq = {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        deq[names[t.name]] = w.reshape([int(d) for d in reversed(t.shape)])
    state = {}
    for (role, layer), w in deq.items():
        if role in ("experts_gate", "experts_up", "experts_gate_bias", "experts_up_bias"):
            continue
        L = f"model.layers.{layer}.mlp.experts."
        if role == "experts_down":
            state[L + "down_proj"] = w.swapaxes(1, 2)
        elif role == "experts_down_bias":
            state[L + "down_proj_bias"] = w
        else:
            state[tensor_name(role, "hf", layer, "gptoss")] = w
    for i in range(cfg.num_layers):
        L = f"model.layers.{i}.mlp.experts."
        gate, up = deq[("experts_gate", i)].swapaxes(1, 2), deq[("experts_up", i)].swapaxes(1, 2)   # [E, H, F]
        state[L + "gate_up_proj"] = np.stack([gate, up], axis=-1).reshape(*gate.shape[:2], -1)
        bg, bu = deq[("experts_gate_bias", i)], deq[("experts_up_bias", i)]
        state[L + "gate_up_proj_bias"] = np.stack([bg, bu], axis=-1).reshape(bg.shape[0], -1)
    tmp = path.parent / f"{path.stem}-reference"
    if not tmp.is_dir():
        shutil.copytree(folder, tmp)
        for f in tmp.glob("*.safetensors"):
            f.unlink()
        safetensors.torch.save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                                    str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return _hf_model(tmp)


def test_gguf_mxfp4_logits_equal_dequantized_reference(model_files):
    """Our mxfp4_moe file (llama-quantize's MXFP4_MOE, as gpt-oss GGUFs are: experts MXFP4, other matrices
    Q8_0, router, biases and sinks F32), its experts kept packed, against gguf-py's dequantization of the same
    file in transformers; the dense (CPU default) load equals the packed one."""
    path = model_files.gguf(VARIANT, "mxfp4_moe")
    types = {t.name: (t.tensor_type.name, len(t.shape)) for t in gguf.GGUFReader(path).tensors}
    assert {q for n, (q, d) in types.items() if n.endswith("_exps.weight")} == {"MXFP4"}
    assert {q for n, (q, d) in types.items() if d == 2 and n.endswith(".weight") and "_exps" not in n
            and "gate_inp" not in n} == {"Q8_0"}
    assert {q for n, (q, d) in types.items() if "gate_inp" in n or n.endswith(".bias") or "sinks" in n} == {"F32"}
    packed = rj.load(path, dtype="float32", dense_weights=False)
    lp = packed.params.layers[0]
    assert isinstance(lp.experts_gate, QTensor) and lp.experts_gate.qtype == "MXFP4"
    ids = random_ids(PROMPT, packed.config.vocab_size, 4)
    ours = packed.logits(ids)
    assert max_rel(ours, hf_logits(_reference_from_gguf(path, model_files.hf(VARIANT)), ids)) <= 1e-4
    assert max_rel(rj.load(path, dtype="float32").logits(ids), np.asarray(ours, np.float64)) <= 1e-5


def test_role_names_match_gguf_tensor_map():
    """Each per-layer role's HF name (the split experts' too, as llama.cpp's converter names them before
    mapping) maps through gguf-py's TensorNameMap for gpt-oss to our GGUF name."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, 3)
    for role, r in roles_of("gptoss").items():
        g, h = tensor_name(role, "gguf", 1, "gptoss"), tensor_name(role, "hf", 1, "gptoss")
        if r.per_layer and role != "attn_sinks":
            assert tmap.get_name(h, try_suffixes=(".weight", ".bias")) == g, role
    # the converter appends .weight to the sinks before mapping (GptOssModel.filter_tensors)
    assert tmap.get_name(tensor_name("attn_sinks", "hf", 1, "gptoss") + ".weight",
                         try_suffixes=(".weight",)) == tensor_name("attn_sinks", "gguf", 1, "gptoss")


def test_inspect_and_memory_count_every_tensor(model_files):
    from realizar_jax.cli.inspect import inspect_main
    for path in (model_files.hf(VARIANT), model_files.gguf(VARIANT, "mxfp4_moe")):
        out = io.StringIO()
        with redirect_stdout(out):
            assert inspect_main([str(path), "--json"]) == 0
        report = json.loads(out.getvalue())
        assert report["architecture"] == "gptoss" and all(t["role"] for t in report["tensors"])
        c = open_model(path).config
        assert parameter_count(c) == sum(math.prod(t["shape"]) for t in report["tensors"]) \
            == report["memory"]["parameters"]


# ---- the ops' features ----------------------------------------------------------------------------------------

def test_router_topk_then_softmax():
    """order="topk_softmax": the k largest logits and the softmax over them (transformers' GptOssTopKRouter)."""
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((7, 6)) * 3, jnp.float32)
    w, ids = moe_ops.route_experts(logits, 3, False, "topk_softmax")
    top, want_ids = torch.topk(torch.from_numpy(np.array(logits)), 3, dim=-1)
    np.testing.assert_array_equal(np.asarray(ids), want_ids.numpy())
    np.testing.assert_allclose(np.asarray(w), torch.softmax(top, -1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="order"):
        moe_ops.route_experts(logits, 3, False, "bogus")


def test_decode_kernel_route_declines_sinks():
    q = jnp.zeros((1, 4, 16), jnp.bfloat16)
    kv = jnp.zeros((1, 2, 16), jnp.bfloat16)
    cache = jnp.zeros((1, 1, 2, 8, 16), jnp.bfloat16)
    full = jnp.zeros((1, 16))
    with routes.using(routes.KernelConfig(pallas=True, interpret=True)):
        assert routes.decode_attention_kernel(q, kv, kv, cache, cache, jnp.zeros((1,), jnp.int32), full, full, 0.25,
                                              0, jnp.zeros((64, 64), jnp.bfloat16), None, sinks=jnp.zeros(4)) is None


@pytest.mark.parametrize("truncate,factor,beta", [(False, 32.0, (32.0, 1.0)), (True, 32.0, (32.0, 1.0)),
                                                  (True, 4.0, (8.0, 2.0))])
def test_yarn_frequencies_equal_transformers(truncate, factor, beta):
    """YaRN's inverse frequencies and attention factor, from a gpt-oss-20b-style config.json (transformers 4's
    rope_scaling form), against transformers' _compute_yarn_parameters."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from realizar_jax.formats.hf_dir import config_from_hf
    from realizar_jax.weights import rope_inv_freq
    raw = dict(model_type="gpt_oss", hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
               num_hidden_layers=4, intermediate_size=2880, vocab_size=201088, max_position_embeddings=131072,
               num_local_experts=32, num_experts_per_tok=4, sliding_window=128, rope_theta=150000,
               rope_scaling=dict(rope_type="yarn", factor=factor, beta_fast=beta[0], beta_slow=beta[1],
                                 truncate=truncate, original_max_position_embeddings=4096))
    c = config_from_hf(json.loads(json.dumps(raw)), __import__("pathlib").Path("."), {})
    ref = transformers.AutoConfig.for_model(**json.loads(json.dumps(raw)))
    inv, attention = ROPE_INIT_FUNCTIONS["yarn"](ref, "cpu")
    np.testing.assert_allclose(rope_inv_freq(c), inv.numpy(), rtol=1e-6)
    assert c.rope_scaling.attention_factor == pytest.approx(attention, rel=1e-7)
    assert [c.layer_type(i) for i in range(4)] == list(ref.layer_types)
    assert (c.num_experts, c.experts_per_token, c.expert_ffn, c.swiglu_limit, c.swiglu_alpha) == (32, 4, 2880, 7.0,
                                                                                                  1.702)
    with pytest.raises(ValueError, match="beta_fast"):
        RopeScaling("yarn", factor=4.0, beta_fast=float("nan"))


# ---- bench shapes ----------------------------------------------------------------------------------------------

def test_bench_shapes(tmp_path):
    """gpt-oss-20b's mxfp4_moe plan is ggml-org's file: MXFP4 experts, Q8_0 matrices, F32 vectors, ~12.1 GB;
    tiny-gpt-oss has its structure, reads back as its config and runs; the bench's bytes count only the active
    experts (their biases too) and its FLOPs experts_per_token experts per row."""
    from realizar_jax.cli.bench import decode_matmul_flops, decode_read_bytes
    from realizar_jax.cli.synth import SHAPES, plan_bytes, tensor_plan, write_synthetic_gguf
    from realizar_jax.weights import param_bytes
    big, small = SHAPES["gpt-oss-20b"], SHAPES["tiny-gpt-oss"]
    plan = tensor_plan(big, "mxfp4_moe")
    layer = lambda c: [(n.split(".", 2)[2], qt) for n, _, qt in tensor_plan(c, "mxfp4_moe") if n.startswith("blk.1.")]
    assert layer(small) == layer(big)
    assert {qt for n, _, qt in plan if "_exps.weight" in n} == {"MXFP4"}
    assert {qt for n, s, qt in plan if len(s) == 2 and "_exps" not in n and "gate_inp" not in n} == {"Q8_0"}
    D, q, kv, E, F, V = 2880, 64 * 64, 8 * 64, 32, 2880, 201088
    q8 = lambda n: n // 32 * 34   # noqa: E731
    per_layer = (q8(q * D) + 2 * q8(kv * D) + q8(D * q) + 3 * E * F * D // 32 * 17
                 + 4 * (2 * D + q + 2 * kv + D + 64 + E * D + E + E * (2 * F + D)))
    assert plan_bytes(plan) == 24 * per_layer + 2 * q8(V * D) + 4 * D
    assert 12.0e9 < plan_bytes(plan) < 12.2e9
    for field in ("architecture", "rope_scaling", "moe_router", "swiglu_limit", "attn_sinks", "moe_bias"):
        assert getattr(small, field) == getattr(big, field), field

    path = write_synthetic_gguf(tmp_path / "tiny-gpt-oss.gguf", "tiny-gpt-oss", "mxfp4_moe", seed=1)
    assert open_model(path).config == small
    m = rj.load(path, max_seq_len=64, dense_weights=False)
    logits = np.asarray(m.logits(list(range(3, 15))))   # 12 > the window of 4
    assert np.isfinite(logits).all() and 0.05 < logits.std() < 20
    p = m.params
    experts = sum(int(getattr(lp, r).nbytes) for lp in p.layers for r in ("experts_gate", "experts_up",
                  "experts_down", "experts_gate_bias", "experts_up_bias", "experts_down_bias"))
    rest = param_bytes(p) - experts
    emb = lambda b: param_bytes(p.embed) - param_bytes(p.embed) * b // small.vocab_size   # noqa: E731
    for b, active in ((1, 4), (3, 12), (32, 16)):
        assert decode_read_bytes(p, small, b) == rest - emb(b) + experts * active // 16, b
    D, Q, KV, E, F = 256, 8 * 64, 2 * 64, 16, 256
    dense = (2 * Q * D + 2 * KV * D + E * D) * small.num_layers + small.vocab_size * D
    assert decode_matmul_flops(p, 2, small) == 2 * 2 * (dense + 4 * 3 * F * D * small.num_layers)


# ---- OpenAI's MXFP4 checkpoints ------------------------------------------------------------------------------

def _openai_mxfp4(w):
    """w [experts, out, in] float32 -> OpenAI's (blocks uint8 [experts, out, in / 32, 16], scales uint8
    [experts, out, in / 32]): our MXFP4 quantizer's blocks (gguf-py's bits) in OpenAI's nibble order."""
    from realizar_jax.quant.quantize import quantize
    e, rows, cols = w.shape
    q = quantize(w.reshape(e * rows, cols), "MXFP4").reshape(e, rows, cols // 32, 17)
    scales, qs = q[..., 0], q[..., 1:]
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)   # ggml: value j low nibble, j + 16 high
    blocks = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
    return blocks, scales.copy(), q.reshape(e * rows, -1)


def test_openai_mxfp4_checkpoint(model_files, tmp_path):
    """A checkpoint in the published gpt-oss form (experts as U8 `_blocks` / `_scales`, not transposed, gate and
    up interleaved by rows): its experts load packed, bit-equal to llama.cpp's repacking (our quantizer's
    blocks), and the logits equal transformers' own dequantization of the blocks (convert_moe_packed_tensors)
    in float32; `convert --quant mxfp4_moe` writes the blocks as they are."""
    import safetensors.numpy
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    src = model_files.hf(VARIANT)
    raw = safetensors.numpy.load_file(str(src / "model.safetensors"))
    packed, dequantized, ggml = dict(raw), dict(raw), {}
    c = open_model(src).config
    for i in range(c.num_layers):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{i}.mlp.experts.{name}"
            blocks, scales, ggml[(i, name)] = _openai_mxfp4(raw.pop(key).swapaxes(1, 2))   # [E, out, in]
            del packed[key]
            packed[key + "_blocks"], packed[key + "_scales"] = blocks, scales
            dequantized[key] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                          dtype=torch.float32).numpy()
    folders = {}
    for kind, tensors in (("mxfp4", packed), ("reference", dequantized)):
        folders[kind] = tmp_path / kind
        shutil.copytree(src, folders[kind])
        safetensors.numpy.save_file(tensors, str(folders[kind] / "model.safetensors"), metadata={"format": "pt"})
    m = rj.load(folders["mxfp4"], dtype="float32", dense_weights=False)
    lp = m.params.layers[1]
    assert isinstance(lp.experts_up, QTensor) and lp.experts_up.qtype == "MXFP4"
    E, F = c.num_experts, c.expert_ffn
    gate_up = ggml[(1, "gate_up_proj")].reshape(E, 2 * F, -1)
    np.testing.assert_array_equal(np.asarray(lp.experts_up.data), gate_up[:, 1::2])
    np.testing.assert_array_equal(np.asarray(lp.experts_down.data),
                                  ggml[(1, "down_proj")].reshape(E, c.hidden_size, -1))
    ids = random_ids(PROMPT, c.vocab_size, 2)
    assert max_rel(m.logits(ids), hf_logits(_hf_model(folders["reference"]), ids)) <= 1e-4
    from realizar_jax.formats.gguf_writer import write_gguf
    out = write_gguf(folders["mxfp4"], tmp_path / "m.gguf", "mxfp4_moe", progress=False)
    t = {t.name: t for t in gguf.GGUFReader(out).tensors}["blk.1.ffn_up_exps.weight"]
    np.testing.assert_array_equal(np.asarray(t.data).reshape(E, F, -1), gate_up[:, 1::2])


def test_o200k_split_survives_gguf(model_files):
    """gpt-oss's tokenizer splits text with o200k's regex (case-split words, digits by three): our converter
    names it tokenizer.ggml.pre 'gpt-4o' (llama.cpp's name), and the GGUF's tokenizer encodes as the HF one."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, pre_tokenizers
    from realizar_jax.formats.gguf_tokenizer import GPT4O_REGEX, QWEN2_REGEX
    from realizar_jax.text.tokenizer import Tokenizer
    path = model_files.gguf(VARIANT, "mxfp4_moe")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "gpt-4o"
    hf = HFTokenizer.from_file(str(model_files.hf(VARIANT) / "tokenizer.json"))
    ours = Tokenizer.from_gguf_file(path)
    texts = ["HelloWorld and CamelCaseWords", "I'M sure they'LL say don't 1234567", "a/b//c\n\n  x\r\ny  ",
             "ÉCOLE élève ΑΒΓ αβγ 東京", "def f(x):\n    return x**2  # ok"]
    split = lambda regex, t: [w for w, _ in pre_tokenizers.Split(Regex(regex), "isolated").pre_tokenize_str(t)]
    assert split(GPT4O_REGEX, texts[0]) != split(QWEN2_REGEX, texts[0])   # the regex matters here
    for text in texts:
        assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids, text


def test_gguf_yarn_keys_checked_and_defaults(model_files, tmp_path):
    """A bad YaRN value names its GGUF key; without our truncate key a gpt-oss file is read untruncated (as
    transformers' gpt-oss computes it; llama.cpp always truncates)."""
    from realizar_jax.errors import DamagedFileError
    from realizar_jax.formats.gguf_file import REALIZAR_YARN_TRUNCATE
    src = model_files.gguf(VARIANT, "f32")
    bad = rewrite_gguf(src, tmp_path / "bad.gguf", {"gpt-oss.rope.scaling.yarn_beta_fast": -1.0})
    with pytest.raises(DamagedFileError, match="gpt-oss.rope.scaling.yarn_beta_fast"):
        open_model(bad)
    for truncate in (True, None):
        path = rewrite_gguf(src, tmp_path / f"t{truncate}.gguf", {REALIZAR_YARN_TRUNCATE: truncate})
        assert open_model(path).config.rope_scaling.truncate is bool(truncate)
