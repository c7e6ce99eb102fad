"""Random-weight GGUFs of real model shapes, for benchmarks (ours and llama.cpp's on the same file).

Packed blocks are random bytes except the scale fields (f16, or MXFP4's E8M0 exponent), which get
small positive finite values so every dequantized weight is finite and of a sensible size. Tensors are written one at a time
(header first, then each tensor's bytes streamed in row chunks), so a 16 GB file needs no 16 GB
of RAM.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..formats.gguf_writer import use_more_bits
from ..quant.types import qtype_info, row_bytes

# random dense values: keep the sign and low mantissa bits of random 16-bit words and set the
# exponent: |w| in [2^-7, 2^-6)
_DENSE_BITS = {"F16": (0x83FF, 0x2000), "BF16": (0x807F, 0x3C00)}


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int
    n_head: int
    n_kv: int
    d_ff: int
    vocab: int
    tied: bool
    rope_theta: float = 500000.0
    ctx: int = 8192


SHAPES = {
    "llama3-8b": Shape(32, 4096, 32, 8, 14336, 128256, False),
    "llama3.2-1b": Shape(16, 2048, 32, 8, 8192, 128256, True),
    "tiny": Shape(2, 256, 4, 2, 512, 512, False, ctx=512),   # for tests
}

# quant -> (the type of most matrices, general.file_type)
_QUANTS = {"q4_k_m": ("Q4_K", 15), "q8_0": ("Q8_0", 7), "q6_k": ("Q6_K", 18), "q4_k": ("Q4_K", 14),
           "q4_0": ("Q4_0", 2), "bf16": ("BF16", 32), "f16": ("F16", 1)}
QUANTS = tuple(_QUANTS)
_CHUNK_BYTES = 64 << 20


def tensor_plan(shape: Shape, quant: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(gguf name, numpy shape [rows, cols] or [n], qtype) for every tensor, in file order."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; choose from {', '.join(QUANTS)}")
    base = _QUANTS[quant][0]
    D, hd = shape.d_model, shape.d_model // shape.n_head
    kv = shape.n_kv * hd

    def qt(role, layer=None):
        if quant == "q4_k_m":
            if role == "output" or (role == "token_embd" and shape.tied):
                return "Q6_K"
            if role in ("attn_v", "ffn_down") and use_more_bits(layer, shape.n_layer):
                return "Q6_K"
        return base

    plan = [("token_embd.weight", (shape.vocab, D), qt("token_embd"))]
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (D,), "F32"),
                 (p + "attn_q.weight", (D, D), qt("attn_q", i)),
                 (p + "attn_k.weight", (kv, D), qt("attn_k", i)),
                 (p + "attn_v.weight", (kv, D), qt("attn_v", i)),
                 (p + "attn_output.weight", (D, D), qt("attn_output", i)),
                 (p + "ffn_norm.weight", (D,), "F32"),
                 (p + "ffn_gate.weight", (shape.d_ff, D), qt("ffn_gate", i)),
                 (p + "ffn_up.weight", (shape.d_ff, D), qt("ffn_up", i)),
                 (p + "ffn_down.weight", (D, shape.d_ff), qt("ffn_down", i))]
    plan.append(("output_norm.weight", (D,), "F32"))
    if not shape.tied:
        plan.append(("output.weight", (shape.vocab, D), qt("output")))
    return plan


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes] of random `qtype` rows, fast: raw random bytes, then the scale fields
    (or dense exponents) fixed so that |w| ~ 1e-2; F32 (the norm weights) around 1."""
    q, bits = qtype_info(qtype), _DENSE_BITS.get(qtype)
    if q.is_dense and bits is None:   # F32: around 1 so activations stay O(1)
        return (1.0 + 0.1 * rng.standard_normal((rows, cols), dtype=np.float32)).view(np.uint8)
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


def write_synthetic_gguf(path, shape_name: str, quant: str, *, seed: int = 0, progress=None):
    """Write a random-weight llama GGUF of `shape_name` (see SHAPES) in `quant`; returns path."""
    import gguf
    shape = SHAPES[shape_name]
    plan = tensor_plan(shape, quant)
    rng = np.random.default_rng(seed)
    tmp = f"{path}.part"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"synthetic-{shape_name}-{quant}")
    w.add_block_count(shape.n_layer)
    w.add_context_length(shape.ctx)
    w.add_embedding_length(shape.d_model)
    w.add_feed_forward_length(shape.d_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_kv)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_rope_dimension_count(shape.d_model // shape.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(shape.vocab)
    w.add_file_type(_QUANTS[quant][1])
    w.add_quantization_version(2)
    toks, scores, types = _tokens(shape.vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, shp, qt in plan:
        nbytes = int(np.prod(shp[:-1], dtype=np.int64)) * row_bytes(qt, shp[-1])
        w.add_tensor_info(name, shp, np.float32, nbytes, raw_dtype=gguf.GGMLQuantizationType[qt])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    for name, shp, qt in plan:
        rows, cols = (1, shp[0]) if len(shp) == 1 else shp
        w.write_padding(fout, fout.tell())
        step = max(1, _CHUNK_BYTES // row_bytes(qt, cols))
        for r0 in range(0, rows, step):
            random_blocks(qt, min(step, rows - r0), cols, rng).tofile(fout)
        w.write_padding(fout, rows * row_bytes(qt, cols))
        if progress:
            progress(name)
    w.close()
    os.replace(tmp, path)
    return path
