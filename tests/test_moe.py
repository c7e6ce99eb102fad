"""Mixtures of experts: Mixtral and Qwen3-MoE (tests/fixtures.py MOE_VARIANTS: tiny random transformers models with
4-8 experts, so a 21-token prompt spreads over all of them; qwen3moe_raw keeps transformers' default
norm_topk_prob=false, top-3).

Against transformers in float32 (from f32 and bf16 safetensors), prefill + extend + decode against the whole
prompt, the two formulations of ops.moe (gathered, grouped) against numpy on dense and packed experts, the
router against a numpy reference (ties, renormalization), our GGUF conversion (llama.cpp's names and keys,
read back by gguf-py, logits against gguf-py's dequantization loaded into transformers), the errors of bad
MoE files, inspect and the memory estimate."""
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
from realizar_jax.errors import MissingTensorError, ModelFormatError, ShapeMismatchError
from realizar_jax.formats import open_model
from realizar_jax.formats.gguf_writer import permute_qk
from realizar_jax.formats.roles import EXPERT_ROLES, GGUF_QK_PERMUTED_ARCHS, roles_of, tensor_name
from realizar_jax.formats.validate import validate_roles
from realizar_jax.layers import swiglu
from realizar_jax.memory import parameter_count
from realizar_jax.ops import moe as moe_ops
from realizar_jax.quant.qtensor import QTensor
from realizar_jax.quant.quantize import quantize
from realizar_jax.weights import build_params

from fixtures import VARIANTS
from model_helpers import hf_logits, max_rel, random_ids, rewrite_gguf

PROMPT = 21
slow = partial(pytest.param, marks=pytest.mark.slow)   # -m slow: the rest of the grid
GGUF_ARCHS = {"mixtral": gguf.MODEL_ARCH.LLAMA, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}


def _arch(variant):
    return VARIANTS[variant]["arch"]


def _hf_model(folder, dtype=torch.float32):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


# ---- against transformers -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["mixtral", "qwen3moe", slow("qwen3moe_raw")])
def test_logits_equal_transformers_and_tokens_pick_different_experts(model_files, variant):
    """Every position of a 21-token prompt against transformers; in every layer the tokens choose different
    expert sets, and at least half the experts are chosen by some token."""
    folder = model_files.hf(variant)
    m = rj.load(folder, dtype="float32")
    ids = random_ids(PROMPT, m.config.vocab_size, 1)
    hf = _hf_model(folder)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_router_logits=True)
    assert max_rel(m.logits(ids), out.logits[0].double().numpy()) <= 1e-4
    k = m.config.experts_per_token
    for layer in out.router_logits:
        chosen = torch.topk(layer.float().softmax(-1), k, dim=-1).indices
        assert len({tuple(sorted(row.tolist())) for row in chosen}) > 1
        assert 2 * len(set(chosen.flatten().tolist())) >= m.config.num_experts


@pytest.mark.parametrize("variant", [slow("mixtral"), "qwen3moe"])
def test_bf16_checkpoint(model_files, variant):
    """A bfloat16 checkpoint computed in bfloat16 is no further from transformers' float32 run than transformers'
    own bfloat16 run is (a token whose two best experts are near a tie may swap one in bfloat16, in either
    engine, so a fixed bound would test luck)."""
    folder = model_files.hf(variant, dtype="bfloat16")
    ids = random_ids(PROMPT, 700, 3)
    ref = hf_logits(_hf_model(folder), ids)
    err = lambda x: np.linalg.norm(x - ref) / np.linalg.norm(ref)   # noqa: E731
    ours = err(np.asarray(rj.load(folder, dtype="bfloat16").logits(ids), np.float64))
    theirs = err(hf_logits(_hf_model(folder, torch.bfloat16), ids))
    assert ours <= max(1.5 * theirs, 2e-2), (ours, theirs)


@pytest.mark.parametrize("variant", [slow("mixtral"), "qwen3moe_raw", "gptoss"])
def test_prefill_decode_equal_the_whole_prompt(model_files, variant):
    """A 16-token prefill (the grouped formulation) and five one-token decode steps (the gathered one) equal the
    whole prompt's prefill at each position, and transformers (gpt-oss: the sliding window and the sinks on
    the decode path too)."""
    folder = model_files.hf(variant)
    m = rj.load(folder, dtype="float32")
    ids = random_ids(PROMPT, m.config.vocab_size, 1)
    ref = hf_logits(_hf_model(folder), ids)
    whole = np.asarray(m.logits(ids), np.float64)
    assert max_rel(whole, ref) <= 1e-4
    static = dict(config=m.config, dtype=jnp.float32)
    tokens = jnp.asarray([ids], jnp.int32)
    cache = init_cache(m.config, 1, 32, jnp.float32)
    logits, cache = jax.jit(partial(models.prefill, **static))(m.params, cache, tokens[:, :16], jnp.asarray([16]))
    assert max_rel(logits[0], whole[15]) <= 1e-5
    decode = jax.jit(partial(models.decode_logits, **static))
    for pos in range(16, PROMPT):
        logits, cache = decode(m.params, cache, tokens[:, pos])
        assert max_rel(logits[0], whole[pos]) <= 1e-5, pos


@pytest.mark.slow
def test_generate_greedy_equals_transformers(model_files):
    """generate() (prefill, then decode steps) gives transformers' greedy tokens (up to an EOS of ours)."""
    folder = model_files.hf("mixtral")
    m = rj.load(folder, dtype="float32")
    ids = random_ids(12, m.config.vocab_size, 5)
    hf = _hf_model(folder)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids):]
    got = list(m.generate(ids, max_new_tokens=6).tokens)
    assert got == want.tolist()[:len(got)] and (len(got) == 6 or got[-1] in m.config.eos_token_ids)


# ---- ops.moe against numpy ----------------------------------------------------------------------------

def _numpy_route(logits, k, normalize):
    """Softmax, the k largest (ties: lower index first), renormalized: float64."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    w = np.take_along_axis(p, ids, -1)
    return (w / w.sum(-1, keepdims=True) if normalize else w), ids


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31), experts=st.integers(1, 9), data=st.data(), normalize=st.booleans(),
       ties=st.booleans())
def test_router_matches_numpy(seed, experts, data, normalize, ties):
    """route_experts against numpy: the same experts (ties broken towards the lower id; with `ties` the logits
    take few distinct values, so exact ties are common), the same weights, summing to 1 when renormalized."""
    k = data.draw(st.integers(1, experts))
    rng = np.random.default_rng(seed)
    logits = (rng.integers(-2, 3, (5, experts)) if ties else rng.standard_normal((5, experts)) * 3).astype(np.float32)
    w, ids = moe_ops.route_experts(jnp.asarray(logits), k, normalize)
    want_w, want_ids = _numpy_route(logits.astype(np.float64), k, normalize)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-6, atol=1e-7)
    if normalize:
        np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)


def _numpy_moe(x, router, wg, wu, wd, k, normalize):
    x = x.astype(np.float64)
    w, ids = _numpy_route(x @ router.T.astype(np.float64), k, normalize)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(k):
            e = ids[n, j]
            g, u = wg[e] @ x[n], wu[e] @ x[n]
            out[n] += w[n, j] * (wd[e] @ (g / (1 + np.exp(-g)) * u))
    return out


@pytest.mark.parametrize("rows,qtype", [(1, "Q8_0"), (40, "Q8_0"), slow(1, None), slow(40, None), slow(1, "Q4_K"),
                                        slow(3, "Q4_K")])
def test_moe_op_matches_numpy(rows, qtype):
    """Both formulations (1 row: gathered; 3 and 40 rows: grouped, in blocks) on dense and packed experts
    against numpy over the same (dequantized) weights."""
    rng = np.random.default_rng(rows)
    e, f, h, k = 6, 256, 256, 2
    router = rng.standard_normal((e, h)).astype(np.float32) / 4
    ws = [rng.standard_normal(s).astype(np.float32) / 16 for s in ((e, f, h), (e, f, h), (e, h, f))]
    if qtype is not None:
        from realizar_jax.quant.dequant import dequantize
        packed = [QTensor(jnp.asarray(quantize(w, qtype)), qtype, w.shape) for w in ws]
        ws = [np.asarray(dequantize(q)) for q in packed]
    x = rng.standard_normal((rows, h)).astype(np.float32)
    got = moe_ops.moe(jnp.asarray(x), jnp.asarray(router), *(packed if qtype else map(jnp.asarray, ws)),
                      top_k=k, normalize=True)
    np.testing.assert_allclose(np.asarray(got), _numpy_moe(x, router, *ws, k, True), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gathered_and_grouped_agree():
    """The two formulations on the same rows (forced), and the gathered one for a 1-row batch equals a row of
    the grouped one: what makes decode equal prefill."""
    rng = np.random.default_rng(0)
    e, f, h = 4, 32, 16
    x = jnp.asarray(rng.standard_normal((10, h)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, e, (10, 2)), jnp.int32)
    ws = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((e, f, h), (e, f, h), (e, h, f))]
    a = moe_ops._gathered(x, ids, *ws, swiglu)
    b = moe_ops._grouped(x, ids, *ws, swiglu)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# ---- GGUF: our converter's file ------------------------------------------------------------------------

def _reference_from_gguf(path, folder):
    """A transformers model whose weights are gguf-py's dequantization of the GGUF's tensors (llama's q/k rows
    un-permuted, the stacked experts split back into HF's per-expert tensors): independent of our loader."""
    model = _hf_model(folder)
    reader = gguf.GGUFReader(path)
    arch = open_model(path).config.architecture
    cfg = model.config
    names = {tensor_name(r, "gguf", i, arch): (r, i) for r, role in roles_of(arch).items()
             for i in (range(cfg.num_hidden_layers) if role.per_layer else [None])}
    state = {}
    for t in reader.tensors:
        role, layer = names[t.name]
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if arch in GGUF_QK_PERMUTED_ARCHS and role in ("wq", "wk"):
            n = cfg.num_attention_heads if role == "wq" else cfg.num_key_value_heads
            w = w.reshape(n, w.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        if role in EXPERT_ROLES:
            for e in range(w.shape[0]):
                state[roles_of(arch)[role].hf.format(i=layer, e=e)] = torch.from_numpy(w[e].copy())
        else:
            state[tensor_name(role, "hf", layer, arch)] = torch.from_numpy(w.reshape(-1) if w.ndim == 1 else w)
    # transformers 5 holds the experts fused: load the per-expert checkpoint names through its own conversion
    import safetensors.torch
    tmp = path.parent / f"{path.stem}-reference"
    if not tmp.is_dir():
        shutil.copytree(folder, tmp)
        for f in tmp.glob("*.safetensors"):
            f.unlink()
        safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return _hf_model(tmp)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3moe"])
def test_gguf_f32_reads_back(model_files, variant):
    """convert f32: the same config; llama.cpp's architecture ('llama' for Mixtral), expert keys and tensor
    names (each one of gguf-py's MODEL_TENSORS for it), the experts stacked [experts, out, in] and equal to
    the HF tensors; the same weights pytree as the HF folder's."""
    hf_path, path = model_files.hf(variant), model_files.gguf(variant, "f32")
    hf, g = open_model(hf_path), open_model(path)
    assert g.config == hf.config
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    assert arch == gguf.MODEL_ARCH_NAMES[GGUF_ARCHS[_arch(variant)]]
    c = hf.config
    assert reader.fields[f"{arch}.expert_count"].contents() == c.num_experts
    assert reader.fields[f"{arch}.expert_used_count"].contents() == c.experts_per_token
    if arch == "qwen3moe":
        assert reader.fields[f"{arch}.expert_feed_forward_length"].contents() == c.expert_ffn
    names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[GGUF_ARCHS[_arch(variant)]]}
    for t in reader.tensors:
        parts = t.name.rsplit(".", 1)[0].split(".")
        assert (".".join(["blk", "{bid}"] + parts[2:]) if parts[0] == "blk" else ".".join(parts)) in names, t.name
    exps = {t.name: [int(d) for d in reversed(t.shape)] for t in reader.tensors if "_exps" in t.name}
    assert exps["blk.1.ffn_down_exps.weight"] == [c.num_experts, c.hidden_size, c.expert_ffn]
    assert exps["blk.0.ffn_gate_exps.weight"] == [c.num_experts, c.expert_ffn, c.hidden_size]
    for (role, layer), name in validate_roles(g).items():
        want = np.asarray(hf.tensors[tensor_name(role, "hf", layer, c.architecture)].data, np.float32)
        if _arch(variant) == "mixtral" and role in ("wq", "wk"):
            want = permute_qk(want, c.num_heads if role == "wq" else c.num_kv_heads)
        np.testing.assert_array_equal(np.asarray(g.tensors[name].data, np.float32), want, err_msg=name)
    a, b = build_params(hf, jnp.float32), build_params(g, jnp.float32)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


@pytest.mark.parametrize("variant,quant", [("mixtral", "q8_0"), slow("qwen3moe", "q8_0"), slow("mixtral", "f16"),
                                           slow("qwen3moe", "f16"), ("qwen3moe", "mxfp4_moe")])
def test_gguf_logits_equal_dequantized_reference(model_files, variant, quant):
    """Our f16 / q8_0 file, its experts kept packed (only the chosen ones dequantized), against gguf-py's
    dequantization of the same file in transformers; the dense (CPU default) load equals the packed one."""
    path = model_files.gguf(variant, quant)
    packed = rj.load(path, dtype="float32", dense_weights=False)
    if quant == "q8_0":
        lp = packed.params.layers[0]
        assert isinstance(lp.experts_gate, QTensor) and lp.experts_gate.data.ndim == 3
        assert isinstance(lp.router, jax.Array)   # the router stays F32, as llama.cpp keeps it
    if quant == "mxfp4_moe":   # llama-quantize's MXFP4_MOE: experts MXFP4, other matrices Q8_0, router F32
        types = {t.name: (t.tensor_type.name, len(t.shape)) for t in gguf.GGUFReader(path).tensors}
        assert {q for n, (q, d) in types.items() if "_exps" in n} == {"MXFP4"}
        assert {q for n, (q, d) in types.items() if d == 2 and "_exps" not in n and "gate_inp" not in n} == {"Q8_0"}
        assert {q for n, (q, d) in types.items() if "gate_inp" in n} == {"F32"}
    ids = random_ids(PROMPT, packed.config.vocab_size, 4)
    ref = hf_logits(_reference_from_gguf(path, model_files.hf(variant)), ids)
    ours = packed.logits(ids)
    assert max_rel(ours, ref) <= 1e-4
    assert max_rel(rj.load(path, dtype="float32").logits(ids), np.asarray(ours, np.float64)) <= 1e-5


@pytest.mark.parametrize("variant", ["mixtral", "qwen3moe"])
def test_role_names_match_gguf_tensor_map(variant):
    """Each role's HF name (the experts' stacked name, as llama.cpp's converter merges them) maps through
    gguf-py's TensorNameMap of the architecture to our GGUF name for it."""
    arch = _arch(variant)
    tmap = gguf.get_tensor_name_map(GGUF_ARCHS[arch], 2)
    for role in roles_of(arch):
        g, h = tensor_name(role, "gguf", 1, arch), tensor_name(role, "hf", 1, arch)
        if g is not None and h is not None and roles_of(arch)[role].per_layer:
            assert tmap.get_name(h, try_suffixes=(".weight", ".bias")) == g, role


# ---- bad files ------------------------------------------------------------------------------------------

def _copy_without(folder, dst, drop=(), rename=None):
    """A copy of an HF folder with tensors dropped (or one renamed) in its safetensors file."""
    import safetensors.numpy
    shutil.copytree(folder, dst)
    tensors = safetensors.numpy.load_file(str(dst / "model.safetensors"))
    tensors = {(rename[1] if rename and k == rename[0] else k): v for k, v in tensors.items() if k not in drop}
    safetensors.numpy.save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_bad_moe_files_name_the_tensor(model_files, tmp_path):
    folder = model_files.hf("mixtral")
    gone = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    with pytest.raises(MissingTensorError, match="experts.2.w3") as e:
        open_model(_copy_without(folder, tmp_path / "missing", drop=[gone]))
    assert e.value.tensor == gone
    extra = "model.layers.0.block_sparse_moe.experts.4.w1.weight"   # the config says 4 experts: 0..3
    with pytest.raises(ModelFormatError, match="expert 4 of layer 0") as e:
        open_model(_copy_without(folder, tmp_path / "extra", rename=("model.layers.0.block_sparse_moe.experts.3.w1"
                                                                     ".weight", extra)))
    assert e.value.tensor == extra
    # a GGUF whose expert_count disagrees with its stacked tensors
    src = model_files.gguf("mixtral", "f32")
    rewrite_gguf(src, tmp_path / "count.gguf", {"llama.expert_count": 3})
    with pytest.raises(ShapeMismatchError, match="holds 4 experts but the config says 3") as e:
        open_model(tmp_path / "count.gguf")
    assert e.value.tensor == "blk.0.ffn_gate_inp.weight"


def test_qwen3moe_dense_layers_refused(model_files, tmp_path):
    folder = tmp_path / "dense"
    shutil.copytree(model_files.hf("qwen3moe"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["mlp_only_layers"] = [1]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="mlp_only_layers"):
        open_model(folder)


# ---- inspect, memory ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["mixtral", "qwen3moe"])
def test_inspect_shows_experts_and_memory_counts_them(model_files, variant):
    from realizar_jax.cli.inspect import inspect_main
    for path in (model_files.hf(variant), model_files.gguf(variant, "q8_0")):
        out = io.StringIO()
        with redirect_stdout(out):
            assert inspect_main([str(path), "--json"]) == 0
        report = json.loads(out.getvalue())
        assert report["architecture"] == _arch(variant) and all(t["role"] for t in report["tensors"])
        c = open_model(path).config
        experts = [t for t in report["tensors"] if t["role"] in EXPERT_ROLES]
        assert len(experts) == 3 * c.num_layers and all(t["shape"][0] == c.num_experts for t in experts)
        assert report["config"]["num_experts"] == c.num_experts
        weights = sum(math.prod(t["shape"]) for t in report["tensors"])
        assert parameter_count(c) == weights == report["memory"]["parameters"]


# ---- GPU --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("variant,quant", [("mixtral", "q8_0"), ("qwen3moe", "f16")])
def test_gpu_logits_match_cpu_float32(model_files, tmp_path, variant, quant):
    """On the GPU route (Pallas kernels for attention and the dense matrices; the experts on ops.moe's
    formulations) within bfloat16's tolerance of the CPU float32 path, prefill and decode."""
    from test_gpu_model import _cpu_logits
    assert jax.default_backend() == "gpu"
    path = model_files.gguf(variant, quant)
    m = rj.load(path, dtype="bfloat16", max_seq_len=128)
    assert m.kernels.pallas
    ids = random_ids(40, m.config.vocab_size, 11)
    ref = _cpu_logits(path, ids, tmp_path / "ref.npy")
    got = np.asarray(m.logits(ids), np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 4e-2
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.85
    out = m.generate(ids, max_new_tokens=8)
    full = _cpu_logits(path, ids + out.tokens, tmp_path / "full.npy")
    for j, tok in enumerate(out.tokens):
        row = full[len(ids) - 1 + j]
        assert row[tok] >= row.max() - 0.15 * row.std(), (j, tok)
