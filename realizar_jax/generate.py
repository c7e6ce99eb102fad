"""What generation returns (Generation, GenerationStats), the ahead-of-time compile cache (Compiled)
and the prompt padding of the jitted prefill. Decoding itself runs on the serving engine
(serving/state.py: the jitted steps; serving/scheduler.py: the host loop)."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .kernels.tuning import KernelConfig
from .models import decode_logits, prefill
from .sampling import SamplingParams, sample, update_seen_mask
from .weights import Params

MIN_BUCKET = 16
DECODE_CHUNK = 8  # decode steps per device call in `bench` (the engine has its own decode_chunk)


def decode_step(params: Params, cache, tokens, key, sampling: SamplingParams, seen=None, *, config: ModelConfig,
                dtype=None, kernels: KernelConfig = KernelConfig()):
    """One decode step as a pure function, for writing a loop by hand (notebook 02): feed tokens [B],
    sample the next ones on device. -> (next_tokens [B], logits [B, V], cache, seen). The engine's
    batched step with per-slot keys and stops is serving.state.decode."""
    logits, cache = decode_logits(params, cache, tokens, config=config, dtype=dtype, kernels=kernels)
    next_tokens = sample(logits, sampling, key, seen)
    if seen is not None:
        seen = update_seen_mask(seen, next_tokens)
    return next_tokens, logits, cache, seen


class Compiled:
    """A jitted function compiled ahead of time per argument shapes, so compile time is measured apart
    from run time and a new shape (a new prompt bucket, a new batch size) is the only thing that compiles.
    The params (fixed for a Model) are left out of the key. Arguments may be arrays or
    jax.ShapeDtypeStructs: `lower` + `add` compile a shape without running it (a warm-up can lower
    serially and compile on several threads: XLA's compile releases the GIL)."""

    def __init__(self, fn):
        self.fn = fn
        self.executables = {}
        self.compile_seconds = 0.0
        self.compiles = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(args, static) -> tuple:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        return treedef, tuple((x.shape, jnp.result_type(x)) for x in leaves), tuple(sorted(static.items()))

    def lower(self, params, *args, **static):
        """(key, jax's Lowered) for these arguments, or None when that shape is compiled already."""
        key = self.key(args, static)
        return None if key in self.executables else (key, self.fn.lower(params, *args, **static))

    def add(self, key, lowered) -> None:
        """Compile a `lower` result and keep it (thread-safe; the first of two racing compiles wins)."""
        t0 = time.perf_counter()
        exe = lowered.compile()
        with self._lock:
            if key not in self.executables:
                self.executables[key] = exe
                self.compile_seconds += time.perf_counter() - t0
                self.compiles += 1

    def __call__(self, params, *args, **static):
        key = self.key(args, static)
        exe = self.executables.get(key)
        if exe is None:
            self.add(key, self.fn.lower(params, *args, **static))
            exe = self.executables[key]
        return exe(params, *args)


class Steps:
    """The jitted prefill of one model (config, dtype, kernels): Model.logits and perplexity."""

    def __init__(self, config: ModelConfig, dtype, kernels: KernelConfig):
        static = dict(config=config, dtype=dtype, kernels=kernels)
        self.prefill = Compiled(jax.jit(partial(prefill, **static), static_argnames=("all_logits",),
                                        donate_argnums=(1,)))

    @property
    def compile_seconds(self) -> float:
        return self.prefill.compile_seconds


@dataclass
class GenerationStats:
    """prefill_s: admission to the first token on the host; decode_s: first to last token on the host
    (decode_tokens = generated_tokens less each request's first, which came from the prefill); both
    without the compile seconds that fell inside them (compile_s)."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0
    decode_tokens: int = 0
    cached_tokens: int = 0   # prompt tokens found in the engine's prefix cache (not prefilled)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (f"prompt {self.prompt_tokens} tok{cached}, prefill {self.prefill_tok_s:.1f} tok/s, "
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


def generation_stats(handles) -> GenerationStats:
    """The stats of finished engine requests taken together (one request: its own)."""
    hs = [h for h in handles if h.stats.first_token is not None and h.stats.finished is not None]
    st = GenerationStats(prompt_tokens=sum(h.stats.prompt_tokens for h in handles),
                         generated_tokens=sum(h.stats.generated_tokens for h in handles),
                         cached_tokens=sum(h.stats.cached_tokens for h in handles))
    if not hs:
        return st
    admitted = min(h.stats.admitted for h in hs)
    first = min(h.stats.first_token for h in hs)
    last = max(h.stats.finished for h in hs)
    compile_prefill = sum(h.compile_seconds_between("admitted", "first_token") for h in hs[:1])
    compile_decode = sum(h.compile_seconds_between("first_token", "finished") for h in hs[:1])
    st.prefill_s = max(first - admitted - compile_prefill, 0.0)
    st.decode_s = max(last - first - compile_decode, 0.0)
    st.compile_s = compile_prefill + compile_decode
    st.decode_tokens = sum(max(h.stats.generated_tokens - h.n, 0) for h in hs)
    return st


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


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r:.40}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {'...' if hi is None else hi}], got {value}")


