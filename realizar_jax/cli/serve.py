"""realizar-jax serve: the OpenAI-compatible HTTP server (realizar_jax.server) under uvicorn.

SIGTERM or SIGINT drains: /health turns 503, the engine takes no new requests (503), uvicorn stops
accepting connections, and requests already in flight finish before the process exits 0. A second
SIGINT quits at once.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

import uvicorn

from .parser import DTYPES, QUANT_CHOICES, Parser, positive_int, run


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="realizar-jax serve", description="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", help="a .gguf file or HF folder (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port to bind, 0 for any free one (default: 8000)")
    p.add_argument("--max-slots", type=positive_int, default=32, help="requests decoded together (default: 32)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests waiting for a slot before 429 (default: 256)")
    p.add_argument("--max-seq-len", type=positive_int, help="KV-cache length per slot (default: the model's, <= 4096)")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--quantize", choices=QUANT_CHOICES, help="quantize an HF folder's weights as they load "
                   "(the types `convert --quant` writes)")
    p.add_argument("--model-name", help="the id clients pass as `model` (default: the file name without suffix)")
    p.add_argument("--decode-chunk", type=positive_int, default=4,
                   help="decode steps per device call; tokens stream paced over each chunk (default: 4)")
    p.add_argument("--warmup", type=_warmup, default="all", metavar="all|none|N,N,...",
                   help="compile before listening: every prompt bucket (all, the default), none, or the buckets "
                        "of these prompt lengths")
    p.add_argument("--request-timeout", type=_seconds, metavar="S",
                   help="end a request after S seconds (finish_reason 'timeout'); default: no limit")
    p.add_argument("--kv-cache-memory", type=_gib, metavar="GB",
                   help="device memory of the KV-cache page pool, in GiB (default: enough for every slot at "
                        "--max-seq-len; with less, requests hold only the pages they fill and the newest is "
                        "preempted and recomputed when the pool runs out)")
    p.add_argument("--page-size", type=_page_size, default=16, metavar="N",
                   help="positions per KV-cache page, a power of two (default: 16)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse the cached KV pages of a repeated prompt prefix (on by default)")
    return p


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of GiB, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text}")
    return value


def _page_size(text: str) -> int:
    value = positive_int(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number of seconds, got {text}")
    return value


def _warmup(text: str):
    if text in ("all", "none"):
        return text
    try:
        lengths = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"all, none or comma-separated prompt lengths, got {text!r}") from None
    if not all(n > 0 for n in lengths):
        raise argparse.ArgumentTypeError(f"prompt lengths must be positive, got {text!r}")
    return lengths


class Server(uvicorn.Server):
    """uvicorn.Server that drains the engine on the first signal and exits 0 afterwards (uvicorn's own
    signal capture re-raises the signal after shutdown, which would end the process by it)."""

    def __init__(self, config: uvicorn.Config, app, engine):
        super().__init__(config)
        self.app, self.engine, self.closer = app, engine, None

    def handle_exit(self, sig, frame):
        if self.closer is None:
            self.app.state.draining = True
            # close(drain=True) blocks until in-flight requests finish: not here, on the loop's thread.
            self.closer = threading.Thread(target=self.engine.close, kwargs={"drain": True}, daemon=True)
            self.closer.start()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"realizar-jax serve: {self.app.state.model_name} ready on http://{host}:{port}/v1 "
                  f"(OpenAI API; /health, /metrics)", file=sys.stderr, flush=True)


def cmd_serve(args) -> int:
    import realizar_jax as rj
    from ..server import create_app
    from .main import _resolve_model
    path = _resolve_model(args.model)
    model = rj.load(path, dtype=args.dtype, max_seq_len=args.max_seq_len, quantize=args.quantize)
    name = args.model_name or ("realizar-jax-default" if args.model is None else (path.stem or path.name))
    engine = model.engine(max_slots=args.max_slots, max_queue=args.max_queue, decode_chunk=args.decode_chunk,
                          kv_cache_memory=args.kv_cache_memory, page_size=args.page_size,
                          prefix_cache=args.prefix_cache)
    print(f"realizar-jax serve: KV cache {engine.pool.usable} pages of {engine.page_size} positions "
          f"({engine.pool.usable * engine.page_size} tokens), prefix cache {'on' if args.prefix_cache else 'off'}",
          file=sys.stderr, flush=True)
    if args.warmup != "none":
        print(f"realizar-jax serve: compiling ({args.max_slots} slots) ...", file=sys.stderr, flush=True)
        seconds = engine.warmup(None if args.warmup == "all" else args.warmup)
        print(f"realizar-jax serve: compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
    app = create_app(engine, name, model=model, request_timeout=args.request_timeout)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                    access_log=False, timeout_graceful_shutdown=None), app, engine)
    try:
        server.run()
    finally:
        engine.close(drain=True)
    return 0


def serve_main(argv) -> int:
    args = build_parser().parse_args(argv)
    return run("realizar-jax serve", cmd_serve, args)
