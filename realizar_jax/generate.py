"""Generation: the jitted decode step and loop (sampling on the device), their ahead-of-time compile
cache, and the host loop that drives them for Model.generate / stream / chat."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .kernels.tuning import KernelConfig
from .models import decode_logits, prefill
from .sampling import SamplingParams, make_sampling_params, sample, seen_mask_from_tokens, update_seen_mask
from .weights import Params

MIN_BUCKET = 16
DECODE_CHUNK = 8  # decode steps per device call: the host reads tokens once per chunk


def decode_step(params: Params, cache, tokens, key, sampling: SamplingParams, seen=None, *, config: ModelConfig,
                dtype=None, kernels: KernelConfig = KernelConfig()):
    """Feed tokens [B], sample the next ones on device. Returns (next_tokens [B], logits [B, V], cache, seen)."""
    logits, cache = decode_logits(params, cache, tokens, config=config, dtype=dtype, kernels=kernels)
    next_tokens = sample(logits, sampling, key, seen)
    if seen is not None:
        seen = update_seen_mask(seen, next_tokens)
    return next_tokens, logits, cache, seen


def decode_loop(params: Params, cache, tokens, key, sampling: SamplingParams, seen, *, config: ModelConfig,
                steps: int, dtype=None, kernels: KernelConfig = KernelConfig()):
    """`steps` decode steps on device in one call (lax.scan): -> (tokens [steps, B], cache, seen, last tokens).

    tokens[j] is the token sampled at step j; the host reads them once per call, not once per token.
    """
    def body(carry, step_key):
        cache, toks, seen = carry
        nxt, _, cache, seen = decode_step(params, cache, toks, step_key, sampling, seen, config=config, dtype=dtype,
                                          kernels=kernels)
        return (cache, nxt, seen), nxt

    (cache, last, seen), out = jax.lax.scan(body, (cache, tokens, seen), jax.random.split(key, steps))
    return out, cache, seen, last


def _sample_first(_, logits, sampling, key, seen):
    tok = sample(logits, sampling, key, seen)
    return tok, update_seen_mask(seen, tok)


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


class Steps:
    """The jitted prefill, decode loop and first-token sampler of one model (config, dtype, kernels)."""

    def __init__(self, config: ModelConfig, dtype, kernels: KernelConfig):
        static = dict(config=config, dtype=dtype, kernels=kernels)
        self.prefill = Compiled(jax.jit(partial(prefill, **static), static_argnames=("all_logits",),
                                        donate_argnums=(1,)))
        self.decode_loop = Compiled(jax.jit(partial(decode_loop, **static), static_argnames=("steps",),
                                            donate_argnums=(1, 5)))
        self.sample = Compiled(jax.jit(_sample_first))

    @property
    def compile_seconds(self) -> float:
        return self.prefill.compile_seconds + self.sample.compile_seconds + self.decode_loop.compile_seconds


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


def bucket_length(n: int, max_len: int) -> int:
    return min(max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(n, 1))))), max_len)


def pad_prompts(prompts: Sequence[Sequence[int]], max_seq_len: int):
    """Right-padded tokens [B, bucket] and lengths [B] (the bucket: a power of two, so few shapes compile)."""
    longest = max(len(p) for p in prompts)
    if longest == 0:
        raise ValueError("empty prompt: give at least one token (or let the tokenizer add BOS)")
    if longest > max_seq_len:
        raise ValueError(f"prompt of {longest} tokens exceeds max_seq_len={max_seq_len}; "
                         f"load with a larger max_seq_len or shorten the prompt")
    t = bucket_length(longest, max_seq_len)
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def run(model, prompts, *, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
        repetition_penalty=1.0, seed=None, stop_token_ids=None, finished=None):
    """Yields (row, new token id) as chunks arrive; returns (StopIteration.value) the per-row finish
    reasons, the stats and the produced ids. seed None: fresh randomness; an int: reproducible.
    finished: a list of per-row flags the consumer sets (a stop string matched): such a row takes no
    more tokens, and the run ends once every row is done."""
    steps: Steps = model.steps
    _check_int("max_new_tokens", max_new_tokens, 1)
    if seed is not None:
        _check_int("seed", seed, 0, 2**63 - 1)
    for t in stop_token_ids or ():
        _check_int("stop_token_ids", t, 0, model.config.vocab_size - 1)
    b = len(prompts)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len={model.max_seq_len}; load with a larger max_seq_len")
    sampling = make_sampling_params(b, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                    repetition_penalty=repetition_penalty)
    stop_ids = set(model.config.eos_token_ids) | set(stop_token_ids or ())
    if model.tokenizer is not None:
        stop_ids |= set(getattr(model.tokenizer, "eos_ids", ()) or ())
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    key = jax.random.PRNGKey(int(seed))
    finished = finished if finished is not None else [False] * b
    tokens, lengths = pad_prompts(prompts, model.max_seq_len)
    seen = seen_mask_from_tokens(tokens, model.config.vocab_size, lengths)

    _check_cache_fits(model, b)
    compiled_before = steps.compile_seconds
    cache = model.new_cache(b)
    t0 = time.perf_counter()
    logits, cache = steps.prefill(model.params, cache, tokens, lengths)
    key, sub = jax.random.split(key)
    first, seen = steps.sample(None, logits, sampling, sub, seen)
    first_host = np.asarray(first)
    stats.prefill_s = time.perf_counter() - t0 - (steps.compile_seconds - compiled_before)

    done = np.zeros(b, bool)
    reasons = ["length"] * b
    produced = [[] for _ in range(b)]
    pending = first_host[None]  # [steps, B] tokens not yet handed out
    state = (cache, first, seen, key)
    queued = []   # dispatched chunks not yet read: the next one is queued before this one is read

    def dispatch():
        nonlocal state
        cache, last, seen, key = state
        key, sub = jax.random.split(key)
        out, cache, seen, last = steps.decode_loop(model.params, cache, last, sub, sampling, seen, steps=DECODE_CHUNK)
        state = (cache, last, seen, key)
        queued.append(out)

    t_decode = time.perf_counter()
    decode_compiled_before = steps.decode_loop.compile_seconds
    while True:
        for step in pending:
            for r in range(b):
                done[r] |= finished[r]
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
        done |= np.asarray(finished, bool)
        if done.all():
            break
        if not queued:
            dispatch()
        # tokens still wanted once the queued chunk is read: then the chunk after it goes to the
        # device now, and the GPU never waits for the host to read and hand out tokens
        wanted = max(max_new_tokens - len(produced[r]) for r in range(b) if not done[r])
        if wanted > DECODE_CHUNK * len(queued):
            dispatch()
        pending = np.asarray(queued.pop(0))
    stats.decode_s = time.perf_counter() - t_decode - (steps.decode_loop.compile_seconds - decode_compiled_before)
    stats.compile_s = steps.compile_seconds - compiled_before
    stats.generated_tokens = sum(len(p) for p in produced)
    return reasons, stats, produced


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r:.40}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {'...' if hi is None else hi}], got {value}")


def _check_cache_fits(model, batch: int) -> None:
    """InsufficientMemoryError before a batch's KV cache is allocated, when it cannot fit."""
    from .errors import InsufficientMemoryError
    from .memory import free_device_memory
    c = model.config
    need = 2 * c.num_layers * batch * c.num_kv_heads * model.max_seq_len * c.head_dim * model.kv_dtype.itemsize
    free = free_device_memory()
    if free is not None and need > free:
        raise InsufficientMemoryError(f"a batch of {batch} prompts needs {need / 2**30:.2f} GiB of KV cache at "
                                      f"max_seq_len={model.max_seq_len} but {free / 2**30:.2f} GiB is free; "
                                      f"pass fewer prompts at once or load with a smaller max_seq_len")


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of text could still begin a stop string (not handed out yet)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def run_text(model, prompts, stop, **kw) -> Iterator:
    """run() with text: yields (row, piece, stopped) as pieces decode (never a split UTF-8 character),
    cutting each row at its first stop string: text that could begin a stop string is held back until
    it cannot, so no part of a stop string is ever handed out, and a matched row stops decoding.
    Returns (reasons, stats, produced, texts)."""
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop)):
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    stop = list(stop or [])
    decoders = [model.tokenizer.stream_decoder() if model.tokenizer is not None else None for _ in prompts]
    texts = [""] * len(prompts)   # each row's text so far, stop-free
    sent = [0] * len(prompts)     # how much of it was handed out
    stopped = [False] * len(prompts)
    gen = run(model, prompts, finished=stopped, **kw)
    try:
        while True:
            r, tok = next(gen)
            if stopped[r] or decoders[r] is None:
                continue
            texts[r] += decoders[r].push(tok)
            hit = _find_stop(texts[r], stop)
            if hit is not None:
                texts[r], stopped[r] = texts[r][:hit], True
            end = len(texts[r]) if stopped[r] else len(texts[r]) - _held_back(texts[r], stop)
            if end > sent[r] or stopped[r]:
                piece, sent[r] = texts[r][sent[r]:end], max(end, sent[r])
                yield r, piece, stopped[r]
    except StopIteration as fin:
        reasons, stats, produced = fin.value
    for r in range(len(prompts)):
        if stopped[r]:
            reasons[r] = "stop"
        elif decoders[r] is not None:
            texts[r] += decoders[r].flush()
            if len(texts[r]) > sent[r]:
                yield r, texts[r][sent[r]:], False
    return reasons, stats, produced, texts
