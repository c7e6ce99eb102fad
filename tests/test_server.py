"""The OpenAI-compatible server end to end: a real uvicorn on an ephemeral port over the engine and
the embedded model, called with the official openai client and with raw httpx for hostile input."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import realizar_jax as rj
from fake_engine import FakeEngine
from served import Served
from realizar_jax.server import create_app
from realizar_jax.serving import SamplingOptions
from realizar_jax.server.schema import (ChatCompletionRequest, CompletionRequest, RequestError, parse_json,
                                        parse_request)

NAME = "tiny"
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, x):", "for i in range(10):",
           "# Copyright", "def main():\n    args = parse_args()\n    if args.verbose:\n        print(",
           "x = [", "return self._"]


@pytest.fixture(scope="module")
def model():
    return rj.load(rj.default_model_path())


@pytest.fixture(scope="module")
def engine(model):
    e = model.engine(max_slots=8, max_queue=64)
    yield e
    e.close(drain=False)


@pytest.fixture(scope="module")
def served(engine):
    s = Served(create_app(engine, NAME))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=240)


def metric(url, name) -> float:
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


def wait_idle(url, timeout=30.0):
    """Until the engine holds no slot and queues nothing (a cancelled request is freed at a chunk boundary)."""
    t0 = time.monotonic()
    while metric(url, "realizar:num_requests_running") or metric(url, "realizar:num_requests_waiting"):
        assert time.monotonic() - t0 < timeout, "the engine still runs requests"
        time.sleep(0.05)


EXTENSIONS = ("ignore_eos", "top_k", "min_p", "repetition_penalty")


def _kw(kw):  # the openai client sends fields it does not know through extra_body
    return {**{k: v for k, v in kw.items() if k not in EXTENSIONS},
            "extra_body": {k: v for k, v in kw.items() if k in EXTENSIONS}}


def greedy(client, prompt, max_tokens=12, **kw):
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, **_kw(kw))


def stream_text(client, prompt, max_tokens=12, **kw) -> tuple[str, str]:
    text, reason = "", None
    for chunk in client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, stream=True, **_kw(kw)):
        for c in chunk.choices:
            text += c.text
            reason = c.finish_reason or reason
    return text, reason


# ---- completions and chat ------------------------------------------------------------------------------
def test_completion_matches_the_engine(client, engine, model):
    prompt = PROMPTS[0]
    r = greedy(client, prompt, max_tokens=10)
    ref = engine.submit(prompt, SamplingOptions(max_tokens=10)).result().choices[0]
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == {"length": "length", "eos": "stop", "stop": "stop"}[ref.finish_reason]
    assert r.usage.prompt_tokens == len(model.encode(prompt))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_equals_nonstream_with_usage(client):
    whole = greedy(client, PROMPTS[1], max_tokens=16)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.text for ch in chunks for c in ch.choices) == whole.choices[0].text
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])


def test_echo(client, model):
    r = greedy(client, PROMPTS[2], max_tokens=4, echo=True)
    assert r.choices[0].text == PROMPTS[2] + greedy(client, PROMPTS[2], max_tokens=4).choices[0].text
    ids = model.encode(PROMPTS[3])
    assert stream_text(client, ids, max_tokens=4, echo=True, temperature=0)[0].startswith(model.tokenizer.decode(ids))


def test_chat_stream_and_not(client, engine, model):
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": [{"type": "text", "text": "def add(a, b):"}]}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    ids = model.encode_chat([{"role": "system", "content": "You write Python."},
                             {"role": "user", "content": "def add(a, b):"}])
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == engine.submit(ids, SamplingOptions(max_tokens=12)).result().choices[0].text
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.delta.content or "" for ch in chunks for c in ch.choices) == r.choices[0].message.content
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == [r.choices[0].finish_reason]
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()


def test_n_and_prompt_lists(client):
    r = client.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=8, n=2, temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert 2 <= r.usage.completion_tokens <= 16 and all(c.finish_reason in ('length', 'stop') for c in r.choices)
    alone = [greedy(client, p, max_tokens=6).choices[0].text for p in PROMPTS[:2]]
    r = greedy(client, PROMPTS[:2], max_tokens=6, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt-major
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          n=3, seed=1)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    streamed = {}
    for ch in client.completions.create(model=NAME, prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=6, n=2,
                                        temperature=0, stream=True):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: alone[0], 1: alone[0], 2: alone[1], 3: alone[1]}


def test_logprobs(client, model):
    r = greedy(client, PROMPTS[5], max_tokens=8, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == \
        r.usage.completion_tokens
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 4 and top[tok] == value
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy took the most likely token
    ch = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "def f():"}], max_tokens=6,
                                        temperature=0, logprobs=True, top_logprobs=2)
    content = ch.choices[0].logprobs.content
    assert len(content) == ch.usage.completion_tokens
    assert "".join(t.token for t in content) == ch.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and bytes(t.bytes).decode() == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
    streamed = [t for chunk in client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "def f():"}], max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=2, stream=True) for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_stop(client):
    text = greedy(client, PROMPTS[0], max_tokens=24, ignore_eos=True).choices[0].text
    cut = next(i for i in range(3, len(text) - 2) if not text[i].isspace())
    stop = text[cut:cut + 2]
    r = greedy(client, PROMPTS[0], max_tokens=24, ignore_eos=True, stop=[stop, "@@never@@"])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    assert stream_text(client, PROMPTS[0], 24, temperature=0, ignore_eos=True, stop=stop) == (r.choices[0].text, "stop")


def test_seed_reproducible_also_concurrently(client):
    kw = dict(max_tokens=8, temperature=1.0, top_p=0.95, seed=1234)
    alone = client.completions.create(model=NAME, prompt=PROMPTS[6], **kw).choices[0].text
    assert client.completions.create(model=NAME, prompt=PROMPTS[6], **kw).choices[0].text == alone
    with ThreadPoolExecutor(6) as pool:
        seeded = pool.map(lambda _: stream_text(client, PROMPTS[6], **kw)[0], range(3))
        others = [pool.submit(stream_text, client, p, 8, temperature=1.0) for p in PROMPTS[:3]]
        assert list(seeded) == [alone] * 3
        [f.result() for f in others]
    texts = {client.completions.create(model=NAME, prompt=PROMPTS[6], **{**kw, "seed": s}).choices[0].text
             for s in range(4)}
    assert len(texts) > 1  # the seed matters


def test_concurrent_greedy_streams_equal_alone(client, model):
    ids = model.encode("\n".join(PROMPTS))
    prompts = [ids[:8 + 3 * i] for i in range(16)]  # 16 lengths, 8..53 tokens
    assert len({len(p) for p in prompts}) == 16 and len(ids) >= 53
    alone = [stream_text(client, p, 6, temperature=0, ignore_eos=True) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: stream_text(client, p, 6, temperature=0, ignore_eos=True), prompts))
    assert together == alone
    assert all(reason == "length" for _, reason in alone)


# ---- cancellation, backpressure ------------------------------------------------------------------------
def test_disconnect_frees_the_slot(served):
    long = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", served.url + "/v1/completions", json={**long, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            deadline = time.time() + 10   # the gauge is read at scrape time; give a loaded machine a moment
            while metric(served.url, "realizar:num_requests_running") < 1 and time.time() < deadline:
                next(lines)
            assert metric(served.url, "realizar:num_requests_running") >= 1
    wait_idle(served.url)
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up waiting
        httpx.post(served.url + "/v1/completions", json=long, timeout=httpx.Timeout(60, read=0.5))
    wait_idle(served.url)
    assert sum(s.value for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)
               for s in f.samples if s.name == "realizar:request_success_total"
               and s.labels.get("finish_reason") == "cancelled") >= 2


def test_full_queue_is_429_with_retry_after(model):
    engine = model.engine(max_slots=1, max_queue=1)
    s = Served(create_app(engine, NAME, model=model))
    long = SamplingOptions(max_tokens=500, ignore_eos=True)
    try:
        running = engine.submit(PROMPTS[0], long)
        while running.stats.admitted is None:  # it holds the one slot ...
            time.sleep(0.01)
        queued = engine.submit(PROMPTS[1], long)  # ... and this one the one place in the queue
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
        assert r.json()["error"]["type"] == "rate_limit_error" and not queued.done
        running.cancel(), queued.cancel()
        wait_idle(s.url)
        assert metric(s.url, "realizar:request_errors_total") == 1
        assert greedy(openai.OpenAI(base_url=s.url + "/v1", api_key="x"), "x", max_tokens=2).usage.completion_tokens
    finally:
        s.close()
        engine.close(drain=False)


def test_request_timeout_ends_a_request_with_timeout(model):
    engine = model.engine(max_slots=1, decode_chunk=2)
    s = Served(create_app(engine, NAME, model=model, request_timeout=0.3))
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 400, "ignore_eos": True,
                                                         "temperature": 0}, timeout=120).json()
        assert r["choices"][0]["finish_reason"] == "timeout" and r["usage"]["completion_tokens"] < 400
    finally:
        s.close()
        engine.close(drain=False)


# ---- hostile input -------------------------------------------------------------------------------------
P = {"prompt": "x", "max_tokens": 2}
M = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
BAD = [
    ("/v1/completions", {**P, "tools": []}, "tools"),
    ("/v1/completions", {**P, "logit_bias": {"1": 2}}, "logit_bias"),
    ("/v1/completions", {**P, "best_of": 3}, "best_of"),
    ("/v1/completions", {**P, "suffix": "x"}, "suffix"),
    ("/v1/completions", {**P, "nonsense": 1}, "nonsense"),
    ("/v1/chat/completions", {**M, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {**M, "tool_choice": "auto"}, "tool_choice"),
    ("/v1/completions", {**P, "temperature": -0.5}, "temperature"),
    ("/v1/completions", {**P, "temperature": 2.5}, "temperature"),
    ("/v1/completions", {**P, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**P, "top_p": 0}, "top_p"),
    ("/v1/completions", {**P, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**P, "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {**P, "max_tokens": 600}, "max_tokens"),
    ("/v1/completions", {**P, "prompt": [5] * 600}, "prompt"),
    ("/v1/completions", {**P, "prompt": [99999]}, "prompt"),
    ("/v1/completions", {**P, "prompt": []}, "prompt"),
    ("/v1/completions", {**P, "prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
    ("/v1/completions", {**P, "n": 1.5}, "n"),
    ("/v1/completions", {**P, "n": 100}, "n"),
    ("/v1/completions", {**P, "stream": "yes"}, "stream"),
    ("/v1/completions", {**P, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {**P, "stop": 5}, "stop"),
    ("/v1/completions", {**P, "stop": [""]}, "stop"),
    ("/v1/completions", {**P, "seed": 2.5}, "seed"),
    ("/v1/completions", {**P, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**P, "logprobs": 2, "echo": True}, "echo"),
    ("/v1/completions", {**P, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {**P, "top_k": -2}, "top_k"),
    ("/v1/completions", {**P, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {**P, "min_p": 1.5}, "min_p"),
    ("/v1/completions", {**P, "ignore_eos": 1}, "ignore_eos"),
    ("/v1/chat/completions", {"max_tokens": 2, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"max_tokens": 2, "messages": []}, "messages"),
    ("/v1/chat/completions", {**M, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**M, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {**M, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ("/v1/chat/completions", {**M, "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages[0].tool_calls"),
    ("/v1/chat/completions", {**M, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**M, "logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {**M, "messages": [{"role": "user", "content": "x " * 600}]}, "messages"),
    ("/v1/chat/completions", {**M, "max_completion_tokens": 600}, "max_tokens"),
]


@pytest.mark.parametrize("path, body, param", BAD, ids=[f"{p.split('/')[-1]}-{q}" for p, _, q in BAD])
def test_bad_request_is_400_naming_the_field(served, path, body, param):
    r = httpx.post(served.url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and param in err["message"] or \
        err["code"] == "context_length_exceeded", err
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body", [b"{", b"", b"[1, 2]", b'"x"', b'{"prompt": "x", "temperature": NaN}',
                                  b"\xff\xfe", b"[" * 100_000])
def test_malformed_json_is_400(served, body):
    r = httpx.post(served.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_other_errors_in_openai_shape(served, client):
    r = httpx.post(served.url + "/v1/completions", content=b" " * (4 * 2**20 + 1))
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(served.url + "/v1/completions", json={**P, "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for method, path, status in [("GET", "/v2/nothing", 404), ("GET", "/v1/completions", 405)]:
        r = httpx.request(method, served.url + path)
        assert r.status_code == status and r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=9)
    assert e.value.body["param"] == "temperature"


def test_models_health_metrics(served, client, engine):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    greedy(client, PROMPTS[0], max_tokens=3)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)}
    for name in ["realizar:num_requests_waiting", "realizar:num_requests_running", "realizar:kv_cache_usage_perc",
                 "realizar:time_to_first_token_seconds", "realizar:inter_token_latency_seconds",
                 "realizar:e2e_request_latency_seconds", "realizar:prompt_tokens", "realizar:generation_tokens",
                 "realizar:request_success", "realizar:request_errors", "realizar:kv_cache_pages_total",
                 "realizar:kv_cache_pages_in_use", "realizar:kv_cache_pages_cached", "realizar:prefix_cache_hits",
                 "realizar:prefix_cache_queries", "realizar:prefix_cache_hit_rate", "realizar:num_preemptions",
                 "realizar:request_queue_time_seconds", "realizar:request_prefill_time_seconds",
                 "realizar:request_decode_time_seconds", "realizar:engine_seconds"]:
        assert name in families, name
    phases = {s.labels["phase"]: s.value for s in families["realizar:engine_seconds"].samples}
    assert set(phases) == {"host", "device_wait", "idle", "compile"} and phases["host"] > 0 and phases["device_wait"] > 0
    assert metric(served.url, "realizar:request_queue_time_seconds_count") >= 1
    assert metric(served.url, "realizar:request_prefill_time_seconds_count") >= 1
    assert 0.0 <= metric(served.url, "realizar:kv_cache_usage_perc") <= 1.0
    assert metric(served.url, "realizar:kv_cache_pages_total") == engine.pool.usable
    assert metric(served.url, "realizar:prefix_cache_queries_total") >= 1
    assert metric(served.url, "realizar:e2e_request_latency_seconds_count") >= 1
    assert metric(served.url, "realizar:prompt_tokens_total") >= 1


def _json_values():
    scalars = st.none() | st.booleans() | st.integers(-3, 600) | st.floats(allow_nan=False, allow_infinity=False, width=32) | \
        st.text(max_size=8) | st.sampled_from([0, 1, 2, 20, 0.5, 1.0, 2.0, -1, "x", ""])
    return st.recursive(scalars, lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=5), v,
                                                                                      max_size=3), max_leaves=6)


KEYS = ["model", "prompt", "messages", "temperature", "top_p", "seed", "stop", "n", "presence_penalty",
        "frequency_penalty", "logprobs", "top_logprobs", "echo", "stream", "stream_options", "user", "top_k",
        "min_p", "repetition_penalty", "ignore_eos", "max_completion_tokens", "tools", "best_of", "zzz"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                 "content": st.text(max_size=20) | _json_values()})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(chat=st.booleans(), body=st.dictionaries(st.sampled_from(KEYS), _json_values(), max_size=6),
       prompt=st.text(max_size=30) | st.lists(st.integers(-1, 5000), max_size=4) | _json_values(),
       messages=st.lists(MESSAGE, max_size=2) | _json_values(),
       max_tokens=st.sampled_from([1, 2, 3, 0, -1, "2", 2.0, None, True]))
def test_fuzz_never_5xx(served, chat, body, prompt, messages, max_tokens):
    body = {**body, "max_tokens": max_tokens}  # always set and small: no long generation per example
    body["messages" if chat else "prompt"] = messages if chat else prompt
    if body.get("max_completion_tokens") not in (None, 1, 2):
        body.pop("max_completion_tokens")
    if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool):
        body["n"] = min(body["n"], 3)
    r = httpx.post(served.url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body, timeout=60)
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
        else:
            assert r.json()["usage"]["total_tokens"] >= 1
    else:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_still_serving_after_fuzz(served, client):
    assert httpx.get(served.url + "/health").status_code == 200
    assert greedy(client, PROMPTS[0], max_tokens=2).choices[0].finish_reason in ("length", "stop")


# ---- the server's own paths, on a scripted engine ------------------------------------------------------
def test_engine_failures_and_draining(model):
    engine = FakeEngine(model, delay=0.001, fail_after=1)
    app = create_app(engine, NAME, model=model)
    s = Served(app)
    try:
        r = httpx.post(s.url + "/v1/completions", json=P | {"max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        r = httpx.post(s.url + "/v1/completions", json=P | {"max_tokens": 4, "stream": True})
        events = [line for line in r.text.split("\n\n") if line]
        assert r.status_code == 200 and json.loads(events[-2][6:])["error"]["message"] == "boom"
        assert events[-1] == "data: [DONE]"
        app.state.draining = True
        assert httpx.get(s.url + "/health").status_code == 503
        engine.closed = True
        r = httpx.post(s.url + "/v1/chat/completions", json=M)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_closed"
    finally:
        s.close()


def test_chat_default_max_tokens_is_the_rest_of_the_context(model):
    engine = FakeEngine(model)
    s = Served(create_app(engine, NAME, model=model))
    try:
        messages = [{"role": "user", "content": "x " * 100}]
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 200
        assert engine.last.max_tokens == model.max_seq_len - len(model.encode_chat(messages))
        assert r.json()["usage"]["total_tokens"] == model.max_seq_len
    finally:
        s.close()


def test_signal_drains_in_flight_requests(model):
    from realizar_jax.cli.serve import Server
    engine = FakeEngine(model, delay=0.02)
    app = create_app(engine, NAME, model=model)
    s = Served(app, Server, dict(app=app, engine=engine))
    with httpx.stream("POST", s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 40, "stream": True},
                      timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        s.server.handle_exit(signal.SIGTERM, None)  # what SIGTERM calls
        assert app.state.draining
        rest = [line for line in lines if line]
    s.thread.join(30)
    assert not s.thread.is_alive() and engine.closed
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_serve_cli_sigterm_exits_0(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "realizar_jax.cli.main", "serve", "--port", "0", "--max-slots",
                             "2", "--model-name", "m", "--warmup", "none", "--kv-cache-memory", "0.01", "--page-size",
                             "32", "--no-prefix-cache"], stderr=subprocess.PIPE, text=True)
    try:
        url, said = None, []
        for line in proc.stderr:
            said.append(line)
            if " ready on " in line:
                url = line.split(" ready on ")[1].split()[0]
                break
        assert url, "no ready line"
        assert any("pages of 32 positions" in x and "prefix cache off" in x for x in said), said
        assert httpx.get(url + "/models").json()["data"][0]["id"] == "m"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()


def test_serve_cli_bad_flags():
    from realizar_jax.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "70000"])
    assert e.value.code == 2
    for flags in (["--warmup", "some"], ["--request-timeout", "-1"], ["--request-timeout", "nan"],
                  ["--page-size", "12"], ["--kv-cache-memory", "0"], ["--kv-cache-memory", "lots"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", *flags])
        assert e.value.code == 2


# ---- schema, without a server ---------------------------------------------------------------------------
def test_schema_normalizes_and_names_fields():
    r = parse_request(CompletionRequest, parse_json(b'{"prompt": [1, 2], "stop": "\\n", "top_k": -1}'))
    assert r.prompt == [[1, 2]] and r.stop == ("\n",) and r.temperature == 1.0 and r.max_tokens is None
    assert parse_request(CompletionRequest, {"prompt": ["a", [3]]}).prompt == ["a", [3]]
    r = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "user": "me", "best_of": None})
    assert r.messages[0].text() == "a\nb"
    with pytest.raises(RequestError) as e:
        parse_request(CompletionRequest, {"prompt": "x", "stream_options": {"include_usage": 1}, "stream": True})
    assert e.value.param == "stream_options.include_usage" and e.value.status == 400
