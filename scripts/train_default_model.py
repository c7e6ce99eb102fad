#!/usr/bin/env python3
"""Train realizar-jax's embedded default model: a small LLaMA on the Python standard library.

Self-contained (JAX + optax + tokenizers + safetensors); it does not use the package's own model
code, so the package can be tested against a model it did not produce itself.

  data       the running interpreter's stdlib *.py files (no test dirs, no site-packages), sorted;
             split by file on h = md5(relative path) mod 20: h == 0 validation (picks the checkpoint),
             h == 1 test (the reported held-out numbers), the rest training
  tokenizer  byte-level BPE (GPT-2 pre-tokenizer regex) trained with `tokenizers` on the train files
  model      LLaMA (RMSNorm, HF "halves" RoPE, SwiGLU, GQA, tied embeddings) in plain JAX
  training   AdamW + warmup + cosine, bf16 compute, f32 master weights, residual dropout, fixed seed;
             the step count is min(--max-epochs, what fits --device-time-budget) or --steps; the
             checkpoint with the lowest validation loss is kept
  output     an HF LlamaForCausalLM folder: config.json, model*.safetensors, tokenizer.json,
             tokenizer_config.json, train_log.json

Example: python scripts/train_default_model.py --out /tmp/m --device-time-budget 240
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Renders a chat as Python comments: the model only knows code, so that is what it can continue.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}# assistant:{% endif %}"
)
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    vocab: int = 4096
    dim: int = 512          # multiple of 256 so every K-quant type applies to every matrix
    layers: int = 5
    heads: int = 8
    kv_heads: int = 2
    ffn: int = 1024
    ctx: int = 512
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


# ----------------------------------------------------------------------------------------- data
def stdlib_files(max_files: int | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the interpreter's stdlib .py files, sorted for determinism."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        if text.strip():
            out.append((rel.as_posix(), text))
    return out[:max_files] if max_files else out


def split_of(rel: str) -> str:
    """Deterministic split by file (md5 of the path, so it does not depend on PYTHONHASHSEED)."""
    h = int(hashlib.md5(rel.encode()).hexdigest(), 16) % 20
    return {0: "valid", 1: "test"}.get(h, "train")


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[BOS, EOS, PAD], min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # HF-style: encode() prepends <|bos|> (as LLaMA-3 tokenizers do).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def tokenizer_config(cfg: ModelCfg) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": cfg.ctx, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def encode_docs(tok, texts: list[str]) -> np.ndarray:
    """One token stream: <|bos|> doc <|eos|> <|bos|> doc <|eos|> ..."""
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(texts):  # post-processor adds the <|bos|>
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


# ---------------------------------------------------------------------------------------- model
def init_params(cfg: ModelCfg, key) -> dict:
    """HF LlamaForCausalLM tensor layout ([out, in] matrices), f32."""
    import jax
    import jax.numpy as jnp

    hd = cfg.head_dim
    shapes = {"q_proj": (cfg.heads * hd, cfg.dim), "k_proj": (cfg.kv_heads * hd, cfg.dim),
              "v_proj": (cfg.kv_heads * hd, cfg.dim), "o_proj": (cfg.dim, cfg.heads * hd),
              "gate_proj": (cfg.ffn, cfg.dim), "up_proj": (cfg.ffn, cfg.dim),
              "down_proj": (cfg.dim, cfg.ffn)}
    keys = iter(jax.random.split(key, 1 + cfg.layers * len(shapes)))
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.layers)  # GPT-2 scaling of residual outputs
    params = {"embed": jax.random.normal(next(keys), (cfg.vocab, cfg.dim)) * std,
              "norm": jnp.ones((cfg.dim,)), "layers": []}
    for _ in range(cfg.layers):
        layer = {n: jax.random.normal(next(keys), s) * (out_std if n in ("o_proj", "down_proj") else std)
                 for n, s in shapes.items()}
        layer["input_layernorm"] = jnp.ones((cfg.dim,))
        layer["post_attention_layernorm"] = jnp.ones((cfg.dim,))
        params["layers"].append(layer)
    return params


def rms_norm(x, w, eps):
    import jax.numpy as jnp
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax_rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * x32.astype(x.dtype)  # HF order: normalise in f32, scale in model dtype


def jax_rsqrt(x):
    import jax
    return jax.lax.rsqrt(x)


def rope(x, pos, theta):
    """HF LlamaRotaryEmbedding: rotate the two halves of each head ("NEOX" style)."""
    import jax.numpy as jnp
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang = pos[:, None].astype(jnp.float32) * inv[None, :]           # [T, hd/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[None, :, None, :]  # [1, T, 1, hd]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rot = jnp.concatenate([-x2, x1], -1)
    return (x.astype(jnp.float32) * cos + rot.astype(jnp.float32) * sin).astype(x.dtype)


def forward(params, tokens, cfg: ModelCfg, *, dtype=None, dropout=0.0, key=None, attn_impl="xla"):
    """tokens [B, T] int -> logits [B, T, V] f32. dtype: compute dtype (weights cast on the fly)."""
    import jax
    import jax.numpy as jnp

    dtype = dtype or jnp.float32
    B, T = tokens.shape
    hd = cfg.head_dim
    pos = jnp.arange(T)
    keys = iter(jax.random.split(key, 2 * cfg.layers + 1)) if dropout > 0 else None

    def drop(x):
        if dropout <= 0:
            return x
        keep = jax.random.bernoulli(next(keys), 1.0 - dropout, x.shape)
        return jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)

    def mm(x, w):  # x [..., in] @ w[out, in].T
        return jnp.einsum("...i,oi->...o", x, w.astype(dtype))

    emb = params["embed"].astype(dtype)
    h = drop(emb[tokens])
    for L in params["layers"]:
        x = rms_norm(h, L["input_layernorm"], cfg.eps)
        q = rope(mm(x, L["q_proj"]).reshape(B, T, cfg.heads, hd), pos, cfg.rope_theta)
        k = rope(mm(x, L["k_proj"]).reshape(B, T, cfg.kv_heads, hd), pos, cfg.rope_theta)
        v = mm(x, L["v_proj"]).reshape(B, T, cfg.kv_heads, hd)
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attn_impl)
        h = h + drop(mm(a.reshape(B, T, cfg.heads * hd), L["o_proj"]))
        x = rms_norm(h, L["post_attention_layernorm"], cfg.eps)
        g = jax.nn.silu(mm(x, L["gate_proj"])) * mm(x, L["up_proj"])
        h = h + drop(mm(g, L["down_proj"]))
    h = rms_norm(h, params["norm"], cfg.eps)
    return jnp.einsum("btd,vd->btv", h, emb, preferred_element_type=jnp.float32)


def count_params(params) -> int:
    import jax
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


# ------------------------------------------------------------------------------------ export
def hf_tensors(params) -> dict[str, np.ndarray]:
    t = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["norm"]}
    for i, L in enumerate(params["layers"]):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = L[n]
        for n in ("gate_proj", "up_proj", "down_proj"):
            t[p + f"mlp.{n}.weight"] = L[n]
        t[p + "input_layernorm.weight"] = L["input_layernorm"]
        t[p + "post_attention_layernorm.weight"] = L["post_attention_layernorm"]
    return {k: np.asarray(v, dtype=np.float32) for k, v in t.items()}


def hf_config(cfg: ModelCfg, tok, torch_dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.ctx, "rms_norm_eps": cfg.eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS),
        "pad_token_id": tok.token_to_id(PAD), "torch_dtype": torch_dtype, "use_cache": True,
    }


def save_hf(out: Path, cfg: ModelCfg, params, tok, save_dtype: str = "float32",
            max_shard_bytes: int = 14 * 2**20) -> list[str]:
    """Write an HF LlamaForCausalLM folder; shards the weights so each file stays < max_shard_bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[save_dtype]
    tensors = {k: v.astype(np_dtype) for k, v in hf_tensors(params).items()}
    shards, cur, size = [], {}, 0
    for name, arr in tensors.items():
        if cur and size + arr.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = arr
        size += arr.nbytes
    shards.append(cur)
    files = []
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        files.append("model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fn), metadata={"format": "pt"})
            weight_map.update({k: fn for k in shard})
            files.append(fn)
        total = sum(a.nbytes for a in tensors.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        files.append("model.safetensors.index.json")
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tok, save_dtype), indent=1))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(cfg), indent=1))
    return files + ["config.json", "tokenizer.json", "tokenizer_config.json"]


# ---------------------------------------------------------------------------------- training
def lr_at(step: int, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    t_start = time.time()
    log = lambda *a: print(f"[{time.time() - t_start:7.1f}s]", *a, flush=True)  # noqa: E731
    cfg = ModelCfg(vocab=args.vocab, dim=args.dim, layers=args.layers, heads=args.heads,
                   kv_heads=args.kv_heads, ffn=args.ffn, ctx=args.ctx)
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if (on_gpu and args.dtype == "auto") or args.dtype == "bfloat16" else jnp.float32

    files = stdlib_files(args.max_files)
    docs = {k: [t for r, t in files if split_of(r) == k] for k in ("train", "valid", "test")}
    for k in ("valid", "test"):  # tiny runs (--max-files) may draw no such file: take the last train one
        if not docs[k]:
            docs[k], docs["train"] = docs["train"][-1:], docs["train"][:-1]
    train_docs, valid_docs, held_docs = docs["train"], docs["valid"], docs["test"]
    log(f"{len(files)} stdlib files: {len(train_docs)} train, {len(valid_docs)} valid, {len(held_docs)} test")
    tok = train_tokenizer(train_docs, cfg.vocab)
    train_ids, valid_ids, held_ids = (encode_docs(tok, d) for d in (train_docs, valid_docs, held_docs))
    held_bytes = sum(len(t.encode()) for t in held_docs)
    log(f"tokens: train {train_ids.size:,}  valid {valid_ids.size:,}  test {held_ids.size:,} "
        f"({held_bytes / held_ids.size:.2f} B/tok)")

    key = jax.random.PRNGKey(args.seed)
    key, k_init = jax.random.split(key)
    params = init_params(cfg, k_init)
    n_params = count_params(params)
    log(f"model {cfg}  params {n_params:,}  compute {jnp.dtype(dtype).name}  backend {jax.default_backend()}")

    decay_mask = jax.tree_util.tree_map(lambda p: p.ndim == 2, params)
    opt = optax.inject_hyperparams(lambda learning_rate: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(learning_rate, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask),
    ))(learning_rate=args.lr)
    opt_state = opt.init(params)
    data = jnp.asarray(train_ids)
    B, T = args.batch, cfg.ctx

    def batch_at(k):
        starts = jax.random.randint(k, (B,), 0, data.size - T - 1)
        return jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (T + 1,)))(starts)

    def make_step(attn_impl):
        def loss_fn(p, x, k):
            logits = forward(p, x[:, :-1], cfg, dtype=dtype, dropout=args.dropout, key=k,
                             attn_impl=attn_impl)
            return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

        @jax.jit
        def step(p, s, k, lr):
            kb, kd = jax.random.split(k)
            loss, g = jax.value_and_grad(loss_fn)(p, batch_at(kb), kd)
            s.hyperparams["learning_rate"] = lr
            upd, s = opt.update(g, s, p)
            return optax.apply_updates(p, upd), s, loss
        return step

    def make_eval(attn_impl):
        @jax.jit
        def ev(p, x):  # x [n, T+1] -> summed nll, token count
            logits = forward(p, x[:, :-1], cfg, dtype=dtype, attn_impl=attn_impl)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
            return nll.sum()
        return ev

    def windows(ids, max_windows=None):
        n = (ids.size - 1) // T
        if max_windows:
            n = min(n, max_windows)
        idx = np.arange(n)[:, None] * T + np.arange(T + 1)[None, :]
        return ids[idx]

    held_w = windows(held_ids) if held_ids.size > T + 1 else held_ids[None, :]
    valid_w = windows(valid_ids) if valid_ids.size > T + 1 else valid_ids[None, :]
    train_w = windows(train_ids, max_windows=held_w.shape[0])  # same-size train sample, no dropout

    def evaluate(p, ev, w):
        tot, n = 0.0, 0
        for i in range(0, w.shape[0], 32):
            chunk = jnp.asarray(w[i:i + 32])
            tot += float(ev(p, chunk))
            n += chunk.shape[0] * (chunk.shape[1] - 1)
        return tot / n

    # cuDNN flash attention on GPU when it compiles; XLA's attention otherwise.
    impls = (["cudnn", "xla"] if on_gpu else ["xla"]) if args.attn == "auto" else [args.attn]
    for impl in impls:
        try:
            step, ev = make_step(impl), make_eval(impl)
            t0 = time.time()
            key, k = jax.random.split(key)
            params, opt_state, loss = step(params, opt_state, k, jnp.float32(lr_at(0, args.lr, args.warmup, 1)))
            loss = float(loss)
            log(f"compiled train step with attention={impl} in {time.time() - t0:.1f}s; first loss {loss:.3f}")
            attn_impl = impl
            break
        except Exception as e:  # noqa: BLE001 - try the next implementation
            log(f"attention={impl} failed: {type(e).__name__}: {str(e)[:200]}")
    else:
        raise RuntimeError("no attention implementation compiled")
    evaluate(params, ev, valid_w), evaluate(params, ev, held_w)  # compile eval shapes outside the timed loop

    steps_per_epoch = max(1, (train_ids.size) // (B * T))
    max_steps = args.steps or int(args.max_epochs * steps_per_epoch)
    total, losses, evals = max_steps, [[0, loss]], []
    best = (float("inf"), None, -1)
    t_train = time.time()
    step_i = 1
    pending = []
    while step_i < total:
        key, k = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, k, jnp.float32(lr_at(step_i, args.lr, args.warmup, total)))
        pending.append((step_i, loss))
        step_i += 1
        if step_i == 21 and not args.steps and args.device_time_budget:
            loss.block_until_ready()
            per = (time.time() - t_train) / 20
            fit = int((args.device_time_budget - (time.time() - t_train)) / (per * 1.06)) + step_i
            total = max(step_i + 1, min(max_steps, fit))
            log(f"{per * 1e3:.1f} ms/step ({B * T / per:,.0f} tok/s); {steps_per_epoch} steps/epoch; "
                f"training for {total} steps ({total / steps_per_epoch:.1f} epochs)")
        if step_i % args.log_every == 0 or step_i == total:
            for s, l in pending:
                losses.append([s, float(l)])
            pending = []
            log(f"step {step_i:6d}/{total}  loss {losses[-1][1]:.4f}  lr {lr_at(step_i, args.lr, args.warmup, total):.2e}")
        if step_i % args.eval_every == 0 or step_i == total:
            vl, hl = evaluate(params, ev, valid_w), evaluate(params, ev, held_w)
            evals.append({"step": step_i, "valid_loss": vl, "heldout_loss": hl, "time_s": time.time() - t_train})
            if vl < best[0]:
                best = (vl, jax.tree_util.tree_map(lambda x: x.copy(), params), step_i)
            log(f"step {step_i:6d}  valid loss {vl:.4f}  test loss {hl:.4f}  ppl {math.exp(hl):.2f}")
    train_time = time.time() - t_train
    final_held = evals[-1]["heldout_loss"] if evals else evaluate(params, ev, held_w)
    if best[1] is not None and args.keep_best:
        params = best[1]
    held, valid = evaluate(params, ev, held_w), evaluate(params, ev, valid_w)
    train_eval = evaluate(params, ev, train_w)
    shipped_step = best[2] if (best[1] is not None and args.keep_best) else step_i
    log(f"shipped step {shipped_step}: valid {valid:.4f}, test {held:.4f} nats/token (ppl {math.exp(held):.2f}, "
        f"{held / math.log(2) * held_ids.size / held_bytes:.3f} bits/byte); train-sample {train_eval:.4f}")

    out = Path(args.out)
    written = save_hf(out, cfg, params, tok, args.save_dtype)
    gpu_name = ""
    try:
        gpu_name = jax.devices()[0].device_kind
    except Exception:  # noqa: BLE001
        pass
    result = {
        "recipe": {
            "data": "Python stdlib *.py of the training interpreter (no test/tests/idle_test/site-packages dirs), "
                    "sorted; split by file on int(md5(relpath), 16) % 20: 0 valid, 1 test (held-out), "
                    "else train",
            "python": platform.python_version(), "train_files": len(train_docs), "valid_files": len(valid_docs),
            "heldout_files": len(held_docs), "valid_tokens": int(valid_ids.size),
            "train_tokens": int(train_ids.size), "heldout_tokens": int(held_ids.size),
            "heldout_bytes": held_bytes,
            "tokenizer": f"byte-level BPE (tokenizers, GPT-2 regex), vocab {cfg.vocab}, specials {BOS} {EOS} {PAD}",
            "model": dataclasses.asdict(cfg), "params": n_params,
            "optimizer": {"name": "adamw", "lr": args.lr, "b1": 0.9, "b2": 0.95,
                          "weight_decay": args.weight_decay, "clip": 1.0, "warmup": args.warmup,
                          "schedule": "linear warmup, cosine to 10%"},
            "dropout": args.dropout, "batch": [B, T], "steps": total, "seed": args.seed,
            "compute_dtype": jnp.dtype(dtype).name, "attention": attn_impl,
        },
        "device": f"{jax.default_backend()}:{gpu_name}", "jax": jax.__version__,
        "train_time_s": round(train_time, 1), "total_time_s": round(time.time() - t_start, 1),
        "epochs": round(total / steps_per_epoch, 2),
        "final_train_loss": float(np.mean([l for _, l in losses[-20:]])),
        "final_heldout_loss": final_held,
        "shipped_step": shipped_step, "valid_loss": valid, "heldout_loss": held, "heldout_ppl": math.exp(held),
        "heldout_bits_per_byte": held / math.log(2) * held_ids.size / held_bytes,
        "train_sample_loss": train_eval,
        "evals": evals, "losses": losses[:: max(1, len(losses) // 400)],
        "files": written,
    }
    (out / "train_log.json").write_text(json.dumps(result, indent=1))
    log(f"wrote {out}: {', '.join(written)}")
    return result


def ship(hf_dir: str, data_dir: str, quant: str = "q8_0", notes: dict | None = None) -> dict:
    """Convert the HF folder with the package's converter and write <data_dir>/default.gguf plus
    default_model.json (the recipe and measured numbers from train_log.json)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from realizar_jax.cli.convert import convert_main

    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    gguf_path = data / "default.gguf"
    if convert_main([hf_dir, str(gguf_path), "--quant", quant, "--no-progress"]) != 0:
        raise SystemExit(f"conversion of {hf_dir} failed")
    gguf_path.chmod(0o644)  # the converter writes through a private temp file
    log = json.loads((Path(hf_dir) / "train_log.json").read_text())
    keep = ("device", "jax", "train_time_s", "total_time_s", "epochs", "final_train_loss", "valid_loss",
            "heldout_loss", "heldout_ppl", "heldout_bits_per_byte", "train_sample_loss", "shipped_step")
    info = {"name": Path(hf_dir).name, **log["recipe"], **{k: log[k] for k in keep},
            "heldout_note": "per token, on the test split (files with md5(path) % 20 == 1) of the "
                            "training interpreter's stdlib, bf16 weights before quantization",
            "gguf_quant": quant.upper(), "gguf_bytes": gguf_path.stat().st_size,
            "gguf_sha256": hashlib.sha256(gguf_path.read_bytes()).hexdigest(),
            "rebuild": "see TRAINING.md", **(notes or {})}
    (data / "default_model.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output HF folder (required unless --ship)")
    p.add_argument("--ship", metavar="HF_DIR", help="instead of training: convert HF_DIR to Q8_0 GGUF and "
                   "write realizar_jax/data/default.gguf + default_model.json")
    p.add_argument("--notes", help="with --ship: a JSON file of extra measured numbers to record")
    p.add_argument("--device-time-budget", type=float, default=240.0,
                   help="seconds of training wall time (steps chosen after timing the first ones)")
    p.add_argument("--steps", type=int, default=0, help="fixed number of steps (overrides the budget)")
    p.add_argument("--max-epochs", type=float, default=30.0)
    p.add_argument("--max-files", type=int, default=0, help="use only the first N stdlib files (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.5)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--attn", choices=["auto", "xla", "cudnn"], default="auto")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                   help="ship the checkpoint with the lowest validation loss")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=200)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ship:
        notes = json.loads(Path(args.notes).read_text()) if args.notes else None
        info = ship(args.ship, str(Path(__file__).resolve().parents[1] / "realizar_jax" / "data"), notes=notes)
        print(json.dumps({k: info[k] for k in ("gguf_bytes", "heldout_loss", "heldout_ppl")}))
        return 0
    if not args.out:
        raise SystemExit("--out is required")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
