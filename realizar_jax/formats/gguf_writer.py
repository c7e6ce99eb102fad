"""Write a GGUF file from an HF model folder, laid out the way llama.cpp's tools make them.

convert_hf_to_gguf.py decides names, metadata and the llama Q/K row permutation; llama-quantize
decides which tensor gets which type. We do both in one pass:
- names from roles.py; Mistral is written as general.architecture 'llama' (as llama.cpp does);
- llama-arch attn_q/attn_k rows are permuted for ggml's adjacent-pair RoPE, qwen2/qwen3 are not;
- llama3 rope scaling becomes a rope_freqs.weight tensor (plus `realizar.rope.scaling.*` keys, which
  llama.cpp ignores, so that the exact HF parameters survive the round trip);
- Mixtral is written as 'llama' with expert_count / expert_used_count, as llama.cpp does; each layer's
  experts go out stacked ([experts, out, in]: ffn_gate_exps / ffn_up_exps / ffn_down_exps);
- gpt-oss is 'gpt-oss' with llama.cpp's names (the experts' biases ffn_*_exps.bias [experts, out], the
  router's ffn_gate_inp.bias, attn_sinks, the MLP's pre-norm post_attention_norm), YaRN as rope.scaling.*
  (plus our `realizar.rope.scaling.yarn_truncate`: llama.cpp always truncates the ramp, gpt-oss does not)
  and our `realizar.swiglu_*` keys for the clamp (llama.cpp fixes them);
- vectors (norms, biases, sinks, rope_freqs; the experts' biases too) and the MoE router (ffn_gate_inp,
  which llama.cpp never quantizes) stay F32; matrices and expert stacks get the requested type, or for
  q4_k_m llama-quantize's mix; experts already packed in the checkpoint (gpt-oss's MXFP4) are written as
  they are when the plan keeps their type, else dequantized first; a row length that is not a whole
  number of blocks falls back like llama-quantize (Q4_K -> Q5_0, Q6_K -> Q8_0, then F16).
- mxfp4_moe is llama-quantize's MXFP4_MOE mix: expert stacks MXFP4, every other matrix (embeddings and
  output included) Q8_0; a dense model comes out all Q8_0, as from llama-quantize. mxfp4 is ours: every
  matrix and expert stack MXFP4. Both carry file type MOSTLY_MXFP4_MOE, llama.cpp's only MXFP4 one.
The output is streamed tensor by tensor into a temp file next to OUT and renamed into place only
when complete, so a failure never leaves a half-written OUT.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..errors import ModelFormatError
from ..quant.types import qtype_info, row_bytes
from .roles import GGUF_QK_PERMUTED_ARCHS, NORM_ROLES, NORM_SHIFT, ROLES, roles_of, tensor_name
from .gguf_file import (GEMMA_SWA_PATTERN, REALIZAR_ATTENTION_FACTOR, REALIZAR_QUERY_SCALAR, REALIZAR_ROPE_PREFIX,
                        REALIZAR_SWIGLU, REALIZAR_YARN_TRUNCATE, SWA_PATTERN, llama3_rope_factors,
                        llamacpp_query_scalar)
from ..config import yarn_attention_factor

logger = logging.getLogger(__name__)

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "olmo2": "olmo2",
             "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3", "mixtral": "llama", "qwen3moe": "qwen3moe",
             "gptoss": "gpt-oss"}
# llama.cpp's graphs that apply {arch}.attention.sliding_window (llama/qwen2/qwen3 ignore it)
_SWA_ARCHS = ("phi3", "gemma2", "gemma3", "gptoss")
_FT = gguf.LlamaFileType
# quant -> (the type of 2-D tensors before llama-quantize's mix and fallbacks, general.file_type)
_QUANTS = {"f32": ("F32", _FT.ALL_F32), "f16": ("F16", _FT.MOSTLY_F16), "bf16": ("BF16", _FT.MOSTLY_BF16),
           "q8_0": ("Q8_0", _FT.MOSTLY_Q8_0), "q4_0": ("Q4_0", _FT.MOSTLY_Q4_0),
           "q4_k": ("Q4_K", _FT.MOSTLY_Q4_K_S), "q5_k": ("Q5_K", _FT.MOSTLY_Q5_K_S),
           "q6_k": ("Q6_K", _FT.MOSTLY_Q6_K), "q4_k_m": ("Q4_K", _FT.MOSTLY_Q4_K_M),
           "mxfp4_moe": ("MXFP4", _FT.MOSTLY_MXFP4_MOE), "mxfp4": ("MXFP4", _FT.MOSTLY_MXFP4_MOE)}
QUANT_CHOICES = tuple(_QUANTS)
# llama-quantize's convert_incompatible_tensor: a type whose blocks fit rows that K-quants do not.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL"}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quantize's choice of layers whose attn_v / ffn_down get more bits in *_K_M files."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fit_qtype(qtype: str, row_length: int) -> str:
    """`qtype`, or llama-quantize's fallback when row_length is not a whole number of its blocks."""
    if row_length % qtype_info(qtype).block_size == 0:
        return qtype
    alt = _FALLBACK.get(qtype)
    if alt is not None and row_length % qtype_info(alt).block_size == 0:
        return alt
    return "F16"


def plan_qtype(role: str, layer: int | None, shape: tuple[int, ...], quant: str, num_layers: int,
               has_output: bool, tensor: str | None = None, num_experts: int | None = None) -> str:
    """The gguf qtype a tensor is written in for `--quant quant`. When its rows do not fit the type's blocks
    and `tensor` (its name) is given, the fallback is logged as a warning, as llama-quantize prints one.
    num_experts: the model's expert count (llama-quantize gives 8-expert models more bits in attention)."""
    if quant not in _QUANTS:
        raise ValueError(f"unknown quant {quant!r}; choose from {', '.join(QUANT_CHOICES)}")
    if len(shape) < 2 or quant == "f32" or role == "router" or ROLES[role].kind == "vector":
        return "F32"
    qtype = _QUANTS[quant][0]
    if quant == "mxfp4_moe" and len(shape) < 3:   # llama-quantize: "MoE tensors -> MXFP4, other tensors -> Q8_0"
        qtype = "Q8_0"
    if quant == "q4_k_m":
        if role == "lm_head" or (role == "embed" and not has_output):
            qtype = "Q6_K"
        elif num_experts == 8 and role in ("wk", "wv"):   # llama-quantize: "for the 8-expert model" Q8_0
            qtype = "Q8_0"
        elif num_experts == 8 and role == "wo":
            qtype = "Q5_K"
        elif role in ("wv", "w_down", "experts_down") and use_more_bits(layer, num_layers):
            qtype = "Q6_K"
        elif role == "wqkv":   # llama-quantize: attn_qkv gets Q5_K in Q4_K_M files
            qtype = "Q5_K"
    fitted = fit_qtype(qtype, shape[-1])
    if fitted != qtype and tensor is not None:
        logger.warning("%s: rows of %d values are not a whole number of %s blocks (%d values); writing it as %s",
                       tensor, shape[-1], qtype, qtype_info(qtype).block_size, fitted)
    return fitted


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's halves layout to ggml's interleaved pairs (llama.cpp's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class _Planned:
    name: str  # gguf name
    role: str
    layer: int | None
    source: str | None  # HF tensor name, None for generated tensors
    shape: tuple[int, ...]
    qtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * row_bytes(self.qtype, self.shape[-1])


def _plan(src, role_map, quant: str) -> list[_Planned]:
    c = src.config
    has_output = ("lm_head", None) in role_map and not c.tie_embeddings
    arch = c.architecture
    order = [("embed", None)]
    if c.rope_scaling is not None and c.rope_scaling.kind == "llama3":
        order.append(("rope_freqs", None))
    if c.rope_scaling is not None and c.rope_scaling.kind == "longrope":
        order += [("rope_factors_long", None), ("rope_factors_short", None)]
    roles = roles_of(arch)
    for i in range(c.num_layers):
        order += [(r, i) for r in roles if roles[r].per_layer and (r, i) in role_map]
    order += [("final_norm", None)] + ([("lm_head", None)] if has_output else [])
    plan = []
    for role, layer in order:
        if role in ("rope_freqs", "rope_factors_long", "rope_factors_short"):   # made from the config
            shape = (c.head_dim // 2,) if role == "rope_freqs" else (c.rotary_dim // 2,)
            plan.append(_Planned(tensor_name(role, "gguf", None, arch), role, None, None, shape, "F32"))
            continue
        hf_name = role_map[(role, layer)]
        shape = tuple(src.tensors[hf_name].shape)
        name = tensor_name(role, "gguf", layer, arch)
        plan.append(_Planned(name, role, layer, hf_name, shape,
                             plan_qtype(role, layer, shape, quant, c.num_layers, has_output, tensor=name,
                                        num_experts=c.num_experts)))
    return plan


def _tensor_bytes(src, p: _Planned) -> np.ndarray:
    """The planned tensor's data as the array GGUFWriter writes (dense typed, or uint8 blocks)."""
    from ..quant.device_quant import faster_on_device, quantize_on_device
    from ..quant.quantize import quantize
    c = src.config
    if p.role in ("rope_factors_long", "rope_factors_short"):
        return np.asarray(c.rope_scaling.factors(p.role == "rope_factors_long"), np.float32)
    if p.source is None:
        return llama3_rope_factors(c.head_dim, c.rope_theta, c.rope_scaling)
    t = src.tensors[p.source]
    if not qtype_info(t.qtype).is_dense:   # packed in the checkpoint (gpt-oss's MXFP4 experts)
        if t.qtype == p.qtype:
            return np.ascontiguousarray(np.asarray(t.data, np.uint8))   # as they are: no second rounding
        x = gguf.quants.dequantize(np.asarray(t.data, np.uint8), gguf.GGMLQuantizationType[t.qtype])
        x = x.astype(np.float32).reshape(p.shape)
    else:
        x = np.asarray(t.data, dtype=np.float32)
    if p.role in NORM_ROLES and c.architecture in NORM_SHIFT:   # llama.cpp stores Gemma's norms as 1 + w
        x = x + np.float32(NORM_SHIFT[c.architecture])
    if GGUF_ARCH[c.architecture] in GGUF_QK_PERMUTED_ARCHS:
        if p.role in ("wq", "bq"):
            x = permute_qk(x, c.num_heads)
        elif p.role in ("wk", "bk"):
            x = permute_qk(x, c.num_kv_heads)
    try:
        if x.ndim == 2 and not qtype_info(p.qtype).is_dense and faster_on_device(p.qtype):
            return np.asarray(quantize_on_device(x, p.qtype))   # the same bytes (quant/device_quant.py)
        return quantize(x, p.qtype)
    except ValueError as e:
        raise ModelFormatError(f"cannot quantize to {p.qtype}: {e}", path=src.path, tensor=p.source) from None


def _metadata(w: gguf.GGUFWriter, src, quant: str, name: str, hf_dir: Path, plan: list[_Planned]):
    write_model_metadata(w, src.config, quant, name, any(not qtype_info(p.qtype).is_dense for p in plan), src.path)
    for key, value, vtype in _tokenizer_fields(hf_dir):
        if vtype is None:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)


def write_model_metadata(w: gguf.GGUFWriter, c, quant: str, name: str, quantized: bool, path=None) -> None:
    """Every key of a model `c` (a ModelConfig) but the tokenizer's, as llama.cpp's converter writes them for
    its architecture; `quantized`: some tensor is packed (adds the quantization version). Also what
    `bench --shape` writes into its synthetic files (cli/synth.py), so those carry convert's metadata."""
    arch = GGUF_ARCH[c.architecture]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(int(_QUANTS[quant][1]))
    if quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.context_length)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    _family_metadata(w, c, path)
    _moe_metadata(w, c, path)
    s = c.rope_scaling
    if s is not None and s.kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s.factor)
    elif s is not None and s.kind == "longrope" and arch != "phi3":
        raise ModelFormatError(f"longrope rope scaling on a {c.architecture} model cannot be written as GGUF",
                               path=path)
    elif s is not None and s.kind == "llama3":
        if arch != "llama":
            raise ModelFormatError(f"llama3 rope scaling on a {c.architecture} model cannot be written as GGUF",
                                   path=path)
        w.add_float32(REALIZAR_ROPE_PREFIX + "factor", s.factor)
        w.add_float32(REALIZAR_ROPE_PREFIX + "low_freq_factor", s.low_freq_factor)
        w.add_float32(REALIZAR_ROPE_PREFIX + "high_freq_factor", s.high_freq_factor)
        w.add_uint32(REALIZAR_ROPE_PREFIX + "original_context_length", s.original_context_length)
    elif s is not None and s.kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.factor)
        w.add_rope_scaling_orig_ctx_len(s.original_context_length)
        w.add_rope_scaling_yarn_beta_fast(s.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(s.beta_slow)
        w.add_bool(REALIZAR_YARN_TRUNCATE, s.truncate)
        if s.attention_factor != yarn_attention_factor(s.factor):
            w.add_float32(REALIZAR_ATTENTION_FACTOR, s.attention_factor)
            logger.warning("%s: YaRN attention factor %s is not the default for factor %s, which llama.cpp uses",
                           path, s.attention_factor, s.factor)


def _family_metadata(w: gguf.GGUFWriter, c, path) -> None:
    """The keys llama.cpp's converter writes for the features beyond the llama block (sliding windows,
    soft-capping, Phi-3's longrope, Gemma 3's local RoPE base), and ours where llama.cpp has none."""
    arch = c.architecture
    if c.architecture == "phi3":   # llama.cpp tells Phi-4 (no window) from Phi-3 by a zero window
        w.add_sliding_window(c.sliding_window or 0)
        s = c.rope_scaling
        w.add_rope_scaling_orig_ctx_len(s.original_context_length if s is not None and s.kind == "longrope"
                                        else c.context_length)
        if s is not None and s.kind == "longrope":
            w.add_rope_scaling_attn_factors(s.attention_factor)
    elif c.sliding_window is not None:
        w.add_sliding_window(c.sliding_window)
        if arch not in _SWA_ARCHS:
            logger.warning("%s: llama.cpp's %s graph has no sliding window; it will attend to the whole context",
                           path, GGUF_ARCH[arch])
    if c.layer_types is not None and c.sliding_window is not None:
        pattern = [c.sliding(i) for i in range(c.num_layers)]
        w.add_sliding_window_pattern(pattern)
        n = SWA_PATTERN.get(arch)
        if n is not None and pattern != [bool((i + 1) % n) for i in range(c.num_layers)]:
            logger.warning("%s: llama.cpp fixes %s's sliding layers to every %d-th global; this model's differ",
                           path, arch, n)
    if arch == "gemma2":
        if not c.tie_embeddings:
            raise ModelFormatError("a Gemma 2 model with its own lm_head cannot be written as GGUF: llama.cpp's "
                                   "gemma2 ties the head to the embedding", path=path)
        if c.attn_softcap is None or c.final_softcap is None:
            raise ModelFormatError("a Gemma 2 model without soft-capping cannot be written as GGUF: llama.cpp "
                                   "always soft-caps gemma2", path=path)
        w.add_attn_logit_softcapping(c.attn_softcap)
        w.add_final_logit_softcapping(c.final_softcap)
    if arch == "gemma3":
        if c.attn_softcap is not None:
            raise ModelFormatError("attention soft-capping on a Gemma 3 model cannot be written as GGUF (llama.cpp's "
                                   "gemma3 has none)", path=path)
        if c.final_softcap is not None:
            w.add_final_logit_softcapping(c.final_softcap)
        w.add_rope_freq_base_swa(c.rope_local_theta)
        if c.rope_local_theta != 10000.0:
            logger.warning("%s: llama.cpp fixes gemma3's local RoPE base to 10000; this model's is %s", path,
                           c.rope_local_theta)
    if arch in GEMMA_SWA_PATTERN:
        rule = llamacpp_query_scalar(arch, c.num_layers, c.hidden_size, c.num_heads, c.head_dim)
        if c.query_pre_attn_scalar != rule:
            w.add_float32(REALIZAR_QUERY_SCALAR, c.query_pre_attn_scalar)
            logger.warning("%s: query_pre_attn_scalar %s is not the %s llama.cpp assumes for this model", path,
                           c.query_pre_attn_scalar, rule)


def _moe_metadata(w: gguf.GGUFWriter, c, path) -> None:
    """llama.cpp's expert keys; for Qwen3-MoE also the experts' width and whether the chosen weights are
    renormalized (llama.cpp's qwen3moe graph always renormalizes: it ignores expert_weights_norm)."""
    if not c.moe:
        return
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.experts_per_token)
    if c.architecture == "gptoss":
        w.add_expert_feed_forward_length(c.expert_ffn)
        w.add_float32(REALIZAR_SWIGLU + "limit", c.swiglu_limit)
        w.add_float32(REALIZAR_SWIGLU + "alpha", c.swiglu_alpha)
        if (c.swiglu_limit, c.swiglu_alpha) != (7.0, 1.702):
            logger.warning("%s: llama.cpp fixes gpt-oss's SwiGLU limit and alpha to 7 and 1.702; this model's are "
                           "%s and %s", path, c.swiglu_limit, c.swiglu_alpha)
    if c.architecture == "qwen3moe":
        w.add_expert_feed_forward_length(c.expert_ffn)
        w.add_expert_weights_norm(c.norm_topk_prob)
        if not c.norm_topk_prob:
            logger.warning("%s: norm_topk_prob is false; llama.cpp's qwen3moe renormalizes the chosen experts' "
                           "weights regardless (our reader follows the file's expert_weights_norm)", path)


def _tokenizer_fields(hf_dir: Path):
    from .gguf_tokenizer import gguf_tokenizer_fields
    return gguf_tokenizer_fields(hf_dir)


def write_gguf(hf_dir, out, quant: str = "f16", *, progress: bool | None = None) -> Path:
    """Convert the HF model folder `hf_dir` to the GGUF file `out` with `quant` (see QUANT_CHOICES).

    The folder is opened and validated first (ModelFormatError on any problem); tokenizer problems
    raise TokenizerError. Returns the output path.
    """
    from .hf_dir import open_hf_dir
    from .validate import validate_roles

    quant = quant.lower()
    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown quant {quant!r}; choose from {', '.join(QUANT_CHOICES)}")
    hf_dir, out = Path(hf_dir), Path(out)
    src = open_hf_dir(hf_dir)
    plan = _plan(src, validate_roles(src), quant)
    arch = GGUF_ARCH[src.config.architecture]

    w = gguf.GGUFWriter(path=None, arch=arch)
    _metadata(w, src, quant, hf_dir.resolve().name, hf_dir, plan)
    for p in plan:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=gguf.GGMLQuantizationType[p.qtype])

    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(out))
    tmp, prefix = None, f".{out.name}."
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=prefix, suffix=".tmp")
        os.close(fd)
        w.write_header_to_file(path=Path(tmp))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if progress is None:
            progress = sys.stderr.isatty()
        from tqdm import tqdm
        with tqdm(total=sum(p.nbytes for p in plan), unit="B", unit_scale=True, desc=f"writing {out.name}",
                  disable=not progress) as bar:
            for p in plan:
                data = _tensor_bytes(src, p)
                if data.nbytes != p.nbytes:  # our plan and the quantizer must agree on the layout
                    raise AssertionError(f"{p.name}: {data.nbytes} bytes of {p.qtype}, planned {p.nbytes}")
                w.write_tensor_data(data)
                bar.update(p.nbytes)
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as e:
        w.close()
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno and (e.filename is None or Path(e.filename).name.startswith(prefix)):
            raise OSError(e.errno, e.strerror, str(out)) from None  # the temp file is ours: name OUT
        raise
    return out
