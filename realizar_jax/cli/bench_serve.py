"""`realizar-jax bench-serve`: load an OpenAI-compatible server with concurrent streaming clients.

    realizar-jax bench-serve --url http://127.0.0.1:8000 --clients 1,8,32,64 --prompt-tokens 128 --max-tokens 128

For each client count, that many async clients send streaming completions back to back, each over its own
keep-alive HTTP/1.1 connection, and every request's time to first token, inter-token gaps and end-to-end
latency are recorded. Only standard OpenAI fields are relied on, plus `ignore_eos` (which llama.cpp's
llama-server and vLLM accept; --no-ignore-eos leaves it out), so the same run can be pointed at any of them.

--shared-prefix N puts one system prompt of about N tokens before every request's own words: one probe
request sends it first (its TTFT is the uncached one), then every level's requests repeat it, so a
server with a prefix cache answers them faster; the table gives their TTFT p50 over the probe's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .parser import Parser, fail, positive_int
from .serve_stats import summarise

# Common English words, each about one token (with its leading space) in LLaMA- and GPT-style BPE
# vocabularies: N random words are roughly N tokens before the warm-up calibrates the count.
WORDS = """the of and to in is was for on with as by at from that this it be are or an have not but
had they which one you were her all she there would their we him been has when who will more no if out so
said what up its about into than them can only other new some could time these two may then do first any
my now such like our over man me even most made after also did many before must through back years where
much your way well down should because each just those people how too little state good very make world
still own see men work long get here between both life being under never day same another know while last
might us great old year off come since against go came right used take three states himself few house use
during without again place around however home small found thought went say part once general high upon
school every course does war until always away something fact though water less public put think almost
hand enough far took head yet government system better set told nothing night end why called find
look going asked later knew point next city give group young let room side social given present several
order national second possible rather per face among form important often things early white case large
need big four within felt children along saw best church ever least power development light thing seemed
family interest want members mind country area others done turned although open god service certain kind
problem began different door thus help sense means whole matter perhaps itself york times human law line
above name example action company hands local show whether five history gave today either act feet across
taken past quite anything seen having death experience body word half really week free field car words
""".split()
BACKOFF_S = 0.05  # after a failed request a client pauses this long (or a 429's Retry-After, <= 1 s),
MAX_RETRY_AFTER_S = 1.0  # so a refusing or dead server is not hit in a tight loop
PROGRESS_EVERY_S = 5.0


class SetupError(Exception):
    """The server cannot be reached, or names no model and --model is not given (exit code 2)."""


def make_prompt(n_words: int, seed: int, *key) -> str:
    """n_words random words from a generator seeded by (seed, key): every request has its own key, so
    no two prompts share a prefix longer than a few words and a server's prefix cache cannot help."""
    rng = random.Random(":".join(map(str, (seed, *key))))
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def parse_clients(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--clients: expected a comma-separated list of integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--clients: every client count must be >= 1, got {text!r}")
    return levels


def base_url(url: str) -> str:
    """http://host:port for http://host:port, http://host:port/ and http://host:port/v1 alike."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class Target:
    """Where and what to send: the server, the endpoint, the model and the fixed request fields."""

    def __init__(self, args, url: str, model: str):
        self.args, self.url, self.model = args, url, model
        self.chat = args.endpoint == "chat"
        self.path = "/v1/chat/completions" if self.chat else "/v1/completions"
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        # words per prompt: refined from the warm-up's usage.prompt_tokens (a tokenizer that splits words
        # into many tokens may need a --prompt-words start so the warm-up itself fits the context)
        self.n_words = args.prompt_words or args.prompt_tokens
        self.prefix = ""   # --shared-prefix: the system prompt every measured request starts with

    def body(self, prompt: str) -> dict:
        a = self.args
        prompt = self.prefix + prompt
        body = {"model": self.model, "max_tokens": a.max_tokens, "temperature": a.temperature, "stream": True,
                "stream_options": {"include_usage": True}}
        if a.ignore_eos:
            body["ignore_eos"] = True  # every request generates exactly max_tokens: comparable runs
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def client(self, clients: int):
        import httpx
        # one keep-alive connection per client, none shared or queued for: what we time is the server
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=httpx.Timeout(self.args.timeout),
                                 limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients))


def _chunk_text(choice: dict, chat: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # reasoning models stream their thinking in a separate field; those are generated tokens too
    return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""


def sse_event(line: str):
    """One SSE line: None (nothing to read: a blank separator, a comment, event:/id:/retry:), "[DONE]",
    or the JSON object of a data: line (an error: line's as {"error": ...}); ValueError if malformed."""
    if not line.strip() or line.startswith(":"):
        return None
    name, _, value = line.partition(":")
    value = value.strip()
    if name in ("event", "id", "retry"):
        return None
    if name == "data" and value == "[DONE]":
        return "[DONE]"
    if name not in ("data", "error"):
        raise ValueError(line)
    obj = json.loads(value)  # a JSONDecodeError is a ValueError
    if not isinstance(obj, dict):
        raise ValueError(line)
    return {"error": obj} if name == "error" else obj


async def one_request(client, target: Target, prompt: str, epoch: float) -> dict:
    """Send one streaming request; its timings, token counts and error (None, or a kind) as a record."""
    import httpx
    rec = {"start_s": 0.0, "end_s": 0.0, "ttft_s": None, "e2e_s": None, "prompt_tokens": None,
           "completion_tokens": None, "chunks": 0, "itl_s": [], "malformed_lines": 0, "done": False,
           "error": None, "error_message": None, "retry_after_s": None}
    times: list[float] = []  # arrival of each event that carried content
    usage, finished = None, False
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(target.args.timeout), \
                client.stream("POST", target.path, json=target.body(prompt)) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                rec["error"], rec["error_message"] = str(resp.status_code), f"HTTP {resp.status_code}: {text[:300]}"
                try:
                    rec["retry_after_s"] = float(resp.headers["retry-after"])
                except (KeyError, ValueError):
                    pass
            else:
                # read to the end even after [DONE]: a response left unread costs its keep-alive connection
                async for line in resp.aiter_lines():
                    now = time.perf_counter()
                    try:
                        ev = sse_event(line)
                        if ev is None:
                            continue
                        if ev == "[DONE]":
                            rec["done"] = True
                            continue
                        if "error" in ev and not ev.get("choices"):  # a server's error after the stream began
                            err = ev["error"]
                            msg = err.get("message", err) if isinstance(err, dict) else err
                            rec["error"] = rec["error"] or "stream_error"
                            rec["error_message"] = rec["error_message"] or str(msg)[:300]
                            continue
                        usage = ev.get("usage") or usage
                        content = False
                        for choice in ev.get("choices") or []:
                            content = content or bool(_chunk_text(choice, target.chat))
                            finished = finished or bool(choice.get("finish_reason"))
                    except (ValueError, AttributeError, TypeError):  # not SSE, not JSON, or not the usual shape
                        rec["malformed_lines"] += 1
                        continue
                    if content:
                        times.append(now)
    except TimeoutError:
        rec["error"], rec["error_message"] = "timeout", f"no complete answer within --timeout {target.args.timeout} s"
    except httpx.HTTPError as e:
        rec["error"], rec["error_message"] = type(e).__name__, (str(e) or repr(e))[:300]
    t1 = time.perf_counter()
    rec["start_s"], rec["end_s"], rec["e2e_s"] = t0 - epoch, t1 - epoch, t1 - t0
    rec["chunks"] = len(times)
    if isinstance(usage, dict):
        if isinstance(usage.get("prompt_tokens"), int):
            rec["prompt_tokens"] = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            rec["completion_tokens"] = usage["completion_tokens"]
    if rec["completion_tokens"] is None:
        rec["completion_tokens"] = len(times)  # no usage: one token per content chunk
    if times:
        rec["ttft_s"] = times[0] - t0
        # a chunk may carry several tokens (a server may flush a few at once): spread each gap over them
        per_chunk = max(rec["completion_tokens"], len(times)) / len(times)
        rec["itl_s"] = [(b - a) / per_chunk for a, b in zip(times, times[1:])]
    if rec["error"] is None and not (rec["done"] or finished):
        rec["error"] = "incomplete_stream"
        rec["error_message"] = (f"the stream ended after {len(times)} content chunks without [DONE] or a "
                                f"finish_reason ({rec['malformed_lines']} malformed lines)")
    elif rec["error"] is None and not times:
        rec["error"], rec["error_message"] = "empty", "the stream finished without any content"
    return rec


async def run_level(target: Target, clients: int, epoch: float, key, per_client: int | None,
                    duration: float | None, label: str) -> list[dict]:
    """`clients` concurrent clients, each sending requests back to back: per_client of them, or until
    `duration` seconds have passed (a request under way then still finishes)."""
    records: list[dict] = []
    t_start = stop_at = 0.0  # set once the client exists: building one takes tens of ms (an SSL context)

    async def worker(k: int):
        i = 0
        while (time.perf_counter() < stop_at) if duration else (i < per_client):
            rec = await one_request(http, target, make_prompt(target.n_words, target.args.seed, *key, k, i), epoch)
            rec.update(clients=clients, client=k, index=i)
            records.append(rec)
            i += 1
            if rec["error"] is not None:
                await asyncio.sleep(min(rec["retry_after_s"] or BACKOFF_S, MAX_RETRY_AFTER_S))

    async def progress():
        total = None if duration else clients * per_client
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            failed = sum(r["error"] is not None for r in records)
            print(f"  {label}: {len(records)}{f'/{total}' if total else ''} requests done ({failed} failed), "
                  f"{time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)

    async with target.client(clients) as http:
        t_start = time.perf_counter()
        stop_at = t_start + duration if duration else None
        ticker = asyncio.create_task(progress())
        try:
            await asyncio.gather(*(worker(k) for k in range(clients)))
        finally:
            ticker.cancel()
    return records


async def discover_model(target_url: str, headers: dict, model: str | None, timeout: float) -> str:
    """--model, or the first id GET /v1/models lists; SetupError if the server does not answer."""
    import httpx
    try:
        async with httpx.AsyncClient(base_url=target_url, headers=headers, timeout=min(timeout, 10.0)) as c:
            r = await c.get("/v1/models")
    except httpx.HTTPError as e:
        raise SetupError(f"cannot reach the server at {target_url}: {type(e).__name__}: {e}") from None
    if model:
        return model  # a server without /v1/models (an HTTP error there) still works with --model
    try:
        if r.status_code == 200:
            return r.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    raise SetupError(f"GET {target_url}/v1/models answered HTTP {r.status_code} without a model id "
                     f"({r.text[:200]!r}); give --model")


def print_table(result: dict, out=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console(file=out or sys.stdout)
    if not console.is_terminal:
        console.width = 160  # a file or pipe gets every column on one line

    def ms(x):
        return "-" if x is None else f"{x * 1e3:.1f}"

    def num(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    s = result["settings"]
    t = Table(title=f"{result['model']} at {result['url']}{result['endpoint']}: prompt ~{s['prompt_tokens']} "
                    f"tokens ({s['prompt_words']} words), {s['max_tokens']} generated per request")
    for col in ("clients", "requests", "failed", "gen tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                "ITL p99 ms", "e2e p50 s", "stream tok/s p50"):
        t.add_column(col, justify="right")
    for lv in result["levels"]:
        t.add_row(str(lv["clients"]), str(lv["requests"]), str(lv["failed"]), num(lv["gen_tok_s"]),
                  num(lv["req_s"], "{:.2f}"), ms(lv["ttft_p50_s"]), ms(lv["ttft_p99_s"]), ms(lv["itl_p50_s"]),
                  ms(lv["itl_p99_s"]), num(lv["e2e_p50_s"], "{:.2f}"), num(lv["decode_tok_s_p50"]))
    console.print(t)
    sp = result.get("shared_prefix")
    if sp:
        probe = sp["probe"]
        first = "-" if probe.get("ttft_s") is None else f"{probe['ttft_s'] * 1e3:.1f} ms"
        console.print(f"shared prefix ~{sp['tokens']} tokens: first request's TTFT {first}; later requests' TTFT "
                      "p50 / first's: " + ", ".join(f"{lv['clients']} clients {lv['ttft_p50_over_first']:.2f}"
                                                   for lv in result["levels"] if "ttft_p50_over_first" in lv),
                      markup=False)
    for lv in result["levels"]:
        for kind, e in lv["errors"].items():
            console.print(f"clients={lv['clients']}: {e['count']} x {kind}; first: {e['first']}", markup=False)
        if lv["short"]:
            console.print(f"clients={lv['clients']}: {lv['short']} requests generated fewer than "
                          f"{s['max_tokens']} tokens (does the server honour ignore_eos?)", markup=False)
        if lv["malformed_lines"]:
            console.print(f"clients={lv['clients']}: {lv['malformed_lines']} malformed SSE lines skipped", markup=False)


async def bench(args, levels: list[int]) -> dict:
    url = base_url(args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = await discover_model(url, headers, args.model, args.timeout)
    target = Target(args, url, model)
    epoch = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.warmup:
        for _ in range(12):
            warm = await run_level(target, args.warmup, epoch, ("warmup",), 1, None, "warm-up")
            # a first guess of one token a word can overflow the server's context: halve it and try again
            if target.n_words == 1 or not all(r["error"] == "400" and "context" in (r["error_message"] or "")
                                              for r in warm):
                break
            target.n_words //= 2
            log(f"warm-up: the prompt overflows the server's context; trying {target.n_words} words")
        reported = [r["prompt_tokens"] for r in warm if r["error"] is None and r["prompt_tokens"]]
        if reported:  # words per token differ between tokenizers: scale the prompt to the server's count,
            # rounding down: one token over a server's prompt bucket can double the padded prefill
            target.n_words = max(1, int(target.n_words * args.prompt_tokens / (sum(reported) / len(reported))))
        failed = [r for r in warm if r["error"] is not None]
        log(f"warm-up: {len(warm) - len(failed)}/{len(warm)} ok"
            + (f"; server counts {sum(reported) / len(reported):.0f} prompt tokens -> prompts of {target.n_words} "
               f"words from now on" if reported else "")
            + (f"; first error: {failed[0]['error_message']}" if failed else ""))
    result = {"url": url, "model": model, "endpoint": target.path,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "settings": {"clients": levels, "prompt_tokens": args.prompt_tokens, "prompt_words": target.n_words,
                           "max_tokens": args.max_tokens, "requests_per_client": None if args.duration else
                           args.requests_per_client, "duration_s": args.duration, "temperature": args.temperature,
                           "ignore_eos": args.ignore_eos, "warmup": args.warmup, "timeout_s": args.timeout,
                           "seed": args.seed, "api_key": bool(args.api_key)},  # whether one was sent, not the key
              "levels": [], "requests": []}
    if args.shared_prefix:
        words = max(1, round(args.shared_prefix * target.n_words / args.prompt_tokens))
        target.prefix = make_prompt(words, args.seed, "shared prefix") + "\n\n"
        probe = (await run_level(target, 1, epoch, ("prefix probe",), 1, None, "prefix probe"))[0]
        result["shared_prefix"] = {"tokens": args.shared_prefix, "words": words, "probe": probe}
        log(f"shared prefix of {words} words: the first request (uncached) "
            + (f"had {probe['prompt_tokens']} prompt tokens, TTFT {probe['ttft_s'] * 1e3:.1f} ms"
               if probe["error"] is None and probe["ttft_s"] is not None else f"failed: {probe['error_message']}"))
    for n, clients in enumerate(levels):
        log(f"clients={clients}: "
            + (f"{args.duration:g} s" if args.duration else f"{clients * args.requests_per_client} requests"))
        records = await run_level(target, clients, epoch, ("level", n), args.requests_per_client, args.duration,
                                  f"clients={clients}")
        for r in records:
            r["level"] = n
        lv = {"clients": clients, **summarise(records, args.max_tokens if args.ignore_eos else None)}
        probe_ttft = result.get("shared_prefix", {}).get("probe", {}).get("ttft_s")
        if probe_ttft and lv["ttft_p50_s"] is not None:
            lv["ttft_p50_over_first"] = lv["ttft_p50_s"] / probe_ttft
        result["levels"].append(lv)
        result["requests"].extend(records)
        log(f"clients={clients}: {lv['ok']}/{lv['requests']} ok in {lv['wall_s']:.1f} s, "
            + (f"{lv['gen_tok_s']:.1f} generated tok/s" if lv["gen_tok_s"] else "no throughput"))
    return result


def bench_serve_main(argv=None) -> int:
    ap = Parser(prog="realizar-jax bench-serve", description=__doc__.split("\n")[0].split(": ", 1)[1])
    ap.add_argument("--url", required=True, metavar="URL", help="the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    ap.add_argument("--clients", default="1,8,32,64", metavar="N,N,...",
                    help="comma-separated concurrent client counts, one load level each (default 1,8,32,64)")
    ap.add_argument("--prompt-tokens", type=positive_int, default=128, metavar="N", help="about this many prompt tokens (128)")
    ap.add_argument("--max-tokens", type=positive_int, default=128, metavar="N", help="tokens to generate per request (128)")
    n = ap.add_mutually_exclusive_group()
    n.add_argument("--requests-per-client", type=positive_int, default=4, metavar="N",
                   help="requests each client sends back to back per level (4)")
    n.add_argument("--duration", type=float, metavar="S", help="instead: each level lasts this many seconds")
    ap.add_argument("--model", metavar="NAME", help="model name to send (default: the first id of GET /v1/models)")
    ap.add_argument("--api-key", metavar="KEY", help="sent as 'Authorization: Bearer KEY'")
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                    help="/v1/completions (default) or /v1/chat/completions")
    ap.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature (0: greedy)")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="ask for exactly --max-tokens tokens, past end-of-sequence (default on; "
                         "--no-ignore-eos for servers that reject the field)")
    ap.add_argument("--warmup", type=int, default=1, metavar="N", help="requests sent at once before measuring, which also "
                    "calibrate the prompt length from the server's usage.prompt_tokens (1; 0: none)")
    ap.add_argument("--prompt-words", type=positive_int, metavar="N", help="words per prompt before the warm-up's calibration "
                    "(default: --prompt-tokens)")
    ap.add_argument("--timeout", type=float, default=300.0, metavar="S", help="seconds one request may take in all (300)")
    ap.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random prompt words (0)")
    ap.add_argument("--json", metavar="OUT.json", help="write settings, per-level results and every request's record here")
    ap.add_argument("--shared-prefix", type=positive_int, metavar="N",
                    help="a system prompt of about N tokens before every request's prompt, sent once alone first "
                         "(uncached) and then by every measured request (prefix caching)")
    args = ap.parse_args(argv)
    try:
        levels = parse_clients(args.clients)
    except ValueError as e:
        return fail(ap.prog, e, 2)
    if not args.url.startswith(("http://", "https://")):
        return fail(ap.prog, f"--url must start with http:// or https://, got {args.url!r}", 2)
    if args.duration is not None and args.duration <= 0 or args.timeout <= 0 or args.warmup < 0:
        return fail(ap.prog, "--duration and --timeout must be > 0, --warmup >= 0", 2)
    try:
        result = asyncio.run(bench(args, levels))
    except SetupError as e:
        return fail(ap.prog, e, 2)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not any(lv["ok"] for lv in result["levels"]):
        first = next((r["error_message"] for r in result["requests"] if r["error"]), "no requests sent")
        return fail(ap.prog, f"every request failed; first error: {first}")
    return 0


if __name__ == "__main__":
    sys.exit(bench_serve_main())
