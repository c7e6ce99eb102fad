"""THE contract between files and model code: tensor roles.

Each role names what a tensor *does*. This table says where each role lives in a GGUF file and in an
HF safetensors checkpoint, and which roles each architecture needs. Nothing outside formats/ and
weights.py ever sees a file's tensor names.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from gguf import TENSOR_NAMES, MODEL_TENSOR as T

from ..config import SUPPORTED_ARCHITECTURES, ModelConfig
from ..errors import UnknownArchitectureError


@dataclass(frozen=True)
class Role:
    name: str
    gguf: str | None  # '{i}' stands for the layer index; None: the role has no tensor in this format
    hf: str | None
    per_layer: bool
    # 'matrix' (rows=out, cols=in), 'vector' (1-D, or one per expert), 'embedding', 'experts' ([experts, out, in])
    kind: str


def _g(tensor: T, suffix: str = "weight") -> str:
    """llama.cpp's name of a gguf MODEL_TENSOR (gguf.TENSOR_NAMES), '{bid}' as our '{i}'."""
    return TENSOR_NAMES[tensor].replace("{bid}", "{i}") + "." + suffix


def stacked(template: str) -> str:
    """The name of an experts role's stacked tensor: its per-expert HF template without the expert index
    (llama.cpp's converter merges the experts under this name before mapping it, so gguf-py's TensorNameMap
    knows it)."""
    return template.replace(".{e}", "")


def _r(name, gguf, hf, kind="matrix"):
    return Role(name, gguf, hf, per_layer="{i}" in (gguf or hf), kind=kind)


_L = "model.layers.{i}."
# Every role, named as the llama family names it (the HF names of the other families differ: _OVERRIDES).
ROLES: dict[str, Role] = {r.name: r for r in [
    _r("embed", _g(T.TOKEN_EMBD), "model.embed_tokens.weight", "embedding"),
    _r("final_norm", _g(T.OUTPUT_NORM), "model.norm.weight", "vector"),
    _r("lm_head", _g(T.OUTPUT), "lm_head.weight"),
    _r("rope_freqs", _g(T.ROPE_FREQS), "rope_freqs.weight", "vector"),  # llama3 scaling, GGUF only
    _r("rope_factors_long", _g(T.ROPE_FACTORS_LONG), None, "vector"),  # phi3 longrope, GGUF only
    _r("rope_factors_short", _g(T.ROPE_FACTORS_SHORT), None, "vector"),
    _r("attn_norm", _g(T.ATTN_NORM), _L + "input_layernorm.weight", "vector"),
    _r("wq", _g(T.ATTN_Q), _L + "self_attn.q_proj.weight"),
    _r("wk", _g(T.ATTN_K), _L + "self_attn.k_proj.weight"),
    _r("wv", _g(T.ATTN_V), _L + "self_attn.v_proj.weight"),
    _r("wqkv", _g(T.ATTN_QKV), _L + "self_attn.qkv_proj.weight"),  # fused q|k|v rows
    _r("wo", _g(T.ATTN_OUT), _L + "self_attn.o_proj.weight"),
    _r("bq", _g(T.ATTN_Q, "bias"), _L + "self_attn.q_proj.bias", "vector"),
    _r("bk", _g(T.ATTN_K, "bias"), _L + "self_attn.k_proj.bias", "vector"),
    _r("bv", _g(T.ATTN_V, "bias"), _L + "self_attn.v_proj.bias", "vector"),
    _r("bo", _g(T.ATTN_OUT, "bias"), _L + "self_attn.o_proj.bias", "vector"),
    _r("attn_sinks", _g(T.ATTN_SINKS), _L + "self_attn.sinks", "vector"),   # gpt-oss: a logit per head
    _r("q_norm", _g(T.ATTN_Q_NORM), _L + "self_attn.q_norm.weight", "vector"),
    _r("k_norm", _g(T.ATTN_K_NORM), _L + "self_attn.k_norm.weight", "vector"),
    _r("post_attn_norm", _g(T.ATTN_POST_NORM), _L + "post_attention_layernorm.weight", "vector"),  # gemma, olmo2
    _r("ffn_norm", _g(T.FFN_NORM), _L + "post_attention_layernorm.weight", "vector"),  # the MLP's pre-norm
    _r("post_ffn_norm", _g(T.FFN_POST_NORM), _L + "post_feedforward_layernorm.weight", "vector"),
    _r("w_gate", _g(T.FFN_GATE), _L + "mlp.gate_proj.weight"),
    _r("w_up", _g(T.FFN_UP), _L + "mlp.up_proj.weight"),
    _r("w_gate_up", "blk.{i}.ffn_gate_up.weight", _L + "mlp.gate_up_proj.weight"),  # fused gate|up rows
    _r("w_down", _g(T.FFN_DOWN), _L + "mlp.down_proj.weight"),
    # Mixture of experts. GGUF stacks each layer's experts in one tensor; HF checkpoints hold one tensor per
    # expert ('{e}'), which formats/experts.py stacks at open under the name `stacked` gives.
    _r("router", _g(T.FFN_GATE_INP), _L + "block_sparse_moe.gate.weight"),
    _r("experts_gate", _g(T.FFN_GATE_EXP), _L + "block_sparse_moe.experts.{e}.w1.weight", "experts"),
    _r("experts_up", _g(T.FFN_UP_EXP), _L + "block_sparse_moe.experts.{e}.w3.weight", "experts"),
    _r("experts_down", _g(T.FFN_DOWN_EXP), _L + "block_sparse_moe.experts.{e}.w2.weight", "experts"),
    # gpt-oss's biases: the router's [experts], the experts' [experts, out] (no Mixtral-style HF name: _OVERRIDES)
    _r("router_bias", _g(T.FFN_GATE_INP, "bias"), _L + "mlp.router.bias", "vector"),
    _r("experts_gate_bias", _g(T.FFN_GATE_EXP, "bias"), _L + "mlp.experts.gate_proj.bias", "vector"),
    _r("experts_up_bias", _g(T.FFN_UP_EXP, "bias"), _L + "mlp.experts.up_proj.bias", "vector"),
    _r("experts_down_bias", _g(T.FFN_DOWN_EXP, "bias"), _L + "mlp.experts.down_proj.bias", "vector"),
]}
EXPERT_ROLES = ("experts_gate", "experts_up", "experts_down")
MOE_ROLES = ("router",) + EXPERT_ROLES
MOE_BIAS_ROLES = ("router_bias", "experts_gate_bias", "experts_up_bias", "experts_down_bias")

GLOBAL_ROLES = tuple(n for n, r in ROLES.items() if not r.per_layer)
LAYER_ROLES = tuple(n for n, r in ROLES.items() if r.per_layer)

# Fused roles and the separate roles they stand in for, split row-wise in this order.
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}

# The roles each architecture's files may hold. The GGUF names are llama.cpp's (tests check each HF name
# against gguf-py's TensorNameMap of the architecture, and each role against its MODEL_TENSORS).
_LLAMA = ("embed", "final_norm", "lm_head", "rope_freqs", "attn_norm", "wq", "wk", "wv", "wqkv", "wo", "bq", "bk",
          "bv", "q_norm", "k_norm", "ffn_norm", "w_gate", "w_up", "w_gate_up", "w_down")
_GEMMA2 = ("embed", "final_norm", "lm_head", "attn_norm", "wq", "wk", "wv", "wo", "post_attn_norm", "ffn_norm",
           "post_ffn_norm", "w_gate", "w_up", "w_down")
ARCH_ROLES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "olmo2": ("embed", "final_norm", "lm_head", "wq", "wk", "wv", "wo", "q_norm", "k_norm", "post_attn_norm",
              "w_gate", "w_up", "w_down", "post_ffn_norm"),
    "phi3": ("embed", "final_norm", "lm_head", "rope_factors_long", "rope_factors_short", "attn_norm", "wq", "wk",
             "wv", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down"),
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA2 + ("q_norm", "k_norm"),
    "mixtral": ("embed", "final_norm", "lm_head", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm") + MOE_ROLES,
    "qwen3moe": ("embed", "final_norm", "lm_head", "attn_norm", "wq", "wk", "wv", "wo", "q_norm", "k_norm",
                 "ffn_norm") + MOE_ROLES,
    "gptoss": ("embed", "final_norm", "lm_head", "attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo",
               "attn_sinks", "ffn_norm") + MOE_ROLES + MOE_BIAS_ROLES,
}
_GEMMA_HF = {"ffn_norm": dict(hf=_L + "pre_feedforward_layernorm.weight")}
_OVERRIDES: dict[str, dict[str, dict]] = {
    # llama.cpp's gemma2 always ties its head to the embedding (no output tensor)
    "gemma2": {**_GEMMA_HF, "lm_head": dict(gguf=None)}, "gemma3": _GEMMA_HF,
    # llama.cpp keeps Phi-3's fused gate|up as ffn_up (2 * n_ff rows) and has no ffn_gate
    "phi3": {"w_gate_up": dict(gguf=_g(T.FFN_UP))},
    "qwen3moe": {"router": dict(hf=_L + "mlp.gate.weight"),
                 **{r: dict(hf=_L + f"mlp.experts.{{e}}.{p}_proj.weight")
                    for r, p in (("experts_gate", "gate"), ("experts_up", "up"), ("experts_down", "down"))}},
    # gpt-oss: llama.cpp names the MLP's pre-norm post_attention_norm. Its HF checkpoints hold each layer's
    # experts stacked and transposed, gate and up interleaved in one gate_up_proj: formats/experts.py splits
    # them at open into the per-role stacks named here (the names llama.cpp's converter maps them through).
    "gptoss": {"ffn_norm": dict(gguf=_g(T.ATTN_POST_NORM)), "router": dict(hf=_L + "mlp.router.weight"),
               **{r: dict(hf=_L + f"mlp.experts.{p}_proj.weight")
                  for r, p in (("experts_gate", "gate"), ("experts_up", "up"), ("experts_down", "down"))}},
}
# The norms of a block, by architecture: pre-norms (llama), post-norms only (olmo2), both (gemma).
LAYER_NORMS = {"olmo2": ("post_attn_norm", "post_ffn_norm"),
               "gemma2": ("attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm")}
LAYER_NORMS["gemma3"] = LAYER_NORMS["gemma2"]
# RMSNorm weights that the HF checkpoint stores as w for (1 + w) (Gemma): GGUF stores 1 + w, as llama.cpp's
# converter writes it, and the weights builder adds the shift to HF tensors.
NORM_SHIFT = {"gemma2": 1.0, "gemma3": 1.0}
NORM_ROLES = ("final_norm", "attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm", "q_norm", "k_norm")


@lru_cache(maxsize=None)
def roles_of(arch: str) -> dict[str, Role]:
    """The role table of an architecture: role -> Role with that architecture's file names."""
    over = _OVERRIDES.get(arch, {})
    return {n: replace(ROLES[n], **over.get(n, {})) for n in ARCH_ROLES.get(arch, _LLAMA)}

# GGUF's llama converter permutes wq/wk rows so that ggml's "normal" RoPE (adjacent pairs) is right.
# Our model uses the HF "halves" (NEOX) RoPE everywhere, so the weights builder undoes it for these.
GGUF_QK_PERMUTED_ARCHS = frozenset({"llama", "mistral", "mixtral"})

# HF `model_type` / GGUF `general.architecture` -> our architecture name.
ARCH_ALIASES = {
    "llama": "llama", "LlamaForCausalLM": "llama",
    "mistral": "mistral", "MistralForCausalLM": "mistral",
    "qwen2": "qwen2", "Qwen2ForCausalLM": "qwen2",
    "qwen3": "qwen3", "Qwen3ForCausalLM": "qwen3",
    "olmo2": "olmo2", "Olmo2ForCausalLM": "olmo2",
    "phi3": "phi3", "Phi3ForCausalLM": "phi3",
    "gemma2": "gemma2", "Gemma2ForCausalLM": "gemma2",
    "gemma3": "gemma3", "gemma3_text": "gemma3", "Gemma3ForCausalLM": "gemma3",
    "mixtral": "mixtral", "MixtralForCausalLM": "mixtral",   # GGUF: 'llama' with expert_count (gguf_file.py)
    "qwen3moe": "qwen3moe", "qwen3_moe": "qwen3moe", "Qwen3MoeForCausalLM": "qwen3moe",
    "gptoss": "gptoss", "gpt_oss": "gptoss", "gpt-oss": "gptoss", "GptOssForCausalLM": "gptoss",
}


def canonical_architecture(name: str, *, path=None) -> str:
    arch = ARCH_ALIASES.get(name)
    if arch is None:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r:.60}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}", path=path)
    return arch


def required_layer_roles(config: ModelConfig) -> tuple[str, ...]:
    """Per-layer roles the model needs (after fused roles are split)."""
    norms = LAYER_NORMS.get(config.architecture, ("attn_norm", "ffn_norm"))
    roles = [n for n in norms if n in ("attn_norm", "post_attn_norm")] + ["wq", "wk", "wv", "wo"]
    roles += [n for n in norms if n in ("ffn_norm", "post_ffn_norm")]
    roles += list(MOE_ROLES) if config.moe else ["w_gate", "w_up", "w_down"]
    if config.qkv_bias:
        roles += ["bq", "bk", "bv"]
    if config.attn_out_bias:
        roles += ["bo"]
    if config.attn_sinks:
        roles += ["attn_sinks"]
    if config.moe_bias:
        roles += list(MOE_BIAS_ROLES)
    if config.qk_norm:
        roles += ["q_norm", "k_norm"]
    return tuple(roles)


def required_global_roles(config: ModelConfig) -> tuple[str, ...]:
    return ("embed", "final_norm") if config.tie_embeddings else ("embed", "final_norm", "lm_head")


def expected_shape(role: str, config: ModelConfig) -> tuple[int, ...]:
    """Logical shape of a role's tensor, [rows=out, cols=in] for matrices."""
    c = config
    whole = c.architecture == "olmo2"   # OLMo 2 normalizes q and k over the whole projection, not per head
    shapes = {
        "embed": (c.vocab_size, c.hidden_size),
        "lm_head": (c.vocab_size, c.hidden_size),
        "final_norm": (c.hidden_size,),
        "rope_freqs": (c.head_dim // 2,),
        "rope_factors_long": (c.rotary_dim // 2,), "rope_factors_short": (c.rotary_dim // 2,),
        "attn_norm": (c.hidden_size,),
        "post_attn_norm": (c.hidden_size,),
        "ffn_norm": (c.hidden_size,),
        "post_ffn_norm": (c.hidden_size,),
        "wq": (c.q_size, c.hidden_size),
        "wk": (c.kv_size, c.hidden_size),
        "wv": (c.kv_size, c.hidden_size),
        "wqkv": (c.q_size + 2 * c.kv_size, c.hidden_size),
        "wo": (c.hidden_size, c.q_size),
        "bq": (c.q_size,), "bk": (c.kv_size,), "bv": (c.kv_size,), "bo": (c.hidden_size,),
        "attn_sinks": (c.num_heads,),
        "q_norm": (c.q_size if whole else c.head_dim,), "k_norm": (c.kv_size if whole else c.head_dim,),
        "w_gate": (c.intermediate_size, c.hidden_size),
        "w_up": (c.intermediate_size, c.hidden_size),
        "w_gate_up": (2 * c.intermediate_size, c.hidden_size),
        "w_down": (c.hidden_size, c.intermediate_size),
    }
    if c.moe:
        e, f = c.num_experts, c.expert_ffn
        shapes.update(router=(e, c.hidden_size), experts_gate=(e, f, c.hidden_size), experts_up=(e, f, c.hidden_size),
                      experts_down=(e, c.hidden_size, f), router_bias=(e,), experts_gate_bias=(e, f),
                      experts_up_bias=(e, f), experts_down_bias=(e, c.hidden_size))
    return shapes[role]


def tensor_name(role: str, fmt: str, layer: int | None = None, arch: str = "llama") -> str | None:
    """The name of a role's tensor in format fmt ('gguf' or 'hf') for architecture arch; None where the
    architecture has no such tensor in that format."""
    r = roles_of(arch).get(role)
    template = None if r is None else r.gguf if fmt == "gguf" else r.hf
    if template is None:
        return None
    template = stacked(template)
    return template.format(i=layer) if r.per_layer else template


def expert_tensor_name(role: str, layer: int, expert: int, arch: str) -> str | None:
    """The HF name of one expert's tensor of an experts role (None where the architecture has no such role)."""
    r = roles_of(arch).get(role)
    return None if r is None or r.hf is None or "{e}" not in r.hf else r.hf.format(i=layer, e=expert)


def name_to_role(fmt: str, num_layers: int, arch: str = "llama") -> dict[str, tuple[str, int | None]]:
    """Map every known tensor name of a format (and architecture) to (role, layer)."""
    out = {}
    for role, r in roles_of(arch).items():
        for i in (range(num_layers) if r.per_layer else (None,)):
            name = tensor_name(role, fmt, i, arch)
            if name is not None:
                out[name] = (role, i)
    return out
