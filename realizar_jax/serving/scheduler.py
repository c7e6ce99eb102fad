"""The Engine: a scheduler thread that batches requests continuously over the slot state.

Each loop turn: apply cancellations and deadlines, admit queued requests into free slots (their
prefill, chunked for long prompts, runs between decode chunks within a token budget), dispatch the
next decode chunk, then read every result except that newest chunk: the device always has the next
chunk queued while the host hands out tokens, detokenizes and matches stop strings.

Tokens of a chunk are released to a streaming consumer spread over the chunk's duration (the
measured chunk period), so a stream sees even gaps instead of bursts of `decode_chunk` tokens.

The KV cache is a pool of pages (pages.py decides which slot holds which). A request holds pages for
what it has in the cache, and gets more before each decode chunk; a prompt whose leading full pages
are cached (prefix caching) takes those pages and prefills only the rest. When the pool runs out, the
newest running request is preempted: its pages are freed and it is queued again at the front, to be
recomputed (prompt and the tokens it already produced) when pages are free; its stream goes on where
it stopped, with the same tokens.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..cache import DEFAULT_PAGE_SIZE, NULL_PAGE, page_bytes, pages_for
from ..generate import MIN_BUCKET, bucket_length
from . import state as S
from .pages import PagePool, page_keys
from .requests import (Choice, Completion, ContextLengthError, EngineClosedError, Event, OptionError,
                       QueueFullError, RequestStats, SamplingOptions, TokenLogprob)
from .text import ChoiceText

GOLDEN = 0x9E3779B97F4A7C15
PREFILL_BATCHES = (1, 4, 16)   # prompts per prefill call, padded up: few shapes to compile; batching
MAX_PREFILL_BATCH = PREFILL_BATCHES[-1]   # amortizes the weight reads (run 37: 14 ms for 1, 62 for 16)


@dataclass(frozen=True)
class EngineMetrics:
    waiting: int            # requests queued, not yet in a slot (preempted ones included)
    running: int            # requests holding slots (prefilling or decoding)
    kv_cache_usage: float   # pages held by requests / pages of the pool
    max_slots: int
    max_queue: int
    compiles: int
    compile_seconds: float
    pages_total: int = 0            # pages of the pool (the null page not counted)
    pages_in_use: int = 0           # held by requests
    pages_cached: int = 0           # full pages in the prefix index (held or not)
    prefix_cache_queries: int = 0   # prompt tokens of admitted requests (looked up in the prefix cache)
    prefix_cache_hits: int = 0      # of those, tokens found cached (not prefilled)
    prefill_tokens: int = 0         # prompt tokens prefilled (run through the model)
    preemptions: int = 0            # requests preempted for lack of pages (then recomputed)
    # the scheduler thread's wall time since start: dispatching and bookkeeping on the host, blocked
    # reading results (the device is behind), waiting for work, and compiling a shape warm-up did not
    # (every stream stops meanwhile): where TTFT and throughput go
    host_seconds: float = 0.0
    device_wait_seconds: float = 0.0
    idle_seconds: float = 0.0
    compile_seconds_in_loop: float = 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class _Choice:
    """One completion of a request, while it occupies a slot."""

    def __init__(self, handle: "RequestHandle", index: int, seed: int, stop_ids: frozenset, decoder):
        self.handle, self.index, self.seed, self.stop_ids = handle, index, seed, stop_ids
        self.text = ChoiceText(decoder, handle.options.stop)
        self.slot: int | None = None
        self.generated = 0          # tokens sampled (EOS excluded)
        self.sampled: list[int] = []   # those tokens (a preempted choice is recomputed from prompt + these)
        self.dispatched = 0         # decode steps dispatched since its first token (+ tokens before a preemption)
        self.prefilled = 0          # positions of ids() in its slot's cache (chunked prefill)
        self.resumed = 0            # tokens of `sampled` its current admission recomputes
        self.keys: list[bytes] = []    # page keys of ids() (prefix caching)
        self.registered = 0         # table entries of its slot put in the prefix index
        self.fresh = False          # admitted, its first extend chunk not dispatched yet
        self.decoding = False
        self.finish: str | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []

    def ids(self) -> tuple[int, ...]:
        """What its admission puts in the cache: the prompt, and the tokens produced before a preemption."""
        return self.handle.prompt_token_ids + tuple(self.sampled[:self.resumed])

    @property
    def needs_steps(self) -> bool:
        return self.decoding and self.finish is None and self.dispatched < self.handle.options.max_tokens - 1

    def setting(self) -> S.SlotSettings:
        o = self.handle.options
        return S.settings(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, min_p=o.min_p,
                          repetition_penalty=o.repetition_penalty, presence_penalty=o.presence_penalty,
                          frequency_penalty=o.frequency_penalty, seed=self.seed, stop_ids=sorted(self.stop_ids),
                          max_tokens=o.max_tokens)


class RequestHandle:
    """A submitted request: iterate it (or `async for ev in handle.events()`) for its Events, or wait
    for the Completion with `result()` / `await completion()`; `cancel()` ends it."""

    def __init__(self, engine: "Engine", prompt_ids: tuple[int, ...], options: SamplingOptions,
                 deadline: float | None):
        self.engine = engine
        self.prompt_token_ids = prompt_ids
        self.options = options
        self.n = options.n
        self.deadline = deadline
        self.stats = RequestStats(submitted=time.perf_counter(), prompt_tokens=len(prompt_ids))
        self.choices: list[_Choice] = []
        self._events: list[tuple[Event, float]] = []
        self._cond = threading.Condition()
        self._waiters: list = []     # (loop, future) of async consumers
        self._done = False
        self._order = 0                 # admission order (the newest running request is preempted first)
        self.error: str | None = None   # why the request failed (finish_reason 'error')
        self._compile_marks: dict[str, float] = {}

    # ---- producer side (the scheduler thread) ----
    def _push(self, ev: Event, release_at: float) -> None:
        with self._cond:
            self._events.append((ev, release_at))
            if all(c.finish is not None for c in self.choices):
                self._done = True
                self.stats.finished = time.perf_counter()
                self._compile_marks["finished"] = self.engine.steps.compile_seconds
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:   # that consumer's event loop is closed
                pass

    # ---- consumer side ----
    @property
    def done(self) -> bool:
        return self._done

    def __iter__(self) -> Iterator[Event]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and not self._done:
                    self._cond.wait()
                if i >= len(self._events):
                    return
                ev, at = self._events[i]
            i += 1
            delay = at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            yield ev

    async def events(self):
        """The Events as an async iterator (never blocks the event loop), each released at its time (a
        decode chunk's tokens spread over the chunk). A consumer that falls behind gets the events of a
        choice that are due by then as one (their text, tokens and logprobs joined): as many wakeups
        and, in the server, SSE chunks as it can take, since the per-event work of the HTTP layer, not
        the device, bounds the tokens per second of many streams."""
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            fut = None
            with self._cond:
                if i < len(self._events):
                    ev, at = self._events[i]
                elif self._done:
                    return
                else:
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if fut is not None:
                await fut
                continue
            i += 1
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            with self._cond:
                now = time.perf_counter()
                while i < len(self._events) and ev.finish_reason is None:
                    nxt, at = self._events[i]
                    if at > now or nxt.choice != ev.choice or nxt.finish_reason == "error":
                        break   # (an engine failure stays its own event: the text before it is kept)
                    ev, i = _joined(ev, nxt), i + 1
            yield ev

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to finish (no pacing) and return its Completion."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request not finished after {timeout} s")
        return self._completion()

    async def completion(self) -> Completion:
        async for _ in self._until_done():
            pass
        return self._completion()

    async def _until_done(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._done:
                    return
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            await fut
            yield

    def cancel(self) -> None:
        """End the request: its choices finish with 'cancelled' and their slots are freed at the next
        chunk boundary. Harmless after the request finished."""
        if not self._done:
            self.engine._request_cancel(self, "cancelled")

    def _completion(self) -> Completion:
        want = self.options.logprobs is not None
        choices = tuple(Choice(c.index, c.text.text, tuple(c.token_ids), c.finish or "error",
                               tuple(c.logprobs) if want else None, c.generated) for c in self.choices)
        return Completion(choices, self.prompt_token_ids, self.stats)

    def compile_seconds_between(self, a: str, b: str) -> float:
        m = self._compile_marks
        return m.get(b, 0.0) - m.get(a, 0.0) if a in m and b in m else 0.0


def _joined(a: Event, b: Event) -> Event:
    """Two consecutive Events of one choice as one."""
    lps = None if a.logprobs is None and b.logprobs is None else (a.logprobs or ()) + (b.logprobs or ())
    return Event(a.choice, a.text + b.text, a.token_ids + b.token_ids, lps, b.finish_reason, b.error)


def _prefill_rows(prompts: int) -> int:
    return next(b for b in PREFILL_BATCHES if b >= prompts)


def _variant(options) -> dict:
    """The decode variant (static flags) that serves these requests' options."""
    return dict(logprobs=any(o.logprobs is not None for o in options),
                sample=any(o.temperature > 0 for o in options),
                penalize=any(o.repetition_penalty != 1 or o.presence_penalty or o.frequency_penalty for o in options))


def _resolve(fut) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class _Pending:
    """A dispatched device result not read yet."""
    kind: str                     # 'chunk' or 'first'
    sampled: S.Sampled
    owners: list = field(default_factory=list)   # chunk: the _Choice of each slot at dispatch; first: [choice]
    steps: int = 1


class Engine:
    """Continuous batching of requests over `max_slots` sequences of one model.

    submit() validates a request and queues it (at most `max_queue` waiting); the scheduler thread
    admits it when slots are free. decode_chunk: decode steps per device call. prefill_chunk: prompt
    tokens per prefill call (longer prompts are prefilled in chunks between decode chunks).
    prefill_budget: prompt tokens prefilled per loop turn while other requests are decoding.
    KV cache: pages of `page_size` positions; `kv_cache_memory` GiB of them, or `kv_pages` pages
    (default: enough for every slot at max_seq_len, so nothing is ever preempted). prefix_cache:
    reuse the cached pages of a prompt's prefix (on by default).
    """

    def __init__(self, model, max_slots: int = 32, max_queue: int = 256, *, decode_chunk: int = 4,
                 prefill_chunk: int = 512, prefill_budget: int = 2048, smooth_streams: bool = True,
                 page_size: int = DEFAULT_PAGE_SIZE, kv_cache_memory: float | None = None, kv_pages: int | None = None,
                 prefix_cache: bool = True):
        from ..errors import InsufficientMemoryError
        from ..memory import free_device_memory
        for name, v, lo in (("max_slots", max_slots, 1), ("max_queue", max_queue, 0), ("decode_chunk", decode_chunk, 1),
                            ("prefill_chunk", prefill_chunk, 16), ("prefill_budget", prefill_budget, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        self.model = model
        self.max_slots, self.max_queue = int(max_slots), int(max_queue)
        self.decode_chunk = int(decode_chunk)
        self.prefill_chunk = min(1 << (int(prefill_chunk).bit_length() - 1), model.max_seq_len)
        self.prefill_budget = int(prefill_budget)
        self.smooth_streams = smooth_streams
        c = model.config
        if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1 \
                or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size!r}")
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        self.page_size = int(page_size)
        self.max_pages = pages_for(model.max_seq_len, self.page_size)
        self.pages = self._pool_pages(kv_cache_memory, kv_pages)
        need = S.state_bytes(c, self.max_slots, model.kv_dtype, self.pages, self.page_size)
        free = free_device_memory()
        if free is not None and need > free:
            raise InsufficientMemoryError(
                f"{self.max_slots} slots need {need / 2**30:.2f} GiB ({self.pages} KV pages of {self.page_size} "
                f"positions) but {free / 2**30:.2f} GiB is free; give a smaller kv_cache_memory or fewer slots")
        self.steps: S.SlotSteps = model.slot_steps
        self.pool = PagePool(self.pages, self.page_size, self.max_slots, self.max_pages, prefix_cache)
        # the prefix index keys start from the model's identity: pages of another model never match
        self._identity = repr((getattr(model, "path", None), c, str(model.dtype), str(model.kv_dtype))).encode()
        self.state = self._new_state()
        self._tables = jnp.asarray(self.pool.tables)
        self.pool.dirty = False
        self._no_release = jnp.zeros((self.max_slots,), bool)
        self._no_copy = jnp.full((self.max_slots,), NULL_PAGE, jnp.int32)
        self._counts = dict(queries=0, hits=0, prefilled=0, preemptions=0)
        self._seconds = dict(host=0.0, device_wait=0.0, idle=0.0, compile=0.0)
        self._idle_since: float | None = None
        self._admissions = 0
        self._eos = frozenset(c.eos_token_ids) | frozenset(getattr(model.tokenizer, "eos_ids", ()) or ())
        self._cond = threading.Condition()
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._cancels: list[tuple[RequestHandle, str]] = []
        self._slots: list[_Choice | None] = [None] * self.max_slots
        self._release: set[int] = set()
        self._prefilling: collections.deque[_Choice] = collections.deque()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._running: set[RequestHandle] = set()
        self._period = 0.0              # measured seconds per decode chunk (stream pacing)
        self._last_read: float | None = None
        self._closing = False
        self._drain = True
        self._thread = threading.Thread(target=self._loop, name="realizar-scheduler", daemon=True)
        self._thread.start()

    def _pool_pages(self, kv_cache_memory, kv_pages) -> int:
        """The pool's page count (null page included) from the arguments."""
        if kv_cache_memory is not None and kv_pages is not None:
            raise ValueError("give kv_cache_memory (GiB) or kv_pages, not both")
        if kv_pages is not None:
            if isinstance(kv_pages, bool) or not isinstance(kv_pages, (int, np.integer)) or kv_pages < 1:
                raise ValueError(f"kv_pages must be a positive integer, got {kv_pages!r}")
            return int(kv_pages) + 1
        if kv_cache_memory is not None:
            if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, (int, float)) \
                    or not 0 < kv_cache_memory < float("inf"):
                raise ValueError(f"kv_cache_memory must be a positive number of GiB, got {kv_cache_memory!r}")
            per = page_bytes(self.model.config, self.page_size, self.model.kv_dtype)
            pages = int(kv_cache_memory * 2**30 // per)
            if pages < 2:
                raise ValueError(f"kv_cache_memory={kv_cache_memory} GiB holds {pages} pages of {per / 2**20:.2f} MiB "
                                 f"({self.page_size} positions); a sequence needs at least one page and the pool "
                                 f"its null page")
            return pages
        return self.max_slots * self.max_pages + 1

    def _new_state(self) -> S.SlotState:
        m = self.model
        return S.new_state(m.config, self.max_slots, m.max_seq_len, m.kv_dtype, self.pages, self.page_size)

    # ---- client API ----
    def submit(self, prompt, options: SamplingOptions | None = None, deadline_s: float | None = None,
               **kw) -> RequestHandle:
        """Queue a prompt (text or token ids). Options: a SamplingOptions or its fields as keywords.
        deadline_s: seconds from now after which the request ends with finish_reason 'timeout'.
        Raises OptionError / ContextLengthError / TypeError / ValueError for a bad request,
        QueueFullError when max_queue requests already wait, EngineClosedError after close()."""
        if options is not None and kw:
            raise TypeError("pass either a SamplingOptions or keyword options, not both")
        options = options if options is not None else SamplingOptions(**kw)
        if not isinstance(options, SamplingOptions):
            raise TypeError(f"options must be a SamplingOptions, got {type(options).__name__}")
        ids = tuple(self.model.encode(prompt))
        if not ids:
            raise ContextLengthError("the prompt is empty: give at least one token", param="prompt")
        limit = self.model.max_seq_len
        if len(ids) >= limit:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; this engine's context is {limit} "
                                     f"(max_seq_len), leaving no room to generate", param="prompt")
        if len(ids) + options.max_tokens > limit:
            raise ContextLengthError(f"prompt ({len(ids)} tokens) + max_tokens ({options.max_tokens}) exceeds "
                                     f"the context of {limit} tokens (max_seq_len)", param="max_tokens")
        vocab = self.model.config.vocab_size
        bad = [t for t in options.stop_token_ids if t >= vocab]
        if bad:
            raise OptionError("stop_token_ids", f"token id {bad[0]} out of range [0, {vocab})")
        if options.n > self.max_slots:
            raise OptionError("n", f"n={options.n} exceeds this engine's {self.max_slots} slots")
        pages = options.n * pages_for(len(ids) + options.max_tokens, self.page_size)
        if pages > self.pool.usable:
            raise ContextLengthError(f"prompt ({len(ids)} tokens) + max_tokens ({options.max_tokens}) x n={options.n} "
                                     f"need {pages} KV pages of {self.page_size} positions; the pool has "
                                     f"{self.pool.usable} (kv_cache_memory)", param="max_tokens")
        if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))
                                       or not deadline_s > 0):
            raise OptionError("deadline_s", f"must be a positive number of seconds, got {deadline_s!r}")
        handle = RequestHandle(self, ids, options,
                               None if deadline_s is None else time.perf_counter() + deadline_s)
        seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(8), "little")
        stop_ids = frozenset(options.stop_token_ids) | (frozenset() if options.ignore_eos else self._eos)
        decoder_of = self.model.tokenizer.stream_decoder if self.model.tokenizer is not None else lambda: None
        handle.choices = [_Choice(handle, i, (seed + i * GOLDEN) % 2**64, stop_ids, decoder_of())
                          for i in range(options.n)]
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting (max_queue={self.max_queue})",
                                     retry_after=max(1.0, round(self._period * 8, 1)))
            self._queue.append(handle)
            self._cond.notify_all()
        return handle

    def generate(self, prompt, options: SamplingOptions | None = None, **kw) -> Completion:
        return self.submit(prompt, options, **kw).result()

    def metrics(self) -> EngineMetrics:
        with self._cond:
            pool, n = self.pool, self._counts
            t = dict(self._seconds)
            if self._idle_since is not None:
                t["idle"] += time.perf_counter() - self._idle_since
            return EngineMetrics(len(self._queue), len(self._running), pool.in_use / pool.usable, self.max_slots,
                                 self.max_queue, self.steps.compiles, self.steps.compile_seconds, pool.usable,
                                 pool.in_use, pool.cached, n["queries"], n["hits"], n["prefilled"], n["preemptions"],
                                 t["host"], t["device_wait"], t["idle"], t["compile"])

    def warmup(self, prompt_lengths: Sequence[int] | None = None, logprobs: bool = False,
               workers: int | None = None) -> float:
        """Compile what serving will run, so the first requests don't: prefill (every batch size) and
        insert for every prompt bucket up to prefill_chunk (or those of `prompt_lengths`), extend at
        its chunk lengths and row counts, start, and the greedy and sampling decode variants (also with logprobs if asked; penalties
        compile when first used). Nothing runs: each step is lowered from abstract shapes (a step's
        output shapes feed the next one's lowering) and compiled on `workers` threads (default: up to
        8, one per core), since XLA compiles release the GIL. Returns the wall seconds it took."""
        t0 = time.perf_counter()
        lengths = prompt_lengths or [1 << k for k in range(4, self.prefill_chunk.bit_length())]
        cfg, slots = self.model.config, self.max_slots
        state = jax.eval_shape(self._new_state)
        setting = S.settings(max_tokens=2)
        p = self.model.params
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        flag = jax.ShapeDtypeStruct((), jnp.bool_)
        ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        table = ints(self.max_pages)
        batches = sorted({_prefill_rows(g) for g in range(1, min(slots, MAX_PREFILL_BATCH) + 1)})
        variants = [dict(logprobs=False, sample=False, penalize=False), dict(logprobs=False, sample=True, penalize=False)]
        if logprobs:
            variants += [dict(v, logprobs=True) for v in variants]
        workers = workers or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="warmup") as pool:
            jobs = []

            def compile_later(step, params, *args, **static):
                """Lower now (Python, under the GIL), compile on the pool; -> the step's output shapes."""
                lowered = step.lower(params, *args, **static)
                if lowered is None:   # compiled already: its output shapes from a trace
                    return jax.eval_shape(step.fn, params, *args, **static)
                jobs.append(pool.submit(step.add, *lowered))
                return lowered[1].out_info

            for n in sorted({bucket_length(n, self.prefill_chunk) for n in lengths}):
                for b in batches:
                    pre = compile_later(self.steps.prefill, p, ints(b, n), ints(b))
                    compile_later(self.steps.insert, None, state, pre, i32, i32, setting, table)
            chunk = ints(1, self.prefill_chunk)
            flags = lambda r: jax.ShapeDtypeStruct((r,), jnp.bool_)  # noqa: E731
            for n in self.extend_lengths():
                for r in sorted({_prefill_rows(g) for g in range(1, min(slots, self._extend_rows(n)) + 1)}):
                    _, out = compile_later(self.steps.extend, p, state, ints(r), ints(r, n), ints(r), ints(r),
                                           ints(r, self.max_pages), flags(r))
                    if r == 1:
                        logits = out   # [1, V]: what start takes
            compile_later(self.steps.start, None, state, i32, logits, setting, i32)
            compile_later(self.steps.mark, None, state, i32, chunk, ints(1), flag, flag)
            compile_later(self.steps.copy, None, state, ints(slots), ints(slots))
            release = jax.ShapeDtypeStruct((slots,), jnp.bool_)
            for rows in sorted({self._rows(n) for n in range(1, slots + 1)}):
                for v in variants:
                    compile_later(self.steps.decode, p, state, release, ints(slots, self.max_pages),
                                  steps=self.decode_chunk, rows=rows, **v)
            for job in jobs:
                job.result()   # a failed compile raises here
        return time.perf_counter() - t0

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; drain=True lets queued and running ones finish, False cancels them."""
        with self._cond:
            self._closing = True
            self._drain = drain
            if not drain:
                for h in list(self._queue) + list(self._running):
                    self._cancels.append((h, "cancelled"))
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closing

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(drain=False)

    def _request_cancel(self, handle: RequestHandle, reason: str) -> None:
        with self._cond:
            self._cancels.append((handle, reason))
            self._cond.notify_all()

    # ---- the scheduler thread ----
    def _loop(self) -> None:
        t = self._seconds   # written by this thread only
        while True:
            with self._cond:
                self._idle_since = time.perf_counter()   # (metrics() counts a wait in progress)
                while not (self._queue or self._running or self._pending or self._cancels):
                    if self._closing:
                        return
                    self._cond.wait()
                t1 = time.perf_counter()
                t["idle"] += t1 - self._idle_since
                self._idle_since = None
                cancels, self._cancels = self._cancels, []
            waited, compiled = t["device_wait"] + t["idle"], self.steps.compile_seconds
            try:
                self._turn(cancels)
            except Exception as e:   # a device error: fail what was in flight, keep serving
                self._fail_all(e)
            # the turn's time less its reads, short waits (counted where they happen) and compiles
            t["compile"] += self.steps.compile_seconds - compiled
            t["host"] += time.perf_counter() - t1 - (t["device_wait"] + t["idle"] - waited) \
                - (self.steps.compile_seconds - compiled)

    def _turn(self, cancels) -> None:
        now = time.perf_counter()
        for handle, reason in cancels:
            self._cancel(handle, reason)
        for handle in [h for h in list(self._running) + list(self._queue) if h.deadline and now > h.deadline]:
            self._cancel(handle, "timeout")
        pending_before = len(self._pending)
        self._admit()
        dispatched = False
        if any(c is not None and c.needs_steps for c in self._slots):
            dispatched = self._dispatch_decode()
        if not dispatched:
            self._last_read = None   # the next chunk read after an idle gap does not measure a period
        # read everything but the newest chunk: it keeps the device busy while the host works
        while self._pending and (len(self._pending) > 1 or not dispatched):
            self._read(self._pending.popleft())
        if not dispatched and not pending_before and len(self._pending) == 0 and not cancels:
            t = time.perf_counter()
            with self._cond:   # nothing to do this turn (e.g. waiting for slots): don't spin
                self._cond.wait(0.005)
            self._seconds["idle"] += time.perf_counter() - t

    def _admit(self) -> None:
        budget, spent = self.prefill_budget, 0
        extends: list[_Choice] = []   # one chunk each this turn, batched by _extend
        # long prompts already in slots continue first, one chunk each per turn
        for ch in self._prefilling:
            if spent >= budget:
                break
            extends.append(ch)
            spent += self._part_length(ch)
        group: list[RequestHandle] = []   # short prompts admitted together share one batched prefill
        while self._queue and spent < budget:
            with self._cond:
                handle = self._queue[0]
                todo = [c for c in handle.choices if c.finish is None]
                free = [s for s, c in enumerate(self._slots) if c is None]
                if len(free) < len(todo):
                    break
            if handle.stats.admitted is not None and self._pending:
                # a preempted request: book what it produced before recomputing it from there
                while self._pending:
                    self._read(self._pending.popleft())
                continue   # reading may have finished it (or other requests)
            batched = self._place(todo, free)
            if batched is None:   # not enough free pages: wait for running requests to give some back
                break
            with self._cond:
                self._queue.popleft()
                self._running.add(handle)
            if handle.stats.admitted is None:
                handle.stats.admitted = time.perf_counter()
                handle._compile_marks["admitted"] = self.steps.compile_seconds
            self._admissions += 1
            handle._order = self._admissions
            if batched:
                group.append(handle)
                spent += len(handle.prompt_token_ids)
                if len(group) == MAX_PREFILL_BATCH:
                    self._prefill(group)
                    group = []
            else:
                for ch in todo:
                    self._prefilling.append(ch)
                    if spent < budget:
                        extends.append(ch)
                        spent += self._part_length(ch)
        if group:
            self._prefill(group)
        if extends:
            self._extend(extends)

    def _place(self, todo: list[_Choice], free: list[int]) -> bool | None:
        """Slots and pages for a request's unfinished choices. -> True: a fresh short prompt without a
        cached prefix, for the batched prefill (its choices share its pages, the partial last one
        copied on the first write); False: each choice prefills its ids() by extend chunks after its
        cached prefix; None: not enough pages (nothing taken)."""
        pool, ps = self.pool, self.page_size
        batched = None
        placed: list[_Choice] = []
        for ch, slot in zip(todo, free):
            ch.resumed = len(ch.sampled)
            ids = ch.ids()
            if batched and placed:   # the first choice's pages, shared
                shared = [int(p) for p in pool.tables[placed[0].slot, :pool.held[placed[0].slot]]]
                ch.keys = placed[0].keys
            else:
                ch.keys = page_keys(ids, ps, self._identity) if pool.prefix_cache else []
                # the last prompt token is always computed (its logits give the first token): a cached
                # page holding it is not reused
                shared = pool.match(ch.keys)[:(len(ids) - 1) // ps]
                if batched is None:
                    batched = not shared and not ch.sampled and len(ids) <= self.prefill_chunk
            if not pool.assign(slot, shared, len(ids)):
                for done in placed:
                    pool.release(done.slot)
                    self._slots[done.slot], done.slot = None, None
                return None
            ch.slot = slot
            self._slots[slot] = ch
            self._release.discard(slot)   # insert/extend rewrite every per-slot field
            ch.registered = 0 if batched and placed else len(shared)
            ch.prefilled = 0 if batched else len(shared) * ps
            ch.dispatched = len(ch.sampled)
            ch.fresh = True
            placed.append(ch)
        first = todo[0]
        n = self._counts
        n["queries"] += len(first.ids())
        n["hits"] += first.prefilled
        if first.handle.stats.admitted is None:
            first.handle.stats.cached_tokens = first.prefilled
        return batched

    def _register(self, ch: _Choice) -> None:
        """Put ch's full pages written so far in the prefix index (their writes are dispatched: any later
        reader is behind them on the device)."""
        full = min(ch.prefilled // self.page_size, len(ch.keys))
        for i in range(ch.registered, full):
            self.pool.register(ch.slot, i, ch.keys[i])
        ch.registered = max(ch.registered, full)

    def _register_output(self, ch: _Choice) -> None:
        """A finished choice's full pages of generated tokens go into the prefix index too (a chat's next
        turn repeats them). The positions before its last sampled token hold prompt + sampled[:-1]: every
        call that wrote them is dispatched, and what the device may still write lies past them."""
        if not self.pool.prefix_cache or ch.slot is None or self._slots[ch.slot] is not ch \
                or ch.prefilled < len(ch.ids()) or not ch.sampled:
            return
        ids = ch.handle.prompt_token_ids + tuple(ch.sampled[:-1])
        if len(ids) // self.page_size > ch.registered:
            ch.keys = page_keys(ids, self.page_size, self._identity)
            ch.prefilled = len(ids)
            self._register(ch)

    def _prefill(self, group: list[RequestHandle]) -> None:
        """One prefill call for the group's prompts (rows padded to 1, 4 or 16, length to the longest
        one's bucket), then each row inserted into its choices' slots (the choices of a row hold the
        same pages: the writes after the first repeat its values)."""
        t = bucket_length(max(len(h.prompt_token_ids) for h in group), self.prefill_chunk)
        rows = _prefill_rows(len(group))
        tokens = np.zeros((rows, t), np.int32)
        lengths = np.ones((rows,), np.int32)
        for r, h in enumerate(group):
            tokens[r, :len(h.prompt_token_ids)] = h.prompt_token_ids
            lengths[r] = len(h.prompt_token_ids)
        pre = self.steps.prefill(self.model.params, jnp.asarray(tokens), jnp.asarray(lengths))
        for r, h in enumerate(group):
            self._counts["prefilled"] += len(h.prompt_token_ids)
            for ch in h.choices:
                if ch.slot is None:
                    continue
                self.state, first = self.steps.insert(None, self.state, pre, jnp.int32(r), jnp.int32(ch.slot),
                                                      ch.setting(), jnp.asarray(self.pool.tables[ch.slot]))
                ch.prefilled = len(h.prompt_token_ids)
                self._register(ch)
                ch.decoding = True
                self._pending.append(_Pending("first", first, [ch]))

    def _mark(self, ch: _Choice, ids, reset: bool, output: bool) -> bool:
        """ids into ch's seen mask (and output counts) by `mark` calls of prefill_chunk tokens. -> whether
        anything was marked."""
        c = self.prefill_chunk
        for i in range(0, len(ids), c):
            part = ids[i:i + c]
            tokens = np.zeros((1, c), np.int32)
            tokens[0, :len(part)] = part
            self.state = self.steps.mark(None, self.state, jnp.int32(ch.slot), jnp.asarray(tokens),
                                         jnp.asarray([len(part)], jnp.int32), jnp.asarray(reset and i == 0),
                                         jnp.asarray(output))
        return len(ids) > 0

    def _part_length(self, ch: _Choice) -> int:
        """Tokens of ch's next extend chunk."""
        return min(len(ch.ids()) - ch.prefilled, self.prefill_chunk)

    def extend_lengths(self) -> tuple[int, ...]:
        """The chunk lengths extend runs at, each compiled at every row count: an eighth, a half and the
        whole prefill chunk (64, 256 and 512 by default). A tail (of a prompt whose prefix is cached, of
        a chunked prompt, of a preempted request's recompute) can have any length: three lengths pad
        it at most 4x (2x above half a chunk) for 7 compiles at 16 slots, not 16 for every bucket."""
        c = self.prefill_chunk
        return tuple(sorted({max(MIN_BUCKET, c // 8), max(MIN_BUCKET, c // 2), c}))

    def _extend_rows(self, chunk: int) -> int:
        """The most rows one extend call of `chunk`-token chunks takes: a PREFILL_BATCHES size within
        prefill_budget tokens (the chunk's attention scores grow with rows x chunk x max_seq_len)."""
        return max([b for b in PREFILL_BATCHES if b * chunk <= self.prefill_budget] or [1])

    def _extend(self, chs: list[_Choice]) -> None:
        """The next chunk of each choice's ids() after what its slot's cache holds. Chunks padded to the
        same extend length go in one call (rows padded to 1, 4 or 16), so the tails of many prompts with
        a cached prefix prefill together; a choice's last chunk starts it."""
        parts = []
        for ch in chs:
            reset = False
            if ch.fresh:
                # the first chunk: what the cache holds without an extend (cached pages, produced tokens)
                # goes into the slot's seen mask and counts
                ch.fresh = False
                marked = self._mark(ch, ch.sampled[:ch.resumed], reset=True, output=True)
                marked = self._mark(ch, ch.ids()[:ch.prefilled], reset=not marked, output=False) or marked
                reset = not marked
            parts.append((ch, ch.ids()[ch.prefilled:ch.prefilled + self.prefill_chunk], reset))
        by_bucket: dict[int, list] = {}
        for part in parts:
            t = next(n for n in self.extend_lengths() if n >= len(part[1]))
            by_bucket.setdefault(t, []).append(part)
        for t, group in sorted(by_bucket.items()):
            most = self._extend_rows(t)
            for i in range(0, len(group), most):
                self._extend_call(t, group[i:i + most])

    def _extend_call(self, t: int, group: list) -> None:
        rows = _prefill_rows(len(group))
        slots = np.full((rows,), self.max_slots, np.int32)   # padding rows: out of range, dropped
        tokens = np.zeros((rows, t), np.int32)
        starts, lengths = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
        tables = np.zeros((rows, self.max_pages), np.int32)
        reset = np.zeros((rows,), bool)
        for r, (ch, part, first) in enumerate(group):
            slots[r], starts[r], lengths[r], reset[r] = ch.slot, ch.prefilled, len(part), first
            tokens[r, :len(part)] = part
            tables[r] = self.pool.tables[ch.slot]
        self.state, logits = self.steps.extend(self.model.params, self.state, jnp.asarray(slots), jnp.asarray(tokens),
                                               jnp.asarray(starts), jnp.asarray(lengths), jnp.asarray(tables),
                                               jnp.asarray(reset))
        for r, (ch, part, _) in enumerate(group):
            ch.prefilled += len(part)
            self._counts["prefilled"] += len(part)
            self._register(ch)
            if ch.prefilled >= len(ch.ids()):
                self._prefilling.remove(ch)
                self.state, first = self.steps.start(None, self.state, jnp.int32(ch.slot),
                                                     jax.lax.dynamic_slice_in_dim(logits, r, 1),
                                                     ch.setting(), jnp.int32(ch.resumed))
                ch.decoding = True
                self._pending.append(_Pending("first", first, [ch]))

    def _rows(self, used: int) -> int:
        """The decode rows bucket that covers slots [0, used): 1, 4, 16, ... (admission fills the lowest
        free slots, so the requests stay packed at the front)."""
        rows = 1
        while rows < used:
            rows *= 4
        return min(rows, self.max_slots)

    def _pages_for_chunk(self) -> None:
        """Before a decode chunk: every decoding choice gets pages for the positions the chunk writes and
        a page of its own where it writes into a shared one (the copies dispatched now). Out of pages,
        the newest running request is preempted until the choice fits (or is itself the one preempted)."""
        ps, k, pool = self.page_size, self.decode_chunk, self.pool
        copies: list[tuple[int, int]] = []
        for ch in sorted((c for c in self._slots if c is not None and c.needs_steps), key=lambda c: c.handle._order):
            while ch.slot is not None:
                n = len(ch.handle.prompt_token_ids)
                first = n + ch.dispatched    # the chunk writes positions first .. first + k - 1
                end = min(first + k, n + ch.handle.options.max_tokens)
                ok = pool.grow(ch.slot, end)
                for index in range(first // ps, pages_for(end, ps)) if ok else ():
                    pair = pool.writable(ch.slot, index)
                    if pair is False:
                        ok = False
                        break
                    if pair is not None:
                        copies.append(pair)
                if ok:
                    break
                self._preempt_newest()
        # a request preempted here may have given back a copy's target, taken again by a later copy: the
        # last copy into a page is the one that stands
        last = {dst: src for src, dst in copies}
        copies = [(src, dst) for dst, src in last.items()]
        for i in range(0, len(copies), self.max_slots):
            batch = copies[i:i + self.max_slots]
            src = np.full((self.max_slots,), NULL_PAGE, np.int32)
            dst = src.copy()
            src[:len(batch)], dst[:len(batch)] = zip(*batch)
            self.state = self.steps.copy(None, self.state, jnp.asarray(src), jnp.asarray(dst))

    def _preempt_newest(self) -> None:
        """Free the pages and slots of the most recently admitted request holding any, and queue it
        first again: it is recomputed from its prompt and the tokens it produced so far."""
        held = {c.handle for c in self._slots if c is not None}
        victim = max(held, key=lambda h: h._order)
        for ch in victim.choices:
            if ch.slot is not None:
                self._free_slot(ch, device_active=True)
            if ch in self._prefilling:
                self._prefilling.remove(ch)
            ch.decoding = False
            ch.prefilled = 0
        self._counts["preemptions"] += 1
        with self._cond:
            self._running.discard(victim)
            self._queue.appendleft(victim)

    def _free_slot(self, ch: _Choice, device_active: bool) -> None:
        """Give ch's slot and pages back. The device runs calls in order, so a page handed to another
        request now is written by it only after every call already dispatched for ch."""
        if ch.slot is not None and self._slots[ch.slot] is ch:
            self._slots[ch.slot] = None
            self.pool.release(ch.slot)
            if device_active:
                self._release.add(ch.slot)
        ch.slot = None

    def _dispatch_decode(self) -> bool:
        """The next decode chunk, after its pages; False when nothing is left to step (all preempted)."""
        self._pages_for_chunk()
        if not any(c is not None and c.needs_steps for c in self._slots):
            return False
        if self._release:
            mask = np.zeros((self.max_slots,), bool)
            mask[list(self._release)] = True
            release = jnp.asarray(mask)
            self._release.clear()
        else:   # the usual case: no host-to-device copy per chunk
            release = self._no_release
        if self.pool.dirty:
            self._tables = jnp.asarray(self.pool.tables)
            self.pool.dirty = False
        owners = list(self._slots)
        live = [c.handle.options for c in owners if c is not None and c.decoding]
        top = max(s for s, c in enumerate(owners) if c is not None and c.decoding) + 1
        self.state, out = self.steps.decode(self.model.params, self.state, release, self._tables,
                                            steps=self.decode_chunk, rows=self._rows(top), **_variant(live))
        for c in owners:
            if c is not None and c.decoding:
                c.dispatched += self.decode_chunk
        self._pending.append(_Pending("chunk", out, [c if c is not None and c.decoding else None for c in owners],
                                      self.decode_chunk))
        return True

    def _read(self, item: _Pending) -> None:
        t = time.perf_counter()
        got = jax.device_get(item.sampled)
        now = time.perf_counter()
        self._seconds["device_wait"] += now - t
        if item.kind == "first":
            ch = item.owners[0]
            h = ch.handle
            if h.stats.first_token is None:
                h.stats.first_token = now
                h._compile_marks["first_token"] = self.steps.compile_seconds
            if ch.finish is None:
                self._take(ch, got, 0, 0, now)
            return
        if self._last_read is not None:
            gap = now - self._last_read
            self._period = gap if self._period == 0 else 0.8 * self._period + 0.2 * gap
        self._last_read = now
        dt = min(self._period, 0.25) / item.steps if self.smooth_streams else 0.0
        for s, ch in enumerate(item.owners):
            if ch is None:
                continue
            for j in range(item.steps):
                if ch.finish is not None or got.tokens[j, s] < 0:
                    break
                self._take(ch, got, j, s, now + j * dt)

    def _take(self, ch: _Choice, got: S.Sampled, j: int, s: int, at: float) -> None:
        """Book one sampled token of a choice (got's step j, slot column s)."""
        tok = int(got.tokens[j, s]) if got.tokens.ndim == 2 else int(got.tokens[s])
        o = ch.handle.options
        if tok in ch.stop_ids:
            return self._finish(ch, "eos", at, device_active=False)
        ch.generated += 1
        ch.sampled.append(tok)
        lp = None
        if o.logprobs is not None:
            idx = (j, s) if got.tokens.ndim == 2 else (s,)
            k = o.logprobs
            lp = TokenLogprob(tok, float(got.logprob[idx]),
                              tuple(zip(map(int, got.top_ids[idx][:k]), map(float, got.top_logprobs[idx][:k]))))
        piece, toks, lps, stopped = ch.text.push(tok, lp)
        if stopped:
            self._emit(ch, piece, toks, lps, at)
            return self._finish(ch, "stop", at, device_active=True)
        if ch.generated >= o.max_tokens:
            self._emit(ch, piece, toks, lps, at)
            return self._finish(ch, "length", at, device_active=False)
        if piece or toks:
            self._emit(ch, piece, toks, lps, at)

    def _emit(self, ch: _Choice, piece: str, toks, lps, at: float, finish: str | None = None,
              error: str | None = None) -> None:
        ch.token_ids.extend(toks)
        want = ch.handle.options.logprobs is not None
        if want:
            ch.logprobs.extend(lps)
        if piece or toks or finish:
            ch.handle._push(Event(ch.index, piece, tuple(toks), tuple(lps) if want else None, finish, error), at)

    def _finish(self, ch: _Choice, reason: str, at: float, device_active: bool, error: str | None = None) -> None:
        piece, toks, lps, _ = ch.text.flush() if reason != "stop" else ("", [], [], True)
        ch.finish = reason
        ch.decoding = False
        if ch in self._prefilling:
            self._prefilling.remove(ch)
        if reason != "error":
            self._register_output(ch)
        self._free_slot(ch, device_active)
        h = ch.handle
        if error is not None:
            h.error = error
        h.stats.generated_tokens = sum(c.generated for c in h.choices)
        if all(c.finish is not None for c in h.choices):
            with self._cond:
                self._running.discard(h)
                if h in self._queue:   # a preempted request, finished by results read after it was queued
                    self._queue.remove(h)
        self._emit(ch, piece, toks, lps, at, finish=reason, error=error)

    def _cancel(self, handle: RequestHandle, reason: str) -> None:
        with self._cond:
            queued = handle in self._queue
            if queued:
                self._queue.remove(handle)
        now = time.perf_counter()
        for ch in handle.choices:
            if ch.finish is None:
                self._finish(ch, reason, now, device_active=True)

    def _fail_all(self, err: Exception) -> None:
        """After a device error the donated state may be gone: fail every admitted request, start a fresh
        state, and keep serving the queue."""
        msg = f"{type(err).__name__}: {err}"
        now = time.perf_counter()
        for h in list(self._running):
            for ch in h.choices:
                if ch.finish is None:
                    self._finish(ch, "error", now, device_active=False, error=msg)
        self._pending.clear()
        self._prefilling.clear()
        self._release.clear()
        self._slots = [None] * self.max_slots
        self.pool = PagePool(self.pages, self.page_size, self.max_slots, self.max_pages, self.pool.prefix_cache)
        self.state = self._new_state()
