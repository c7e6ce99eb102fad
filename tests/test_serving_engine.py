"""The serving engine on the embedded model: continuous batching gives each request what it gets alone,
seeds are per request, device-side stops/budgets/penalties/logprobs match references computed from
Model.logits, a stream of arrivals/departures/cancellations compiles nothing new, bad input is refused."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import realizar_jax as rj
from realizar_jax.serving import (ContextLengthError, EngineClosedError, OptionError, QueueFullError,
                                  SamplingOptions)
from realizar_jax.serving.text import ChoiceText


@pytest.fixture(scope="module")
def model():
    return rj.load(rj.default_model_path(), dtype="float32", max_seq_len=256)


@pytest.fixture(scope="module")
def engine(model):
    e = model.engine(max_slots=8, max_queue=64, decode_chunk=4, prefill_chunk=64)
    yield e
    e.close(drain=False)


def _prompts(model, seed: int, count: int, lo: int = 2, hi: int = 90):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, model.config.vocab_size, int(n))] for n in rng.integers(lo, hi, count)]


def _alone(model, prompt, **kw):
    with model.engine(max_slots=8, decode_chunk=4, prefill_chunk=64) as e:
        return e.submit(prompt, **kw).result()


def test_concurrent_greedy_requests_equal_each_alone(model, engine):
    """16 requests of different lengths (some longer than a prefill chunk) on 8 slots: queueing,
    batched prefill, chunked prefill and slot reuse change no token."""
    prompts = _prompts(model, 1, 16, hi=150)
    handles = [engine.submit(p, max_tokens=int(m), ignore_eos=True)
               for p, m in zip(prompts, np.random.default_rng(2).integers(3, 40, 16))]
    got = [h.result(timeout=300) for h in handles]
    for p, h, g in zip(prompts, handles, got):
        ref = _alone(model, p, max_tokens=h.options.max_tokens, ignore_eos=True)
        assert g.choices[0].token_ids == ref.choices[0].token_ids
        assert len(g.choices[0].token_ids) == h.options.max_tokens and g.choices[0].finish_reason == "length"


def test_greedy_equals_argmax_of_reference_logits(model, engine):
    """Each greedy token is the argmax of Model.logits (the jitted prefill) over prompt + tokens so far,
    and the reported logprobs are that distribution's log-softmax."""
    prompt = _prompts(model, 3, 1, 5, 20)[0]
    c = engine.submit(prompt, max_tokens=6, ignore_eos=True, logprobs=3).result().choices[0]
    seq = list(prompt)
    for tok, lp in zip(c.token_ids, c.logprobs):
        logits = model.logits(seq)[-1].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert tok == int(np.argmax(logits)) == lp.token_id
        assert lp.logprob == pytest.approx(logp[tok], abs=2e-4)
        top = np.argsort(-logp)[:3]
        assert [t for t, _ in lp.top] == list(top)
        assert [v for _, v in lp.top] == pytest.approx(list(logp[top]), abs=2e-4)
        seq.append(tok)


def test_frequency_and_presence_penalties_follow_openai_definition(model, engine):
    """Greedy with penalties: token = argmax(logits - presence * [count > 0] - frequency * count)
    over the tokens generated so far (not the prompt)."""
    prompt = _prompts(model, 4, 1, 5, 12)[0]
    pres, freq = 0.7, 0.9
    c = engine.submit(prompt, max_tokens=10, ignore_eos=True, presence_penalty=pres,
                      frequency_penalty=freq).result().choices[0]
    seq, counts = list(prompt), np.zeros(model.config.vocab_size)
    for tok in c.token_ids:
        x = model.logits(seq)[-1] - pres * (counts > 0) - freq * counts
        assert tok == int(np.argmax(x))
        counts[tok] += 1
        seq.append(tok)


def test_a_seed_gives_the_same_tokens_whatever_runs_beside_it(model, engine):
    prompt = _prompts(model, 5, 1, 8, 9)[0]
    kw = dict(max_tokens=24, temperature=1.2, top_p=0.95, top_k=200, seed=77, ignore_eos=True)
    alone = _alone(model, prompt, **kw).choices[0].token_ids
    noise = [engine.submit(p, max_tokens=30, temperature=0.9, ignore_eos=True) for p in _prompts(model, 6, 6)]
    h = engine.submit(prompt, **kw)
    assert h.result().choices[0].token_ids == alone
    for n in noise:
        n.result()
    unseeded = {engine.submit(prompt, **dict(kw, seed=None)).result().choices[0].token_ids for _ in range(3)}
    assert len(unseeded) > 1   # no seed: fresh randomness


def test_n_choices_share_a_prefill_and_differ(model, engine):
    prompt = _prompts(model, 7, 1, 10, 11)[0]
    c = engine.submit(prompt, max_tokens=16, temperature=1.0, seed=3, n=3, ignore_eos=True).result()
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    assert len({ch.token_ids for ch in c.choices}) > 1
    assert c.completion_tokens == 48 and c.prompt_tokens == len(prompt)
    greedy = engine.submit(prompt, max_tokens=8, n=2, ignore_eos=True).result()
    assert greedy.choices[0].token_ids == greedy.choices[1].token_ids
    assert engine.generate(prompt, max_tokens=8, ignore_eos=True).choices[0].token_ids == greedy.choices[0].token_ids


def test_stop_ids_and_budget_end_on_device(model, engine):
    prompt = _prompts(model, 8, 1, 6, 7)[0]
    free = engine.submit(prompt, max_tokens=12, ignore_eos=True).result().choices[0].token_ids
    stop_at = free[5]
    first = free.index(stop_at)
    c = engine.submit(prompt, max_tokens=12, stop_token_ids=[stop_at], ignore_eos=True).result().choices[0]
    assert c.token_ids == free[:first] and c.finish_reason == "eos" and c.generated_tokens == first


def test_stop_strings_are_cut_and_end_the_run(model, engine):
    prompt = "def fibonacci(n):"
    full = engine.submit(prompt, max_tokens=40, ignore_eos=True).result().choices[0]
    text = full.text
    stop = text[11:14]
    c = engine.submit(prompt, max_tokens=40, ignore_eos=True, stop=[stop]).result().choices[0]
    assert c.text == text[:text.find(stop)] and c.finish_reason == "stop"
    assert c.generated_tokens < 40
    streamed = "".join(ev.text for ev in engine.submit(prompt, max_tokens=40, ignore_eos=True, stop=[stop]))
    assert streamed == c.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.text(alphabet="ab\n", min_size=0, max_size=3), min_size=1, max_size=12),
       stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3), min_size=0, max_size=3))
def test_choice_text_hands_out_exactly_the_text_before_the_first_stop(pieces, stops):
    class Decoder:   # token i decodes to pieces[i]
        def push(self, i):
            return pieces[i]

        def flush(self):
            return ""
    ct = ChoiceText(Decoder(), tuple(stops))
    out, toks = "", []
    for i in range(len(pieces)):
        piece, t, _, stopped = ct.push(i)
        out += piece
        toks += t
        if stopped:
            break
    else:
        piece, t, _, _ = ct.flush()
        out += piece
        toks += t
    full = "".join(pieces)
    hits = [full.find(s) for s in stops if s in full]
    expect = full[:min(hits)] if hits else full
    assert out == expect
    assert toks == sorted(toks) and len(set(toks)) == len(toks)
    assert "".join(pieces[i] for i in toks).startswith(expect)


def test_cancel_frees_the_slot_at_the_next_chunk(model):
    with model.engine(max_slots=1, max_queue=4, decode_chunk=2) as e:
        long = e.submit([5, 6, 7], max_tokens=200, ignore_eos=True)
        it = iter(long)
        next(it)
        waiting = e.submit([8, 9], max_tokens=3, ignore_eos=True)
        assert e.metrics().running == 1
        long.cancel()
        assert long.result(timeout=30).choices[0].finish_reason == "cancelled"
        assert waiting.result(timeout=60).choices[0].finish_reason == "length"   # got the freed slot
        assert long.stats.generated_tokens < 200
        deadline = time.time() + 10
        while e.metrics().running and time.time() < deadline:
            time.sleep(0.01)
        assert e.metrics().running == 0 and e.metrics().kv_cache_usage == 0


def test_the_scheduler_time_by_phase_adds_up_to_its_wall_time(model):
    t0 = time.perf_counter()
    with model.engine(max_slots=2, decode_chunk=2) as e:
        e.submit([5, 6, 7], max_tokens=12, ignore_eos=True).result(timeout=60)
        time.sleep(0.2)   # idle: the scheduler thread waits for work
        m = e.metrics()
        wall = time.perf_counter() - t0
    assert m.host_seconds > 0 and m.device_wait_seconds > 0 and m.idle_seconds >= 0.15
    assert 0 < m.compile_seconds_in_loop <= m.compile_seconds   # no warm-up: the steps compiled in the loop
    assert m.host_seconds + m.device_wait_seconds + m.idle_seconds + m.compile_seconds_in_loop <= wall


def test_deadline_ends_a_request_with_timeout(model):
    with model.engine(max_slots=1, decode_chunk=2) as e:
        c = e.submit([5, 6], max_tokens=240, ignore_eos=True, deadline_s=0.3).result(timeout=60)
        assert c.choices[0].finish_reason == "timeout" and c.completion_tokens < 240


def test_a_full_queue_refuses_and_a_closed_engine_refuses(model):
    e = model.engine(max_slots=1, max_queue=1, decode_chunk=2)
    first = e.submit([5, 6], max_tokens=200, ignore_eos=True)
    while first.stats.admitted is None:
        time.sleep(0.005)
    queued = e.submit([5, 7], max_tokens=4)
    with pytest.raises(QueueFullError, match="max_queue=1") as info:
        e.submit([5, 8], max_tokens=4)
    assert info.value.retry_after >= 1
    first.cancel()
    e.close(drain=True)
    assert queued.result(timeout=30).choices[0].finish_reason == "length"   # drained, not dropped
    with pytest.raises(EngineClosedError):
        e.submit([1, 2], max_tokens=2)


@pytest.mark.parametrize("kw,error,param", [
    (dict(max_tokens=0), OptionError, "max_tokens"),
    (dict(temperature=-0.5), OptionError, "temperature"),
    (dict(top_p=0.0), OptionError, "top_p"),
    (dict(presence_penalty=3.0), OptionError, "presence_penalty"),
    (dict(logprobs=21), OptionError, "logprobs"),
    (dict(n=0), OptionError, "n"),
    (dict(n=9), OptionError, "n"),
    (dict(stop=[""]), OptionError, "stop"),
    (dict(stop_token_ids=[10**6]), OptionError, "stop_token_ids"),
    (dict(max_tokens=250), ContextLengthError, "max_tokens"),
    (dict(temperature=float("nan")), OptionError, "temperature"),
    (dict(seed="1"), OptionError, "seed"),
])
def test_bad_options_name_their_field(engine, kw, error, param):
    with pytest.raises(error) as info:
        engine.submit([1, 2, 3, 4, 5, 6, 7, 8], **kw)
    assert info.value.param == param
    assert engine.submit([1, 2], max_tokens=2).result().choices[0].token_ids   # still serving


def test_bad_prompts_are_refused(engine):
    with pytest.raises(ContextLengthError, match="empty"):
        engine.submit([], max_tokens=2)
    with pytest.raises(ContextLengthError, match="no room"):
        engine.submit([1] * 256, max_tokens=1)
    with pytest.raises(ValueError, match="out of range"):
        engine.submit([1, 10**7], max_tokens=2)
    with pytest.raises(TypeError):
        engine.submit([1.5, 2], max_tokens=2)


def test_async_events_equal_the_sync_result(model, engine):
    prompt = "import os\n"

    async def main():
        hs = [engine.submit(prompt, max_tokens=12, ignore_eos=True) for _ in range(3)]
        texts = []
        for h in hs:
            texts.append("".join([ev.text async for ev in h.events()]))
        done = await hs[0].completion()
        return texts, done
    texts, done = asyncio.run(main())
    assert texts == [done.choices[0].text] * 3 and done.choices[0].text


def test_a_consumer_that_falls_behind_gets_the_due_events_joined(engine):
    """Read after the request is over and every event is due: a choice's consecutive events come as
    one (n=2: the two choices' runs alternate per decode chunk), their text, tokens and logprobs the
    Completion's."""
    async def main(n):
        h = engine.submit("def f(x):", n=n, max_tokens=24, ignore_eos=True, temperature=0.8, seed=3, logprobs=2)
        done = await h.completion()
        await asyncio.sleep(0.3)   # past the last chunk's paced release times (at most 0.25 s out)
        return done, [ev async for ev in h.events()]

    for n, most in ((1, 1), (2, 24 // 4 + 1)):
        done, events = asyncio.run(main(n))
        for c in done.choices:
            mine = [ev for ev in events if ev.choice == c.index]
            assert len(mine) <= most and mine[-1].finish_reason == "length"
            assert "".join(ev.text for ev in mine) == c.text
            assert sum((ev.token_ids for ev in mine), ()) == c.token_ids
            assert sum((ev.logprobs for ev in mine), ()) == c.logprobs and len(c.logprobs) == 24


def test_an_engine_failure_is_not_joined_into_the_text_before_it(model):
    """A device error mid-stream ends the request with finish_reason 'error'; read late, the tokens that
    came before it still arrive in an event of their own (the server sends them, then the error)."""
    with model.engine(max_slots=1, decode_chunk=2) as e:
        dispatch, calls = e._dispatch_decode, []

        def failing():
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("boom")
            return dispatch()
        e._dispatch_decode = failing

        async def main():
            h = e.submit([5, 6, 7], max_tokens=40, ignore_eos=True)
            await h.completion()
            await asyncio.sleep(0.3)
            return [ev async for ev in h.events()]
        events = asyncio.run(main())
    assert events[-1].finish_reason == "error" and "boom" in events[-1].error
    assert len(events) >= 2 and events[-2].finish_reason is None and len(events[-2].token_ids) >= 2


def test_streams_arrive_paced_not_in_chunk_bursts(model):
    """With decode_chunk=8 a chunk's tokens are released over the chunk's duration: no 8-token bursts."""
    with model.engine(max_slots=1, decode_chunk=8) as e:
        e.submit([5, 6], max_tokens=40, ignore_eos=True).result()   # compiles, measures the chunk period
        stamps = [time.perf_counter() for _ in e.submit([5, 6, 7], max_tokens=80, ignore_eos=True)]
    gaps = np.diff(stamps[8:])   # past the first chunks
    assert np.median(gaps) > 0.1 * np.percentile(gaps, 95), gaps


def test_arrivals_departures_cancellations_compile_nothing_new(model):
    with model.engine(max_slots=4, max_queue=64, decode_chunk=4, prefill_chunk=64) as e:
        e.warmup(workers=2)   # lowered from abstract shapes, compiled on two threads, nothing run
        before = e.steps.compiles
        assert before > 0
        e.warmup()
        assert e.steps.compiles == before   # every shape it needs is there already
        rng = np.random.default_rng(9)
        handles = []
        for i, p in enumerate(_prompts(model, 10, 24, 1, 150)):
            handles.append(e.submit(p, max_tokens=int(rng.integers(1, 30)), temperature=float(rng.choice([0, 0.8])),
                                    seed=i, stop=["\n\n"] if i % 3 == 0 else ()))
            if i % 5 == 4:
                handles[-2].cancel()
            time.sleep(float(rng.uniform(0, 0.01)))
        for h in handles:
            assert h.result(timeout=300).choices[0].finish_reason in ("length", "eos", "stop", "cancelled")
        assert e.steps.compiles == before
        assert e.metrics().running == 0 and e.metrics().waiting == 0


def test_generate_batches_continuously_and_each_result_has_its_own_stats(model):
    prompts = ["def f(x):", "import sys\nimport os\n\n\nclass A:", "x"]
    gens = model.generate(prompts, max_new_tokens=10, stop_token_ids=[])
    assert [g.stats.prompt_tokens for g in gens] == [len(model.encode(p)) for p in prompts]
    assert all(g.stats.generated_tokens == len(g.tokens) == 10 for g in gens)
    assert model.last_stats.generated_tokens == 30


def test_concurrent_threads_share_one_engine(model, engine):
    prompts = _prompts(model, 11, 6)
    refs = [engine.submit(p, max_tokens=8, ignore_eos=True).result().choices[0].token_ids for p in prompts]
    out = [None] * len(prompts)

    def worker(i):
        out[i] = engine.submit(prompts[i], max_tokens=8, ignore_eos=True).result().choices[0].token_ids
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == refs


def test_sampling_options_reject_what_openai_would():
    with pytest.raises(OptionError, match="max_tokens"):
        SamplingOptions(max_tokens=True)
    assert SamplingOptions(stop="x").stop == ("x",)
