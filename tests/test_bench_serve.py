"""`realizar-jax bench-serve` against a real HTTP server with known timing, and its statistics against numpy.

The server is a small Starlette app under uvicorn on 127.0.0.1 (an ephemeral port, a background thread)
speaking the OpenAI streaming protocol: the first chunk FIRST_S after the request arrives, then one chunk
every GAP_S, on an absolute schedule so that event-loop jitter does not accumulate. It counts two prompt
tokens per word, so the warm-up's calibration is visible, and can refuse requests (429), drop [DONE] and
finish_reason, or mix malformed SSE lines into the stream.
"""
from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from realizar_jax.cli.bench_serve import bench_serve_main, make_prompt, sse_event
from realizar_jax.cli.main import main
from realizar_jax.cli.serve_stats import percentile, summarise

ROOT = Path(__file__).resolve().parents[1]
FIRST_S, GAP_S = 0.05, 0.01


@dataclass
class FakeServer:
    first_s: float = FIRST_S
    gap_s: float = GAP_S
    tokens_per_chunk: int = 1
    usage: bool = True
    done: bool = True  # send finish_reason and [DONE]
    malformed: bool = False
    fail_after: int = 0  # report an error in the stream after this many chunks, then end it
    refuse_every: int = 0  # answer 429 to every k-th request
    tokens_per_word: int = 2
    models: bool = True  # serve /v1/models
    context: int = 0  # refuse (400, context_length_exceeded) prompts of more tokens than this
    bodies: list = field(default_factory=list)
    headers: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)  # prompt -> (arrival, [time each content chunk was handed over])
    seen: int = 0

    def app(self) -> Starlette:
        async def models(request: Request):
            if not self.models:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        async def complete(request: Request):
            body = await request.json()
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            self.seen += 1
            if self.refuse_every and self.seen % self.refuse_every == 0:
                return JSONResponse({"error": {"message": "queue full", "type": "rate_limit"}}, status_code=429)
            chat = request.url.path.endswith("chat/completions")
            prompt = body["messages"][0]["content"] if chat else body["prompt"]
            if self.context and self.tokens_per_word * len(prompt.split()) > self.context:
                return JSONResponse({"error": {"message": "prompt exceeds the context", "type": "invalid_request_error",
                                               "code": "context_length_exceeded"}}, status_code=400)
            return StreamingResponse(self.stream(body, chat), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", complete, methods=["POST"]),
                                 Route("/v1/chat/completions", complete, methods=["POST"])])

    async def stream(self, body: dict, chat: bool):
        t0 = time.perf_counter()
        n, k = body["max_tokens"], self.tokens_per_chunk
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        self.timing[prompt] = (t0, sent := [])

        def event(obj) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        def choice(text, finish=None):
            return ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                    else {"index": 0, "text": text, "finish_reason": finish})

        for i in range(math.ceil(n / k)):
            await asyncio.sleep(max(0.0, t0 + self.first_s + i * self.gap_s - time.perf_counter()))
            sent.append(time.perf_counter())
            yield event({"id": "x", "object": "text_completion", "choices": [choice(" tok" * min(k, n - i * k))]})
            if self.fail_after and i + 1 == self.fail_after:
                yield b'data: {"error": {"message": "engine failed", "code": 500}}\n\n'
                return
            if self.malformed and i == 1:
                yield b"data: {not json\n\ngarbage without a field\n\n: keep-alive comment\n\n"
        if self.done:
            yield event({"id": "x", "choices": [choice("", "length")]})
        if self.usage:
            p = self.tokens_per_word * len(prompt.split())
            yield event({"id": "x", "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": n,
                                                              "total_tokens": p + n}})
        if self.done:
            yield b"data: [DONE]\n\n"

    def start(self) -> "FakeServer":
        self.server = uvicorn.Server(uvicorn.Config(self.app(), host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve():
    started = []

    def start(**kw) -> FakeServer:
        started.append(FakeServer(**kw).start())
        return started[-1]
    yield start
    for s in started:
        s.stop()


def bench(tmp_path, url, *args) -> tuple[int, dict | None]:
    out = tmp_path / "out.json"
    rc = bench_serve_main(["--url", url, "--json", str(out), *args])
    return rc, json.loads(out.read_text()) if out.exists() else None


def test_measures_the_servers_known_timing(serve, tmp_path, capsys):
    fake = serve()
    n, per_client, levels = 16, 3, [1, 4]
    rc, res = bench(tmp_path, fake.url + "/v1/", "--clients", "1,4", "--max-tokens", str(n), "--prompt-tokens", "40",
                    "--requests-per-client", str(per_client), "--warmup", "2")
    assert rc == 0
    assert res["model"] == "fake-model" and res["url"] == fake.url and res["endpoint"] == "/v1/completions"
    assert [lv["clients"] for lv in res["levels"]] == levels
    # the server counts 2 tokens a word: the warm-up's calibration halves the words of the measured prompts
    assert res["settings"]["prompt_words"] == 20
    assert len(res["requests"]) == sum(c * per_client for c in levels)
    request_s = FIRST_S + (n - 1) * GAP_S
    for lv in res["levels"]:
        assert lv["ok"] == lv["requests"] == lv["clients"] * per_client and lv["errors"] == {}
        assert lv["generated_tokens"] == lv["requests"] * n and lv["short"] == 0
        assert lv["prompt_tokens_mean"] == 40
        # against the nominal schedule: its bounds hold always; the slack over it is for a loaded machine
        assert FIRST_S <= lv["ttft_p50_s"] < 20 * FIRST_S and lv["ttft_p99_s"] < 40 * FIRST_S   # loose: CI load
        assert 0.5 * GAP_S < lv["itl_p50_s"] < 5 * GAP_S
        assert request_s <= lv["e2e_p50_s"] < 5 * request_s
        assert 0.2 / GAP_S < lv["decode_tok_s_p50"] < 1.5 / GAP_S
        # each client's requests run back to back: the level takes at least per_client request times
        ideal = lv["clients"] * n / request_s
        assert 0.2 * ideal < lv["gen_tok_s"] <= 1.01 * ideal
        assert lv["req_s"] == pytest.approx(lv["gen_tok_s"] / n)
    # against what the server really did, request by request (its prompt regenerated from the record's key)
    ttft_over, itl_client, itl_server = [], [], []
    for r in res["requests"]:
        assert r["error"] is None and r["done"] and r["completion_tokens"] == r["chunks"] == n
        assert r["prompt_tokens"] == 40 and len(r["itl_s"]) == n - 1
        arrival, sent = fake.timing[make_prompt(20, 0, "level", r["level"], r["client"], r["index"])]
        assert r["ttft_s"] >= sent[0] - arrival and r["e2e_s"] >= sent[-1] - arrival  # sent before, seen after
        ttft_over.append(r["ttft_s"] - (sent[0] - arrival))
        itl_client += r["itl_s"]
        itl_server += list(np.diff(sent))
    assert np.median(ttft_over) < FIRST_S  # what the client adds: request, parsing, scheduling
    assert abs(np.median(itl_client) - np.median(itl_server)) < 0.5 * GAP_S
    # what the server was sent: warm-up first (2 requests), then the levels
    assert len(fake.bodies) == 2 + len(res["requests"])
    for b in fake.bodies:
        assert b["stream"] is True and b["ignore_eos"] is True and b["temperature"] == 0
        assert b["stream_options"] == {"include_usage": True} and b["max_tokens"] == n and b["model"] == "fake-model"
    prompts = [b["prompt"] for b in fake.bodies]
    assert len({" ".join(p.split()[:8]) for p in prompts}) == len(prompts)  # no shared prefixes
    out = capsys.readouterr()
    assert "TTFT p50" in out.out and "gen tok/s" in out.out and "clients=4" in out.err


@pytest.mark.parametrize("tokens_per_chunk, usage", [(4, True), (1, False)])
def test_tokens_per_chunk_and_no_usage(serve, tmp_path, tokens_per_chunk, usage):
    # 4 tokens a chunk, a chunk every 4 gaps: still GAP_S a token. Without usage a chunk counts one token.
    fake = serve(tokens_per_chunk=tokens_per_chunk, gap_s=GAP_S * tokens_per_chunk, usage=usage)
    rc, res = bench(tmp_path, fake.url, "--clients", "2", "--max-tokens", "16", "--requests-per-client", "2",
                    "--prompt-tokens", "10")
    assert rc == 0
    lv = res["levels"][0]
    assert lv["ok"] == 4 and lv["generated_tokens"] == 4 * 16
    assert 0.7 * GAP_S < lv["itl_p50_s"] < 1.5 * GAP_S
    for r in res["requests"]:
        assert r["chunks"] == 16 // tokens_per_chunk and r["completion_tokens"] == 16
        assert r["prompt_tokens"] == (10 if usage else None)  # calibrated to --prompt-tokens
    assert res["settings"]["prompt_words"] == (5 if usage else 10)  # no usage, nothing to calibrate from


def test_warmup_shrinks_a_prompt_that_overflows_the_context(serve, tmp_path, capsys):
    """A first guess of one token a word (100 words) is 300 tokens on a server that counts 3 a word and
    holds 160: the warm-up halves the words until one fits (50), then calibrates down to at most
    --prompt-tokens (33 words = 99 tokens, never 102)."""
    fake = serve(tokens_per_word=3, context=160)
    rc, res = bench(tmp_path, fake.url, "--clients", "1", "--max-tokens", "4", "--requests-per-client", "1",
                    "--prompt-tokens", "100")
    assert rc == 0
    assert res["settings"]["prompt_words"] == 33
    assert [r["prompt_tokens"] for r in res["requests"]] == [99] and res["levels"][0]["ok"] == 1
    assert "overflows the server's context; trying 50 words" in capsys.readouterr().err


def test_429s_are_counted_and_the_run_goes_on(serve, tmp_path):
    fake = serve(refuse_every=3)
    rc, res = bench(tmp_path, fake.url, "--clients", "2", "--max-tokens", "8", "--requests-per-client", "3",
                    "--warmup", "0")
    assert rc == 0
    lv = res["levels"][0]
    assert lv["requests"] == 6 and lv["ok"] == 4 and lv["failed"] == 2
    assert lv["errors"]["429"]["count"] == 2 and "queue full" in lv["errors"]["429"]["first"]
    assert lv["generated_tokens"] == 4 * 8 and len(fake.bodies) == 6


def test_a_stream_without_done_is_an_error(serve, tmp_path, capsys):
    fake = serve(done=False)
    rc, res = bench(tmp_path, fake.url, "--clients", "1", "--max-tokens", "4", "--requests-per-client", "2")
    assert rc == 1 and "every request failed" in capsys.readouterr().err
    lv = res["levels"][0]
    assert lv["ok"] == 0 and lv["errors"]["incomplete_stream"]["count"] == 2
    assert lv["gen_tok_s"] == 0 and lv["ttft_p50_s"] is None


def test_an_error_inside_the_stream(serve, tmp_path):
    fake = serve(fail_after=2)
    rc, res = bench(tmp_path, fake.url, "--clients", "1", "--max-tokens", "6", "--requests-per-client", "2")
    assert rc == 1
    e = res["levels"][0]["errors"]["stream_error"]
    assert e["count"] == 2 and e["first"] == "engine failed"
    assert all(r["chunks"] == 2 for r in res["requests"])


def test_sse_lines():
    assert sse_event("") is None and sse_event(": ping") is None and sse_event("event: message") is None
    assert sse_event("data: [DONE]") == "[DONE]" and sse_event('data:{"a": 1}') == {"a": 1}
    assert sse_event('error: {"message": "x"}') == {"error": {"message": "x"}}
    for bad in ("data: {oops", "data: [1, 2]", "hello", 'text: {"a": 1}'):
        with pytest.raises(ValueError):
            sse_event(bad)


def test_malformed_sse_lines_are_skipped_and_counted(serve, tmp_path):
    fake = serve(malformed=True)
    rc, res = bench(tmp_path, fake.url, "--clients", "2", "--max-tokens", "6", "--requests-per-client", "2")
    assert rc == 0
    lv = res["levels"][0]
    assert lv["ok"] == 4 and lv["generated_tokens"] == 24 and lv["malformed_lines"] == 4 * 2
    assert all(r["malformed_lines"] == 2 and r["completion_tokens"] == 6 for r in res["requests"])


def test_chat_endpoint_model_and_api_key(serve, tmp_path):
    fake = serve()
    rc, res = bench(tmp_path, fake.url, "--endpoint", "chat", "--model", "other", "--api-key", "sekrit",
                    "--clients", "3", "--max-tokens", "5", "--requests-per-client", "1", "--temperature", "0.5",
                    "--no-ignore-eos")
    assert rc == 0 and res["endpoint"] == "/v1/chat/completions" and res["model"] == "other"
    assert res["levels"][0]["ok"] == 3 and res["levels"][0]["generated_tokens"] == 15
    assert "sekrit" not in json.dumps(res)  # the key is not written out
    for b, h in zip(fake.bodies, fake.headers):
        assert b["messages"][0]["role"] == "user" and b["model"] == "other" and b["temperature"] == 0.5
        assert "ignore_eos" not in b and h["authorization"] == "Bearer sekrit"


def test_a_server_without_v1_models_needs_model(serve, tmp_path, capsys):
    fake = serve(models=False)
    rc, res = bench(tmp_path, fake.url, "--clients", "1", "--max-tokens", "3", "--requests-per-client", "1")
    assert rc == 2 and res is None and "give --model" in capsys.readouterr().err
    rc, res = bench(tmp_path, fake.url, "--model", "m", "--clients", "1", "--max-tokens", "3",
                    "--requests-per-client", "1")
    assert rc == 0 and res["model"] == "m" and res["levels"][0]["generated_tokens"] == 3


def test_duration_mode(serve, tmp_path):
    fake = serve()
    rc, res = bench(tmp_path, fake.url, "--clients", "2", "--max-tokens", "10", "--duration", "0.5",
                    "--warmup", "0")
    assert rc == 0
    lv = res["levels"][0]
    # a request takes ~0.14 s: each client starts 3-4 before 0.5 s, and the last one still finishes
    assert 1 <= lv["requests"] <= 8 and lv["ok"] == lv["requests"] and lv["wall_s"] >= 0.5   # <= 8: 0.5 s / 60 ms
    assert res["settings"]["duration_s"] == 0.5 and res["settings"]["requests_per_client"] is None


def test_unreachable_server_is_exit_code_2_naming_the_url(capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert main(["bench-serve", "--url", url, "--clients", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("realizar-jax bench-serve: error:") and url in err


@pytest.mark.parametrize("args", [["--clients", "1,x"], ["--clients", "0"], ["--url", "localhost:8000"],
                                  ["--duration", "0"], ["--duration", "1", "--requests-per-client", "2"]])
def test_bad_command_lines_are_exit_code_2(args, capsys):
    argv = args if "--url" in args else ["--url", "http://127.0.0.1:9", *args]
    try:
        rc = bench_serve_main(argv)
    except SystemExit as e:  # argparse's own checks (mutually exclusive flags) exit through Parser.error
        rc = e.code
    assert rc == 2 and "realizar-jax bench-serve: error:" in capsys.readouterr().err


def test_help_through_the_command():
    r = subprocess.run([sys.executable, "-m", "realizar_jax.cli.main", "bench-serve", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.returncode == 0, r.stderr
    for flag in ("--url", "--clients", "--prompt-tokens", "--max-tokens", "--requests-per-client", "--duration",
                 "--model", "--api-key", "--endpoint", "--json", "--warmup", "--timeout", "--seed"):
        assert flag in r.stdout
    assert "bench-serve" in subprocess.run([sys.executable, "-m", "realizar_jax.cli.main", "--help"], cwd=ROOT,
                                           capture_output=True, text=True, timeout=60,
                                           env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout


def test_prompts_are_seeded_and_distinct():
    assert make_prompt(50, 0, "level", 0, 1, 2) == make_prompt(50, 0, "level", 0, 1, 2)
    assert make_prompt(50, 1, "level", 0, 1, 2) != make_prompt(50, 0, "level", 0, 1, 2)
    heads = {make_prompt(8, 0, "level", 0, k, i) for k in range(64) for i in range(16)}
    assert len(heads) == 64 * 16 and all(len(h.split()) == 8 for h in heads)


# ---- statistics against numpy

finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(xs=st.lists(finite, min_size=1, max_size=50), q=st.floats(0, 100))
def test_percentile_matches_numpy(xs, q):
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-9, abs=1e-6)


def test_percentile_of_nothing_is_none():
    assert percentile([], 50) is None


@st.composite
def records(draw):
    e2e = draw(st.floats(1e-3, 10))
    start = draw(st.floats(0, 100))
    return {"start_s": start, "end_s": start + e2e, "e2e_s": e2e, "ttft_s": draw(st.floats(0, e2e)),
            "completion_tokens": draw(st.integers(0, 64)), "prompt_tokens": draw(st.one_of(st.none(), st.integers(1, 99))),
            "itl_s": draw(st.lists(st.floats(0, 1), max_size=8)), "malformed_lines": draw(st.integers(0, 2)),
            "error": draw(st.sampled_from([None, None, "429", "timeout"])), "error_message": draw(st.text(max_size=5))}


@settings(max_examples=100, deadline=None)
@given(recs=st.lists(records(), min_size=1, max_size=30), max_tokens=st.integers(1, 64))
def test_summarise_matches_numpy(recs, max_tokens):
    s = summarise(recs, max_tokens)
    ok = [r for r in recs if r["error"] is None]
    wall = max(r["end_s"] for r in recs) - min(r["start_s"] for r in recs)
    tokens = sum(r["completion_tokens"] for r in ok)

    def pct(xs, q):
        return float(np.percentile(xs, q)) if len(xs) else None

    assert s["requests"] == len(recs) and s["ok"] == len(ok) and s["failed"] == len(recs) - len(ok)
    assert s["wall_s"] == pytest.approx(wall) and s["generated_tokens"] == tokens
    assert s["gen_tok_s"] == pytest.approx(tokens / wall) and s["req_s"] == pytest.approx(len(ok) / wall)
    itl = [x for r in ok for x in r["itl_s"]]
    rates = [(r["completion_tokens"] - 1) / (r["e2e_s"] - r["ttft_s"]) for r in ok
             if r["completion_tokens"] > 1 and r["e2e_s"] > r["ttft_s"]]
    for key, want in [("ttft_p50_s", pct([r["ttft_s"] for r in ok], 50)),
                      ("ttft_p99_s", pct([r["ttft_s"] for r in ok], 99)), ("itl_p50_s", pct(itl, 50)),
                      ("itl_p99_s", pct(itl, 99)), ("e2e_p50_s", pct([r["e2e_s"] for r in ok], 50)),
                      ("decode_tok_s_p50", pct(rates, 50))]:
        assert s[key] == (None if want is None else pytest.approx(want)), key
    errors = Counter(r["error"] for r in recs if r["error"] is not None)
    assert {k: v["count"] for k, v in s["errors"].items()} == errors
    for kind, e in s["errors"].items():
        assert e["first"] == next(r["error_message"] for r in recs if r["error"] == kind)
    assert s["short"] == sum(r["completion_tokens"] < max_tokens for r in ok)
    assert s["malformed_lines"] == sum(r["malformed_lines"] for r in recs)


def test_shared_prefix_probe_then_every_request_repeats_it(serve, tmp_path, capsys):
    fake = serve()
    rc, res = bench(tmp_path, fake.url, "--clients", "1,2", "--max-tokens", "4", "--prompt-tokens", "40",
                    "--requests-per-client", "2", "--warmup", "1", "--shared-prefix", "60")
    assert rc == 0
    sp = res["shared_prefix"]
    assert sp["tokens"] == 60 and sp["words"] == 30   # 2 tokens a word, as the warm-up measured
    assert sp["probe"]["error"] is None and sp["probe"]["prompt_tokens"] == 2 * (30 + 20)
    prompts = [b["prompt"] for b in fake.bodies]
    prefix = prompts[1][:prompts[1].index("\n\n") + 2]
    assert len(prefix.split()) == 30 and not prompts[0].startswith(prefix)   # the warm-up goes without it
    assert all(p.startswith(prefix) for p in prompts[1:]) and len(set(prompts[1:])) == len(prompts) - 1
    for lv in res["levels"]:
        assert lv["ttft_p50_over_first"] == pytest.approx(lv["ttft_p50_s"] / sp["probe"]["ttft_s"])
    assert "shared prefix ~60 tokens" in capsys.readouterr().out
