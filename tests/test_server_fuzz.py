"""Hypothesis fuzzing of the server's request handling over HTTP: a live uvicorn on loopback over the scripted
engine (tests/fake_engine.py), so every example is a real request through uvicorn, FastAPI, the schema and the
app's error mapping, and none waits on a device.

Bodies are malformed JSON (damaged, truncated, nested past the parser, numbers past its limits, other
encodings), valid JSON of the wrong shapes and types, huge values, hostile unicode (lone surrogates, NUL,
bidi marks, template syntax in prompts), and whole random bytes; headers are hostile content types and
values; methods and paths are random. The promise: every answer is a 200 with a well-formed completion (JSON
or an SSE stream ending in [DONE]) or a 4xx in OpenAI's error shape -- never a 5xx, never a hang -- and the
server still serves afterwards. Requests that break HTTP itself (garbage, lying Content-Length, headers past
h11's limits) are answered by uvicorn, not the app: for those the promise is only that the server survives.

The default suite runs SERVER_FUZZ_CASES (300) examples; `pytest -m slow` runs SERVER_FUZZ_SLOW_CASES (5,000).
"""
from __future__ import annotations

import json
import os
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import realizar_jax as rj
from fake_engine import FakeEngine
from served import Served
from realizar_jax.server import create_app
from realizar_jax.server.app import MAX_BODY_BYTES

FAST_CASES = int(os.environ.get("SERVER_FUZZ_CASES", 300))
SLOW_CASES = int(os.environ.get("SERVER_FUZZ_SLOW_CASES", 5000))
NAME = "tiny"
ENDPOINTS = ["/v1/completions", "/v1/chat/completions"]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def model():
    return rj.load(rj.default_model_path())


@pytest.fixture(scope="module")
def served(model):
    s = Served(create_app(FakeEngine(model, max_queue=64), NAME, model=model))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, timeout=30) as c:
        yield c


# ---- hostile values ----------------------------------------------------------------------------------------
_numbers = (st.integers(-5, 600) | st.floats(allow_nan=False, allow_infinity=False)
            | st.sampled_from([0, 1, -1, 2**31, 2**32 + 1, 2**53 + 1, 2**63, 2**64, -2**63 - 1, 10**30, 10**4000,
                               0.5, -0.0, 5e-324, 1e308, 1.0, 2.0, True, False]))
_strings = st.text(max_size=16) | st.sampled_from(
    ["", " ", "x", "\x00", "\ud800", "a\udfffb", "\u202e\u2066", "é😀", "\ufeff", "<|im_end|>", "</s>", "<s>",
     "{{ 7 * 7 }}", "{% for i in range(10**6) %}x{% endfor %}", "\n" * 100, "a" * 20_000, "tiny", "gpt-4",
     "user", "assistant", "system", "text", "image_url"])
_scalars = st.none() | st.booleans() | _numbers | _strings
_values = st.recursive(_scalars, lambda v: st.lists(v, max_size=4) | st.dictionaries(_strings, v, max_size=4),
                       max_leaves=10)
KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
        "n", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "echo", "stream", "stream_options",
        "user", "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "best_of"]
OTHER_KEYS = ["tools", "response_format", "logit_bias", "suffix", "functions"]  # OpenAI's, refused by name
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer"]) | _strings,
     "content": _strings | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | _strings,
                                                           "text": _strings}), max_size=3) | _values},
    optional={"name": _strings | _values, "tool_calls": _values, "zzz": _values})
_prompt = (_strings | st.lists(st.integers(-5, 5000) | _numbers, min_size=0, max_size=6)
           | st.lists(_strings | st.lists(st.integers(-1, 5000), max_size=3), max_size=3) | _values)


# values at the edges of what each field accepts (or just past them), so that many requests are served
_floats = st.floats(allow_nan=False, allow_infinity=False)
EDGE = {
    "model": st.just(NAME) | _strings, "max_tokens": st.integers(1, 8) | st.sampled_from([511, 512, 2**31, 2**63]),
    "max_completion_tokens": st.integers(1, 8) | st.sampled_from([0, 512, 2**63]),
    "temperature": st.floats(0, 2) | st.sampled_from([5e-324, 2.0000001]), "top_p": st.floats(5e-324, 1),
    "seed": st.integers(-2**63, 2**64 - 1) | st.sampled_from([2**64, -2**63 - 1]),
    "stop": _strings | st.lists(_strings, max_size=5), "n": st.integers(1, 3) | st.sampled_from([0, 16, 17]),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2) | _floats,
    "logprobs": st.integers(0, 20) | st.booleans() | st.just(21), "top_logprobs": st.integers(0, 21),
    "echo": st.booleans(), "user": _strings, "top_k": st.integers(-1, 2**31 - 1) | st.sampled_from([-2, 2**31]),
    "min_p": st.floats(0, 1), "repetition_penalty": st.floats(1e-3, 10) | st.sampled_from([5e-324, 1e308, 0.0]),
    "ignore_eos": st.booleans(), "stop_token_ids": st.lists(st.integers(-1, 5000), max_size=4), "best_of": st.just(1),
}
_edge_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                       "content": _strings | st.lists(st.fixed_dictionaries(
                                           {"type": st.just("text"), "text": _strings}), min_size=1, max_size=2)},
                                      optional={"name": _strings})


@st.composite
def request_bodies(draw):
    """A JSON object shaped like a request: the required field (often well formed), other fields at the edges of
    their ranges or of any hostile type and shape, and keys that do not exist."""
    chat = draw(st.booleans())
    body = {}
    if draw(st.integers(0, 9)):  # mostly: the required field, as a client would send it
        body["messages" if chat else "prompt"] = (
            draw(st.lists(_edge_message, min_size=1, max_size=3) | st.lists(_message, min_size=1, max_size=3)
                 | _values) if chat else draw(_strings | _prompt))
    body["max_tokens"] = draw(EDGE["max_tokens"] if draw(st.integers(0, 4)) else _values)
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(KEYS) if draw(st.integers(0, 5)) else st.sampled_from(OTHER_KEYS) | _strings)
        body[key] = draw(EDGE[key] if key in EDGE and draw(st.integers(0, 3)) else _values)
    if draw(st.integers(0, 3)) == 0:
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = draw(st.fixed_dictionaries({"include_usage": st.booleans() | _scalars}))
    return ENDPOINTS[chat], body


def _encode(draw, body) -> bytes:
    how = draw(st.sampled_from(["ascii", "utf8", "utf8", "utf16", "bom"]))
    if how == "ascii":
        return json.dumps(body).encode()
    text = json.dumps(body, ensure_ascii=False)
    if how == "utf16":  # json.loads detects UTF-16 and UTF-32 from bytes
        return text.encode("utf-16", "surrogatepass")
    raw = text.encode("utf-8", "surrogatepass")  # lone surrogates become bytes no UTF-8 decoder accepts
    return b"\xef\xbb\xbf" + raw if how == "bom" else raw


_RAW = [b"", b"{", b"}", b"[]", b"null", b"0", b'"x"', b"[" * 100_000, b"{" * 100_000, b'{"prompt": ' * 2000,
        b'{"prompt": 1e999999}', b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
        b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": -Infinity}',
        b'{"prompt": "x", "prompt": [1, 2]}', b'{"prompt": "\\ud800"}', b'{"prompt": "\\u0000"}',
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}', b"\x00" * 64, b"\xff\xfe\x00",
        b'{"prompt": "x"}\x00', b'{"prompt": "x"} {"prompt": "y"}', b'{"prompt": [' + b"1," * 100_000 + b"1]}"]


@st.composite
def raw_bodies(draw):
    """Bytes that are not a request: damaged or truncated valid bodies, special cases, random bytes."""
    kind = draw(st.sampled_from(["damaged", "cut", "special", "random"]))
    path, body = draw(request_bodies())
    data = _encode(draw, body)
    if kind == "damaged" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    elif kind == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif kind == "special":
        data = draw(st.sampled_from(_RAW))
    elif kind == "random":
        data = draw(st.binary(max_size=200))
    return path, data


_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
_CONTENT_TYPES = ["application/json", "application/json; charset=utf-16", "text/plain", "", "multipart/form-data",
                  "application/x-www-form-urlencoded", "application/json; charset=\"", "*/*", "é/ü"]


@st.composite
def headers(draw):
    h = {}
    if draw(st.booleans()):
        h["content-type"] = draw(st.sampled_from(_CONTENT_TYPES) | _header_text)
    # (not transfer-encoding or expect: they change the framing, which test_broken_http covers with raw bytes)
    for name in draw(st.lists(st.sampled_from(["accept", "accept-encoding", "authorization", "x-request-id",
                                               "user-agent", "openai-organization", "cookie", "x-forwarded-for",
                                               "content-encoding", "host"]), max_size=3, unique=True)):
        h[name] = draw(_header_text)
    return {k: v.encode("latin-1") for k, v in h.items()}


# ---- the promise -------------------------------------------------------------------------------------------
def check(r: httpx.Response, what: str):
    """A 200 carrying a completion (or the GETs' own bodies), or a 4xx JSON error in OpenAI's shape (or, for a
    path with a trailing slash, FastAPI's redirect to the path without it)."""
    where = f"{what}: {r.status_code} {r.text[:500]!r}"
    assert r.status_code < 500, where
    if r.status_code == 307 and r.url.path.endswith("/"):  # FastAPI's redirect to the path without the slash
        assert r.headers["location"].endswith(r.url.path.rstrip("/")), where
        return
    if r.status_code == 200:
        ctype = r.headers.get("content-type", "")
        if ctype.startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, where
            for event in r.text.split("\n\n")[:-2]:
                assert event.startswith("data: ") and "choices" in json.loads(event[6:]), where
        elif r.request.method == "POST":
            body = r.json()
            assert body["choices"] and body["usage"]["total_tokens"] >= 1, where
        return
    assert 400 <= r.status_code < 500, where
    if r.request.method != "HEAD":
        assert r.headers.get("content-type", "").startswith("application/json"), where
        err = r.json()["error"]
        assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"], where


def still_serving(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text


@st.composite
def requests_(draw):
    """(method, path, body bytes, headers): mostly POSTs of hostile bodies, some other methods and paths."""
    kind = draw(st.sampled_from(["json"] * 4 + ["encoded", "raw", "raw", "path"]))
    hdrs = draw(headers())
    if kind == "path":
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
        path = draw(st.sampled_from(ENDPOINTS + ["/v1/models", "/health", "/metrics", "/", "/v1", "/v2/x",
                                                 "/v1/completions/", "//v1/completions", "/v1/%00", "/%ff",
                                                 "/v1/completions?x=1&x=2", "/v1/models/tiny"])
                    | st.text("abcé/%?&=.", max_size=20).map(lambda t: "/v1/" + t))
        return method, path, json.dumps({"prompt": "x", "max_tokens": 1}).encode(), hdrs
    if kind == "json":
        path, body = draw(request_bodies())
        return "POST", path, json.dumps(body).encode(), hdrs
    if kind == "encoded":
        path, body = draw(request_bodies())
        return "POST", path, _encode(draw, body), hdrs
    path, data = draw(raw_bodies())
    return "POST", path, data, hdrs


def _fuzz(client, cases):
    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(requests_())
    def case(req):
        method, path, body, hdrs = req
        try:
            r = client.request(method, path, content=body if method not in ("GET", "HEAD") else None,
                               headers={"content-type": b"application/json", **hdrs})
        except (httpx.LocalProtocolError, httpx.InvalidURL):  # what the client itself will not send
            return
        check(r, f"{method} {path} {body[:300]!r} {hdrs}")

    case()
    still_serving(client)


def test_fuzz_requests_are_200_or_4xx_json(client):
    _fuzz(client, FAST_CASES)


@pytest.mark.slow
def test_fuzz_requests_are_200_or_4xx_json_slow(client):
    _fuzz(client, SLOW_CASES)


# Found by the fuzz (each was a 500): JSON's \\ud800 escapes give lone surrogates, which the error response
# (quoting the request) could not encode, and which the tokenizer refuses with a TypeError.
FOUND = [
    ("/v1/completions", b'{"prompt": "x", "\\ud800": 1}', "\\ud800"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', "not valid Unicode"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "not valid Unicode"),
]


@pytest.mark.parametrize("path, body, needle", FOUND, ids=range(len(FOUND)))
def test_lone_surrogates_are_400_not_500(client, path, body, needle):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    check(r, f"{path} {body!r}")
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_errors_do_not_echo_huge_input(client):
    """A long path or key was quoted whole in the error message."""
    for r in (client.get("/a" * 20_000), client.post("/v1/completions", json={"prompt": "x", "k" * 100_000: 1})):
        check(r, "huge")
        assert r.status_code in (400, 404) and len(r.json()["error"]["message"]) < 1100, r.text[:200]


# ---- beyond what the app sees: HTTP itself broken ------------------------------------------------------------
def _raw_http(served, data: bytes, wait: float = 2.0) -> bytes:
    """Send bytes on a fresh connection, half-close, and read what comes back (b'' when the server hangs up)."""
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


BODY = b'{"prompt": "x", "max_tokens": 1}'
BROKEN_HTTP = [
    b"garbage\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + BODY,  # body shorter than declared
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n" + BODY,  # longer: the rest is garbage
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + BODY,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n" + BODY,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n" + BODY,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + BODY,
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n",  # cut off
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\n" + b"X-H: 1\r\n" * 10_000 + b"\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Bad: \x00\x01\r\n\r\n",
    b"POST /v1/compl\xffetions HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/completions HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST " + b"/a" * 50_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(MAX_BODY_BYTES + 1).encode() + b"\r\n\r\n",
]


@pytest.mark.parametrize("data", BROKEN_HTTP, ids=range(len(BROKEN_HTTP)))
def test_broken_http_leaves_the_server_serving(served, client, data):
    reply = _raw_http(served, data)
    if reply:  # uvicorn's own answer (text), or the app's JSON: never a 5xx
        status = int(reply.split(b" ", 2)[1])
        assert 400 <= status < 500 or status == 200, reply[:300]
    still_serving(client)


def test_client_gone_mid_body_is_not_a_server_error(served, client):
    """The body stops short of its Content-Length and the client leaves: Starlette raises ClientDisconnect
    while the app reads the body, which was a 500 (and a logged traceback); it is a 499, as for a client that
    leaves during generation."""
    before = client.get("/metrics").text
    _raw_http(served, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + BODY[:10])
    for _ in range(100):  # the app notices the disconnect on its own schedule
        after = client.get("/metrics").text
        if _errors(after, "499") > _errors(before, "499"):
            break
        time.sleep(0.02)
    assert _errors(after, "499") == _errors(before, "499") + 1 and _errors(after, "5") == _errors(before, "5"), after
    still_serving(client)


def _errors(metrics_text: str, first_digit: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for f in text_string_to_metric_families(metrics_text) for s in f.samples
               if s.name == "realizar:request_errors_total" and str(s.labels.get("status", "")).startswith(first_digit))
