"""THE contract between files and model code: tensor roles.

Each role names what a tensor *does*. This table says where each role lives in a GGUF file and in an
HF safetensors checkpoint, and which roles each architecture needs. Nothing outside formats/ and
weights.py ever sees a file's tensor names.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import SUPPORTED_ARCHITECTURES, ModelConfig
from ..errors import UnknownArchitectureError


@dataclass(frozen=True)
class Role:
    name: str
    gguf: str  # '{i}' stands for the layer index
    hf: str
    per_layer: bool
    kind: str  # 'matrix' (rows=out, cols=in), 'vector', 'embedding'


def _r(name, gguf, hf, kind="matrix"):
    return Role(name, gguf, hf, per_layer="{i}" in gguf, kind=kind)


ROLES: dict[str, Role] = {r.name: r for r in [
    _r("embed", "token_embd.weight", "model.embed_tokens.weight", "embedding"),
    _r("final_norm", "output_norm.weight", "model.norm.weight", "vector"),
    _r("lm_head", "output.weight", "lm_head.weight"),
    _r("rope_freqs", "rope_freqs.weight", "rope_freqs.weight", "vector"),  # llama3 scaling, GGUF only
    _r("attn_norm", "blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", "vector"),
    _r("wq", "blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    _r("wk", "blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    _r("wv", "blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    _r("wqkv", "blk.{i}.attn_qkv.weight", "model.layers.{i}.self_attn.qkv_proj.weight"),  # fused q|k|v rows
    _r("wo", "blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    _r("bq", "blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias", "vector"),
    _r("bk", "blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias", "vector"),
    _r("bv", "blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias", "vector"),
    _r("q_norm", "blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight", "vector"),
    _r("k_norm", "blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight", "vector"),
    _r("ffn_norm", "blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "vector"),
    _r("w_gate", "blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    _r("w_up", "blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    _r("w_gate_up", "blk.{i}.ffn_gate_up.weight", "model.layers.{i}.mlp.gate_up_proj.weight"),  # fused gate|up
    _r("w_down", "blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
]}

GLOBAL_ROLES = tuple(n for n, r in ROLES.items() if not r.per_layer)
LAYER_ROLES = tuple(n for n, r in ROLES.items() if r.per_layer)

# Fused roles and the separate roles they stand in for, split row-wise in this order.
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}

# GGUF's llama converter permutes wq/wk rows so that ggml's "normal" RoPE (adjacent pairs) is right.
# Our model uses the HF "halves" (NEOX) RoPE everywhere, so the weights builder undoes it for these.
GGUF_QK_PERMUTED_ARCHS = frozenset({"llama", "mistral"})

# HF `model_type` / GGUF `general.architecture` -> our architecture name.
ARCH_ALIASES = {
    "llama": "llama", "LlamaForCausalLM": "llama",
    "mistral": "mistral", "MistralForCausalLM": "mistral",
    "qwen2": "qwen2", "Qwen2ForCausalLM": "qwen2",
    "qwen3": "qwen3", "Qwen3ForCausalLM": "qwen3",
}


def canonical_architecture(name: str, *, path=None) -> str:
    arch = ARCH_ALIASES.get(name)
    if arch is None:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r:.80}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}", path=path)
    return arch


def required_layer_roles(config: ModelConfig) -> tuple[str, ...]:
    """Per-layer roles the model needs (after fused roles are split)."""
    roles = ["attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down"]
    if config.qkv_bias:
        roles += ["bq", "bk", "bv"]
    if config.qk_norm:
        roles += ["q_norm", "k_norm"]
    return tuple(roles)


def required_global_roles(config: ModelConfig) -> tuple[str, ...]:
    return ("embed", "final_norm") if config.tie_embeddings else ("embed", "final_norm", "lm_head")


def expected_shape(role: str, config: ModelConfig) -> tuple[int, ...]:
    """Logical shape of a role's tensor, [rows=out, cols=in] for matrices."""
    c = config
    shapes = {
        "embed": (c.vocab_size, c.hidden_size),
        "lm_head": (c.vocab_size, c.hidden_size),
        "final_norm": (c.hidden_size,),
        "rope_freqs": (c.head_dim // 2,),
        "attn_norm": (c.hidden_size,),
        "ffn_norm": (c.hidden_size,),
        "wq": (c.q_size, c.hidden_size),
        "wk": (c.kv_size, c.hidden_size),
        "wv": (c.kv_size, c.hidden_size),
        "wqkv": (c.q_size + 2 * c.kv_size, c.hidden_size),
        "wo": (c.hidden_size, c.q_size),
        "bq": (c.q_size,), "bk": (c.kv_size,), "bv": (c.kv_size,),
        "q_norm": (c.head_dim,), "k_norm": (c.head_dim,),
        "w_gate": (c.intermediate_size, c.hidden_size),
        "w_up": (c.intermediate_size, c.hidden_size),
        "w_gate_up": (2 * c.intermediate_size, c.hidden_size),
        "w_down": (c.hidden_size, c.intermediate_size),
    }
    return shapes[role]


def tensor_name(role: str, fmt: str, layer: int | None = None) -> str:
    r = ROLES[role]
    template = r.gguf if fmt == "gguf" else r.hf
    return template.format(i=layer) if r.per_layer else template


def name_to_role(fmt: str, num_layers: int) -> dict[str, tuple[str, int | None]]:
    """Map every known tensor name of a format to (role, layer)."""
    out = {}
    for role in ROLES:
        if ROLES[role].per_layer:
            for i in range(num_layers):
                out[tensor_name(role, fmt, i)] = (role, i)
        else:
            out[tensor_name(role, fmt)] = (role, None)
    return out
