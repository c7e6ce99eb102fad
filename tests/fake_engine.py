"""A scripted stand-in for realizar_jax.serving.Engine with its submit/handle contract: token k of
choice c is (last prompt id + 1 + k + c) mod vocab, one event per token, `delay` seconds apart. Lets
the server's own paths (error mapping, engine failures, shutdown) be tested without the device."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from realizar_jax.serving.requests import (Choice, Completion, ContextLengthError, EngineClosedError, Event,
                                           QueueFullError, RequestStats, SamplingOptions, TokenLogprob)


@dataclass
class FakeMetrics:
    waiting: int
    running: int
    kv_cache_usage: float
    max_slots: int
    max_queue: int


class FakeHandle:
    def __init__(self, engine, ids, options: SamplingOptions):
        self.engine, self.options, self.n = engine, options, options.n
        self.prompt_token_ids = tuple(ids)
        self.stats = RequestStats(submitted=time.perf_counter(), prompt_tokens=len(ids))
        self._cancelled = threading.Event()

    def cancel(self):
        self._cancelled.set()

    def _script(self):
        o, tok, vocab = self.options, self.engine.model.tokenizer, self.engine.model.config.vocab_size
        for k in range(o.max_tokens):
            for c in range(self.n):
                if self._cancelled.is_set():
                    yield Event(c, "", finish_reason="cancelled")
                    continue
                t = (self.prompt_token_ids[-1] + 1 + k + c) % vocab
                last = k == o.max_tokens - 1
                fail = self.engine.fail_after is not None and k == self.engine.fail_after
                lp = (TokenLogprob(t, -0.5, tuple((t + j, -1.0 - j) for j in range(o.logprobs))),) \
                    if o.logprobs is not None else None
                yield Event(c, tok.decode([t]), (t,), lp, "error" if fail else "length" if last else None,
                            "boom" if fail else None)
            if self._cancelled.is_set() or (self.engine.fail_after is not None and k == self.engine.fail_after):
                return

    def _events(self):
        self.stats.admitted = time.perf_counter()
        self.engine.running += 1
        try:
            for ev in self._script():
                if self.stats.first_token is None:
                    self.stats.first_token = time.perf_counter()
                self.stats.generated_tokens += len(ev.token_ids)
                if ev.finish_reason:
                    self.stats.finished = time.perf_counter()
                yield ev
        finally:
            self.engine.running -= 1

    async def events(self):
        for ev in self._events():
            await asyncio.sleep(self.engine.delay)
            yield ev

    async def completion(self):
        texts, ids, reasons, lps = ([""] * self.n, [[] for _ in range(self.n)], [None] * self.n,
                                    [[] for _ in range(self.n)])
        async for ev in self.events():
            texts[ev.choice] += ev.text
            ids[ev.choice] += ev.token_ids
            lps[ev.choice] += ev.logprobs or ()
            reasons[ev.choice] = ev.finish_reason or reasons[ev.choice]
        return Completion(tuple(Choice(c, texts[c], tuple(ids[c]), reasons[c],
                                       tuple(lps[c]) if self.options.logprobs is not None else None)
                                for c in range(self.n)), self.prompt_token_ids, self.stats)


class FakeEngine:
    def __init__(self, model, max_queue=4, delay=0.0, fail_after=None):
        self.model, self.max_seq_len, self.max_queue = model, model.max_seq_len, max_queue
        self.delay, self.fail_after, self.running, self.closed, self.submitted = delay, fail_after, 0, False, 0

    def submit(self, prompt, options, deadline_s=None):
        if self.closed:
            raise EngineClosedError("the engine is closed")
        if self.running >= self.max_queue:
            raise QueueFullError("the queue is full", retry_after=2.5)
        ids = self.model.encode(prompt)
        if not ids:  # as the scheduler refuses it
            raise ContextLengthError("the prompt is empty: give at least one token", param="prompt")
        if len(ids) + options.max_tokens > self.max_seq_len:
            raise ContextLengthError(f"{len(ids)} + {options.max_tokens} > {self.max_seq_len}", "max_tokens")
        self.submitted, self.last = self.submitted + 1, options
        return FakeHandle(self, ids, options)

    def metrics(self):
        return FakeMetrics(0, self.running, 0.0, 1, self.max_queue)

    def close(self, drain=True, timeout=None):
        self.closed = True
