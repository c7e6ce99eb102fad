"""Random-weight GGUFs of real model shapes, for benchmarks (ours and llama.cpp's on the same file).

A shape is the ModelConfig of a published model. The file is laid out as our `convert` would write that
model: tensor names, shapes and order from formats/roles.py, metadata from gguf_writer.write_model_metadata,
types from gguf_writer.plan_qtype (llama-quantize's mix for q4_k_m; MoE routers F32, experts stacked
[experts, out, in]). Packed blocks are random bytes except the scale fields (f16, or MXFP4's E8M0
exponent), which get small positive finite values so every dequantized weight is finite and of a sensible
size. Tensors are written one at a time (header first, then each tensor's bytes streamed in row chunks),
so a 17 GB file needs no 17 GB of RAM.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..config import ModelConfig, RopeScaling
from ..formats.gguf_writer import GGUF_ARCH, plan_qtype, write_model_metadata
from ..formats.roles import expected_shape, required_layer_roles, roles_of, tensor_name
from ..quant.types import qtype_info, row_bytes

# random dense values: keep the sign and low mantissa bits of random 16-bit words and set the
# exponent: |w| in [2^-7, 2^-6)
_DENSE_BITS = {"F16": (0x83FF, 0x2000), "BF16": (0x807F, 0x3C00)}
# token ids of the synthetic vocabulary (_tokens)
_UNK, _BOS, _EOS = 0, 1, 2


def _llama(layers, hidden, heads, kv, ffn, vocab, tied, ctx=8192) -> ModelConfig:
    return ModelConfig("llama", vocab, hidden, layers, heads, kv, hidden // heads, ffn, norm_eps=1e-5,
                       rope_theta=500000.0, context_length=ctx, tie_embeddings=tied, bos_token_id=_BOS,
                       eos_token_ids=(_EOS,))


def _qwen3moe(layers, hidden, heads, kv, head_dim, ffn, experts, used, expert_ffn, vocab, ctx) -> ModelConfig:
    return ModelConfig("qwen3moe", vocab, hidden, layers, heads, kv, head_dim, ffn, norm_eps=1e-6,
                       rope_theta=1e6, context_length=ctx, tie_embeddings=False, qk_norm=True, bos_token_id=_BOS,
                       eos_token_ids=(_EOS,), add_bos=False, num_experts=experts, experts_per_token=used,
                       expert_intermediate_size=expert_ffn, norm_topk_prob=True)


def _gemma3(layers, hidden, heads, kv, head_dim, ffn, vocab, window, ctx) -> ModelConfig:
    # every 6th layer global (sliding_window_pattern 6, llama.cpp's fixed gemma3 pattern); the global
    # layers' RoPE carries the linear scaling, the local ones base 10k unscaled
    types = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers))
    return ModelConfig("gemma3", vocab, hidden, layers, heads, kv, head_dim, ffn, norm_eps=1e-6, rope_theta=1e6,
                       rope_scaling=RopeScaling("linear", factor=8.0), context_length=ctx, tie_embeddings=True,
                       qk_norm=True, bos_token_id=_BOS, eos_token_ids=(_EOS,), sliding_window=window,
                       layer_types=types, query_pre_attn_scalar=float(head_dim), rope_local_theta=10000.0)


def _gptoss(layers, hidden, heads, kv, head_dim, experts, used, ffn, vocab, window, ctx) -> ModelConfig:
    # the even layers slide (llama.cpp's gpt-oss: swa pattern 2); YaRN 32x over 4096, not truncated
    types = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers))
    yarn = RopeScaling("yarn", factor=32.0, original_context_length=4096, beta_fast=32.0, beta_slow=1.0,
                       truncate=False, attention_factor=0.1 * math.log(32.0) + 1.0)
    return ModelConfig("gptoss", vocab, hidden, layers, heads, kv, head_dim, ffn, norm_eps=1e-5, rope_theta=150000.0,
                       rope_scaling=yarn, context_length=ctx, tie_embeddings=False, qkv_bias=True, bos_token_id=_BOS,
                       eos_token_ids=(_EOS,), add_bos=False, sliding_window=window, layer_types=types,
                       num_experts=experts, experts_per_token=used, expert_intermediate_size=ffn,
                       moe_router="topk_softmax", moe_bias=True, swiglu_limit=7.0, swiglu_alpha=1.702,
                       attn_out_bias=True, attn_sinks=True)


SHAPES: dict[str, ModelConfig] = {
    "llama3-8b": _llama(32, 4096, 32, 8, 14336, 128256, False),
    "llama3.2-1b": _llama(16, 2048, 32, 8, 8192, 128256, True),
    # Qwen/Qwen3-30B-A3B config.json (transformers 4.51.0): num_hidden_layers 48, hidden_size 2048,
    # num_attention_heads 32, num_key_value_heads 4, head_dim 128, intermediate_size 6144 (written as
    # feed_forward_length, as llama.cpp's converter does; no layer uses it: mlp_only_layers []),
    # num_experts 128, num_experts_per_tok 8, moe_intermediate_size 768, norm_topk_prob true, rms_norm_eps 1e-6,
    # rope_theta 1e6, rope_scaling null, tie_word_embeddings false, vocab_size 151936,
    # max_position_embeddings 40960. Qwen3 RoPE is NEOX (halves): qwen3moe GGUFs are not permuted.
    "qwen3-30b-a3b": _qwen3moe(48, 2048, 32, 4, 128, 6144, 128, 8, 768, 151936, 40960),
    # google/gemma-3-12b-it config.json, text_config (transformers 4.51.0): num_hidden_layers 48,
    # hidden_size 3840, num_attention_heads 16, num_key_value_heads 8, head_dim 256, intermediate_size 15360,
    # query_pre_attn_scalar 256, rms_norm_eps 1e-6, rope_theta 1e6 with rope_scaling linear 8.0,
    # rope_local_base_freq 10000, sliding_window 1024, sliding_window_pattern 6, attn/final logit softcapping
    # null, tied embeddings, max_position_embeddings 131072. vocab_size there is 262208 (image tokens
    # included); llama.cpp's converter cuts token_embd to the tokenizer's 262144 rows, as its GGUFs hold.
    "gemma3-12b": _gemma3(48, 3840, 16, 8, 256, 15360, 262144, 1024, 131072),
    # openai/gpt-oss-20b config.json: num_hidden_layers 24, hidden_size 2880, num_attention_heads 64,
    # num_key_value_heads 8, head_dim 64, intermediate_size 2880 (each expert's), num_local_experts 32,
    # num_experts_per_tok 4, sliding_window 128 on alternating layers, rope_theta 150000 with YaRN (factor 32,
    # original_max_position_embeddings 4096, beta_fast 32, beta_slow 1, truncate false), attention biases,
    # swiglu_limit 7.0, rms_norm_eps 1e-5, vocab_size 201088, max_position_embeddings 131072, untied. Its
    # GGUF (ggml-org/gpt-oss-20b-GGUF, ~12 GB) holds MXFP4 experts and Q8_0 elsewhere: --quant mxfp4_moe.
    "gpt-oss-20b": _gptoss(24, 2880, 64, 8, 64, 32, 4, 2880, 201088, 128, 131072),
    # for tests: the same structures, small (q_size != hidden as in both real models; 16 experts, not 8,
    # since llama-quantize gives 8-expert models a different mix; a window shorter than test prompts)
    "tiny": _llama(2, 256, 4, 2, 512, 512, False, ctx=512),
    "tiny-moe": _qwen3moe(2, 256, 4, 2, 128, 768, 16, 4, 256, 512, 512),
    "tiny-gemma3": _gemma3(6, 256, 2, 1, 256, 512, 512, 4, 512),
    "tiny-gpt-oss": _gptoss(2, 256, 8, 2, 64, 16, 4, 256, 512, 4, 512),
}

# the --quant choices (gguf_writer's names: the base type and llama-quantize's mix for each)
QUANTS = ("q4_k_m", "q8_0", "q6_k", "q4_k", "q4_0", "mxfp4_moe", "bf16", "f16")
_CHUNK_BYTES = 64 << 20


def tensor_plan(config: ModelConfig, quant: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(gguf name, numpy shape, qtype) for every tensor, in file order: the order, names and types our
    `convert` writes for a model of this config (gguf_writer._plan), shapes as the loader expects them."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; choose from {', '.join(QUANTS)}")
    c, arch = config, config.architecture
    has_output = not c.tie_embeddings
    roles, needed = roles_of(arch), set(required_layer_roles(c))
    order = [("embed", None)]
    order += [(r, i) for i in range(c.num_layers) for r in roles if roles[r].per_layer and r in needed]
    order += [("final_norm", None)] + ([("lm_head", None)] if has_output else [])
    plan = []
    for role, layer in order:
        shape = expected_shape(role, c)
        plan.append((tensor_name(role, "gguf", layer, arch), shape,
                     plan_qtype(role, layer, shape, quant, c.num_layers, has_output, num_experts=c.num_experts)))
    return plan


def plan_bytes(plan) -> int:
    """Bytes of the tensor data of a tensor_plan (without the header and alignment padding)."""
    return sum(math.prod(shp[:-1]) * row_bytes(qt, shp[-1]) for _, shp, qt in plan)


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes] of random `qtype` rows, fast: raw random bytes, then the scale fields
    (or dense exponents) fixed so that |w| ~ 1e-2; F32 matrices (MoE routers) normal with sigma 1e-2 (router
    logits of O(0.5): different tokens pick different experts). Norm weights are random_norm's."""
    q, bits = qtype_info(qtype), _DENSE_BITS.get(qtype)
    if q.is_dense and bits is None:
        return (0.01 * rng.standard_normal((rows, cols), dtype=np.float32)).view(np.uint8)
    raw = np.frombuffer(rng.bytes(rows * row_bytes(qtype, cols)), np.uint8).copy()
    if bits is not None:
        keep, exponent = bits
        r = raw.view(np.uint16)
        r[:] = (r & keep) | exponent
        return raw.reshape(rows, -1)
    b = raw.reshape(rows, cols // q.block_size, q.type_size)
    if q.e8m0_offsets:   # exponent e: scale 2^(e - 128), in random_scale, picked by the random byte there
        lo, hi = (int(np.log2(s)) + 128 for s in q.random_scale)
        for o in q.e8m0_offsets:
            b[..., o] = lo + b[..., o] % (hi - lo + 1)
        return b.reshape(rows, -1)
    table = np.linspace(*q.random_scale, 256).astype(np.float16).view(np.uint8).reshape(256, 2)
    for o in q.f16_offsets:   # scale = table[one random byte already in the block]
        b[..., o:o + 2] = table[b[..., o + 1]]
    return b.reshape(rows, -1)


def _tokens(vocab: int):
    """A byte-level SentencePiece-style vocab: <unk> <s> </s>, 256 byte tokens, then fillers."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"\u2581t{i}" for i in range(vocab - len(toks))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(vocab - 259)]
    return toks, scores, types


def random_norm(n: int, rng: np.random.Generator) -> np.ndarray:
    """RMSNorm weights around 1 (F32 bytes), so activations stay O(1). Right for every family we load: the
    loader multiplies by a GGUF norm weight as stored, and llama.cpp's converter stores Gemma's (1 + w)
    weights with the 1 added (formats/roles.NORM_SHIFT), so a Gemma file's norms sit around 1 too."""
    return (1.0 + 0.1 * rng.standard_normal((1, n), dtype=np.float32)).view(np.uint8)


def write_synthetic_gguf(path, shape_name: str, quant: str, *, seed: int = 0, progress=None):
    """Write a random-weight GGUF of `shape_name` (see SHAPES) in `quant`; returns path."""
    import gguf
    config = SHAPES[shape_name]
    plan = tensor_plan(config, quant)
    rng = np.random.default_rng(seed)
    tmp = f"{path}.part"
    w = gguf.GGUFWriter(tmp, GGUF_ARCH[config.architecture])
    write_model_metadata(w, config, quant, f"synthetic-{shape_name}-{quant}",
                         any(not qtype_info(qt).is_dense for _, _, qt in plan), path)
    toks, scores, types = _tokens(config.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(_BOS)
    w.add_eos_token_id(_EOS)
    w.add_unk_token_id(_UNK)
    for name, shp, qt in plan:
        nbytes = math.prod(shp[:-1]) * row_bytes(qt, shp[-1])
        w.add_tensor_info(name, shp, np.float32, nbytes, raw_dtype=gguf.GGMLQuantizationType[qt])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    for name, shp, qt in plan:
        rows, cols = math.prod(shp[:-1]), shp[-1]   # expert stacks [experts, out, in]: experts * out rows
        w.write_padding(fout, fout.tell())
        if len(shp) == 1:
            random_norm(cols, rng).tofile(fout)
        else:
            step = max(1, _CHUNK_BYTES // row_bytes(qt, cols))
            for r0 in range(0, rows, step):
                random_blocks(qt, min(step, rows - r0), cols, rng).tofile(fout)
        w.write_padding(fout, rows * row_bytes(qt, cols))
        if progress:
            progress(name)
    w.close()
    os.replace(tmp, path)
    return path
