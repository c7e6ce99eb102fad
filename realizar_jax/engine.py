"""Model: the user-facing object. load() validates the file, checks memory, builds the pytree,
and wraps the pure prefill/decode functions in jit (decode compiled once per batch size; prefill once
per power-of-two length bucket). generate/stream/chat/logits/perplexity are host-side drivers."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache, init_cache
from .config import ModelConfig
from .weights import Params

MIN_BUCKET = 16
DECODE_CHUNK = 8  # decode steps per device call: the host reads tokens once per chunk


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tok, prefill {self.prefill_tok_s:.1f} tok/s, "
                f"generated {self.generated_tokens} tok, decode {self.decode_tok_s:.1f} tok/s, "
                f"compile {self.compile_s:.2f} s")


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str  # 'length', 'eos', 'stop'
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __str__(self) -> str:
        return self.text


class Compiled:
    """A jitted function compiled ahead of time per argument shapes, so compile time is measured apart
    from run time and a new shape (a new prompt bucket, a new batch size) is the only thing that compiles.
    The params (fixed for a Model) are left out of the key."""

    def __init__(self, fn):
        self.fn = fn
        self.executables = {}
        self.compile_seconds = 0.0
        self.compiles = 0

    def __call__(self, params, *args, **static):
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (treedef, tuple((x.shape, jnp.result_type(x)) for x in leaves), tuple(sorted(static.items())))
        exe = self.executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = self.fn.lower(params, *args, **static).compile()
            self.compile_seconds += time.perf_counter() - t0
            self.compiles += 1
            self.executables[key] = exe
        return exe(params, *args)


def default_dtype() -> str:
    return "bfloat16" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "float32"


def bucket_length(n: int, max_len: int) -> int:
    return min(max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(n, 1))))), max_len)


class Model:
    def __init__(self, config: ModelConfig, params: Params, tokenizer, *, dtype, max_seq_len: int,
                 kv_dtype=None, path=None, source_format=None):
        from .model import decode_logits, decode_loop, prefill
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = jnp.dtype(dtype)
        self.kv_dtype = jnp.dtype(kv_dtype or dtype)
        self.max_seq_len = int(max_seq_len)
        self.path = path
        self.source_format = source_format
        static = dict(config=config, dtype=self.dtype)
        self._prefill = Compiled(jax.jit(partial(prefill, **static), static_argnames=("all_logits",),
                                         donate_argnums=(1,)))
        self._decode_logits = Compiled(jax.jit(partial(decode_logits, **static), donate_argnums=(1,)))
        self._decode_loop = Compiled(jax.jit(partial(decode_loop, **static), static_argnames=("steps",),
                                             donate_argnums=(1, 5)))
        self._sample = Compiled(jax.jit(_sample_first))

    # ---- pieces -------------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1) -> KVCache:
        return init_cache(self.config, batch, self.max_seq_len, self.kv_dtype)

    def _pad(self, prompts: Sequence[Sequence[int]]):
        longest = max(len(p) for p in prompts)
        if longest == 0:
            raise ValueError("empty prompt: give at least one token (or let the tokenizer add BOS)")
        if longest > self.max_seq_len:
            raise ValueError(f"prompt of {longest} tokens exceeds max_seq_len={self.max_seq_len}; "
                             f"load with a larger max_seq_len or shorten the prompt")
        t = bucket_length(longest, self.max_seq_len)
        tokens = np.zeros((len(prompts), t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.config.vocab_size})")
        return ids

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return self._check_ids(prompt)

    def logits(self, token_ids) -> np.ndarray:
        """float32 [len(token_ids), vocab]: the logits at every position, from the jitted prefill."""
        ids = self.encode(token_ids)
        tokens, lengths = self._pad([ids])
        logits, _ = self._prefill(self.params, self.new_cache(1), tokens, lengths, all_logits=True)
        return np.asarray(logits[0, :len(ids)], dtype=np.float32)

    def perplexity(self, text, stride: int | None = None, window: int | None = None) -> float:
        """exp(mean NLL) of the text's tokens, scored with sliding windows of the jitted prefill (as HF's
        perplexity recipe: each window of `window` tokens scores only the tokens not scored before)."""
        ids = self.encode(text)
        if len(ids) < 2:
            raise ValueError("perplexity needs at least 2 tokens")
        window = min(window or self.max_seq_len, self.max_seq_len)
        stride = stride or window
        if not 0 < stride <= window:
            raise ValueError(f"stride must be in (0, {window}], got {stride}")
        nll, count, scored_to = 0.0, 0, 1  # token 0 has no context and is never scored
        begin = 0
        while scored_to < len(ids):
            end = min(begin + window, len(ids))
            logits = self.logits(ids[begin:end])
            logp = logits - _logsumexp(logits)
            for pos in range(max(scored_to, begin + 1), end):
                nll -= float(logp[pos - begin - 1, ids[pos]])
                count += 1
            scored_to = end
            if end == len(ids):
                break
            begin += stride
        return math.exp(nll / count)

    # ---- generation ---------------------------------------------------------------------------------
    def _prompts(self, prompt) -> tuple[list[list[int]], bool]:
        if isinstance(prompt, str):
            return [self.encode(prompt)], False
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (int, np.integer)) for p in prompt):
            return [self.encode(prompt)], False
        if isinstance(prompt, (list, tuple)) and prompt:
            return [self.encode(p) for p in prompt], True
        raise ValueError("prompt must be a string, a list of token ids, or a non-empty list of those")

    def _run(self, prompts, *, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, seed=0, stop=None, stop_token_ids=None):
        """Yields (row, new token ids) per chunk; returns via StopIteration the per-row finish reasons + stats."""
        from .sampling import make_sampling_params, seen_mask_from_tokens
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b = len(prompts)
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.max_seq_len}; load with a larger max_seq_len")
        sampling = make_sampling_params(b, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                        repetition_penalty=repetition_penalty)
        stop_ids = set(self.config.eos_token_ids) | set(stop_token_ids or ())
        if self.tokenizer is not None:
            stop_ids |= set(getattr(self.tokenizer, "eos_ids", ()) or ())
        stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))
        key = jax.random.PRNGKey(int(seed))
        tokens, lengths = self._pad(prompts)
        seen = seen_mask_from_tokens(tokens, self.config.vocab_size, lengths)

        compiled_before = self._prefill.compile_seconds + self._sample.compile_seconds + \
            self._decode_loop.compile_seconds
        cache = self.new_cache(b)
        t0 = time.perf_counter()
        logits, cache = self._prefill(self.params, cache, tokens, lengths)
        key, sub = jax.random.split(key)
        first, seen = self._sample(None, logits, sampling, sub, seen)
        first_host = np.asarray(first)
        stats.prefill_s = time.perf_counter() - t0 - (self._prefill.compile_seconds + self._sample.compile_seconds
                                                      + self._decode_loop.compile_seconds - compiled_before)

        done = np.zeros(b, bool)
        reasons = ["length"] * b
        produced = [[] for _ in range(b)]
        pending = first_host[None]  # [steps, B] tokens not yet handed out
        last = first
        t_decode = time.perf_counter()
        decode_compiled_before = self._decode_loop.compile_seconds
        while True:
            for step in pending:
                for r in range(b):
                    if done[r]:
                        continue
                    tok = int(step[r])
                    if tok in stop_ids:
                        done[r], reasons[r] = True, "eos"
                        continue
                    produced[r].append(tok)
                    yield r, tok
                    if len(produced[r]) >= max_new_tokens:
                        done[r] = True
            if done.all():
                break
            key, sub = jax.random.split(key)
            out, cache, seen, last = self._decode_loop(self.params, cache, last, sub, sampling, seen,
                                                       steps=DECODE_CHUNK)
            pending = np.asarray(out)
        decode_compile = self._decode_loop.compile_seconds - decode_compiled_before
        stats.decode_s = time.perf_counter() - t_decode - decode_compile
        stats.compile_s = (self._prefill.compile_seconds + self._sample.compile_seconds
                           + self._decode_loop.compile_seconds - compiled_before)
        stats.generated_tokens = sum(len(p) for p in produced)
        return reasons, stats, produced

    def _generate(self, prompts, stop, **kw):
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        decoders = [self.tokenizer.stream_decoder() if self.tokenizer is not None else None for _ in prompts]
        texts = [""] * len(prompts)
        stopped = [False] * len(prompts)
        gen = self._run(prompts, **kw)
        try:
            while True:
                r, tok = next(gen)
                if stopped[r] or decoders[r] is None:
                    continue
                piece = decoders[r].push(tok)
                if piece:
                    texts[r] += piece
                    hit = _find_stop(texts[r], stop)
                    if hit is not None:
                        piece = piece[:len(piece) - (len(texts[r]) - hit)]
                        texts[r] = texts[r][:hit]
                        stopped[r] = True
                    yield r, piece, stopped[r]
        except StopIteration as fin:
            reasons, stats, produced = fin.value
        for r in range(len(prompts)):
            if stopped[r]:
                reasons[r] = "stop"
            elif decoders[r] is not None:
                tail = decoders[r].flush()
                if tail:
                    texts[r] += tail
                    yield r, tail, False
        self._last = (reasons, stats, produced, texts)

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0,
                 stop=None, stop_token_ids=None):
        """Generate from a prompt (text or token ids) or a list of prompts (returns a list then)."""
        prompts, batched = self._prompts(prompt)
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  repetition_penalty=repetition_penalty, seed=seed, stop_token_ids=stop_token_ids)
        for _ in self._generate(prompts, stop, **kw):
            pass
        reasons, stats, produced, texts = self._last
        if self.tokenizer is None:
            texts = [""] * len(prompts)
        results = [Generation(text=texts[r], tokens=produced[r], prompt_tokens=prompts[r], finish_reason=reasons[r],
                              stats=stats) for r in range(len(prompts))]
        return results if batched else results[0]

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yield text pieces of one prompt as they are produced (never a broken UTF-8 character)."""
        prompts, batched = self._prompts(prompt)
        if batched:
            raise ValueError("stream() takes one prompt; use generate() for a batch")
        if self.tokenizer is None:
            raise ValueError("stream() needs a tokenizer; this model has none")
        stop = kwargs.pop("stop", None)
        for _, piece, _ in self._generate(prompts, stop, **kwargs):
            if piece:
                yield piece
        self.last_stats = self._last[1]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        from .text.chat import render_chat
        from .errors import ChatTemplateError
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        if not template:
            raise ChatTemplateError(f"{self.path}: this model has no chat template "
                                    f"(no tokenizer.chat_template in GGUF / tokenizer_config.json)")
        tok = self.tokenizer
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tok.id_to_piece(tok.bos_id) if tok.bos_id is not None else "",
                           eos_token=tok.id_to_piece(tok.eos_ids[0]) if tok.eos_ids else "")

    def chat(self, messages, stream: bool = False, **kwargs):
        """Render messages with the model's own chat template and generate the assistant's reply."""
        text = self.apply_chat_template(messages)
        tok = self.tokenizer
        bos_piece = tok.id_to_piece(tok.bos_id) if tok.bos_id is not None else None
        # The template decides about BOS when it writes one; otherwise the model's add_bos rule applies.
        ids = tok.encode(text, add_bos=False) if bos_piece and text.startswith(bos_piece) else tok.encode(text)
        return self.stream(ids, **kwargs) if stream else self.generate(ids, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.architecture}, layers={c.num_layers}, hidden={c.hidden_size}, heads={c.num_heads}/"
                f"{c.num_kv_heads}, vocab={c.vocab_size}, dtype={self.dtype.name}, max_seq_len={self.max_seq_len}, "
                f"path={self.path})")


def _sample_first(_, logits, sampling, key, seen):
    from .sampling import sample, update_seen_mask
    tok = sample(logits, sampling, key, seen)
    return tok, update_seen_mask(seen, tok)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def free_device_memory() -> int | None:
    """Bytes free on the default device, or None when the backend does not say (then: host RAM)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load(path, dtype=None, max_seq_len: int | None = None, *, kv_dtype=None, batch: int = 1,
         check_memory: bool = True, progress: bool | None = None) -> Model:
    """Load a .gguf file or an HF folder: validate, check memory, build the role-keyed pytree.

    progress: a progress bar on stderr while weights load; None shows it for files of 256 MiB or more."""
    from .formats import open_model
    from .memory import check_fits, estimate_memory, weight_bytes_of
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    source = open_model(path)
    config = source.config
    dtype = jnp.dtype(dtype or default_dtype())
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    max_seq_len = int(max_seq_len or min(config.context_length, 4096))
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    kv = jnp.dtype(kv_dtype or dtype)
    if check_memory:
        est = estimate_memory(config, max_seq_len, batch, kv.name, weight_bytes=weight_bytes_of(source, dtype.name))
        free = free_device_memory()
        if free is not None:
            check_fits(est, free, path)
    from .weights import build_params
    params = build_params(source, dtype, transform_matrix=_gpu_repack(), progress=progress)
    tokenizer = _load_tokenizer(source)
    return Model(config, params, tokenizer, dtype=dtype, max_seq_len=max_seq_len, kv_dtype=kv, path=path,
                 source_format=source.format)


def _gpu_repack():
    if jax.default_backend() != "gpu":
        return None
    try:
        from .kernels import repack_for_gpu
    except ImportError:
        return None
    return repack_for_gpu


def _load_tokenizer(source):
    from .text.tokenizer import load_tokenizer
    return load_tokenizer(source)
