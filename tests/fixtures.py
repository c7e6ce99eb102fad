"""Tiny random HF models of every supported architecture on disk, and their GGUF conversions.

    make_hf_model(tmpdir, "qwen3")                  -> folder with config.json, model.safetensors, tokenizer
    make_hf_model(tmpdir, "llama", dtype="bfloat16") / (..., shard_size="200KB")
    make_gguf(hf_dir, out, "q4_k_m")                -> GGUF written by our converter

`arch` is an architecture or one of VARIANTS (llama3 rope scaling, GQA/MQA, tied embeddings, a
hidden-64 model whose rows are not whole K-quant blocks). Defaults give hidden 256 and ffn 512, so
every matrix row is a whole number of 256-value super-blocks. Weights are random with std
1.25/sqrt(hidden) (logits have std ~1, not flat); norms are 1 + 0.2*N(0,1) and biases 0.5*N(0,1), so
a missing norm or bias shows. The tokenizer is tests/tokenizer_fixtures.make_bpe_dir's byte-level BPE
(Llama 3 style for llama/mistral, Qwen2 style for qwen), and vocab_size is its size.
Everything is cached per (tmpdir, arguments): call freely from tests, use the session fixture
`model_files` (conftest.py) to share one tmpdir.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

ARCH_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM",
                "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
                "qwen3moe": "Qwen3MoeForCausalLM", "gptoss": "GptOssForCausalLM"}
MODEL_TYPES = {"gemma3": "gemma3_text", "qwen3moe": "qwen3_moe", "gptoss": "gpt_oss"}   # transformers' model_type where it is not our architecture name
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
VARIANTS = {
    "llama": dict(arch="llama", kv_heads=4),
    "llama3": dict(arch="llama", kv_heads=2, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "mistral": dict(arch="mistral", kv_heads=2),
    "qwen2": dict(arch="qwen2", kv_heads=2),
    "qwen2_tied": dict(arch="qwen2", kv_heads=2, tie=True),
    "qwen3": dict(arch="qwen3", kv_heads=2, head_dim=128),
    "mqa": dict(arch="llama", kv_heads=1),
    "small": dict(arch="llama", hidden=64, intermediate=160, kv_heads=2),  # rows not whole 256-blocks
}
# The families beyond llama, tiny (hidden 64) and with their features switched on where they bite: windows
# shorter than the test prompts, soft-capping caps near the logits' size, partial RoPE, longrope factors.
_FAMILY = dict(hidden=64, intermediate=128, kv_heads=2, layers=2)
_LONGROPE = dict(type="longrope", short_factor=[1.0, 1.1, 1.3, 1.7, 2.0, 2.6, 3.1, 4.0],
                 long_factor=[1.0, 1.5, 2.2, 3.0, 4.5, 6.0, 8.0, 12.0])
ALL_VARIANTS = tuple(VARIANTS)   # the llama family's (the tests of its files run over these)
VARIANTS.update({
    "olmo2": dict(arch="olmo2", **_FAMILY),
    "phi3": dict(arch="phi3", **_FAMILY),
    "phi3_swa": dict(arch="phi3", **_FAMILY, extra=dict(sliding_window=5)),
    # Phi-3.5-mini style: longrope with an original context of 16 (max_position_embeddings 64: factor 4)
    "phi3_longrope": dict(arch="phi3", **_FAMILY, rope_scaling=_LONGROPE, max_position_embeddings=64,
                          extra=dict(original_max_position_embeddings=16)),
    # Phi-4-mini style: partial RoPE (0.75 of head_dim 16 -> 12 dims, 6 factors), tied embeddings, longrope
    "phi4_mini": dict(arch="phi3", **{**_FAMILY, "tie": True}, max_position_embeddings=64,
                      rope_scaling={**_LONGROPE, "short_factor": _LONGROPE["short_factor"][:6],
                                    "long_factor": _LONGROPE["long_factor"][:6]},
                      extra=dict(original_max_position_embeddings=16, partial_rotary_factor=0.75)),
    "gemma2": dict(arch="gemma2", **_FAMILY, head_dim=32, tie=True,   # layer 0 slides, layer 1 is global
                   extra=dict(sliding_window=5, attn_logit_softcapping=3.0, final_logit_softcapping=3.0,
                              query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh")),
    # Gemma 3: layers 0, 1 slide with their own RoPE base, layer 2 is global with linear scaling (pattern 3)
    "gemma3": dict(arch="gemma3", **{**_FAMILY, "layers": 3}, head_dim=32, tie=True,
                   rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=50000.0,
                   extra=dict(sliding_window=5, final_logit_softcapping=3.0, query_pre_attn_scalar=24,
                              rope_local_base_freq=1000.0, sliding_window_pattern=3)),
    "mistral_swa": dict(arch="mistral", **_FAMILY, extra=dict(sliding_window=5)),
})
FAMILY_VARIANTS = tuple(v for v in VARIANTS if v not in ALL_VARIANTS)
# Mixtures of experts (tests/test_moe.py): few experts, so a 21-token prompt spreads over all of them
VARIANTS.update({
    "mixtral": dict(arch="mixtral", **_FAMILY, extra=dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3moe": dict(arch="qwen3moe", **_FAMILY, extra=dict(num_experts=8, num_experts_per_tok=2,
                                                            moe_intermediate_size=32, norm_topk_prob=True)),
    # Qwen3-MoE's transformers default: the chosen experts' weights not renormalized; top-3
    "qwen3moe_raw": dict(arch="qwen3moe", **_FAMILY, extra=dict(num_experts=6, num_experts_per_tok=3,
                                                                moe_intermediate_size=32, norm_topk_prob=False)),
})
# gpt-oss (tests/test_gpt_oss.py): 3 layers alternating sliding (window 5) / full / sliding; YaRN with the
# original context 64 of 256 (factor 4, not truncated, as gpt-oss's); 6 experts, top-3; a SwiGLU limit of
# 1.5 (gpt-oss's is 7) so that the clamps bite at these activations' size; sinks N(0, 1) (conftest-free:
# _build_hf_model widens them)
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
             "original_max_position_embeddings": 64}
VARIANTS.update({
    "gptoss": dict(arch="gptoss", **{**_FAMILY, "layers": 3, "intermediate": 32}, head_dim=16,
                   rope_scaling=YARN_ROPE, max_position_embeddings=256,
                   extra=dict(num_local_experts=6, num_experts_per_tok=3, sliding_window=5, swiglu_limit=1.5)),
})
MOE_VARIANTS = ("mixtral", "qwen3moe", "qwen3moe_raw", "gptoss")
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k", "q6_k", "q4_k_m")
TOKENIZER_STYLE = {"llama": "llama3", "mistral": "llama3", "qwen2": "qwen2", "qwen3": "qwen2", "olmo2": "gpt2",
                   "phi3": "llama3", "gemma2": "llama3", "gemma3": "llama3", "mixtral": "llama3", "qwen3moe": "qwen2",
                   "gptoss": "o200k"}

_cache: dict[tuple, Path] = {}


def _key_dir(tmpdir: Path, prefix: str, key) -> Path:
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:10]
    return Path(tmpdir) / f"{prefix}-{digest}"


def tokenizer_dir(tmpdir, style: str) -> Path:
    """A trained byte-level BPE tokenizer folder (cached)."""
    from tokenizer_fixtures import make_bpe_dir
    key = ("tok", str(tmpdir), style)
    if key not in _cache:
        path = Path(tmpdir) / f"tokenizer-{style}"
        if not (path / "tokenizer_config.json").is_file():
            make_bpe_dir(path, style)
        _cache[key] = path
    return _cache[key]


DEFAULTS = dict(hidden=256, layers=2, heads=4, kv_heads=None, head_dim=None, intermediate=512, tie=False,
                rope_scaling=None, rope_theta=10000.0, dtype="float32", shard_size=None, seed=0, std=None,
                max_position_embeddings=512, extra=None)


def make_hf_model(tmpdir, arch: str = "llama", **overrides) -> Path:
    """Save a tiny random HF model under tmpdir and return its folder; cached per arguments.

    arch: 'llama', 'mistral', 'qwen2', 'qwen3' or a VARIANTS name. overrides (see DEFAULTS): hidden,
    layers, heads, kv_heads, head_dim, intermediate, tie, rope_scaling (HF dict), rope_theta,
    dtype ('float32', 'bfloat16', 'float16'), shard_size (e.g. '200KB'), seed, std, max_position_embeddings,
    extra (more transformers config keys, e.g. sliding_window).
    """
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown make_hf_model arguments {sorted(unknown)}")
    args = {**DEFAULTS, **(VARIANTS[arch] if arch in VARIANTS else {"arch": arch}), **overrides}
    if args["arch"] not in ARCH_CLASSES:
        raise ValueError(f"unknown fixture architecture {arch!r}")
    if args["kv_heads"] is None:
        args["kv_heads"] = args["heads"]
    key = ("hf", str(tmpdir), tuple(sorted((k, repr(v)) for k, v in args.items())))
    if key in _cache:
        return _cache[key]
    out = _key_dir(tmpdir, f"hf-{arch}", key)
    if not (out / ".complete").is_file():
        _build_hf_model(out, Path(tmpdir), **args)
    _cache[key] = out
    return out


def _build_hf_model(out: Path, tmpdir: Path, *, arch, hidden, layers, heads, kv_heads, head_dim, intermediate,
                    tie, rope_scaling, rope_theta, dtype, shard_size, seed, std, max_position_embeddings, extra):
    import torch
    import transformers
    from tokenizers import Tokenizer

    tok_dir = tokenizer_dir(tmpdir, TOKENIZER_STYLE[arch])
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok_cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    kw = dict(vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=hidden,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              intermediate_size=intermediate, max_position_embeddings=max_position_embeddings,
              tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=rope_theta,
              initializer_range=std if std is not None else 1.25 / hidden ** 0.5,
              bos_token_id=tok.token_to_id(tok_cfg["bos_token"]), eos_token_id=tok.token_to_id(tok_cfg["eos_token"]))
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if rope_scaling is not None:
        kw["rope_scaling"] = dict(rope_scaling)
    if arch in ("mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3moe"):
        kw["sliding_window"] = None
    if arch not in ("llama", "mistral", "qwen2", "qwen3"):
        kw["pad_token_id"] = kw["eos_token_id"]   # their defaults (Phi-3: 32000) are past the tiny vocabulary
    kw.update(extra or {})
    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.for_model(MODEL_TYPES.get(arch, arch), **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCH_CLASSES[arch])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:   # Gemma's norms multiply by 1 + w
                p.copy_((0.0 if arch.startswith("gemma") else 1.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name.endswith("sinks"):   # gpt-oss's attention sinks: large enough to take a share
                p.copy_(torch.randn_like(p))
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(tmp, **save_kw)
    for f in tok_dir.iterdir():
        shutil.copy(f, tmp / f.name)
    (tmp / ".complete").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def make_gguf(hf_dir, out, quant: str = "f16") -> Path:
    """Convert `hf_dir` with our writer into `out` (kept if it already exists)."""
    from realizar_jax.formats.gguf_writer import write_gguf
    out = Path(out)
    if not out.is_file():
        write_gguf(hf_dir, out, quant, progress=False)
    return out


class ModelFiles:
    """Session-wide cache of fixture models: `.hf(arch, **overrides)` and `.gguf(arch, quant, **overrides)`."""

    def __init__(self, tmpdir):
        self.tmpdir = Path(tmpdir)

    def hf(self, arch: str = "llama", **overrides) -> Path:
        return make_hf_model(self.tmpdir, arch, **overrides)

    def gguf(self, arch: str = "llama", quant: str = "f16", **overrides) -> Path:
        hf = self.hf(arch, **overrides)
        return make_gguf(hf, hf.parent / f"{hf.name}.{quant}.gguf", quant)
