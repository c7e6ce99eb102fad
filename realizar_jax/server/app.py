"""The OpenAI-compatible HTTP API over one serving Engine: /v1/completions, /v1/chat/completions (JSON
or SSE), /v1/models, /health, /metrics.

The event loop never waits on the engine: results come through RequestHandle.events()/completion(),
and tokenizing or templating a prompt (up to the body cap, and a template may run for seconds) goes to
a worker thread. A client that goes away cancels its engine requests, so its slots are freed at the
next chunk boundary instead of generating for nobody.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import ChatTemplateError
from ..serving.requests import (ContextLengthError, EngineClosedError, OptionError, QueueFullError,
                                SamplingOptions)
from .metrics import ServerMetrics
from .schema import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                     ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessage, ChatTokenLogprob,
                     CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ModelCard,
                     ModelList, RequestError, TopLogprob, Usage, error_body, parse_json, parse_request)

MAX_BODY_BYTES = 4 * 2**20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# The engine's finish reasons in OpenAI's words; 'cancelled' and 'timeout' have none and pass through.
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def create_app(engine, model_name: str, *, model=None, max_body_bytes: int = MAX_BODY_BYTES,
               request_timeout: float | None = None) -> FastAPI:
    """An app serving `engine` (a realizar_jax.serving.Engine) as `model_name`. `model` defaults to
    engine.model (its tokenizer and chat template). /health is 503 once engine.closed or
    app.state.draining (set by `realizar-jax serve` when a shutdown starts)."""
    model = model if model is not None else engine.model
    tok = model.tokenizer
    max_seq_len = int(getattr(engine, "max_seq_len", model.max_seq_len))
    metrics = ServerMetrics(engine)
    created = int(time.time())
    app = FastAPI(title="realizar-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.draining = engine, metrics, False
    app.state.model_name = model_name

    def error_response(e: RequestError) -> JSONResponse:
        metrics.error(e.status)
        headers = {"Retry-After": str(e.retry_after)} if getattr(e, "retry_after", None) is not None else None
        message = e.message if not e.param or e.param in e.message else f"{e.param}: {e.message}"
        return JSONResponse(error_body(message, e.type, e.param, e.code), e.status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(RequestError(f"{request.method} {request.url.path}: {e.detail}", status=e.status_code,
                                           type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):  # FastAPI's 422, in OpenAI's 400 shape
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": str(e)}
        param = ".".join(str(p) for p in err["loc"][1:]) or None
        return error_response(RequestError(f"{param}: {err['msg']}" if param else err["msg"], param))

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        return error_response(RequestError(f"internal error: {type(e).__name__}: {e}", status=500,
                                           type="server_error"))

    async def read_request(request: Request, cls):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise RequestError(f"request body over {max_body_bytes} bytes", status=413)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise RequestError(f"request body over {max_body_bytes} bytes", status=413)
                chunks.append(chunk)
        except ClientDisconnect:  # gone before the body was complete: nobody reads the answer; not our error
            raise RequestError("the client disconnected before sending the whole body", status=499) from None
        req = parse_request(cls, parse_json(b"".join(chunks)))
        if req.model is not None and req.model != model_name:
            raise RequestError(f"the model {req.model!r:.100} does not exist; this server has {model_name!r}",
                               "model", 404, "model_not_found", "not_found_error")
        return req

    def options(req, max_tokens: int, logprobs: int | None) -> SamplingOptions:
        try:
            return SamplingOptions(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                   top_k=max(0, req.top_k), min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                                   presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                   seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                                   ignore_eos=req.ignore_eos, logprobs=logprobs, n=req.n)
        except OptionError as e:
            raise RequestError(str(e), e.param) from None

    async def submit(prompts, opts: SamplingOptions, prompt_param: str) -> list:
        """One engine request per prompt; if one is refused, the ones already in are cancelled."""
        handles = []
        try:
            for p in prompts:
                handles.append(await to_thread.run_sync(engine.submit, p, opts, request_timeout))
        except BaseException as e:
            for h in handles:
                h.cancel()
            raise engine_error(e, prompt_param) from None
        return handles

    def engine_error(e: BaseException, prompt_param: str) -> BaseException:
        if isinstance(e, QueueFullError):
            err = RequestError(str(e), status=429, code="rate_limit_exceeded", type="rate_limit_error")
            err.retry_after = max(1, math.ceil(e.retry_after))
            return err
        if isinstance(e, ContextLengthError):
            return RequestError(str(e), prompt_param if e.param == "prompt" else e.param,
                                code="context_length_exceeded")
        if isinstance(e, OptionError):
            return RequestError(str(e), e.param)
        if isinstance(e, EngineClosedError):
            return RequestError(str(e), status=503, code="engine_closed", type="service_unavailable_error")
        if isinstance(e, (TypeError, ValueError)):  # a prompt the model refuses (token id out of range, ...)
            return RequestError(str(e), prompt_param)
        return e

    def done(handles, finish_reasons) -> None:
        """Record and release: a handle not finished yet (the client left, or an error) is cancelled."""
        for h, reasons in zip(handles, finish_reasons):
            if h.stats.finished is None:
                h.cancel()
                reasons = [r or "cancelled" for r in reasons]
            metrics.finished(h.stats, reasons)

    def text_of(tid: int) -> tuple[str, bytes]:
        data = tok._token_bytes(int(tid))
        try:
            return data.decode("utf-8"), data
        except UnicodeDecodeError:  # part of a character: OpenAI's "bytes:\xNN" spelling
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data), data

    def completion_logprobs(lps, decoder, offset: list[int]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for lp in lps:
            piece = text_of(lp.token_id)[0]
            out.tokens.append(piece)
            out.token_logprobs.append(lp.logprob)
            # OpenAI: the sampled token is always there, so up to logprobs + 1 entries
            out.top_logprobs.append({**{text_of(t)[0]: v for t, v in lp.top}, piece: lp.logprob})
            out.text_offset.append(offset[0])
            offset[0] += len(decoder.push(lp.token_id))
        return out

    def chat_logprobs(lps, k: int) -> ChatLogprobs:
        def entry(tid, logprob):
            text, data = text_of(tid)
            return dict(token=text, logprob=logprob, bytes=list(data))
        return ChatLogprobs(content=[ChatTokenLogprob(**entry(lp.token_id, lp.logprob),
                                                      top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top[:k]])
                                     for lp in lps])

    def usage(handles) -> Usage:
        p = sum(len(h.prompt_token_ids) for h in handles)
        c = sum(h.stats.generated_tokens for h in handles)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    # ---- endpoints ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if app.state.draining or getattr(engine, "closed", False):
            return JSONResponse({"status": "draining"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=model_name, created=created, max_model_len=max_seq_len)]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_request(request, CompletionRequest)
        opts = options(req, req.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS, req.logprobs)
        handles = await submit(req.prompt, opts, "prompt")
        echo = [(p if isinstance(p, str) else tok.decode(p)) if req.echo else "" for p in req.prompt]
        rid, n = f"cmpl-{uuid.uuid4().hex}", req.n
        decoders = [tok.stream_decoder() for _ in range(len(handles) * n)]
        offsets = [[len(e)] for e in echo for _ in range(n)]

        def logprobs(index, lps):
            return None if req.logprobs is None else completion_logprobs(lps or (), decoders[index], offsets[index])

        def chunk(choices, use=None):
            body = CompletionResponse(id=rid, created=int(time.time()), model=model_name, choices=choices, usage=use)
            return body.model_dump_json(exclude=None if req.include_usage else {"usage"})

        if req.stream:
            reasons = _reasons(handles)

            async def events():
                for i, text in enumerate(echo):
                    for c in range(n) if text else ():
                        yield chunk([CompletionChoice(index=i * n + c, text=text)])
                async for i, ev in merged(handles, reasons):
                    index = i * n + ev.choice
                    if ev.text or ev.finish_reason or ev.logprobs:
                        yield chunk([CompletionChoice(index=index, text=ev.text, logprobs=logprobs(index, ev.logprobs),
                                                      finish_reason=FINISH.get(ev.finish_reason, ev.finish_reason))])
                if req.include_usage:
                    yield chunk([], usage(handles))
            return sse(events(), handles, reasons, done)

        comps = await until_disconnect(request, handles, done)
        if comps is None:
            return Response(status_code=499)  # nobody is there to read it
        choices = [CompletionChoice(index=i * n + c.index, text=echo[i] + c.text,
                                    logprobs=logprobs(i * n + c.index, c.logprobs), finish_reason=FINISH.get(
                                        c.finish_reason, c.finish_reason))
                   for i, comp in enumerate(comps) for c in comp.choices]
        return Response(CompletionResponse(id=rid, created=int(time.time()), model=model_name, choices=choices,
                                           usage=usage(handles)).model_dump_json(), media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_request(request, ChatCompletionRequest)
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        try:
            ids = await to_thread.run_sync(model.encode_chat, messages)
        except ChatTemplateError as e:
            raise RequestError(str(e), "messages") from None
        # OpenAI's default is "as many as fit": the rest of the context (at least 1, so the engine names
        # an over-long prompt itself).
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, max_seq_len - len(ids))
        k = req.top_logprobs or 0
        opts = options(req, max_tokens, k if req.logprobs else None)
        handles = await submit([ids], opts, "messages")
        rid, h = f"chatcmpl-{uuid.uuid4().hex}", handles[0]

        def chunk(choices, use=None):
            body = ChatCompletionChunk(id=rid, created=int(time.time()), model=model_name, choices=choices, usage=use)
            return body.model_dump_json(exclude=None if req.include_usage else {"usage"})

        if req.stream:
            reasons = _reasons(handles)

            async def events():
                for c in range(req.n):
                    yield chunk([ChatChunkChoice(index=c, delta=ChatDelta(role="assistant", content=""))])
                async for _, ev in merged(handles, reasons):
                    lp = chat_logprobs(ev.logprobs or (), k) if req.logprobs else None
                    if ev.text or lp and lp.content:
                        yield chunk([ChatChunkChoice(index=ev.choice, delta=ChatDelta(content=ev.text), logprobs=lp)])
                    if ev.finish_reason:
                        yield chunk([ChatChunkChoice(index=ev.choice, delta=ChatDelta(),
                                                     finish_reason=FINISH.get(ev.finish_reason, ev.finish_reason))])
                if req.include_usage:
                    yield chunk([], usage(handles))
            return sse(events(), handles, reasons, done)

        comps = await until_disconnect(request, handles, done)
        if comps is None:
            return Response(status_code=499)
        choices = [ChatChoice(index=c.index, message=ChatMessage(content=c.text),
                              logprobs=chat_logprobs(c.logprobs or (), k) if req.logprobs else None,
                              finish_reason=FINISH.get(c.finish_reason, c.finish_reason))
                   for c in comps[0].choices]
        return Response(ChatCompletionResponse(id=rid, created=int(time.time()), model=model_name, choices=choices,
                                               usage=usage([h])).model_dump_json(), media_type="application/json")

    return app


async def merged(handles, reasons):
    """(handle index, Event) from all handles as they come, each choice's finish_reason noted in
    reasons[handle][choice]; an engine error ('error' finish) raises EngineRequestError."""
    def noted(i, ev):
        if ev.finish_reason:
            reasons[i][ev.choice] = ev.finish_reason
        if ev.finish_reason == "error":
            raise EngineRequestError(ev.error or "the engine failed this request")
        return i, ev

    if len(handles) == 1:   # the usual request: its events as they come, without a task and a queue
        async for ev in handles[0].events():
            yield noted(0, ev)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        try:
            async for ev in h.events():
                await queue.put((i, ev))
        except BaseException as e:
            await queue.put((i, e))
            raise
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(tasks)
        while left:
            i, ev = await queue.get()
            if ev is None:
                left -= 1
            elif isinstance(ev, BaseException):
                raise ev
            else:
                yield noted(i, ev)
    finally:
        for t in tasks:
            t.cancel()


class EngineRequestError(RuntimeError):
    """The engine ended a request with finish_reason 'error' (a bug or a device failure, HTTP 500)."""


def _reasons(handles) -> list[list]:
    return [[None] * h.n for h in handles]


def sse(events, handles, reasons, done) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`. An engine failure mid-stream
    becomes an OpenAI error object in the stream (the 200 status is already sent)."""
    async def body():
        try:
            async for data in events:
                yield f"data: {data}\n\n"
        except EngineRequestError as e:
            yield "data: " + json.dumps(error_body(str(e), "server_error"), ensure_ascii=False) + "\n\n"
        finally:  # also when the client left and the response task was cancelled
            done(handles, reasons)
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def until_disconnect(request: Request, handles, done):
    """The handles' Completions, or None when the client disconnected first (then they are cancelled)."""
    work = asyncio.ensure_future(asyncio.gather(*(h.completion() for h in handles)))

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.create_task(disconnected())
    comps = None
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            comps = work.result()
    finally:
        watch.cancel()
        work.cancel()
        done(handles, [[c.finish_reason for c in comp.choices] for comp in comps] if comps else _reasons(handles))
    for comp in comps or ():
        bad = [c for c in comp.choices if c.finish_reason == "error"]
        if bad:
            raise RequestError("the engine failed this request", status=500, type="server_error")
    return comps

