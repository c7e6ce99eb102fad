"""The HTTP layer's tokens/s ceiling with no model: the real app (`create_app`) over real RequestHandles
that a producer thread feeds as the scheduler does (CHUNK tokens per stream every PERIOD seconds, each
chunk's tokens released over its duration), so `bench-serve` against it measures the server's (and its
own) per-token work. Defaults: run 54's 64-slot step (10.7 ms) and decode chunk (4): 5,980 tok/s offered
at 64 streams.

    PYTHONPATH=. python scripts/http_ceiling.py --port 8130 &
    realizar-jax bench-serve --url http://127.0.0.1:8130 --clients 1,64 --prompt-tokens 16 --max-tokens 128
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
import types
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import realizar_jax as rj  # noqa: E402
from fake_engine import FakeEngine  # noqa: E402  (its submit/metrics/close contract)
from realizar_jax.server.app import create_app  # noqa: E402
from realizar_jax.serving.requests import Event  # noqa: E402
from realizar_jax.serving.scheduler import RequestHandle  # noqa: E402


class FedEngine(FakeEngine):
    def __init__(self, model, period: float, chunk: int):
        super().__init__(model, max_queue=4096)
        self.steps = types.SimpleNamespace(compile_seconds=0.0)   # what RequestHandle reads of its engine
        self.period, self.chunk, self.live, self.lock = period, chunk, [], threading.Lock()
        threading.Thread(target=self._produce, daemon=True).start()

    def submit(self, prompt, options, deadline_s=None):
        h = RequestHandle(self, tuple(self.model.encode(prompt)), options, None)
        h.choices = [types.SimpleNamespace(finish=None)]
        h.stats.admitted, h.left = time.perf_counter(), options.max_tokens
        with self.lock:
            self.live.append(h)
        return h

    def _produce(self):
        while True:
            t0 = time.perf_counter()
            with self.lock:
                live = list(self.live)
            for h in live:
                for j in range(min(self.chunk, h.left)):
                    h.left -= 1
                    finish = "length" if h.left == 0 else None
                    if finish:
                        h.choices[0].finish = finish
                    h.stats.generated_tokens += 1
                    h.stats.first_token = h.stats.first_token or time.perf_counter()
                    h._push(Event(0, " tok", (5,), None, finish), t0 + j * self.period / self.chunk)
            with self.lock:
                self.live = [h for h in self.live if h.left > 0]
            time.sleep(max(0.0, self.period - (time.perf_counter() - t0)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8130)
    ap.add_argument("--period", type=float, default=0.0428, help="seconds per decode chunk (0.0428)")
    ap.add_argument("--chunk", type=int, default=4, help="tokens per stream per chunk (4)")
    args = ap.parse_args()
    model = rj.load(rj.default_model_path(), dtype="float32")
    uvicorn.run(create_app(FedEngine(model, args.period, args.chunk), "fed", model=model), host="127.0.0.1",
                port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
