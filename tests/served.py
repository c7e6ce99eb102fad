"""uvicorn serving an app on loopback in a background thread, for tests that call the server over HTTP."""
from __future__ import annotations

import threading
import time

import uvicorn


class Served:
    """uvicorn serving `app` on 127.0.0.1 with an ephemeral port, in a background thread."""

    def __init__(self, app, server_cls=uvicorn.Server, server_kw=None):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = server_cls(config, **(server_kw or {}))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() - t0 < 30, "uvicorn did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
