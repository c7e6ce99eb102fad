"""Build tiny random HF transformers models in memory and the matching Params directly from their state
dict (no file formats involved), so model.py is checked against HF on its own."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from realizar_jax.config import ModelConfig, RopeScaling
from realizar_jax.formats.roles import LAYER_ROLES, ROLES, tensor_name
from realizar_jax.weights import LayerParams, Params, rope_inv_freq

ARCH_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}


def tiny_hf_model(arch="llama", *, vocab=97, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None,
                  ffn=96, tie=False, rope_scaling=None, seed=0):
    import transformers
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=256,
              tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=10000.0)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if rope_scaling is not None:
        kw["rope_scaling"] = rope_scaling
    if arch == "qwen2":
        kw["use_sliding_window"] = False
    if arch == "mistral":
        kw["sliding_window"] = None
    config = transformers.AutoConfig.for_model(arch, **kw)
    config._attn_implementation = "eager"
    model = getattr(transformers, ARCH_CLASSES[arch])(config).eval()
    with torch.no_grad():  # random init is too flat to catch mistakes: widen every weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 / p.shape[-1] ** 0.5))
    return model


def config_from_hf(model, arch) -> ModelConfig:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rs = getattr(c, "rope_scaling", None)
    scaling = None
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        scaling = RopeScaling("llama3", rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                              rs["original_max_position_embeddings"])
    return ModelConfig(architecture=arch, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                       num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                       num_kv_heads=c.num_key_value_heads, head_dim=head_dim, intermediate_size=c.intermediate_size,
                       norm_eps=c.rms_norm_eps, rope_theta=float(getattr(c, "rope_theta", 10000.0)),
                       rope_scaling=scaling, context_length=c.max_position_embeddings,
                       tie_embeddings=bool(c.tie_word_embeddings), qkv_bias=arch == "qwen2",
                       qk_norm=arch == "qwen3")


def params_from_hf(model, config: ModelConfig, dtype=jnp.float32) -> Params:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def get(role, layer=None):
        name = tensor_name(role, "hf", layer)
        if name not in sd:
            return None
        arr = sd[name]
        return jnp.asarray(arr, jnp.float32 if ROLES[role].kind == "vector" else dtype)

    layers = []
    for i in range(config.num_layers):
        fields = {r: get(r, i) for r in LAYER_ROLES if r not in ("wqkv", "w_gate_up")}
        layers.append(LayerParams(**fields))
    embed = get("embed")
    return Params(embed=embed, layers=tuple(layers), final_norm=get("final_norm"),
                  lm_head=embed if config.tie_embeddings else get("lm_head"),
                  rope_inv_freq=jnp.asarray(rope_inv_freq(config)))


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def max_rel(ours, ref) -> float:
    """max |ours - ref| over max |ref|: logits parity against a reference."""
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    """n token ids in [3, vocab) (clear of the usual special ids), fresh per seed."""
    return [int(i) for i in np.random.default_rng(seed).integers(3, vocab, n)]


def rewrite_gguf(src, dst, changes: dict | None = None, drop=()):
    """A copy of the GGUF file `src` at `dst` with metadata values changed (`changes`: key -> value, None
    leaves the key out) and the keys `drop` left out; tensors copied as they are. -> dst."""
    import gguf
    changes = dict(changes or {}, **{k: None for k in drop})
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or (name in changes and changes[name] is None):
            continue
        value = changes.get(name, f.contents())
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, value, f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(name, value, f.types[0])
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=[int(d) for d in reversed(t.shape.tolist())],
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
