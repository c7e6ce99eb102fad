"""The Engine: a scheduler thread that batches requests continuously over the slot state.

Each loop turn: apply cancellations and deadlines, admit queued requests into free slots (their
prefill, chunked for long prompts, runs between decode chunks within a token budget), dispatch the
next decode chunk, then read every result except that newest chunk: the device always has the next
chunk queued while the host hands out tokens, detokenizes and matches stop strings.

Tokens of a chunk are released to a streaming consumer spread over the chunk's duration (the
measured chunk period), so a stream sees even gaps instead of bursts of `decode_chunk` tokens.
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

from ..generate import bucket_length
from . import state as S
from .requests import (Choice, Completion, ContextLengthError, EngineClosedError, Event, OptionError,
                       QueueFullError, RequestStats, SamplingOptions, TokenLogprob)
from .text import ChoiceText

GOLDEN = 0x9E3779B97F4A7C15
PREFILL_BATCHES = (1, 4, 16)   # prompts per prefill call, padded up: few shapes to compile; batching
MAX_PREFILL_BATCH = PREFILL_BATCHES[-1]   # amortizes the weight reads (run 37: 14 ms for 1, 62 for 16)


@dataclass(frozen=True)
class EngineMetrics:
    waiting: int            # requests queued, not yet in a slot
    running: int            # requests holding slots (prefilling or decoding)
    kv_cache_usage: float   # cached tokens of the occupied slots / (slots x max_seq_len)
    max_slots: int
    max_queue: int
    compiles: int
    compile_seconds: float


class _Choice:
    """One completion of a request, while it occupies a slot."""

    def __init__(self, handle: "RequestHandle", index: int, seed: int, stop_ids: frozenset, decoder):
        self.handle, self.index, self.seed, self.stop_ids = handle, index, seed, stop_ids
        self.text = ChoiceText(decoder, handle.options.stop)
        self.slot: int | None = None
        self.generated = 0          # tokens sampled (EOS excluded)
        self.dispatched = 0         # decode steps dispatched since its first token
        self.prefilled = 0          # prompt tokens in its slot's cache (chunked prefill)
        self.decoding = False
        self.finish: str | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []

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
        """The Events as an async iterator (never blocks the event loop)."""
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
    """

    def __init__(self, model, max_slots: int = 32, max_queue: int = 256, *, decode_chunk: int = 4,
                 prefill_chunk: int = 512, prefill_budget: int = 2048, smooth_streams: bool = True):
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
        need = S.state_bytes(c, self.max_slots, model.max_seq_len, model.kv_dtype)
        free = free_device_memory()
        if free is not None and need > free:
            raise InsufficientMemoryError(
                f"{self.max_slots} slots need {need / 2**30:.2f} GiB (KV cache at max_seq_len={model.max_seq_len}) "
                f"but {free / 2**30:.2f} GiB is free; use fewer slots or load with a smaller max_seq_len")
        self.steps: S.SlotSteps = model.slot_steps
        self.state = S.new_state(c, self.max_slots, model.max_seq_len, model.kv_dtype)
        self._no_release = jnp.zeros((self.max_slots,), bool)
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
            used = sum(len(c.handle.prompt_token_ids) + c.generated for c in self._slots if c is not None)
            return EngineMetrics(len(self._queue), len(self._running),
                                 used / (self.max_slots * self.model.max_seq_len), self.max_slots, self.max_queue,
                                 self.steps.compiles, self.steps.compile_seconds)

    def warmup(self, prompt_lengths: Sequence[int] | None = None, logprobs: bool = False,
               workers: int | None = None) -> float:
        """Compile what serving will run, so the first requests don't: prefill (every batch size) and
        insert for every prompt bucket up to prefill_chunk (or those of `prompt_lengths`), extend,
        start, and the greedy and sampling decode variants (also with logprobs if asked; penalties
        compile when first used). Nothing runs: each step is lowered from abstract shapes (a step's
        output shapes feed the next one's lowering) and compiled on `workers` threads (default: up to
        8, one per core), since XLA compiles release the GIL. Returns the wall seconds it took."""
        t0 = time.perf_counter()
        lengths = prompt_lengths or [1 << k for k in range(4, self.prefill_chunk.bit_length())]
        cfg, slots = self.model.config, self.max_slots
        state = jax.eval_shape(lambda: S.new_state(cfg, slots, self.model.max_seq_len, self.model.kv_dtype))
        setting = S.settings(max_tokens=2)
        p = self.model.params
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
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
                    compile_later(self.steps.insert, None, state, pre, i32, i32, setting)
            _, logits = compile_later(self.steps.extend, p, state, i32, ints(1, self.prefill_chunk), i32, ints(1))
            compile_later(self.steps.start, None, state, i32, logits, setting)
            release = jax.ShapeDtypeStruct((slots,), jnp.bool_)
            for rows in sorted({self._rows(n) for n in range(1, slots + 1)}):
                for v in variants:
                    compile_later(self.steps.decode, p, state, release, steps=self.decode_chunk, rows=rows, **v)
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
        while True:
            with self._cond:
                while not (self._queue or self._running or self._pending or self._cancels):
                    if self._closing:
                        return
                    self._cond.wait()
                cancels, self._cancels = self._cancels, []
            try:
                self._turn(cancels)
            except Exception as e:   # a device error: fail what was in flight, keep serving
                self._fail_all(e)

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
            self._dispatch_decode()
            dispatched = True
        else:
            self._last_read = None   # the next chunk read after an idle gap does not measure a period
        # read everything but the newest chunk: it keeps the device busy while the host works
        while self._pending and (len(self._pending) > 1 or not dispatched):
            self._read(self._pending.popleft())
        if not dispatched and not pending_before and len(self._pending) == 0 and not cancels:
            with self._cond:   # nothing to do this turn (e.g. waiting for slots): don't spin
                self._cond.wait(0.005)

    def _admit(self) -> None:
        budget, spent = self.prefill_budget, 0
        # long prompts already in slots continue first, one chunk each per turn
        for ch in list(self._prefilling):
            if spent >= budget:
                return
            spent += self._extend(ch)
        group: list[RequestHandle] = []   # short prompts admitted together share one batched prefill
        while self._queue and spent < budget:
            with self._cond:
                handle = self._queue[0]
                free = [s for s, c in enumerate(self._slots) if c is None]
                if len(free) < handle.n:
                    break
                self._queue.popleft()
            handle.stats.admitted = time.perf_counter()
            handle._compile_marks["admitted"] = self.steps.compile_seconds
            with self._cond:
                self._running.add(handle)
            for ch, slot in zip(handle.choices, free):
                ch.slot = slot
                self._slots[slot] = ch
                self._release.discard(slot)   # insert/extend rewrite every per-slot field
            n = len(handle.prompt_token_ids)
            if n <= self.prefill_chunk:
                group.append(handle)
                spent += n
                if len(group) == MAX_PREFILL_BATCH:
                    self._prefill(group)
                    group = []
            else:
                for ch in handle.choices:
                    self._prefilling.append(ch)
                spent += self._extend(self._prefilling[-len(handle.choices)])
        if group:
            self._prefill(group)

    def _prefill(self, group: list[RequestHandle]) -> None:
        """One prefill call for the group's prompts (rows padded to 1, 4 or 16, length to the longest
        one's bucket), then each row inserted into its choices' slots."""
        t = bucket_length(max(len(h.prompt_token_ids) for h in group), self.prefill_chunk)
        rows = _prefill_rows(len(group))
        tokens = np.zeros((rows, t), np.int32)
        lengths = np.ones((rows,), np.int32)
        for r, h in enumerate(group):
            tokens[r, :len(h.prompt_token_ids)] = h.prompt_token_ids
            lengths[r] = len(h.prompt_token_ids)
        pre = self.steps.prefill(self.model.params, jnp.asarray(tokens), jnp.asarray(lengths))
        for r, h in enumerate(group):
            for ch in h.choices:
                self.state, first = self.steps.insert(None, self.state, pre, jnp.int32(r), jnp.int32(ch.slot),
                                                      ch.setting())
                ch.decoding = True
                self._pending.append(_Pending("first", first, [ch]))

    def _extend(self, ch: _Choice) -> int:
        """One prompt chunk of a long prompt into ch's slot; the last one starts the choice."""
        ids = ch.handle.prompt_token_ids
        c = self.prefill_chunk
        part = ids[ch.prefilled:ch.prefilled + c]
        tokens = np.zeros((1, c), np.int32)
        tokens[0, :len(part)] = part
        self.state, logits = self.steps.extend(self.model.params, self.state, jnp.int32(ch.slot), jnp.asarray(tokens),
                                               jnp.int32(ch.prefilled), jnp.asarray([len(part)], jnp.int32))
        ch.prefilled += len(part)
        if ch.prefilled >= len(ids):
            self._prefilling.remove(ch)
            self.state, first = self.steps.start(None, self.state, jnp.int32(ch.slot), logits, ch.setting())
            ch.decoding = True
            self._pending.append(_Pending("first", first, [ch]))
        return len(part)

    def _rows(self, used: int) -> int:
        """The decode rows bucket that covers slots [0, used): 1, 4, 16, ... (admission fills the lowest
        free slots, so the requests stay packed at the front)."""
        rows = 1
        while rows < used:
            rows *= 4
        return min(rows, self.max_slots)

    def _dispatch_decode(self) -> None:
        if self._release:
            mask = np.zeros((self.max_slots,), bool)
            mask[list(self._release)] = True
            release = jnp.asarray(mask)
            self._release.clear()
        else:   # the usual case: no host-to-device copy per chunk
            release = self._no_release
        owners = list(self._slots)
        live = [c.handle.options for c in owners if c is not None and c.decoding]
        top = max(s for s, c in enumerate(owners) if c is not None and c.decoding) + 1
        self.state, out = self.steps.decode(self.model.params, self.state, release,
                                            steps=self.decode_chunk, rows=self._rows(top), **_variant(live))
        for c in owners:
            if c is not None and c.decoding:
                c.dispatched += self.decode_chunk
        self._pending.append(_Pending("chunk", out, [c if c is not None and c.decoding else None for c in owners],
                                      self.decode_chunk))

    def _read(self, item: _Pending) -> None:
        got = jax.device_get(item.sampled)
        now = time.perf_counter()
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
        if ch.slot is not None and self._slots[ch.slot] is ch:
            self._slots[ch.slot] = None
            if device_active:
                self._release.add(ch.slot)
        h = ch.handle
        if error is not None:
            h.error = error
        h.stats.generated_tokens = sum(c.generated for c in h.choices)
        if all(c.finish is not None for c in h.choices):
            with self._cond:
                self._running.discard(h)
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
        self.state = S.new_state(self.model.config, self.max_slots, self.model.max_seq_len, self.model.kv_dtype)
