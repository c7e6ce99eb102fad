"""The serving engine on the paged KV cache: a cached prompt prefix gives exactly the tokens it gives
uncached while only the rest is prefilled; n > 1 choices share their prompt's pages (copy on write);
out of pages, the newest request is preempted and recomputed, losing and changing nothing; a stream
of arrivals, cancellations, prefix hits and preemptions compiles nothing new and leaves no page held."""
from __future__ import annotations

import time

import numpy as np
import pytest

import realizar_jax as rj
from realizar_jax.serving import ContextLengthError
from realizar_jax.serving.scheduler import GOLDEN

# one pool shape for every engine here (the steps compile once per shape): 10 pages of 16 positions; and
# one decode variant (sampling with penalties) where the test allows it (each variant compiles)
KW = dict(max_slots=4, max_queue=64, decode_chunk=4, prefill_chunk=64, page_size=16, kv_pages=10)
SAMPLED = dict(ignore_eos=True, temperature=0.9, top_k=50, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def model():
    return rj.load(rj.default_model_path(), dtype="float32", max_seq_len=256)


def _ids(model, seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(3, model.config.vocab_size, n)]


def _idle(e):
    deadline = time.time() + 10
    while (e.metrics().running or e.metrics().waiting) and time.time() < deadline:
        time.sleep(0.01)
    e.pool.check()
    assert e.metrics().pages_in_use == 0 and not e.pool.refs.any()


def test_a_cached_prefix_gives_the_same_tokens_prefilling_only_the_rest(model):
    system = _ids(model, 1, 40)                       # two full pages and a partial one
    a, b = system + _ids(model, 2, 7), system + _ids(model, 3, 11)
    kw = dict(SAMPLED, max_tokens=12, seed=5)
    with model.engine(**KW) as e, model.engine(**KW, prefix_cache=False) as cold:
        first = e.submit(a, **kw).result(timeout=300)
        assert first.stats.cached_tokens == 0
        before = e.metrics()
        hit = e.submit(b, **kw).result(timeout=300)
        after = e.metrics()
        assert hit.stats.cached_tokens == 32
        assert after.prefill_tokens - before.prefill_tokens == len(b) - 32
        assert after.prefix_cache_hits - before.prefix_cache_hits == 32
        assert after.prefix_cache_queries - before.prefix_cache_queries == len(b)
        ref = cold.submit(b, **kw).result(timeout=300)
        assert ref.stats.cached_tokens == 0 and cold.metrics().prefix_cache_hits == 0
        assert hit.choices[0].token_ids == ref.choices[0].token_ids
        # the same prompt again: every full page but the one holding its last token is reused
        again = e.submit(a, **kw).result(timeout=300)
        assert again.stats.cached_tokens == 32 and again.choices[0].token_ids == first.choices[0].token_ids
        assert 0 < e.metrics().prefix_cache_hit_rate < 1
        # the next turn of a conversation: the pages of the first reply are cached too
        turn = a + list(first.choices[0].token_ids) + _ids(model, 6, 5)
        nxt = e.submit(turn, **kw).result(timeout=300)
        assert nxt.stats.cached_tokens == (len(a) + 11) // 16 * 16 == 48
        assert nxt.choices[0].token_ids == cold.submit(turn, **kw).result(timeout=300).choices[0].token_ids
        _idle(e)
        assert e.metrics().pages_cached > 0   # released pages stay cached for the next prompt


def test_n_choices_share_their_prompt_pages_and_copy_on_write(model):
    prompt = _ids(model, 4, 21)   # a full page and a shared partial one
    kw = dict(SAMPLED, max_tokens=20)
    with model.engine(**KW, prefix_cache=False) as e:
        many = e.submit(prompt, n=3, seed=11, **kw).result(timeout=300)
        alone = [e.submit(prompt, seed=(11 + i * GOLDEN) % 2**64, **kw).result(timeout=300).choices[0].token_ids
                 for i in range(3)]
        assert [c.token_ids for c in many.choices] == alone
        assert len(set(alone)) == 3
        _idle(e)


def test_out_of_pages_the_newest_is_preempted_and_recomputed_unchanged(model):
    """Four requests needing 4 or 5 pages each on 9 usable pages: preemptions, and each request's tokens
    (seeded sampling, penalties over what it generated before being preempted) as alone."""
    prompts = [_ids(model, 10 + i, n) for i, n in enumerate((20, 30, 17, 26))]
    opts = [dict(SAMPLED, max_tokens=40, seed=1), dict(SAMPLED, max_tokens=34, seed=3, presence_penalty=0.8),
            dict(SAMPLED, max_tokens=44, seed=5, frequency_penalty=0.6), dict(SAMPLED, max_tokens=36, seed=9)]
    with model.engine(**KW) as e:
        refs = [e.submit(p, **o).result(timeout=300).choices[0].token_ids for p, o in zip(prompts, opts)]
        assert e.metrics().preemptions == 0
        handles = [e.submit(p, **o) for p, o in zip(prompts, opts)]
        got = [h.result(timeout=300) for h in handles]
        assert e.metrics().preemptions > 0
        for g, ref in zip(got, refs):   # (token_ids are what the stream handed out: each once, in order)
            assert g.choices[0].finish_reason == "length" and g.choices[0].token_ids == ref
        _idle(e)
        with pytest.raises(ContextLengthError, match="KV pages"):
            e.submit(prompts[0], max_tokens=200)


def test_a_stream_with_prefix_hits_cancellations_and_preemptions_compiles_nothing_new(model):
    system = _ids(model, 20, 16)   # one page
    rng = np.random.default_rng(21)
    with model.engine(**KW) as e:
        e.warmup([20], workers=2)   # every prompt below is in the bucket of 17..32 tokens (fewer compiles)
        before = e.steps.compiles
        handles = []
        for i in range(16):
            prompt = system + _ids(model, 100 + i, int(rng.integers(1, 16))) if i % 2 else \
                _ids(model, 100 + i, int(rng.integers(17, 32)))
            handles.append(e.submit(prompt, max_tokens=int(rng.integers(1, 48)), temperature=float(rng.choice([0, 0.8])),
                                    seed=i, ignore_eos=True))
            if i % 5 == 4:
                handles[-2].cancel()
            time.sleep(float(rng.uniform(0, 0.01)))
        for h in handles:
            assert h.result(timeout=300).choices[0].finish_reason in ("length", "cancelled")
        m = e.metrics()
        assert e.steps.compiles == before, "a step compiled after warm-up"
        assert m.prefix_cache_hits > 0 and m.preemptions > 0
        _idle(e)


def test_bad_pool_arguments_are_named(model):
    with pytest.raises(ValueError, match="page_size"):
        model.engine(page_size=12)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        model.engine(kv_cache_memory=-1)
    with pytest.raises(ValueError, match="not both"):
        model.engine(kv_cache_memory=1, kv_pages=10)
    with pytest.raises(ValueError, match="holds 0 pages"):
        model.engine(kv_cache_memory=1e-9)


def test_tails_of_a_shared_prefix_prefill_together_each_as_alone(model):
    """Six prompts with one cached system prompt arrive at once: their tails (1 to 40 tokens, padded to 16, 32
    or 64) go through batched extend calls, with padding rows, and each request's tokens equal the
    same request run alone with the prefix cache off."""
    system = _ids(model, 30, 33)   # two full pages cached, the last token's page computed
    rng = np.random.default_rng(31)
    prompts = [system + _ids(model, 40 + i, int(n)) for i, n in enumerate(rng.integers(1, 40, 6))]
    kw = dict(SAMPLED, max_tokens=6)
    with model.engine(**dict(KW, max_slots=8, kv_pages=40)) as e, \
            model.engine(**dict(KW, max_slots=8, kv_pages=40), prefix_cache=False) as cold:
        assert e.extend_lengths() == (16, 32, 64)
        e.submit(system, **kw).result(timeout=300)   # caches the system prompt's full pages
        calls, call = [], e._extend_call
        e._extend_call = lambda t, group: (calls.append((t, len(group))), call(t, group))
        with e._cond:   # held: the six are queued before the scheduler's next turn admits any
            handles = [e.submit(p, seed=i, **kw) for i, p in enumerate(prompts)]
        got = [h.result(timeout=300) for h in handles]
        assert all(g.stats.cached_tokens == 32 for g in got)
        assert max(n for _, n in calls) > 1 and {t for t, _ in calls} <= {16, 32, 64}, calls
        for i, (p, g) in enumerate(zip(prompts, got)):
            assert g.choices[0].token_ids == cold.submit(p, seed=i, **kw).result(timeout=300).choices[0].token_ids
        _idle(e)
